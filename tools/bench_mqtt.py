#!/usr/bin/env python3
"""Does the MQTT control plane cost the real-time path anything? JSON on stdout.

In one run, alternating blocks (off, on, off, on) of the service at 5000 Hz x 64 EEG
channels (as in ``bench_latency.py``): *off* with MQTT disabled, *on* with MQTT enabled,
telemetry on (decisions, pulses, metrics every second), and a separate commander process
sending ``1000`` commands per minute (``status`` and ``set`` alternately) over a
persistent connection to the broker on 127.0.0.1:1883, measuring each round trip.

Reported: the EEG-chunk-to-decision p50/p99 with MQTT off and on (the target: p99 "on"
within 10% of "off"), the share of decisions later than 1 and 2 ms (the tail's size: a
p99 gives only its edge), the command round-trip p50/p99, and the CPU used by the
service, its MQTT worker process, the broker and the commander.

``--pairs N`` runs N off/on pairs (default 2). ``--nice A B ...`` cycles the "on" blocks
through these ``mqtt.nice`` values (e.g. ``--pairs 4 --nice 0 10`` compares the
MQTT worker at equal and at lowered priority, in one run).

``--isolate`` keeps the service (this process) on CPU 0 and the broker, the commander and
the EEG pusher on CPU 1, as a lab would give the real-time process cores of its own (on a
two-core machine the other processes otherwise take turns on the service's core).

Usage: ``python tools/bench_mqtt.py [--seconds 20] [--rate 5000] [--per-minute 1000]
[--pairs 2] [--nice N ...] [--isolate]``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

_here = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_latency", _here / "bench_latency.py")
assert _spec is not None and _spec.loader is not None
bench_latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_latency)


async def commander(prefix: str, per_minute: float, seconds: float, port: int) -> None:
    """Child process: send commands at a steady rate and print the round trips."""
    import aiomqtt  # noqa: PLC0415
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    bench_latency.pin_from_env()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0 = ru.ru_utime + ru.ru_stime, time.perf_counter()
    rtts: list[float] = []
    errors = 0
    reply_topic = f"{prefix}reply/bench-{uuid.uuid4().hex[:8]}"
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5,
                              socket_options=nodelay) as c:
        await c.subscribe(reply_topic, qos=1)
        period = 60.0 / per_minute
        t_next = time.perf_counter()
        end = t_next + seconds
        n = 0
        messages = aiomqtt.Client.messages.__get__(c)  # one iterator for the whole run
        while time.perf_counter() < end:
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            t_next += period
            verb = "status" if n % 2 == 0 else "set"
            body: dict[str, Any] = {"ts": time.time(), "id": n}
            if verb == "set":
                body["tolerance_deg"] = 170 + n % 10
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = str(n).encode()
            t0 = time.perf_counter()
            await c.publish(f"{prefix}cmd/{verb}", json.dumps(body), qos=1, properties=props)
            try:
                async with asyncio.timeout(2.0):
                    async for m in messages:
                        if json.loads(bytes(m.payload)).get("id") == n:  # type: ignore[arg-type]
                            break
                rtts.append((time.perf_counter() - t0) * 1000.0)
            except TimeoutError:
                errors += 1
            n += 1
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru.ru_utime + ru.ru_stime - cpu0) / (time.perf_counter() - wall0) * 100
    print(json.dumps({"sent": n, "timeouts": errors, "rtts": rtts, "cpu_pct": round(cpu, 1)}))


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def block(mqtt_on: bool, rate: float, seconds: float, per_minute: float, port: int,
                nice: int | None, broker_pid: int | None) -> dict[str, Any]:
    inst = f"bench-{uuid.uuid4().hex[:6]}"
    prefix = f"closedloop/{inst}/"
    extra: tuple[str, ...] = ()
    if mqtt_on:
        extra = ("mqtt.enabled=true", f'mqtt.instance="{inst}"', f"mqtt.port={port}",
                 "mqtt.metrics_interval_s=1",
                 "mqtt.status_interval_s=1",
                 *((f"mqtt.nice={nice}",) if nice is not None else ()))

    async def load(service: Any) -> dict[str, Any] | None:
        if not mqtt_on:
            return None
        worker_pid = service.attachments[0].pid  # the MQTT worker process
        b0, w0 = cpu_seconds(broker_pid), time.perf_counter()
        k0 = cpu_seconds(worker_pid)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--commander", prefix, "--per-minute", str(per_minute),
            "--seconds", str(seconds - 1.0), "--port", str(port), stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        b1, w1 = cpu_seconds(broker_pid), time.perf_counter()
        k1 = cpu_seconds(worker_pid)

        def pct(a: float | None, b: float | None) -> float | None:
            return round((b - a) / (w1 - w0) * 100, 1) if a is not None and b else None
        return {**json.loads(out), "broker_cpu_pct": pct(b0, b1), "worker_cpu_pct": pct(k0, k1)}

    # the default estimator, measured after it is trained (15 s) and has taken over
    extra = ("phase.calibration_s=15", *extra)
    warmup = 2.0 + 15.0 + bench_latency.TRAINED_SWITCH_DELAY_S
    return dict(await bench_latency.measure(rate, seconds, 2.0, extra, load, warmup_s=warmup))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="per block")
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--per-minute", type=float, default=1000.0)
    ap.add_argument("--port", type=int, default=None,
                    help="broker on 127.0.0.1 (default: a private mosquitto with "
                         "set_tcp_nodelay, as configs/mosquitto recommends)")
    ap.add_argument("--pairs", type=int, default=2, help="off/on block pairs")
    ap.add_argument("--nice", type=int, nargs="+", default=None,
                    help="mqtt.nice of the 'on' blocks, cycled (default: the config's)")
    ap.add_argument("--isolate", action="store_true",
                    help="service on CPU 0; broker, commander and EEG pusher on CPU 1")
    ap.add_argument("--commander", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.commander:
        asyncio.run(commander(args.commander, args.per_minute, args.seconds, args.port))
        return
    from closedloop.mqtt.local_broker import local_broker  # noqa: PLC0415

    if args.isolate:  # threads and children inherit the affinity of their creator
        os.environ["CLOSEDLOOP_BENCH_CPUS"] = "1"  # the commander and the pusher
        os.sched_setaffinity(0, {1})  # the broker, started from this thread

    async def with_broker() -> list[tuple[bool, dict[str, Any]]]:
        kinds = ("existing",) if args.port == 1883 else ("mosquitto",)
        async with local_broker(kinds=kinds) as broker:
            if args.isolate:
                os.sched_setaffinity(0, {0})  # the service and all its threads
            port = args.port or broker.port
            broker_pid = broker.pid if args.port is None else None
            out = []
            nices = args.nice or [None]
            for i in range(args.pairs):
                for on in (False, True):
                    nice = nices[i % len(nices)] if on else None
                    out.append(((on, nice), await block(on, args.rate, args.seconds,
                                                        args.per_minute, port, nice,
                                                        broker_pid)))
            return out

    blocks = asyncio.run(with_broker())
    kinds = sorted({k for k, _ in blocks}, key=lambda k: (k[0], -1 if k[1] is None else k[1]))

    def label(kind: tuple[bool, int | None]) -> str:
        on, nice = kind
        return "off" if not on else ("on" if nice is None or not args.nice else f"on_nice{nice}")

    def summary(kind: tuple[bool, int | None]) -> dict[str, Any]:
        bs = [b for k, b in blocks if k == kind]

        def mean(f: Any) -> float:
            return round(float(np.mean([f(b) for b in bs])), 5)
        out: dict[str, Any] = {
            "p50": mean(lambda b: b["chunk_to_decision"]["p50"]),
            "p99": mean(lambda b: b["chunk_to_decision"]["p99"]),
            "over_1ms": mean(lambda b: b["chunk_to_decision_late"]["over_1ms"]),
            "over_2ms": mean(lambda b: b["chunk_to_decision_late"]["over_2ms"]),
            "p99_per_block": [b["chunk_to_decision"]["p99"] for b in bs],
            "service_cpu_pct": [b["cpu_pct_of_one_core"] for b in bs]}
        if kind[0]:
            out["broker_cpu_pct"] = [b["during"]["broker_cpu_pct"] for b in bs]
            out["commander_cpu_pct"] = [b["during"]["cpu_pct"] for b in bs]
            out["mqtt_worker_cpu_pct"] = [b["during"]["worker_cpu_pct"] for b in bs]
        return out

    figures = {label(k): summary(k) for k in kinds}
    off = figures["off"]["p99"]
    rtts = [r for (o, _), b in blocks if o for r in b["during"]["rtts"]]
    sent = sum(b["during"]["sent"] for (o, _), b in blocks if o)
    timeouts = sum(b["during"]["timeouts"] for (o, _), b in blocks if o)
    result = {
        "benchmark": "mqtt", "rate_hz": args.rate, "channels": 64,
        "isolated": args.isolate, "machine_cores": os.cpu_count(),
        "commands_per_minute": args.per_minute, "seconds_per_block": args.seconds,
        "pairs": args.pairs, "chunk_to_decision_ms": figures,
        **{f"p99_{k}_over_off": round(v["p99"] / off, 3) for k, v in figures.items()
           if k != "off"},
        "command_round_trip_ms": {
            "count": len(rtts), "sent": sent, "timeouts": timeouts,
            "p50": round(float(np.percentile(rtts, 50)), 3) if rtts else None,
            "p99": round(float(np.percentile(rtts, 99)), 3) if rtts else None},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
