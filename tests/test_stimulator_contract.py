"""The contract every stimulator driver must meet, run against each driver.

The simulated driver is the reference; the serial drivers run against their protocol
emulators on pseudo-terminal pairs (tools/stim_emulator.py) and must pass the same tests
unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pylsl
import pytest

from closedloop.config.schema import StimulatorConfig
from closedloop.errors import StimulatorError
from closedloop.stim.base import Stimulator
from closedloop.stim.factory import DRIVER_NAMES, make_driver
from tests.conftest import unique
from tools.stim_emulator import Emulator, make_emulator

pytestmark = pytest.mark.lsl

EMULATED = {"ttl": "ttl-byte", "magstim-200": "magstim-200",
            "magstim-bistim": "magstim-bistim", "magstim-rapid": "magstim-rapid",
            "magventure": "magventure"}


@pytest.fixture(params=DRIVER_NAMES)
def driver(request: pytest.FixtureRequest) -> Iterator[Stimulator]:
    name = request.param
    emu: Emulator | None = None
    if name == "simulated":
        cfg = StimulatorConfig(coil_stream=unique("contract-coil"))
    else:
        emu = make_emulator(EMULATED[name]).start()
        cfg = StimulatorConfig(driver=name, port=emu.port, ttl_line="byte")
    d = make_driver(cfg)
    d.open()
    yield d
    d.close()
    if emu is not None:
        emu.stop()


def wait_ready(d: Stimulator, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while not d.ready and time.monotonic() < end:
        time.sleep(0.01)
    return d.ready


def test_is_a_stimulator(driver: Stimulator) -> None:
    assert isinstance(driver, Stimulator)
    assert driver.name in DRIVER_NAMES
    assert driver.latency_s >= 0.0
    assert driver.trigger_route
    st = driver.status()
    assert st["driver"] == driver.name and st["fault"] is None


def test_fires_only_when_armed(driver: Stimulator) -> None:
    assert driver.set_intensity(40.0) == 40.0
    assert not driver.ready
    with pytest.raises(StimulatorError):
        driver.fire()
    driver.arm()
    assert wait_ready(driver)
    before = pylsl.local_clock()
    t = driver.fire()
    assert before <= t <= pylsl.local_clock() + driver.latency_s + 0.01
    driver.disarm()
    assert not driver.ready
    with pytest.raises(StimulatorError):
        driver.fire()


def test_disarm_and_close_are_idempotent(driver: Stimulator) -> None:
    driver.disarm()
    driver.disarm()
    driver.close()
    driver.close()
    with pytest.raises(StimulatorError):
        driver.fire()


def test_paired_only_where_supported(driver: Stimulator) -> None:
    if driver.supports_paired:
        driver.set_paired(30.0, 60.0, 3.0)
    else:
        with pytest.raises(StimulatorError, match="paired"):
            driver.set_paired(30.0, 60.0, 3.0)


def test_fault_handler_is_called_once(driver: Stimulator) -> None:
    seen: list[str] = []
    driver.set_fault_handler(seen.append)
    driver.report_fault("test fault")
    driver.report_fault("second fault")
    assert seen == ["test fault"]
    assert driver.fault == "test fault"
    assert not driver.ready
