"""``closedloop demo``: simulator, service and simulated stimulator, with a summary.

The simulator runs in a child process (as an amplifier would be a separate device), with
stream names unique to this demo so that it never picks up or disturbs other LSL streams
on the network. The ground truth the simulator publishes (true mu phase at each pulse) is
matched to the pulses the service fired to report the phase error.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from closedloop.config.load import load_config
from closedloop.config.schema import Config, StreamSelector
from closedloop.control.service import ClosedLoopService, ServiceStats
from closedloop.control.stats import circular_stats_deg
from closedloop.streams.reader import MarkerReader

__all__ = ["demo_overrides", "run_demo", "summarize"]


def demo_overrides(prefix: str, events: str) -> list[str]:
    """The settings the demo runs with (on top of the defaults and any --set)."""
    return [
        f'streams.eeg.name="{prefix}-EEG"', f'streams.emg.name="{prefix}-EMG"',
        f'stimulator.coil_stream="{prefix}-coil"', f'recording.marker_stream="{prefix}-pulses"',
        f'recording.events="{events}"', "stimulator.arm_on_start=true",
        "trigger.min_interval_s=1.0", "trigger.jitter_s=0.3", "safety.min_interval_s=0.9",
        "trigger.amplitude_percentile=50", "trigger.amplitude_window_s=10",
    ]


async def _run_service(cfg: Config, duration_s: float, truth: list[dict[str, Any]],
                       prefix: str) -> ServiceStats:
    service = ClosedLoopService(cfg, config_source="demo")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_truth(text: str, _t: float) -> None:
        truth.append(json.loads(text))

    truth_reader = MarkerReader(role="truth", selector=StreamSelector(name=f"{prefix}-truth"),
                                acquisition=cfg.acquisition, on_marker=on_truth,
                                on_event=lambda _e: None)
    truth_reader.start()
    task = asyncio.create_task(service.run(stop))
    try:
        ready = asyncio.create_task(service.ready.wait())
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        await asyncio.wait({task}, timeout=duration_s)
        stop.set()
        stats = await task
        await asyncio.sleep(0.3)  # the truth for the last pulse
        return stats
    finally:
        stop.set()
        truth_reader.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_demo(*, duration_s: float, eeg_rate: float, overrides: list[str], seed: int | None,
             events: str | None, as_json: bool) -> int:
    """Run the demo; print the summary; return the exit code."""
    prefix = f"cl-demo-{os.getpid()}"
    events = events or str(Path(tempfile.gettempdir()) / f"{prefix}-events.jsonl")
    cfg = load_config(None, [*demo_overrides(prefix, events), *overrides])
    sim_cmd = [sys.executable, "-m", "closedloop", "simulate", "--prefix", prefix,
               "--coil-stream", cfg.stimulator.coil_stream, "--eeg-rate", str(eeg_rate),
               "--emg-rate", str(min(eeg_rate, 5000.0))]
    if seed is not None:
        sim_cmd += ["--seed", str(seed)]
    if not as_json:
        print(f"closedloop demo: simulator at {eeg_rate:g} Hz x 64 channels, service, "
              f"simulated stimulator; {duration_s:g} s; target {cfg.trigger.target_phase_deg:g}°"
              f"; events -> {events}", flush=True)
    sim = subprocess.Popen(sim_cmd, stdin=subprocess.DEVNULL)
    truth: list[dict[str, Any]] = []
    try:
        stats = asyncio.run(_run_service(cfg, duration_s, truth, prefix))
    finally:
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(5)
        except subprocess.TimeoutExpired:
            sim.kill()
    summary = summarize(stats, truth, cfg)
    summary["events"] = events
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def summarize(stats: ServiceStats, truth: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Pulses, refusals, phase error against the truth, MEPs, latencies."""
    target = cfg.trigger.target_phase_deg
    errors = []
    matched = 0
    for p in stats.pulses:
        best = min(truth, key=lambda t: abs(t["pulse_lsl_time"] - p["lsl_time"]), default=None)
        if best is not None and abs(best["pulse_lsl_time"] - p["lsl_time"]) < 1e-3:
            matched += 1
            errors.append(math.degrees(math.remainder(
                math.radians(best["true_phase_deg"] - target), 2 * math.pi)))
    meps = [m for m in stats.meps if m["source"] == "closedloop"]
    accepted = [m["p2p_uv"] for m in meps if not m["rejected"] and m["p2p_uv"] is not None]
    reasons: dict[str, int] = {}
    for m in meps:
        reasons[m["reason"]] = reasons.get(m["reason"], 0) + 1
    pulse_times = sorted(p["lsl_time"] for p in stats.pulses)
    intervals = np.diff(pulse_times) if len(pulse_times) > 1 else np.array([])
    return {
        "pulses_fired": stats.fired,
        "decisions": stats.decisions,
        "refused": dict(stats.refused.most_common()),
        "min_inter_pulse_interval_s": round(float(intervals.min()), 4) if len(intervals) else None,
        "max_intensity_pct": max((p["intensity_pct"] for p in stats.pulses), default=None),
        "target_phase_deg": target,
        "phase_error_vs_truth": {**circular_stats_deg(errors), "matched_pulses": matched},
        "mep": {"records": len(meps), "pulses_with_mep_record": len(
                    {m["pulse_lsl_time"] for m in meps}),
                "by_reason": reasons,
                "median_p2p_uv": round(float(np.median(accepted)), 1) if accepted else None,
                "min_p2p_uv": round(float(np.min(accepted)), 1) if accepted else None,
                "max_p2p_uv": round(float(np.max(accepted)), 1) if accepted else None},
        "latency_ms": {"chunk_to_decision": stats.chunk_to_decision_ms.summary(),
                       "chunk_to_fire_request": stats.chunk_to_handoff_ms.summary(),
                       "fire_error": stats.fire_error_ms.summary()},
        "update_cost_us": stats.update_cost_us.summary(),
        "samples_lost": stats.samples_lost,
        "calibration": stats.calibration,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary as text for people."""
    pe = s["phase_error_vs_truth"]
    lat = s["latency_ms"]
    mep = s["mep"]

    def pct(d: dict[str, Any]) -> str:
        if not d["count"]:
            return "n/a"
        return f"p50 {d['p50']:.3f}  p99 {d['p99']:.3f}  max {d['max']:.3f}  (n={d['count']})"

    refused = ", ".join(f"{k} {v}" for k, v in s["refused"].items()) or "none"
    lines = [
        "",
        "== closedloop demo summary ==",
        f"pulses fired:        {s['pulses_fired']}  (of {s['decisions']} decisions)",
        f"refused:             {refused}",
        f"phase error vs truth (target {s['target_phase_deg']:g}°): "
        + (f"circular mean {pe['mean_deg']:+.1f}°, circular SD {pe['sd_deg']:.1f}° "
           f"over {pe['n']} pulses" if pe["n"] else "no pulses matched"),
        f"MEPs:                {mep['records']} records for {mep['pulses_with_mep_record']} "
        f"pulses; accepted median {mep['median_p2p_uv']} µV (range {mep['min_p2p_uv']}–"
        f"{mep['max_p2p_uv']}); {mep['by_reason']}",
        f"latency chunk→decision ms:  {pct(lat['chunk_to_decision'])}",
        f"latency chunk→fire request: {pct(lat['chunk_to_fire_request'])}",
        f"fire error (actual−scheduled) ms: {pct(lat['fire_error'])}",
        f"event log:           {s['events']}",
    ]
    return "\n".join(lines)
