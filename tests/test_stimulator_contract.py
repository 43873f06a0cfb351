"""The contract every stimulator driver must meet, run against each driver.

The simulated driver is the reference; the serial drivers run against their protocol
emulators on pseudo-terminal pairs (tools/stim_emulator.py) and must pass the same tests
unchanged. The device-truth cases turn a knob on the device (the emulator's front panel,
or the simulated device's) and expect every driver that can read its device back to see it;
the ttl driver cannot, and says so (``source = "declared"``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pylsl
import pytest

from closedloop.config.schema import StimulatorConfig
from closedloop.errors import StimulatorError
from closedloop.stim.base import DeviceState, Stimulator
from closedloop.stim.factory import DRIVER_NAMES, make_driver
from closedloop.stim.simulated import SimulatedStimulator
from tests.conftest import unique
from tools.stim_emulator import (
    Emulator,
    MagstimEmulator,
    MagVentureEmulator,
    make_emulator,
)

pytestmark = pytest.mark.lsl

EMULATED = {"ttl": "ttl-byte", "magstim-200": "magstim-200",
            "magstim-bistim": "magstim-bistim", "magstim-rapid": "magstim-rapid",
            "magventure": "magventure"}


@pytest.fixture(params=DRIVER_NAMES)
def rig(request: pytest.FixtureRequest) -> Iterator[tuple[Stimulator, Emulator | None]]:
    name = request.param
    emu: Emulator | None = None
    if name == "simulated":
        cfg = StimulatorConfig(coil_stream=unique("contract-coil"))
    else:
        emu = make_emulator(EMULATED[name]).start()
        cfg = StimulatorConfig(driver=name, port=emu.port, ttl_line="byte", poll_ms=200.0)
    d = make_driver(cfg)
    d.open()
    yield d, emu
    d.close()
    if emu is not None:
        emu.stop()


@pytest.fixture
def driver(rig: tuple[Stimulator, Emulator | None]) -> Stimulator:
    return rig[0]


def turn_knob(d: Stimulator, emu: Emulator | None, pct: int) -> bool:
    """Turn output A on the device's front panel; False if this device has none to read."""
    if isinstance(d, SimulatedStimulator):
        d.turn_knob(pct)
    elif isinstance(emu, (MagstimEmulator, MagVentureEmulator)):
        emu.turn_knob(pct)
    else:
        return False
    return True


def wait_fault(d: Stimulator, timeout: float = 3.0) -> str | None:
    end = time.monotonic() + timeout
    while d.fault is None and time.monotonic() < end:
        time.sleep(0.01)
    return d.fault


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


# -- device truth ------------------------------------------------------------------------
def test_device_is_read_back_at_open_and_after_every_setting(driver: Stimulator) -> None:
    first = driver.device
    assert isinstance(first, DeviceState)
    assert first.source == ("declared" if driver.name == "ttl" else "device")
    assert driver.set_intensity(40.0) == 40.0
    dev = driver.device
    assert dev is not None
    assert (dev.intensity_pct, dev.pulses_per_trigger, dev.isi_ms, dev.max_pct) == (
        40.0, 1, None, 40.0)
    st = driver.status()
    assert st["intensity_pct"] == 40.0 and st["commanded_intensity_pct"] == 40.0
    assert st["device"]["intensity_pct"] == 40.0
    again = driver.read_device()
    assert again.intensity_pct == 40.0 and again.read_at >= dev.read_at


def test_paired_is_read_back_as_two_pulses(driver: Stimulator) -> None:
    if not driver.supports_paired:
        pytest.skip(f"{driver.name} gives no paired pulses (test_paired_only_where_supported)")
    driver.set_paired(30.0, 60.0, 3.0)
    dev = driver.device
    assert dev is not None
    assert (dev.pulses_per_trigger, dev.isi_ms, dev.max_pct) == (2, 3.0, 60.0)
    driver.set_intensity(40.0)  # back to one pulse a trigger
    dev = driver.device
    assert dev is not None and (dev.pulses_per_trigger, dev.max_pct) == (1, 40.0)


def test_knob_turned_after_arming_is_a_fault(rig: tuple[Stimulator, Emulator | None]) -> None:
    d, emu = rig
    seen: list[str] = []
    d.set_fault_handler(seen.append)
    d.set_intensity(40.0)
    d.arm()
    assert wait_ready(d)
    if not turn_knob(d, emu, 70):
        assert d.name == "ttl"  # a TTL line cannot read the device: the declaration stays
        dev = d.read_device()
        assert dev.source == "declared" and dev.intensity_pct == 40.0
        return
    fault = wait_fault(d)
    assert fault is not None and "commanded 40 %" in fault and "device reads 70 %" in fault
    assert seen == [fault]
    assert not d.ready
    now = d.device
    assert now is not None and now.intensity_pct == 70.0
    assert d.status()["intensity_pct"] == 70.0
    d.disarm()  # in fault: still safe, and the device still disarmed
    assert not d.ready
