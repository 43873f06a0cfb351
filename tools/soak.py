#!/usr/bin/env python3
"""Soak test: the service for a long time against real EEG replayed over LSL. JSON out.

A replay process plays a real recording (default: EEGMAT Subject19, 500 Hz, 21 channels,
from ``../shared/data``) over LSL in a loop; the service runs in this process with the
simulated stimulator, phase-targeting C3 (Hjorth: F3, T3, Cz, P3) and MQTT telemetry on
(a broker on 127.0.0.1:1883, or a private mosquitto). Reported:

- RSS of this process every ``--sample-s`` seconds, and its growth after the warm-up;
- chunk-to-decision latency percentiles, pulses and refusals per ``--block-min`` block;
- samples lost: the replay's sample count against what the service received, plus
  overruns of the service's ring buffer and estimator resets (gaps).

Targets (issue 8) over one hour: RSS growth under 5 MB, zero lost samples, p99 latency in
the last block within 20% of the first.

Usage: ``python tools/soak.py --minutes 60 [--block-min 10] > soak.json``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("LSLAPICFG", str(REPO / "closedloop" / "resources" / "lsl_api.cfg"))

import pylsl  # noqa: E402

from closedloop.config import load_config  # noqa: E402
from closedloop.control.memory import trim_heap  # noqa: E402
from closedloop.control.service import ClosedLoopService  # noqa: E402
from closedloop.mqtt.local_broker import local_broker  # noqa: E402
from closedloop.mqtt.plane import planes_for  # noqa: E402


def rss_by_kind_mb() -> dict[str, float]:
    """Resident memory by mapping: the main heap, anonymous mappings (thread arenas,
    large arrays, thread stacks) and files (code, libraries), from /proc/self/smaps."""
    out = {"heap": 0.0, "anonymous": 0.0, "file": 0.0}
    kind = "file"
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as fh:
        for line in fh:
            head = line.split(maxsplit=6)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header
                path = head[5].strip() if len(head) > 5 else ""
                kind = "heap" if path == "[heap]" else "anonymous" if not path or \
                    path.startswith("[anon") or path.startswith("[stack") else "file"
            elif head[0] == "Rss:":
                out[kind] += int(head[1]) / 1024.0
    return {k: round(v, 2) for k, v in out.items()}


def rss_mb() -> float:
    """Resident set size of this process (MB), from /proc."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    name = f"soak-{uuid.uuid4().hex[:6]}"
    events = Path(tempfile.gettempdir()) / f"{name}.jsonl"
    replay = subprocess.Popen([sys.executable, "-m", "closedloop", "replay", str(args.file),
                               "--name", name, "--loop", "--chunk-ms", "10"],
                              stdout=subprocess.PIPE, text=True)
    assert replay.stdout is not None
    start_info = json.loads(replay.stdout.readline())
    fs = float(start_info["fs"])
    async with local_broker(kinds=("existing", "mosquitto")) as broker:
        cfg = load_config(None, [
            f'streams.eeg.name="{name}"', 'phase.reference=["F3", "T3", "Cz", "P3"]',
            f'safety.day_counter_dir="{events.with_suffix(".days")}"',
            "phase.band_hz=[8.5, 12.5]", f'recording.events="{events}"',
            f'stimulator.coil_stream="{name}-coil"', f'recording.marker_stream="{name}-pulses"',
            "stimulator.arm_on_start=true", "trigger.min_interval_s=2.0", "trigger.jitter_s=0.5",
            "safety.max_pulses=10000", "mqtt.enabled=true", f'mqtt.instance="{name}"',
            f"mqtt.port={broker.port}", "mqtt.metrics_interval_s=5"])
        service = ClosedLoopService(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop, attachments=planes_for(cfg)))
        await service.ready.wait()
        t0 = time.monotonic()
        lsl0 = pylsl.local_clock()
        first_sample_lsl = float(start_info["t0"])
        samples: list[tuple[float, float]] = []
        blocks: list[dict[str, Any]] = []
        block_s = args.block_min * 60.0
        end = t0 + args.minutes * 60.0
        next_block = t0 + block_s
        s = service.stats
        fired0, refused0 = s.fired, sum(s.refused.values())
        s.chunk_to_decision_ms.reset()
        snap0: tracemalloc.Snapshot | None = None
        by_kind0: dict[str, float] | None = None
        objects0 = 0
        if args.tracemalloc:
            tracemalloc.start(args.tracemalloc)
        while time.monotonic() < end and not task.done():
            await asyncio.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
            now = time.monotonic()
            samples.append((round(now - t0, 1), round(rss_mb(), 2)))
            if by_kind0 is None and now - t0 >= args.warmup_s:
                by_kind0, objects0 = rss_by_kind_mb(), len(gc.get_objects())
                if args.tracemalloc:
                    snap0 = tracemalloc.take_snapshot()
            if now >= next_block or now >= end:
                refused = sum(s.refused.values())
                blocks.append({"block": len(blocks) + 1, "end_s": round(now - t0, 1),
                               "chunk_to_decision_ms": s.chunk_to_decision_ms.summary(),
                               "pulses": s.fired - fired0, "refused": refused - refused0})
                fired0, refused0 = s.fired, refused
                s.chunk_to_decision_ms.reset()
                next_block += block_s
        growth_sites = _growth_sites(snap0) if snap0 is not None else None
        by_kind1, objects1 = rss_by_kind_mb(), len(gc.get_objects())
        rss_before_trim = rss_mb()
        trimmed = trim_heap()
        rss_after_trim = rss_mb()
        elapsed_lsl = pylsl.local_clock() - first_sample_lsl
        received = service.rig.eeg.ring.count if service.rig and service.rig.eeg.ring else 0
        resets = service.rig.tracker.resets if service.rig else None
        stop.set()
        stats = await task
    replay.terminate()
    replay.wait(5)
    replay.stdout.close()
    events.unlink(missing_ok=True)
    events.with_suffix(".day.json").unlink(missing_ok=True)
    warm = [m for t, m in samples if t >= args.warmup_s]
    growth = (warm[-1] - warm[0]) if len(warm) > 1 else None
    expected = int(elapsed_lsl * fs)
    p99_first = blocks[0]["chunk_to_decision_ms"]["p99"] if blocks else None
    p99_last = blocks[-1]["chunk_to_decision_ms"]["p99"] if blocks else None
    return {
        "benchmark": "soak", "recording": str(args.file), "minutes": args.minutes,
        "rss_mb": {"start": warm[0] if warm else None, "end": warm[-1] if warm else None,
                   "growth_after_warmup": round(growth, 2) if growth is not None else None,
                   "series": samples},
        "blocks": blocks,
        "pulses": stats.fired, "refused": dict(stats.refused),
        "samples": {"expected_approx": expected, "received": received,
                    "missing_beyond_one_chunk": max(0, expected - received - int(0.01 * fs)),
                    "ring_overruns": stats.samples_lost, "estimator_resets": resets,
                    "stream_events": list(stats.stream_events)},
        "targets": {"rss_growth_under_5mb": growth is not None and growth < 5.0,
                    "zero_lost_samples": (stats.samples_lost == 0 and not resets
                                          and expected - received <= int(0.01 * fs)),
                    "p99_last_within_20pct_of_first":
                        (p99_last <= 1.2 * p99_first) if p99_first and p99_last else None},
        "python_heap_growth_sites": growth_sites,
        "memory_diagnosis": {
            "rss_by_mapping_after_warmup_mb": by_kind0, "rss_by_mapping_end_mb": by_kind1,
            "python_objects_after_warmup": objects0, "python_objects_end": objects1,
            "rss_end_before_malloc_trim_mb": round(rss_before_trim, 2),
            "rss_end_after_malloc_trim_mb": round(rss_after_trim, 2),
            "malloc_trim_released": trimmed,
            "service_heap_trim_ms": stats.heap_trim_ms.summary()},
        "mqtt_broker": f"{broker.kind}:{broker.port}",
        "lsl_start": lsl0,
    }


def _growth_sites(snap0: tracemalloc.Snapshot, top: int = 15) -> list[dict[str, Any]]:
    """Where the Python heap grew since ``snap0`` (tracemalloc), largest first."""
    snap1 = tracemalloc.take_snapshot()
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = snap1.filter_traces(skip).compare_to(snap0.filter_traces(skip), "traceback")
    return [{"kib": round(d.size_diff / 1024, 1), "blocks": d.count_diff,
             "where": [f"{f.filename}:{f.lineno}" for f in d.traceback][-6:]}
            for d in diff[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--block-min", type=float, default=10.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--file", type=Path, default=REPO.parent / "shared" / "data" / "eeg"
                    / "eegmat" / "Subject19_1.edf")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="diagnose growth: trace Python allocations (this many frames) and "
                         "report where the heap grew after the warm-up (slows the service)")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(soak(args)), indent=2))


if __name__ == "__main__":
    main()
