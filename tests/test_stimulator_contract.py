"""The contract every stimulator driver must meet (run against each driver that exists).

New drivers (TTL, Magstim, MagVenture; against their emulators on pseudo-terminals) add a
factory to DRIVERS and must pass the same tests unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pylsl
import pytest

from closedloop.errors import StimulatorError
from closedloop.stim.base import Stimulator
from closedloop.stim.simulated import SimulatedStimulator
from tests.conftest import unique

pytestmark = pytest.mark.lsl

DRIVERS: dict[str, Callable[[], Stimulator]] = {
    "simulated": lambda: SimulatedStimulator(coil_stream=unique("contract-coil")),
}


@pytest.fixture(params=sorted(DRIVERS))
def driver(request: pytest.FixtureRequest) -> Iterator[Stimulator]:
    d = DRIVERS[request.param]()
    d.open()
    yield d
    d.close()


def test_is_a_stimulator(driver: Stimulator) -> None:
    assert isinstance(driver, Stimulator)
    assert driver.name
    assert driver.latency_s >= 0.0


def test_fires_only_when_armed(driver: Stimulator) -> None:
    driver.set_intensity(40.0)
    with pytest.raises(StimulatorError):
        driver.fire()
    driver.arm()
    before = pylsl.local_clock()
    t = driver.fire()
    assert before <= t <= pylsl.local_clock() + driver.latency_s + 0.01
    driver.disarm()
    with pytest.raises(StimulatorError):
        driver.fire()


def test_disarm_and_close_are_idempotent(driver: Stimulator) -> None:
    driver.disarm()
    driver.disarm()
    driver.close()
    driver.close()
    with pytest.raises(StimulatorError):
        driver.fire()
