"""The ``closedloop`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from closedloop import __version__
from closedloop.blas import single_threaded_blas
from closedloop.config.load import load_config, parse_overrides
from closedloop.errors import ClosedLoopError, ConfigError

if TYPE_CHECKING:
    from closedloop.control.service import ClosedLoopService

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--config", "-c", required=required, help="TOML configuration file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set trigger.target_phase_deg=180 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="closedloop", description=(
        "Brain-state-dependent TMS: phase-locked pulses from EEG over Lab Streaming Layer."))
    ap.add_argument("--version", action="version", version=f"closedloop {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the service until SIGINT/SIGTERM (SIGHUP reloads)")
    _add_config_args(p, required=True)
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="logs on stdout as text lines or JSON objects")

    p = sub.add_parser("demo", help="simulator + service + simulated stimulator, then a summary")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--eeg-rate", type=float, default=5000.0, help="simulated EEG rate, Hz")
    p.add_argument("--seed", type=int, default=None, help="simulator seed")
    p.add_argument("--events", default=None, help="event log path (default: a temp file)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--protocol", default=None, help="run an MEP protocol (mt-mlpest, "
                   "mt-ifcn, io-curve, phase-map) instead of phase-triggered single pulses")
    p.add_argument("--mqtt", action="store_true", help="also run the MQTT control plane, "
                   "driven by a scripted operator (uses a local broker, or starts one)")
    p.add_argument("--report", default=None, metavar="DIR", help="record the session (XDF) "
                   "and write its HTML report into DIR")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a service setting (repeatable)")

    p = sub.add_parser("simulate", help="publish simulated EEG and EMG over LSL")
    p.add_argument("--prefix", default="closedloop-sim", help="stream name prefix")
    p.add_argument("--eeg-rate", type=float, default=5000.0)
    p.add_argument("--emg-rate", type=float, default=5000.0)
    p.add_argument("--chunk-ms", type=float, default=2.0, help="chunk length, like an amplifier")
    p.add_argument("--coil-stream", default="closedloop-sim-coil",
                   help="stream of the simulated stimulator to listen to")
    p.add_argument("--mu-freq", type=float, default=10.0, help="mu frequency, Hz")
    p.add_argument("--mu-amplitude", type=float, default=20.0, help="mu amplitude, µV")
    p.add_argument("--s50", type=float, default=50.0, help="intensity of half-maximal MEP, %%")
    p.add_argument("--best-phase-deg", type=float, default=180.0,
                   help="mu phase of the largest MEPs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="seconds (default: forever)")

    p = sub.add_parser("replay", help="play an EDF/BDF/XDF recording over LSL in real time")
    p.add_argument("file", help="EDF, BDF or XDF file")
    p.add_argument("--name", default=None, help="LSL stream name (default: the file's stem)")
    p.add_argument("--type", default="EEG", help="LSL stream type")
    p.add_argument("--chunk-ms", type=float, default=10.0)
    p.add_argument("--start", type=float, default=0.0, help="start at this second")
    p.add_argument("--duration", type=float, default=None, help="play this many seconds")
    p.add_argument("--stop", type=float, default=None, help="stop at this second")
    p.add_argument("--loop", action="store_true", help="start again at the end")
    p.add_argument("--streams", nargs="+", default=None,
                   help="XDF: replay only these streams (by name)")
    p.add_argument("--progress", action="store_true", help="show progress on stderr")
    p.add_argument("--speed", type=float, default=1.0, help="push N times faster, keeping "
                   "the recording's time base (for recorders and offline consumers; the "
                   "closed-loop service needs 1)")

    p = sub.add_parser("ctl", help="send a command over MQTT and print the reply; or 'watch'")
    p.add_argument("verb", help="arm, disarm, start, stop, set, calibrate, status, reload, "
                                "or watch")
    p.add_argument("args", nargs="*", metavar="KEY=VALUE",
                   help="command fields, e.g. target_phase_deg=180 (values read as TOML)")
    p.add_argument("--config", "-c", default=None, help="TOML file with the [mqtt] section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set mqtt.instance=rig1")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--instance", default=None)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    p.add_argument("--count", type=int, default=None, help="watch: stop after N messages")

    p = sub.add_parser("status", help="print the health summary of a running service")
    p.add_argument("--config", "-c", default=None, help="the service's config (finds the file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--file", default=None, help="the status file itself")

    p = sub.add_parser("evaluate-phase", help="score the phase estimators on a recording "
                       "against the Zrenner 2020 ground truth")
    p.add_argument("file", help="EDF, BDF, or .npz (data, labels, fs)")
    p.add_argument("--channel", default="C3")
    p.add_argument("--reference", nargs="*", default=[], help="Hjorth reference channels")
    p.add_argument("--estimators", nargs="+", default=None)
    p.add_argument("--train-s", type=float, default=60.0,
                   help="seconds that train ETP and wiener and give the peak; scored after")
    p.add_argument("--rhythm", choices=["alpha", "beta", "theta"], default="alpha",
                   help="where the individual peak is looked for")
    p.add_argument("--json", dest="json_out", default=None, help="write the report here")
    p.add_argument("--png", dest="png_out", default=None, help="polar histogram PNG")

    p = sub.add_parser("calibrate", help="find the peak, SNR and best phase estimator from "
                       "resting EEG (live or a file) and write them into a config")
    _add_config_args(p, required=True)
    p.add_argument("--seconds", type=float, default=120.0, help="live recording length")
    p.add_argument("--file", default=None, help="use a recording (EDF/BDF/npz) instead")
    p.add_argument("--out", default=None, help="write the calibrated config here")

    p = sub.add_parser("stimulator", help="bench-test a stimulator: 'stimulator check'")
    ssub = p.add_subparsers(dest="stim_command", required=True, metavar="check")
    c = ssub.add_parser("check", help="connect, print status, optionally set intensity, arm, "
                        "fire once and disarm; print a JSON report")
    c.add_argument("--driver", required=True, choices=["simulated", "ttl", "magstim-200",
                                                      "magstim-bistim", "magstim-rapid",
                                                      "magventure"])
    c.add_argument("--port", default="", help="serial port of the device")
    c.add_argument("--intensity", type=float, default=None, help="set this output, %%")
    c.add_argument("--fire", action="store_true", help="arm, fire one pulse, disarm")
    c.add_argument("--config", default=None, help="take the other settings (safety limits, "
                   "ttl line, unlock code...) from this file")
    c.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE")

    p = sub.add_parser("offline", help="run the decision pipeline over a recording without "
                       "LSL, as fast as the CPU allows; print decisions summary (JSON)")
    _add_config_args(p, required=False)
    p.add_argument("file", help="EDF/BDF, XDF (EEG and, when present, EMG) or .npz")
    p.add_argument("--chunk-ms", type=float, default=10.0, help="the amplifier's chunk size")
    p.add_argument("--delay-ms", type=float, default=1.0, help="modelled processing delay: "
                   "decisions are taken at the newest sample + this")
    p.add_argument("--decisions", default=None, help="write every decision and pulse here "
                   "(JSONL)")

    p = sub.add_parser("report", help="write a session's HTML report (figures as PNGs too)")
    p.add_argument("events", help="the session's event log (recording.events)")
    p.add_argument("--xdf", default=None, help="the session recording (recording.xdf): "
                   "gives the true phase of every pulse")
    p.add_argument("--out", default=None, help="output folder (default: beside the log)")

    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("file", help="TOML configuration file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--print", action="store_true", help="print the effective configuration")

    p = sub.add_parser("config-reference", help="print the configuration reference, generated "
                       "from the schema: markdown, or a JSON Schema")
    p.add_argument("--format", default="markdown",
                   choices=("markdown", "json", "set-json", "refusals"),
                   help="markdown: the reference table (docs/configuration.md); json: JSON "
                   "Schema of a configuration; set-json: JSON Schema of the MQTT set payload; "
                   "refusals: every refusal reason (docs/refusals.md)")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write it here (default: standard output)")
    return ap


def _cmd_run(args: argparse.Namespace) -> int:
    from closedloop.control.logs import log_event, setup_logging  # noqa: PLC0415
    from closedloop.control.service import (  # noqa: PLC0415 - heavy import
        ClosedLoopService,
        ServiceStats,
    )
    from closedloop.mqtt.plane import planes_for  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    logs = setup_logging(args.log_format)

    async def main() -> ServiceStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        service = ClosedLoopService(cfg, config_source=str(args.config),
                                    config_overrides=tuple(args.overrides))
        service.subscribe(log_event)
        loop.add_signal_handler(signal.SIGHUP, _sighup_reload, service)
        return await service.run(stop, attachments=planes_for(cfg))

    try:
        stats = asyncio.run(main())
    finally:
        logs.stop()  # the last lines are written before the summary (or the error)
    print(json.dumps({"fired": stats.fired, "refused": dict(stats.refused),
                      "decisions": stats.decisions, "events": cfg.recording.events}),
          flush=True)
    return 0


def _sighup_reload(service: ClosedLoopService) -> None:
    """SIGHUP: re-read the config file; a bad one is refused and the running one kept.

    ``reload`` records every refusal (``reload_refused``, with the reason). Nothing may
    leave this handler: it has no caller to tell, only the loop's default handler, which
    would print a traceback. An exception that is not a refusal (a bug) is also treated
    as the MQTT plane treats one: the stimulator is disarmed and a ``fault`` recorded.
    """
    try:
        settings = service.api.reload(by="SIGHUP")
    except ClosedLoopError:
        return  # recorded by reload as reload_refused
    except Exception as exc:  # recorded by reload as reload_refused; and a fault
        try:
            service.api.disarm(by="internal_error")
        except Exception as disarm_exc:
            service.fail(disarm_exc)
        service.record("fault", error=type(exc).__name__, message=str(exc)[:500],
                       during="SIGHUP reload")
        return
    service.record("reloaded", by="SIGHUP", settings=settings)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import math  # noqa: PLC0415

    from closedloop.sim.eeg_model import EegSimParams  # noqa: PLC0415
    from closedloop.sim.emg_model import EmgSimParams, MepModel  # noqa: PLC0415
    from closedloop.sim.simulator import Simulator, SimulatorSettings  # noqa: PLC0415

    settings = SimulatorSettings(
        prefix=args.prefix,
        eeg=EegSimParams(fs=args.eeg_rate, mu_freq_hz=args.mu_freq,
                         mu_amplitude_uv=args.mu_amplitude),
        emg=EmgSimParams(fs=args.emg_rate),
        mep=MepModel(s50_pct=args.s50, best_phase_rad=math.radians(args.best_phase_deg)),
        chunk_ms=args.chunk_ms, coil_stream=args.coil_stream, seed=args.seed)
    sim = Simulator(settings)
    signal.signal(signal.SIGTERM, lambda *_: sim.stop())
    try:
        sim.run(args.duration)
    except KeyboardInterrupt:
        sim.stop()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from closedloop.demo import run_demo  # noqa: PLC0415

    return run_demo(duration_s=args.duration, eeg_rate=args.eeg_rate, overrides=args.overrides,
                    seed=args.seed, events=args.events, as_json=args.json, mqtt=args.mqtt,
                    protocol=args.protocol, report_dir=args.report)


def _cmd_offline(args: argparse.Namespace) -> int:
    from closedloop.replay.offline import run_offline  # noqa: PLC0415
    from closedloop.replay.recording import load_recording, load_xdf  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    path = Path(args.file)
    emg = None
    if path.suffix.lower() == ".xdf":
        content = load_xdf(path)
        eeg = content.first("EEG")
        emg = next((r for r in content.regular if r.stype.upper() == "EMG"), None)
    else:
        eeg = load_recording(path)
    result = run_offline(cfg, eeg, emg=emg, chunk_ms=args.chunk_ms, delay_ms=args.delay_ms)
    if args.decisions:
        with open(args.decisions, "w", encoding="utf-8") as fh:
            for kind, items in (("decision", result.decisions), ("pulse", result.pulses),
                                ("pulse_refused", result.refused), ("mep", result.meps)):
                for item in items:
                    fh.write(json.dumps({"event": kind, **item}) + "\n")
    print(json.dumps({"file": str(path), **result.summary()}, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from closedloop.recording.report import build_report  # noqa: PLC0415

    page = build_report(args.events, xdf_path=args.xdf, out_dir=args.out)
    print(page)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from closedloop.replay.player import play  # noqa: PLC0415
    from closedloop.replay.recording import load_edf  # noqa: PLC0415

    if not args.speed > 0:
        print("closedloop: --speed must be > 0", file=sys.stderr)
        return 2
    if args.speed != 1.0:
        print(f"closedloop: replaying at {args.speed:g}x: timestamps keep the recording's "
              "time base and run ahead of the clock (a closed-loop service refuses them; "
              "use `closedloop offline`)", file=sys.stderr)
    if Path(args.file).suffix.lower() == ".xdf":
        return _replay_xdf(args)
    rec = load_edf(args.file)
    name = args.name or Path(args.file).stem
    duration = args.duration
    if args.stop is not None:
        if args.stop <= args.start:
            print("closedloop: --stop must be after --start", file=sys.stderr)
            return 2
        duration = args.stop - args.start if duration is None else min(duration,
                                                                         args.stop - args.start)
    total = duration if duration is not None else rec.duration_s - args.start
    progress = _progress_printer(total) if args.progress else None

    def announce(t0: float) -> None:
        print(json.dumps({"event": "replay_start", "name": name, "t0": t0, "fs": rec.fs,
                          "channels": list(rec.labels), "start_s": args.start}), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        play(rec, name=name, stream_type=args.type, chunk_ms=args.chunk_ms,
             start_s=args.start, duration_s=duration, loop=args.loop, on_start=announce,
             on_progress=progress, speed=args.speed)
    return 0


def _cmd_ctl(args: argparse.Namespace) -> int:
    import aiomqtt  # noqa: PLC0415

    from closedloop.mqtt.ctl import send_command, watch  # noqa: PLC0415

    overrides = list(args.overrides)
    for key, value in (("host", args.host), ("port", args.port), ("instance", args.instance)):
        if value is not None:
            overrides.append(f"mqtt.{key}={json.dumps(value)}")
    cfg = load_config(args.config, overrides).mqtt
    try:
        if args.verb == "watch":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(watch(cfg, count=args.count))
            return 0
        fields = dict(parse_overrides(args.args))
        reply = asyncio.run(send_command(cfg, args.verb, fields, timeout_s=args.timeout))
    except aiomqtt.MqttError as exc:
        print(f"closedloop: MQTT broker {cfg.host}:{cfg.port}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def _cmd_status(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    path = args.file or load_config(args.config, args.overrides).recording.status_path()
    try:
        with open(path, encoding="utf-8") as fh:
            status = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"closedloop: no status at {path}: {exc}", file=sys.stderr)
        return 1
    age = time.time() - float(status.get("written_wall_time", 0.0))
    print(json.dumps(status, indent=2))
    if status.get("state") == "stopped":
        print(f"closedloop: the service stopped ({age:.0f} s ago)", file=sys.stderr)
        return 1
    if age > 5.0:
        print(f"closedloop: status is {age:.0f} s old: is the service running?", file=sys.stderr)
        return 1
    return 0 if status.get("state") != "fault" else 1


def _cmd_evaluate_phase(args: argparse.Namespace) -> int:
    from closedloop.phase.evaluate import ESTIMATORS  # noqa: PLC0415
    from closedloop.phase.report import evaluate_file  # noqa: PLC0415

    names = args.estimators or list(ESTIMATORS)
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        print(f"closedloop: unknown estimator(s) {', '.join(unknown)} (known: "
              f"{', '.join(ESTIMATORS)})", file=sys.stderr)
        return 2
    report = evaluate_file(Path(args.file), channel=args.channel, reference=args.reference,
                           estimators=names, train_s=args.train_s, rhythm=args.rhythm,
                           json_out=Path(args.json_out) if args.json_out else None,
                           png_out=Path(args.png_out) if args.png_out else None)
    print(f"{report['file']}: {report['signal']}, peak {report['peak_hz']} Hz, SNR "
          f"{report['snr_db']} dB; ground-truth spread {report['truth_spread_deg_median']}°")
    print(f"{'estimator':<11} {'gate':<11} {'bias°':>7} {'circ SD°':>9} {'MAE°':>7} {'µs':>7}")
    for name, r in report["estimators"].items():
        for gate, s in r["scores"].items():
            print(f"{name:<11} {gate:<11} {s['bias_deg']:>7} {s['circ_sd_deg']:>9} "
                  f"{s['mae_deg']:>7} {r['cost_us']['median']:>7}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from closedloop.phase.calibrate import (  # noqa: PLC0415
        LIVE_ESTIMATORS,
        calibrate_signal,
        signal_from_file,
        write_config,
    )
    from closedloop.streams.capture import record_live  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    if args.file:
        x, fs = signal_from_file(cfg, Path(args.file))
    else:
        print(f"recording {args.seconds:g} s of resting EEG from the configured stream; "
              "the participant should sit still, eyes open, relaxed", flush=True)
        x, fs = record_live(cfg, args.seconds, progress=lambda s: print(
            f"  {s:.0f} s", end="\r", flush=True))
    print(f"scoring {len(LIVE_ESTIMATORS)} estimators and their variants on "
          f"{len(x) / fs:.0f} s of EEG (about a minute)", flush=True)
    result = calibrate_signal(x, fs, cfg.phase)
    print(f"peak {result['peak_hz']} Hz, SNR {result['snr_db']} dB; band "
          f"{result['band_hz'][0]:g}-{result['band_hz'][1]:g} Hz")
    for name, s in result["scores_amp_above_median"].items():
        print(f"  {name:<34} circular SD {s['circ_sd_deg']}°, bias {s['bias_deg']}° "
              "(amplitude above the median)")
    shown = " ".join(f"{k}={v:g}" for k, v in result["parameters"].items())
    print(f"best: {result['estimator']} {shown}; {result['verdict']}")
    if args.out:
        model = write_config(cfg, result, Path(args.out), x, fs)
        print(f"written: {args.out}" + (f" and {model}" if model else ""))
    print(json.dumps(result))
    return 0 if result["useful"] else 3


def _progress_printer(total_s: float) -> Callable[[float], None]:
    """A one-line progress display on stderr."""
    def show(done_s: float) -> None:
        frac = min(1.0, done_s / total_s) if total_s > 0 else 1.0
        bar = "#" * int(frac * 30)
        print(f"\r[{bar:<30}] {done_s:7.1f} / {total_s:.1f} s", end="", file=sys.stderr,
              flush=True)
    return show


def _replay_xdf(args: argparse.Namespace) -> int:
    """Every stream of an XDF file, with its own name, type and labels, on one time base."""
    import threading  # noqa: PLC0415

    import pylsl  # noqa: PLC0415

    from closedloop.replay.player import play, play_markers  # noqa: PLC0415
    from closedloop.replay.recording import load_xdf  # noqa: PLC0415

    content = load_xdf(args.file)
    if args.streams:
        names = {r.name for r in content.regular} | {m.name for m in content.markers}
        unknown = [s for s in args.streams if s not in names]
        if unknown:
            print(f"closedloop: {args.file}: no stream(s) {', '.join(unknown)}; it has "
                  f"{', '.join(sorted(names))}", file=sys.stderr)
            return 2
        content = type(content)(
            tuple(r for r in content.regular if r.name in args.streams),
            tuple(m for m in content.markers if m.name in args.streams))
    firsts = [r.first_timestamp for r in content.regular] + [
        float(m.timestamps[0]) for m in content.markers if len(m.timestamps)]
    if not firsts:
        print(f"closedloop: {args.file}: no stream to replay", file=sys.stderr)
        return 1
    origin = min(firsts)
    t0 = float(pylsl.local_clock()) + 0.5
    stop = threading.Event()
    threads = [threading.Thread(target=play, kwargs={
        "rec": r, "name": r.name, "stream_type": r.stype, "chunk_ms": args.chunk_ms,
        "stop": stop, "t0": t0 + (r.first_timestamp - origin), "speed": args.speed},
        daemon=True)
        for r in content.regular]
    threads += [threading.Thread(target=play_markers, kwargs={
        "track": m, "t0": t0, "first_timestamp": origin, "stop": stop, "speed": args.speed},
        daemon=True)
        for m in content.markers]
    print(json.dumps({"event": "replay_start", "t0": t0, "streams": [
        r.name for r in content.regular] + [m.name for m in content.markers]}), flush=True)
    for th in threads:
        th.start()
    try:
        for th in threads:
            while th.is_alive():
                th.join(0.5)
    except KeyboardInterrupt:
        stop.set()
    return 0


def _cmd_stimulator(args: argparse.Namespace) -> int:
    from closedloop.stim.check import check_stimulator  # noqa: PLC0415

    cfg = load_config(args.config, [*args.overrides, f'stimulator.driver="{args.driver}"',
                                    f'stimulator.port="{args.port}"'])
    report = check_stimulator(cfg, intensity_pct=args.intensity, fire=args.fire)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def _cmd_check_config(args: argparse.Namespace) -> int:
    from closedloop.config.redact import redacted_config  # noqa: PLC0415
    from closedloop.mqtt.worker import insecure_connection  # noqa: PLC0415 - imports aiomqtt

    cfg = load_config(args.file, args.overrides)
    warning = insecure_connection(cfg.mqtt)
    if warning is not None:
        print(f"closedloop: warning: {warning}", file=sys.stderr)
    if args.print:  # secrets redacted: this output gets pasted into issues and lab notes
        print(json.dumps(redacted_config(cfg), indent=2))
    else:
        print(f"{args.file}: OK")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from closedloop.config.reference import render  # noqa: PLC0415

    text = render(args.format)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"closedloop: cannot write {args.output}: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``closedloop`` console script."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "ctl":  # KEY=VALUE fields may follow options: ctl set --instance x k=v
        fields = [e for e in extra if "=" in e and not e.startswith("-")]
        args.args = [*args.args, *fields]
        extra = [e for e in extra if e not in fields]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    single_threaded_blas()
    # keep liblsl's INFO chatter out of the terminal (a user's own LSLAPICFG wins)
    os.environ.setdefault("LSLAPICFG", str(Path(__file__).parent / "resources" / "lsl_api.cfg"))
    handlers = {"run": _cmd_run, "simulate": _cmd_simulate, "demo": _cmd_demo,
                "check-config": _cmd_check_config, "replay": _cmd_replay,
                "ctl": _cmd_ctl, "status": _cmd_status,
                "evaluate-phase": _cmd_evaluate_phase, "calibrate": _cmd_calibrate,
                "stimulator": _cmd_stimulator, "report": _cmd_report,
                "offline": _cmd_offline, "config-reference": _cmd_config_reference}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"closedloop: configuration error: {exc}", file=sys.stderr)
        return 2
    except ClosedLoopError as exc:
        print(f"closedloop: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
