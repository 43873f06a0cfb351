"""``closedloop stimulator check``: connect to a device, report, optionally fire once.

For bench-testing a real stimulator (or rehearsing against an emulator): every step is
timed and reported, and the JSON report says exactly what happened. A test pulse goes
through the same :class:`~closedloop.stim.gated.GatedStimulator` and safety limits as any
other (there is no EEG on the bench, so EEG freshness is the one check that is waived),
and it is counted in the day's pulses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from closedloop.config.schema import Config
from closedloop.errors import ClosedLoopError
from closedloop.stim.factory import make_driver
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.safety import DayCounter, SafetyGate, SafetyLimits

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

    day = DayCounter(cfg.recording.day_counter_path(cfg.safety.day_counter_file))
    gated = GatedStimulator(driver, SafetyGate(SafetyLimits.from_config(cfg.safety),
                                               day_count=day.today),
                            eeg_age_s=lambda: 0.0, on_fault=faults.append)
    try:
        step("open", driver.open)
        report["status"] = driver.status()
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
                              "latency_ms": round(driver.latency_s * 1e3, 3)}
            if result.fired:
                day.add(1)
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
    if faults:
        report["faults"] = faults
    return report
