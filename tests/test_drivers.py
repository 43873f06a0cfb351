"""Serial drivers against their protocol emulators on pseudo-terminal pairs.

The emulators (tools/stim_emulator.py) serve the device protocol on the master side of a
pty; the drivers open the slave through pyserial, so the real serial stack is in the path.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from closedloop.errors import StimulatorError
from closedloop.stim.magstim import MagstimStimulator, crc, frame
from closedloop.stim.magventure import MagVentureStimulator, crc8
from closedloop.stim.ttl import TtlLine, TtlStimulator
from tools.stim_emulator import (
    MagstimEmulator,
    MagVentureEmulator,
    TriggerBoxEmulator,
)


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def faults() -> list[str]:
    return []


def magstim(model: str, faults: list[str], **kw: object) -> Iterator[
        tuple[MagstimEmulator, MagstimStimulator]]:
    emu = MagstimEmulator(model, **kw).start()  # type: ignore[arg-type]
    drv = MagstimStimulator(port=emu.port, model=model,  # type: ignore[arg-type]
                            unlock_code=str(kw.get("unlock_code", "")))
    drv.set_fault_handler(faults.append)
    try:
        yield emu, drv
    finally:
        drv.close()
        emu.stop()


device = contextlib.contextmanager(magstim)


@pytest.fixture(params=["200", "bistim", "rapid"])
def ms(request: pytest.FixtureRequest, faults: list[str]) -> Iterator[
        tuple[MagstimEmulator, MagstimStimulator]]:
    yield from magstim(request.param, faults)


# -- protocol details ----------------------------------------------------------------------
def test_magstim_crc_and_frame() -> None:
    # 'Q' 0x51 + '@' 0x40 = 0x91 -> one's complement 0x6E
    assert frame("Q") == b"Q@\x6e"
    assert crc(b"J@") == (~(ord("J") + ord("@"))) & 0xFF
    assert frame("@", "050")[-1] == crc(b"@050")


def test_magventure_crc8_is_dallas_maxim() -> None:
    assert crc8(b"123456789") == 0xA1  # the CRC-8/MAXIM check value
    assert crc8(b"") == 0


# -- Magstim ------------------------------------------------------------------------------
@pytest.mark.timing
def test_magstim_session(ms: tuple[MagstimEmulator, MagstimStimulator]) -> None:
    emu, drv = ms
    drv.open()
    assert emu.remote
    assert drv.set_intensity(42.4) == 42.0
    assert emu.power_a == 42
    assert drv.coil_temperature_c == pytest.approx(24.0)
    drv.arm()
    assert wait_for(lambda: drv.ready)
    t = drv.fire()
    assert len(emu.fired) == 1
    # the serial route: the pulse leaves one command's wire time after the write
    assert t - emu.fired[0] == pytest.approx(drv.latency_s, abs=0.002)
    drv.disarm()
    assert not emu.armed and not emu.ready
    with pytest.raises(StimulatorError, match="not armed"):
        drv.fire()
    st = drv.status()
    assert st["driver"] == f"magstim-{drv.model}" and st["trigger_route"] == "serial"


def test_magstim_keepalive_holds_the_device_armed(faults: list[str]) -> None:
    with device("200", faults, watchdog_s=0.6) as (emu, drv):
        drv.open()
        drv.arm()
        time.sleep(1.5)  # > 2 device watchdog periods: only the keep-alive keeps it armed
        assert emu.disarmed_by_watchdog == 0
        assert drv.ready and drv.keepalives >= 2
        assert faults == []


def test_magstim_device_disarms_itself_without_keepalive(faults: list[str]) -> None:
    with device("200", faults, watchdog_s=0.3) as (emu, drv):
        drv.keepalive_s = 0.5  # slower than this device's watchdog
        drv.open()
        drv.arm()
        assert wait_for(lambda: bool(faults), 3.0)
        assert emu.disarmed_by_watchdog >= 1
        assert "disarmed itself" in faults[0] or "remote" in faults[0]
        assert not drv.ready


def test_magstim_error_replies(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        drv.open()
        with pytest.raises(StimulatorError, match="outside"):
            drv.set_intensity(120)
        emu.fault = "refuse"
        with pytest.raises(StimulatorError, match="not allowed in the current state"):
            drv.command("J")
        emu.fault = "bad_crc"
        with pytest.raises(StimulatorError, match="bad checksum"):
            drv.command("J")
        emu.fault = None
        # a command with a corrupt checksum is answered with '?'
        reply = drv.link.transact(b"J@\x00", lambda d: drv.link.read_exact(3, d))
        assert reply[:2] == b"J?" and reply[2] == crc(b"J?")
        with pytest.raises(StimulatorError, match="not understood or bad checksum"):
            drv.command("@", "abc")


def test_magstim_write_not_applied_is_caught(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        drv.open()
        emu.fault = "ignore_writes"
        with pytest.raises(StimulatorError, match="device reads 30%"):
            drv.set_intensity(55)


def test_magstim_silent_device(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        emu.fault = "silent"
        t0 = time.monotonic()
        with pytest.raises(StimulatorError, match="no answer"):
            drv.open()
        assert time.monotonic() - t0 < 2.0  # a deadline, not a hang
    with device("bistim", faults) as (emu, drv):
        drv.open()
        drv.arm()
        emu.fault = "silent"  # stops answering mid-session
        assert wait_for(lambda: bool(faults), 3.0)
        assert "keep-alive" in faults[0] and "no answer" in faults[0]
        assert not drv.ready


def test_magstim_cable_pulled(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        drv.open()
        drv.arm()
        assert wait_for(lambda: drv.ready)
        emu.unplug()
        assert wait_for(lambda: bool(faults), 3.0)
        with pytest.raises(StimulatorError):
            drv.fire()
        drv.disarm()  # never raises, even with the port gone


def test_bistim_paired_pulse_and_high_resolution(faults: list[str]) -> None:
    with device("bistim", faults) as (emu, drv):
        drv.open()
        drv.set_paired(35, 65, 2.5)
        assert (emu.power_a, emu.power_b, emu.interval, emu.hr) == (35, 65, 25, True)
        drv.set_paired(35, 65, 12)
        assert (emu.interval, emu.hr) == (12, False)
        with pytest.raises(StimulatorError, match="interval"):
            drv.set_paired(35, 65, 1500)


def test_rapid_unlock_code_and_train(faults: list[str]) -> None:
    with device("rapid", faults, unlock_code="1234-5678") as (emu, drv):
        drv.open()
        assert drv.configure_train(10.0, 20)["train_pulses"] == 20
        assert (emu.freq10, emu.pulses, emu.dur10) == (100, 20, 20)
        time.sleep(0.7)
        assert drv.keepalives >= 1 and faults == []
    emu = MagstimEmulator("rapid", unlock_code="1234-5678").start()
    wrong = MagstimStimulator(port=emu.port, model="rapid", unlock_code="9999-9999")
    try:
        with pytest.raises(StimulatorError):
            wrong.open()
    finally:
        wrong.close()
        emu.stop()


@pytest.mark.timing
def test_magstim_ttl_trigger_route(faults: list[str]) -> None:
    box = TriggerBoxEmulator().start()
    emu = MagstimEmulator("200").start()
    drv = MagstimStimulator(port=emu.port, trigger=TtlLine(box.port, line="byte",
                                                            width_s=0.001))
    try:
        drv.open()
        drv.arm()
        assert wait_for(lambda: drv.ready)
        t = drv.fire()
        assert wait_for(lambda: len(box.edges) == 1)
        assert emu.fired == []  # fired by the line, not by the serial command
        assert abs(t - box.edges[0][0]) < 0.002
        assert drv.trigger_route == "ttl:byte"
    finally:
        drv.close()
        emu.stop()
        box.stop()


# -- MagVenture ---------------------------------------------------------------------------
@pytest.fixture
def mv(faults: list[str]) -> Iterator[tuple[MagVentureEmulator, MagVentureStimulator]]:
    emu = MagVentureEmulator().start()
    drv = MagVentureStimulator(port=emu.port, poll_s=0.2)
    drv.set_fault_handler(faults.append)
    yield emu, drv
    drv.close()
    emu.stop()


def test_magventure_session(mv: tuple[MagVentureEmulator, MagVentureStimulator]) -> None:
    emu, drv = mv
    emu.chatty = True  # frames of its own in between: skipped
    drv.open()
    assert drv.set_intensity(57) == 57.0 and emu.amp_a == 57
    drv.arm()
    assert emu.enabled and drv.ready
    drv.fire()
    assert wait_for(lambda: len(emu.fired) == 1)
    drv.disarm()
    assert not emu.enabled
    assert drv.coil_temperature_c == 25.0


def test_magventure_unacknowledged_write_is_caught(
        mv: tuple[MagVentureEmulator, MagVentureStimulator]) -> None:
    emu, drv = mv
    drv.open()
    emu.fault = "ignore_writes"
    with pytest.raises(StimulatorError, match="device reads 0%"):
        drv.set_intensity(50)
    with pytest.raises(StimulatorError, match="status says otherwise"):
        drv.arm()


def test_magventure_paired_train_and_burst(
        mv: tuple[MagVentureEmulator, MagVentureStimulator]) -> None:
    emu, drv = mv
    drv.open()
    drv.set_paired(30, 70, 3.0)
    assert (emu.mode, emu.ipi10, emu.amp_a, emu.amp_b) == (2, 30, 30, 70)
    got = drv.configure_train(5.0, 10, trains=2, iti_s=3.5)
    assert got == {"rate_hz": 5.0, "pulses": 10, "trains": 2, "iti_s": 3.5}
    assert drv.configure_burst(3, 10.0)["burst_index"] == 2
    with pytest.raises(StimulatorError, match=r"2\.\.5"):
        drv.configure_burst(7, 10.0)


def test_magventure_faults(mv: tuple[MagVentureEmulator, MagVentureStimulator],
                           faults: list[str]) -> None:
    emu, drv = mv
    drv.open()
    drv.arm()
    emu.disable_from_panel()
    assert wait_for(lambda: bool(faults))
    assert "disabled" in faults[0]
    assert not drv.ready


def test_magventure_bad_crc_and_silence(faults: list[str]) -> None:
    emu = MagVentureEmulator().start()
    drv = MagVentureStimulator(port=emu.port, poll_s=0.2)
    drv.set_fault_handler(faults.append)
    try:
        emu.fault = "bad_crc"
        with pytest.raises(StimulatorError, match="bad CRC"):
            drv.open()
        emu.fault = None
        drv.open()
        emu.fault = "silent"
        assert wait_for(lambda: bool(faults))
        assert "no answer" in faults[0]
    finally:
        drv.close()
        emu.stop()


def test_magventure_cable_pulled(mv: tuple[MagVentureEmulator, MagVentureStimulator],
                                 faults: list[str]) -> None:
    emu, drv = mv
    drv.open()
    drv.arm()
    emu.unplug()
    assert wait_for(lambda: bool(faults))
    assert "failed" in faults[0] or "no answer" in faults[0]


# -- TTL ----------------------------------------------------------------------------------
@pytest.mark.timing
def test_ttl_trigger_box_pulse_width_and_code() -> None:
    box = TriggerBoxEmulator().start()
    drv = TtlStimulator(port=box.port, line="byte", pulse_width_ms=5.0, code=7)
    try:
        drv.open()
        drv.arm()
        t = drv.fire()
        assert wait_for(lambda: box.level == 0 and len(box.edges) == 1)
        assert box.edges[0][1] == 7
        assert abs(box.edges[0][0] - (t - drv.latency_s)) < 0.002
        assert bytes(box.received) == b"\x00\x07\x00"
        assert drv.status()["intensity_control"].startswith("manual")
    finally:
        drv.close()
        box.stop()


def test_ttl_modem_line_on_a_pty_is_a_clear_error() -> None:
    box = TriggerBoxEmulator().start()
    drv = TtlStimulator(port=box.port, line="rts")
    try:
        with pytest.raises(StimulatorError, match=r"cannot set RTS.*line = \"byte\""):
            drv.open()
    finally:
        drv.close()
        box.stop()


def test_missing_port_is_a_clear_error() -> None:
    drv = MagstimStimulator(port="/dev/does-not-exist")
    with pytest.raises(StimulatorError, match="cannot open serial port '/dev/does-not-exist'"):
        drv.open()


def test_port_is_opened_exclusively() -> None:
    emu = MagVentureEmulator().start()
    a = MagVentureStimulator(port=emu.port)
    b = MagVentureStimulator(port=emu.port)
    try:
        a.open()
        with pytest.raises(StimulatorError, match="cannot open"):
            b.open()
    finally:
        a.close()
        b.close()
        emu.stop()


def test_keepalive_and_fire_share_the_port_safely(faults: list[str]) -> None:
    with device("200", faults, recharge_s=0.0) as (emu, drv):
        drv.keepalive_s = 0.05
        drv.open()
        drv.arm()
        assert wait_for(lambda: drv.ready)
        errors: list[BaseException] = []

        def hammer() -> None:
            try:
                for _ in range(50):
                    drv.read_parameters()
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=hammer)
        th.start()
        fired = 0
        for _ in range(20):
            if wait_for(lambda: drv.ready, 1.0):
                drv.fire()
                fired += 1
        th.join()
        assert errors == [] and faults == []
        assert len(emu.fired) == fired >= 15


def test_parallel_port_errors_are_clear(tmp_path: Path) -> None:
    # no parallel port on these machines: the pulse path is untested, the errors are
    with pytest.raises(StimulatorError, match=r"parport.*cannot open '/dev/parport9'"):
        TtlStimulator(port="/dev/parport9", line="parport").open()
    not_a_port = tmp_path / "parport"
    not_a_port.write_bytes(b"")
    drv = TtlStimulator(port=str(not_a_port), line="parport")
    with pytest.raises(StimulatorError, match="cannot claim"):
        drv.open()
    drv.close()


# -- what the device will really deliver -----------------------------------------------------
def test_magstim_left_at_95_is_read_at_open(faults: list[str]) -> None:
    with device("200", faults, power_a=95) as (_emu, drv):
        drv.open()
        dev = drv.device
        assert dev is not None
        assert (dev.intensity_pct, dev.pulses_per_trigger, dev.source) == (95.0, 1, "device")
        st = drv.status()
        assert st["intensity_pct"] == 95.0 and st["commanded_intensity_pct"] is None
        assert st["device"]["max_pct"] == 95.0
        time.sleep(0.7)  # a keep-alive cycle: nothing was commanded, so no mismatch fault
        assert faults == []


def test_magstim_knob_turned_after_arming_is_a_fault(
        ms: tuple[MagstimEmulator, MagstimStimulator], faults: list[str]) -> None:
    emu, drv = ms
    drv.open()
    drv.set_intensity(60)
    drv.arm()
    assert wait_for(lambda: drv.ready)
    emu.turn_knob(95)
    assert wait_for(lambda: bool(faults), 2.0)
    assert faults[0] == "device changed: commanded 60 %, device reads 95 % (front panel?)"
    dev = drv.device
    assert dev is not None and dev.intensity_pct == 95.0
    assert not drv.ready
    assert drv.status()["intensity_pct"] == 95.0


def test_magstim_refuses_to_arm_on_a_changed_device(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        drv.keepalive_s = 0.5
        drv.open()
        drv.set_intensity(40)
        emu.turn_knob(80)
        with pytest.raises(StimulatorError, match=r"refusing to arm.*commanded 40 %.*80 %"):
            drv.arm()
        assert not emu.armed and not drv.ready
        assert faults and "device reads 80 %" in faults[0]


def test_magstim_fires_at_the_device_power(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        drv.open()
        drv.set_intensity(50)
        drv.arm()
        assert wait_for(lambda: drv.ready)
        emu.turn_knob(70)  # between two read-backs: the device fires at 70 %
        drv.fire()
        assert [d.power_a for d in emu.delivered] == [70]


def test_bistim_pulses_per_trigger(faults: list[str]) -> None:
    with device("bistim", faults, interval=0) as (emu, drv):
        drv.open()
        assert "Z@" in emu.commands  # a known interval resolution (it resets to 10 ms)
        dev = drv.device
        assert dev is not None
        assert (dev.mode, dev.pulses_per_trigger, dev.isi_ms) == ("paired", 2, 10.0)
        drv.set_intensity(45)
        dev = drv.device
        assert dev is not None
        assert (dev.mode, dev.pulses_per_trigger, dev.intensity_pct, dev.intensity_b_pct) == (
            "standard", 1, 45.0, None)
        assert emu.power_b == 0
        drv.set_paired(35, 65, 2.5)
        dev = drv.device
        assert dev is not None
        assert (dev.mode, dev.pulses_per_trigger, dev.isi_ms, dev.max_pct) == (
            "paired", 2, 2.5, 65.0)
        emu.interval = 0  # simultaneous discharge: one pulse from both units
        dev = drv.read_device()
        assert (dev.mode, dev.pulses_per_trigger, dev.isi_ms) == ("simultaneous", 1, None)


def test_bistim_power_b_turned_up_is_a_fault(faults: list[str]) -> None:
    with device("bistim", faults) as (emu, drv):
        drv.open()
        drv.set_intensity(40)
        drv.arm()
        assert wait_for(lambda: drv.ready)
        emu.turn_knob(60, output="b")  # B now fires 10 ms after A: two pulses a trigger
        assert wait_for(lambda: bool(faults), 2.0)
        assert "commanded mode standard (1 pulse per trigger)" in faults[0]
        assert "device reads mode paired (2 pulses per trigger)" in faults[0]
        dev = drv.device
        assert dev is not None and dev.max_pct == 60.0


def test_rapid_train_mode_is_many_pulses_per_trigger(faults: list[str]) -> None:
    with device("rapid", faults) as (_emu, drv):
        drv.open()
        dev = drv.device
        assert dev is not None and (dev.mode, dev.pulses_per_trigger) == ("standard", 1)
        drv.configure_train(10.0, 20)
        dev = drv.device
        assert dev is not None
        assert (dev.mode, dev.pulses_per_trigger, dev.isi_ms) == ("train", 20, 100.0)


def test_magstim_fault_then_disarm_still_disarms_the_device(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        drv.open()
        drv.arm()
        assert wait_for(lambda: emu.ready)
        drv.report_fault("test fault")
        n = len(emu.commands)
        drv.disarm()
        assert "EA" in emu.commands[n:]
        assert not emu.armed and not emu.ready


def test_magstim_disarm_error_in_fault_is_not_reported_again(faults: list[str]) -> None:
    with device("200", faults) as (emu, drv):
        drv.open()
        drv.report_fault("first")
        emu.fault = "silent"
        drv.disarm()  # no answer: suppressed, the first fault stays
        assert faults == ["first"] and drv.fault == "first"


def mv_rig(faults: list[str], **kw: object) -> tuple[MagVentureEmulator, MagVentureStimulator]:
    emu = MagVentureEmulator(**kw).start()  # type: ignore[arg-type]
    drv = MagVentureStimulator(port=emu.port, poll_s=0.2)
    drv.set_fault_handler(faults.append)
    return emu, drv


@pytest.mark.parametrize(("left", "was"), [({"mode": "twin"}, "twin"),
                                           ({"mode": "dual"}, "dual"),
                                           ({"waveform": "burst", "burst_pulses": 4}, "burst")])
def test_magventure_open_puts_the_device_in_standard_mode(
        faults: list[str], left: dict[str, object], was: str) -> None:
    emu, drv = mv_rig(faults, amplitude_a=95, enabled=True, **left)
    try:
        assert emu.pulses_per_trigger() > 1
        drv.open()
        dev = drv.device
        assert dev is not None
        assert (dev.mode, dev.pulses_per_trigger, dev.intensity_pct) == ("standard", 1, 95.0)
        assert (emu.mode, emu.pulses_per_trigger(), emu.enabled) == (0, 1, False)
        assert faults == []
    finally:
        drv.close()
        emu.stop()


def test_magventure_open_fails_when_the_mode_change_is_refused(faults: list[str]) -> None:
    emu, drv = mv_rig(faults, mode="twin", locked_mode=True)
    try:
        with pytest.raises(StimulatorError, match=r"twin mode \(2 pulses per trigger\) and "
                                                  "did not go back to standard"):
            drv.open()
        assert not drv.link.is_open
    finally:
        drv.close()
        emu.stop()


def test_magventure_knob_turned_after_arming_is_a_fault(
        mv: tuple[MagVentureEmulator, MagVentureStimulator], faults: list[str]) -> None:
    emu, drv = mv
    drv.open()
    drv.set_intensity(60)
    drv.arm()
    emu.turn_knob(95)
    assert wait_for(lambda: bool(faults), 2.0)
    assert faults[0] == "device changed: commanded 60 %, device reads 95 % (front panel?)"
    dev = drv.device
    assert dev is not None and dev.intensity_pct == 95.0
    assert drv.status()["intensity_pct"] == 95.0


def test_magventure_unsolicited_knob_frame_updates_the_cache(faults: list[str]) -> None:
    emu = MagVentureEmulator().start()
    drv = MagVentureStimulator(port=emu.port, poll_s=30.0)  # no poll during the test
    drv.set_fault_handler(faults.append)
    try:
        drv.open()
        drv.set_intensity(40)
        emu.turn_knob(75)
        time.sleep(0.05)
        drv.read_train()  # any request: takes what the device sent on its own first
        dev = drv.device
        assert dev is not None and dev.intensity_pct == 75.0
        assert drv.unsolicited >= 1 and drv.polls == 0
    finally:
        drv.close()
        emu.stop()


def test_magventure_twin_burst_and_back(
        mv: tuple[MagVentureEmulator, MagVentureStimulator], faults: list[str]) -> None:
    emu, drv = mv
    drv.open()
    drv.set_paired(30, 70, 3.0)
    dev = drv.device
    assert dev is not None
    assert (dev.mode, dev.pulses_per_trigger, dev.isi_ms, dev.intensity_pct,
            dev.intensity_b_pct) == ("twin", 2, 3.0, 30.0, 70.0)
    drv.arm()
    drv.fire()
    assert wait_for(lambda: len(emu.delivered) == 1)
    assert (emu.delivered[0].power_a, emu.delivered[0].power_b, emu.delivered[0].pulses) == (
        30, 70, 2)
    drv.disarm()
    drv.configure_burst(3, 10.0)
    dev = drv.device
    assert dev is not None and (dev.mode, dev.pulses_per_trigger, dev.isi_ms) == (
        "burst", 3, 10.0)
    drv.set_intensity(50)
    dev = drv.device
    assert dev is not None and (dev.mode, dev.pulses_per_trigger) == ("standard", 1)
    assert emu.pulses_per_trigger() == 1
    time.sleep(0.5)  # polls: the device is what was commanded
    assert faults == []


def test_magventure_mode_changed_on_the_panel_is_a_fault(
        mv: tuple[MagVentureEmulator, MagVentureStimulator], faults: list[str]) -> None:
    emu, drv = mv
    drv.open()
    drv.set_intensity(50)
    drv.arm()
    with emu.lock:
        emu.mode = 2  # twin, from the front panel
    assert wait_for(lambda: bool(faults), 2.0)
    assert "device reads mode twin (2 pulses per trigger)" in faults[0]


def test_magventure_fault_then_disarm_still_disables(
        mv: tuple[MagVentureEmulator, MagVentureStimulator], faults: list[str]) -> None:
    emu, drv = mv
    drv.open()
    drv.arm()
    assert emu.enabled
    drv.report_fault("test fault")
    n = len(emu.commands)
    drv.disarm()
    assert b"\x02\x00" in emu.commands[n:]
    assert not emu.enabled


def test_ttl_device_state_is_the_declaration() -> None:
    box = TriggerBoxEmulator().start()
    drv = TtlStimulator(port=box.port, line="byte")
    try:
        drv.open()
        dev = drv.device
        assert dev is not None and dev.intensity_pct is None and dev.source == "declared"
        drv.set_intensity(55)
        dev = drv.read_device()
        assert (dev.intensity_pct, dev.pulses_per_trigger, dev.source) == (55.0, 1, "declared")
    finally:
        drv.close()
        box.stop()


def test_a_watch_thread_that_fails_is_a_fault_not_silence(faults: list[str],
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """An unexpected error in the keep-alive thread (a reply that does not parse, a bug)
    used to end it silently: the device then disarmed itself while the driver said ready."""
    with device("200", faults) as (_emu, drv):
        drv.open()
        drv.arm()

        def broken() -> dict[str, object]:
            raise ValueError("invalid literal for int() with base 10: '9x5'")

        monkeypatch.setattr(drv, "read_parameters", broken)
        assert wait_for(lambda: bool(faults), 3.0)
        assert "keepalive thread failed: ValueError" in faults[0]
        assert drv.fault is not None and not drv.ready
