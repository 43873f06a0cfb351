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

from closedloop.blas import single_threaded_blas
from closedloop.cli_args import build_parser
from closedloop.config.load import load_config, parse_overrides
from closedloop.errors import ChannelNotFoundError, ClosedLoopError, ConfigError

if TYPE_CHECKING:
    from closedloop.control.service import ClosedLoopService

__all__ = ["main"]


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
    # the labels the live rig requires of the EEG stream (control/rig.py), refused alike
    required = {"phase.channel": [cfg.phase.channel], "phase.reference": cfg.phase.reference,
                **{f"trigger.power_conditions[{k}]": [c for c in (cond.channel,
                                                                  *(cond.reference or ())) if c]
                   for k, cond in enumerate(cfg.trigger.power_conditions)}}
    for key, labels in required.items():
        missing = [label for label in labels if label not in eeg.labels]
        if missing:
            raise ChannelNotFoundError(key=key, stream=str(path), missing=missing,
                                       available=eeg.labels)
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

    if args.speed != 1.0:
        print(f"closedloop: replaying at {args.speed:g}x: timestamps keep the recording's "
              "time base and run ahead of the clock (a closed-loop service refuses them; "
              "use `closedloop offline`)", file=sys.stderr)
    is_xdf = Path(args.file).suffix.lower() == ".xdf"
    misplaced = _misplaced_replay_options(args, is_xdf=is_xdf)
    if misplaced:
        kind = "EDF/BDF" if is_xdf else "XDF"
        print(f"closedloop: {', '.join(misplaced)}: only for {kind} files, and "
              f"{args.file} is not one", file=sys.stderr)
        return 2
    if is_xdf:
        return _replay_xdf(args)
    if args.stop is not None and args.stop <= args.start:
        print("closedloop: --stop must be after --start", file=sys.stderr)
        return 2
    rec = load_edf(args.file)
    name = args.name or Path(args.file).stem
    duration = args.duration
    if args.stop is not None:
        duration = args.stop - args.start if duration is None else min(duration,
                                                                         args.stop - args.start)
    if args.start >= rec.duration_s:
        print(f"closedloop: --start {args.start:g} is past the end of {args.file} "
              f"({rec.duration_s:g} s long)", file=sys.stderr)
        return 2
    if duration is not None and int(duration * rec.fs) < 1:
        print(f"closedloop: --duration {duration:g}: shorter than one sample at "
              f"{rec.fs:g} Hz", file=sys.stderr)
        return 2
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


def _misplaced_replay_options(args: argparse.Namespace, *, is_xdf: bool) -> list[str]:
    """The options given that do not apply to this kind of file (replay would ignore them)."""
    if not is_xdf:
        return ["--streams"] if args.streams is not None else []
    edf_only = {"--name": args.name is not None, "--type": args.type != "EEG",
                "--start": args.start != 0.0, "--duration": args.duration is not None,
                "--stop": args.stop is not None, "--loop": args.loop,
                "--progress": args.progress}
    return [option for option, given in edf_only.items() if given]


def _cmd_streams(args: argparse.Namespace) -> int:
    from closedloop.streams.listing import describe, list_streams  # noqa: PLC0415

    found = list_streams(wait_s=args.wait, name=args.name, stype=args.type)
    if args.json:
        print(json.dumps([s.as_json() for s in found], indent=2))
    elif found:
        print(describe(found))
    if not found:
        which = " ".join(f"{k} {v!r}" for k, v in (("named", args.name), ("of type", args.type))
                         if v is not None)
        print(f"closedloop: no LSL stream{' ' + which if which else ''} seen in "
              f"{args.wait:g} s: is the amplifier's LSL app streaming, on this network?",
              file=sys.stderr)
        return 1
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

    path = args.config or args.file  # the positional FILE: kept for scripts that use it
    cfg = load_config(path, args.overrides)
    warning = insecure_connection(cfg.mqtt)
    if warning is not None:
        print(f"closedloop: warning: {warning}", file=sys.stderr)
    if args.print:  # secrets redacted: this output gets pasted into issues and lab notes
        print(json.dumps(redacted_config(cfg), indent=2))
    else:
        print(f"{path}: OK")
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
    parser = build_parser()
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
                "offline": _cmd_offline, "config-reference": _cmd_config_reference,
                "streams": _cmd_streams}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"closedloop: configuration error: {exc}", file=sys.stderr)
        return 2
    except ClosedLoopError as exc:
        print(f"closedloop: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path the user gave: a folder that is not there, no rights
        if exc.filename is None:
            raise
        print(f"closedloop: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
