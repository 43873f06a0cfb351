"""``closedloop stimulator check``: connect to a device, report, optionally fire once.

For bench-testing a real stimulator (or rehearsing against an emulator): every step is
timed and reported, and the JSON report says exactly what happened. A test pulse goes
through the same :class:`~closedloop.stim.gated.GatedStimulator` and safety limits as any
other (there is no EEG on the bench, so EEG freshness is the one check that is waived),
and it is counted in the participant's pulses of the day. The device's settings are read
back first: a device above ``safety.max_intensity_pct`` is refused before anything else
(unless ``--intensity`` sets it lower first), and a test pulse fires at what the device
reads back, which the report shows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from closedloop.config.schema import Config
from closedloop.errors import ClosedLoopError, StimulatorError
from closedloop.stim.base import DeviceState
from closedloop.stim.day_counter import DayCounter, default_state_dir
from closedloop.stim.factory import make_driver
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.safety import SafetyGate, SafetyLimits

__all__ = ["check_stimulator"]


def check_stimulator(cfg: Config, *, intensity_pct: float | None, fire: bool,
                     ready_timeout_s: float = 5.0) -> dict[str, Any]:
    """Run the check; the report has ``ok`` and one entry per step."""
    report: dict[str, Any] = {"driver": cfg.stimulator.driver, "port": cfg.stimulator.port,
                              "steps": [], "ok": False}
    driver = make_driver(cfg.stimulator)
    faults: list[str] = []

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"step": name}
        try:
            result = fn()
        except ClosedLoopError as exc:
            entry.update(ok=False, error=str(exc),
                         ms=round((time.perf_counter() - t0) * 1e3, 2))
            report["steps"].append(entry)
            raise
        entry.update(ok=True, ms=round((time.perf_counter() - t0) * 1e3, 2))
        if isinstance(result, int | float | str):
            entry["result"] = result
        report["steps"].append(entry)
        return result

    limits = SafetyLimits.from_config(cfg.safety)
    day = DayCounter(cfg.safety.day_counter_dir or default_state_dir(),
                     cfg.session.participant, limit=limits.max_pulses_per_day)
    gate = SafetyGate(limits, day=day)
    gated = GatedStimulator(driver, gate, eeg_age_s=lambda: 0.0, on_fault=faults.append,
                            credit_target=2)
    try:
        step("open", driver.open)
        # what the device will deliver, read back before anything else: a device left at a
        # high power by the previous user is refused here, not fired
        device = step("read_device", driver.read_device)
        report["device"] = _device_dict(device)
        report["status"] = driver.status()
        too_high = [p for p in (device.intensity_pct, device.intensity_b_pct)
                    if p is not None and p > limits.max_intensity_pct]
        if too_high and intensity_pct is None:
            raise StimulatorError(
                f"the device is set to {max(too_high):g}%, above safety.max_intensity_pct "
                f"({limits.max_intensity_pct:g}%): refused; give --intensity to set it")
        if intensity_pct is not None:
            step("set_intensity", lambda: gated.set_intensity(intensity_pct))
        if fire:
            step("arm", gated.arm)

            def wait_ready() -> float:
                end = time.monotonic() + ready_timeout_s
                while not driver.ready:
                    if time.monotonic() > end:
                        raise ClosedLoopError(f"device not ready {ready_timeout_s:g} s after "
                                              "arming")
                    time.sleep(0.01)
                return round(ready_timeout_s - (end - time.monotonic()), 3)

            step("wait_ready", wait_ready)
            result = step("fire", gated.fire_now)
            report["fire"] = {"fired": result.fired, "reason": result.reason,
                              "pulse_lsl_time": result.lsl_time,
                              "command_lsl_time": result.command_time,
                              "pulses": [{"lsl_time": t, "intensity_pct": p}
                                         for t, p in result.pulses],
                              "latency_ms": round(driver.latency_s * 1e3, 3)}
            step("disarm", gated.disarm)
        report["status_after"] = driver.status()
        report["ok"] = not faults and (not fire or report["fire"]["fired"])
    except ClosedLoopError as exc:
        report["error"] = str(exc)
    finally:
        with contextlib.suppress(ClosedLoopError):
            gated.disarm()
        with contextlib.suppress(ClosedLoopError):
            driver.close()
        with contextlib.suppress(ClosedLoopError):
            gate.settle()
        report["pulses_today"] = gate.day_count
    if faults:
        report["faults"] = faults
    return report


def _device_dict(dev: DeviceState) -> dict[str, Any]:
    return {"intensity_pct": dev.intensity_pct, "intensity_b_pct": dev.intensity_b_pct,
            "pulses_per_trigger": dev.pulses_per_trigger, "isi_ms": dev.isi_ms,
            "mode": dev.mode, "source": dev.source}
