"""What the safety gate costs on the fire path: microseconds per ``fire_now``.

The fire thread starts each pulse early by the measured cost of its checks (capped at
0.5 ms), so the gate's cost must stay well below that. This measures
:meth:`GatedStimulator.fire_now` with the in-memory driver (no I/O: the gate, the device
read-back comparison and the ledger alone) for the triggers a session gives: a single
pulse, a paired pulse, a pulse of a 20 Hz run, the first trigger of a cTBS block (the
whole 600-pulse unit is checked then) and a later trigger of that block.

Usage: ``python tools/bench_gate.py [--repeats 2000]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from closedloop.config.schema import SafetyConfig, StimulationConfig
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import unit_for
from closedloop.stim.safety import SafetyGate, SafetyLimits


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def rig(paired: bool = False, offsets: tuple[float, ...] = (0.0,)
        ) -> tuple[Clock, GatedStimulator]:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    lim = SafetyLimits.from_config(SafetyConfig(
        min_interval_s=0.05, max_pulses=10_000, max_pulses_per_window=10_000,
        max_pulses_per_day=20_000, motor_threshold_pct=50.0, min_inter_train_s=1.0))
    gated = GatedStimulator(drv, SafetyGate(lim), eeg_age_s=lambda: 0.0, clock=clock,
                            unit_offsets=offsets)
    if paired:
        gated.set_paired(20.0, 45.0, 3.0)
    else:
        gated.set_intensity(40.0)
    gated.arm()
    return clock, gated


def timed(fn: Callable[[], bool], n: int) -> dict[str, float]:
    us = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        ok = fn()
        us.append((time.perf_counter_ns() - t0) / 1000.0)
        assert ok, "the benchmark's trigger was refused"
    us.sort()
    return {"n": n, "p50_us": round(statistics.median(us), 2),
            "p99_us": round(us[int(0.99 * (n - 1))], 2), "max_us": round(us[-1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2000)
    n = ap.parse_args().repeats
    out: dict[str, object] = {}

    clock, gated = rig()

    def single() -> bool:
        clock.t += 2.0
        return gated.fire_now().fired
    out["single"] = timed(single, n)

    clock, gated = rig(paired=True)

    def paired() -> bool:
        clock.t += 2.0
        return gated.fire_now().fired
    out["paired"] = timed(paired, n)

    clock, gated = rig()
    count = [0]

    def run_20hz() -> bool:  # runs of 10 at 20 Hz (0.5 s at 80 % MT), 1.1-s pauses
        count[0] += 1
        clock.t += 0.05 if count[0] % 10 else 1.1
        return gated.fire_now().fired
    out["rtms_20hz"] = timed(run_20hz, n)

    offs = unit_for(StimulationConfig(pattern="ctbs")).offsets
    firsts, laters = [], []
    for _ in range(max(1, n // 200)):
        clock, gated = rig(offsets=offs)  # the unit judged ahead, as the service does
        t0 = time.perf_counter_ns()
        assert gated.fire_now(offsets=offs, index=0, planned=clock.t).fired
        firsts.append((time.perf_counter_ns() - t0) / 1000.0)
        base = clock.t
        for k in range(1, len(offs)):
            clock.t = base + offs[k]
            t0 = time.perf_counter_ns()
            assert gated.fire_now(offsets=offs, index=k, planned=clock.t).fired
            laters.append((time.perf_counter_ns() - t0) / 1000.0)
    firsts.sort()
    laters.sort()
    out["ctbs_first_trigger"] = {"n": len(firsts), "p50_us": round(statistics.median(firsts), 2),
                                 "max_us": round(firsts[-1], 2),
                                 "note": "the 600-pulse unit was judged ahead, on arming"}
    out["ctbs_later_trigger"] = {"n": len(laters), "p50_us": round(statistics.median(laters), 2),
                                 "p99_us": round(laters[int(0.99 * (len(laters) - 1))], 2),
                                 "max_us": round(laters[-1], 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
