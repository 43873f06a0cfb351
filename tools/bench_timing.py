#!/usr/bin/env python3
"""Fire timing of the pulse path, printed as JSON.

Fire error = actual minus scheduled pulse time (LSL clock), over ``--pulses`` pulses per
condition, each requested 2-20 ms ahead as the trigger policy does, through the real
:class:`~closedloop.stim.scheduler.FireScheduler` and
:class:`~closedloop.stim.gated.GatedStimulator`:

- ``simulated``: the simulated driver; "actual" is the time it stamps on its LSL coil
  marker (the scheduler's own accuracy);
- ``ttl_pty``: the ``ttl`` driver in trigger-box mode on a pseudo-terminal pair; "actual"
  is when the emulated trigger box, **in another process**, read the byte from the
  pty (the whole path: scheduler, pyserial, the kernel's tty layer, another process's
  wake-up).

Each with the machine idle and with a CPU load (one busy process per core) in other
processes. Target: p99 under 0.2 ms on an idle machine.

Usage: ``python tools/bench_timing.py [--pulses 1000] [--interval 0.06]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pylsl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from closedloop.config.schema import SafetyConfig  # noqa: E402
from closedloop.stim.base import Stimulator  # noqa: E402
from closedloop.stim.gated import GatedStimulator  # noqa: E402
from closedloop.stim.safety import SafetyGate, SafetyLimits  # noqa: E402
from closedloop.stim.scheduler import FireScheduler, PulseOutcome, PulseRequest  # noqa: E402
from closedloop.stim.simulated import SimulatedStimulator  # noqa: E402
from closedloop.stim.ttl import TtlStimulator  # noqa: E402


def summary(errors_ms: list[float]) -> dict[str, Any]:
    a = np.asarray(errors_ms)
    if not len(a):
        return {"n": 0}
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 4),
            "p99_ms": round(float(np.percentile(a, 99)), 4),
            "p99_abs_ms": round(float(np.percentile(np.abs(a), 99)), 4),
            "max_ms": round(float(np.max(np.abs(a))), 4),
            "mean_ms": round(float(a.mean()), 4)}


RUN_PULSES = 10
RUN_PAUSE_S = 1.1


def run_pulses(driver: Stimulator, n: int, interval: float,
               actual: Any = None) -> tuple[list[float], dict[str, int]]:
    """Schedule ``n`` pulses; return actual-minus-scheduled errors (ms) and refusals."""
    # pulses this close are rTMS to the gate: runs of RUN_PULSES at 50 % MT (Table 4 allows
    # 2 s at up to 20 Hz), each followed by a pause of more than 1 s
    limits = SafetyLimits.from_config(SafetyConfig(
        min_interval_s=0.05, max_intensity_pct=100, max_pulses=10_000,
        max_pulses_per_window=10_000, rate_window_s=1.0, motor_threshold_pct=100.0,
        train_duration_factor=1.0, min_inter_train_s=1.0))
    gated = GatedStimulator(driver, SafetyGate(limits), eeg_age_s=lambda: 0.0)
    gated.set_intensity(50)
    gated.arm()
    outcomes: list[PulseOutcome] = []
    done = threading.Event()

    def on_outcome(o: PulseOutcome) -> None:
        outcomes.append(o)
        done.set()

    sched = FireScheduler(gated, on_outcome=on_outcome, max_lateness_s=0.005,
                          on_error=lambda e: print(f"error: {e}", file=sys.stderr))
    sched.start()
    rng = np.random.default_rng(1)
    try:
        for i in range(n):
            done.clear()
            lead = float(rng.uniform(0.002, 0.020))
            sched.submit(PulseRequest(i, float(pylsl.local_clock()) + lead))
            done.wait(2.0)
            time.sleep(interval if (i + 1) % RUN_PULSES else RUN_PAUSE_S)
    finally:
        sched.stop()
        gated.disarm()
    refused: dict[str, int] = {}
    errors: list[float] = []
    fired = [o for o in outcomes if o.fired]
    for o in outcomes:
        if not o.fired:
            refused[o.reason] = refused.get(o.reason, 0) + 1
    times = actual(len(fired)) if actual is not None else [o.lsl_time for o in fired]
    for o, t in zip(fired, times, strict=False):
        errors.append((t - o.request.fire_time) * 1000.0)
    return errors, refused


def start_load() -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def simulated(n: int, interval: float) -> dict[str, Any]:
    drv = SimulatedStimulator(coil_stream=f"bench-timing-coil-{os.getpid()}")
    drv.open()
    try:
        errors, refused = run_pulses(drv, n, interval)
    finally:
        drv.close()
    return {**summary(errors), "refused": refused}


def ttl_pty(n: int, interval: float) -> dict[str, Any]:
    emu = subprocess.Popen([sys.executable, str(ROOT / "tools" / "stim_emulator.py"),
                            "ttl-byte"], stdout=subprocess.PIPE, text=True)
    assert emu.stdout is not None
    port = json.loads(emu.stdout.readline())["port"]
    edges: list[float] = []

    def reader() -> None:
        assert emu.stdout is not None
        for line in emu.stdout:
            rec = json.loads(line)
            if rec.get("event") == "edge":
                edges.append(rec["lsl_time"])

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    drv = TtlStimulator(port=port, line="byte", pulse_width_ms=1.0, latency_s=0.0)
    drv.open()

    def actual(k: int) -> list[float]:
        end = time.monotonic() + 5.0
        while len(edges) < k and time.monotonic() < end:
            time.sleep(0.05)
        got = list(edges)
        edges.clear()
        return got

    try:
        # the route's latency (write -> the box reads it), measured as a lab would on the
        # bench, then stated to the driver so that the scheduler compensates for it
        calib, _ = run_pulses(drv, 100, interval, actual)
        drv.latency_s = float(np.median(calib)) / 1000.0
        errors, refused = run_pulses(drv, n, interval, actual)
    finally:
        drv.close()
        emu.terminate()
        emu.wait(5)
    return {**summary(errors), "refused": refused,
            "calibrated_latency_ms": round(drv.latency_s * 1000.0, 4),
            "uncalibrated": summary(calib)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pulses", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=0.06,
                    help="seconds between requests (>= the 50 ms hard minimum)")
    args = ap.parse_args()
    out: dict[str, Any] = {"pulses": args.pulses, "cpu_count": os.cpu_count()}
    for name, fn in (("simulated", simulated), ("ttl_pty", ttl_pty)):
        out[name] = {"idle": fn(args.pulses, args.interval)}
        load = start_load()
        try:
            time.sleep(0.5)
            out[name]["cpu_load"] = fn(args.pulses, args.interval)
        finally:
            stop(load)
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    out["target"] = {"p99_ms_idle": 0.2,
                     "met": all(out[k]["idle"].get("p99_abs_ms", 1e9) < 0.2
                                for k in ("simulated", "ttl_pty"))}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
