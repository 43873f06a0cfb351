"""``closedloop demo``: simulator, service and simulated stimulator, with a summary.

The simulator runs in a child process (as an amplifier would be a separate device), with
stream names unique to this demo so that it never picks up or disturbs other LSL streams
on the network. The ground truth the simulator publishes (true mu phase at each pulse) is
matched to the pulses the service fired to report the phase error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from closedloop.config.load import load_config
from closedloop.config.schema import Config, StreamSelector
from closedloop.control.service import ClosedLoopService, ServiceStats
from closedloop.dsp.circular import circular_stats_deg
from closedloop.extras import require_matplotlib
from closedloop.mqtt.local_broker import local_broker
from closedloop.mqtt.plane import planes_for
from closedloop.streams.reader import MarkerReader

__all__ = ["demo_overrides", "run_demo", "summarize"]


def demo_overrides(prefix: str, events: str) -> list[str]:
    """The settings the demo runs with (on top of the defaults and any --set)."""
    return [
        f'streams.eeg.name="{prefix}-EEG"', f'streams.emg.name="{prefix}-EMG"',
        f'stimulator.coil_stream="{prefix}-coil"', f'recording.marker_stream="{prefix}-pulses"',
        f'recording.events="{events}"', "stimulator.arm_on_start=true",
        "trigger.min_interval_s=1.5", "trigger.jitter_s=0.3", "safety.min_interval_s=1.0",
        "trigger.amplitude_percentile=50", "trigger.amplitude_window_s=10",
        # the trained filter takes over (and pulses start) 17 s in: 15 s of training data
        # (about the least it needs), then the switch delay
        "phase.calibration_s=15",
        # the simulated participant's pulses are counted under a name of their own, never
        # against a real participant's (or the shared "unspecified") daily limit
        'session.participant="demo-simulated"',
    ]


async def _operator(cfg: Config, duration_s: float, report: dict[str, Any],
                    echo: bool) -> None:
    """Drive the demo over MQTT, as an experiment computer would."""
    from closedloop.mqtt.ctl import send_command, watch  # noqa: PLC0415

    counts: dict[str, int] = {}
    online = asyncio.Event()  # the service's status says it takes commands

    def count(line: str) -> None:
        topic, _, payload = line.partition(" ")
        topic = topic.removeprefix(cfg.mqtt.topic_prefix())
        counts[topic] = counts.get(topic, 0) + 1
        if topic == "status":
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(payload).get("state") not in (None, "offline"):
                    online.set()

    watcher = asyncio.create_task(watch(cfg.mqtt, out=count))
    rtts: list[float] = []
    # the service publishes its status once subscribed to its commands: a command sent
    # before then would be lost (its MQTT worker is a process that takes a moment)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(online.wait(), 10.0)
    start = asyncio.get_running_loop().time()
    script: list[tuple[float, str, dict[str, Any]]] = [
        (1.0, "status", {}),
        (duration_s / 2, "set", {"target_phase_deg": 180}),
        (max(1.5, duration_s - 1.0), "status", {}),
    ]
    try:
        for at, verb, args in script:
            await asyncio.sleep(max(0.0, start + at - asyncio.get_running_loop().time()))
            t0 = asyncio.get_running_loop().time()
            # (the demo's service and simulator share this machine's cores with its MQTT
            # worker, which runs at a lower priority: give it time)
            reply = await send_command(cfg.mqtt, verb, args, timeout_s=15.0)
            rtt = (asyncio.get_running_loop().time() - t0) * 1000.0
            rtts.append(rtt)
            if echo:
                shown = " ".join(f"{k}={v}" for k, v in args.items())
                state = reply.get("result", {}).get("state", "") if reply["ok"] else ""
                print(f"[mqtt] ctl {verb} {shown} -> {'ok' if reply['ok'] else reply['error']}"
                      f"{' (' + state + ')' if state else ''}, {rtt:.1f} ms", flush=True)
    finally:
        await asyncio.sleep(0.5)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    report.update({"commands": len(rtts), "round_trip_ms": [round(r, 2) for r in rtts],
                   "messages_seen": dict(sorted(counts.items()))})


async def _demo(cfg_overrides: list[str], duration_s: float, truth: list[dict[str, Any]],
                prefix: str, mqtt: bool, echo: bool, report: dict[str, Any],
                protocol: str | None = None) -> tuple[ServiceStats, Config]:
    broker_cm = local_broker() if mqtt else contextlib.nullcontext(None)
    async with broker_cm as broker:
        extra = []
        if broker is not None:
            extra = ["mqtt.enabled=true", f'mqtt.instance="{prefix}"', f"mqtt.port={broker.port}",
                     f'mqtt.host="{broker.host}"', f'mqtt.protocol="{broker.protocol}"',
                     "mqtt.metrics_interval_s=2"]
            report["broker"] = f"{broker.kind} at {broker.host}:{broker.port} " \
                               f"(MQTT {broker.protocol})"
            if echo:
                print(f"[mqtt] broker: {report['broker']}; topics under "
                      f"closedloop/{prefix}/", flush=True)
        cfg = load_config(None, [*cfg_overrides, *extra])
        stats = await _run_service(cfg, duration_s, truth, prefix,
                                   operator=_operator(cfg, duration_s, report, echo)
                                   if mqtt else None, protocol=protocol)
        return stats, cfg


async def _run_service(cfg: Config, duration_s: float, truth: list[dict[str, Any]],
                       prefix: str, operator: Coroutine[Any, Any, None] | None = None,
                       protocol: str | None = None) -> ServiceStats:
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
    task = asyncio.create_task(service.run(stop, attachments=planes_for(cfg)))
    helper = None
    try:
        ready = asyncio.create_task(service.ready.wait())
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if protocol is not None:
            service.api.start_protocol(protocol, pulses=None, by="demo")
        if operator is not None:
            helper = asyncio.create_task(operator)
        await asyncio.wait({task}, timeout=duration_s)
        if helper is not None:
            await helper
        stop.set()
        stats = await task
        await asyncio.sleep(0.3)  # the truth for the last pulse
        return stats
    finally:
        stop.set()
        if helper is not None and not helper.done():
            helper.cancel()
        elif helper is None and operator is not None:
            operator.close()  # never started
        truth_reader.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_demo(*, duration_s: float, eeg_rate: float, overrides: list[str], seed: int | None,
             events: str | None, as_json: bool, mqtt: bool = False,
             protocol: str | None = None, report_dir: str | None = None) -> int:
    """Run the demo; print the summary; return the exit code.

    Raises:
        MissingDependencyError: ``report_dir`` is given and matplotlib (the extra
            ``report``) is not installed; raised before anything starts.
    """
    if report_dir is not None:
        require_matplotlib("session reports (--report)")
    prefix = f"cl-demo-{os.getpid()}"
    events = events or str(Path(tempfile.gettempdir()) / f"{prefix}-events.jsonl")
    overrides = [*demo_overrides(prefix, events), *overrides]
    xdf = None
    if report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        xdf = str(Path(report_dir) / "session.xdf")
        overrides.append(f'recording.xdf="{xdf}"')
    cfg = load_config(None, overrides)
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
    report: dict[str, Any] = {}
    try:
        stats, cfg = asyncio.run(_demo(overrides, duration_s, truth, prefix, mqtt,
                                       not as_json, report, protocol))
    finally:
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(5)
        except subprocess.TimeoutExpired:
            sim.kill()
    summary = summarize(stats, truth, cfg)
    summary["events"] = events
    if mqtt:
        summary["mqtt"] = report
    if report_dir is not None:
        from closedloop.recording.report import build_report  # noqa: PLC0415

        summary["report"] = str(build_report(events, xdf_path=xdf, out_dir=report_dir))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if report_dir is not None:
            print(f"report: {summary['report']}")
    return 0


def summarize(stats: ServiceStats, truth: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Pulses, refusals, phase error against the truth, MEPs, latencies."""
    target = cfg.trigger.target_phase_deg
    errors = []
    targets = sorted({p["target_phase_deg"] for p in stats.pulses})
    matched = 0
    for p in stats.pulses:
        best = min(truth, key=lambda t: abs(t["pulse_lsl_time"] - p["lsl_time"]), default=None)
        if best is not None and abs(best["pulse_lsl_time"] - p["lsl_time"]) < 1e-3:
            matched += 1
            errors.append(math.degrees(math.remainder(  # against the pulse's own target
                math.radians(best["true_phase_deg"] - p["target_phase_deg"]), 2 * math.pi)))
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
        "target_phase_deg": target if len(targets) <= 1 else targets,
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
        "estimator": {"name": cfg.phase.estimator, **(stats.estimator or {})},
        "protocol_results": stats.protocol_results,
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
        f"phase estimator:     {_estimator(s['estimator'])}",
        f"pulses fired:        {s['pulses_fired']}  (of {s['decisions']} decisions)",
        f"refused:             {refused}",
        f"phase error vs truth (target {_targets(s['target_phase_deg'])}): "
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
    for r in s.get("protocol_results", []):
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("ci95",)}
        lines.append(f"protocol result:     {shown}")
    if "mqtt" in s:
        m = s["mqtt"]
        lines.append(f"MQTT:                {m.get('broker')}; {m.get('commands', 0)} commands, "
                     f"round trips {m.get('round_trip_ms')} ms; messages seen "
                     f"{m.get('messages_seen')}")
    return "\n".join(lines)


def _estimator(e: dict[str, Any]) -> str:
    name = str(e["name"])
    if "training" not in e:
        return name
    state = e["training"]
    if state != "ready":
        return f"{name}: {state} (AR forward prediction until it is trained)"
    if "expected_sd_deg_above_median" in e:
        return (f"{name} (trained on this session's first seconds; expected circular SD "
                f"{e['expected_sd_deg_above_median']}° above the median amplitude)")
    return f"{name} (trained on this session's first seconds)"


def _targets(t: float | list[float]) -> str:
    if isinstance(t, list):
        return ", ".join(f"{x:g}°" for x in t) + ", each pulse against its own"
    return f"{t:g}°"
