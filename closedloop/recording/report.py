"""``closedloop report``: one self-contained HTML page (and its PNGs) for a session.

Input: the session's event log (``recording.events``) and, when the session was recorded
(``recording.xdf``), its XDF file. From the XDF's EEG the *true* phase of every pulse is
computed offline (the Zrenner et al. 2020 ground truth on the configured channel, Hjorth
reference and band: non-causal filters over the whole recording), so the report shows what
phase the pulses really hit, next to the phase the service predicted. Without a recording
the phase figures show the predicted phase only, and say so.

Figures: true vs targeted pulse phase (polar histograms); MEP amplitude by phase and over
time; MEP amplitude by intensity and the intensity track (threshold hunting, recruitment
curves) when the intensity varied; decision latency and fire-timing error histograms;
refusal reasons; and a table of stream health and faults. The PNGs are embedded in the
HTML as data URIs (one file to mail or archive) and also written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from closedloop.dsp.circular import circular_mean, circular_sd, wrap
from closedloop.errors import ClosedLoopError
from closedloop.extras import require_matplotlib
from closedloop.recording.events import read_events

__all__ = ["SessionData", "build_report", "load_session"]

_PHASE_EVENTS = ("pulse",)


@dataclass
class SessionData:
    """What the report is made of."""

    events: list[dict[str, Any]]
    config: dict[str, Any]
    pulses: list[dict[str, Any]]
    meps: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    refused: list[dict[str, Any]]
    true_phase_deg: list[float | None] = field(default_factory=list)
    truth_note: str = ""


def _wrap_deg(x: float) -> float:
    return (x + 180.0) % 360.0 - 180.0


def load_session(events_path: str | Path, xdf_path: str | Path | None = None) -> SessionData:
    """Read the event log (and the recording) of a session.

    Raises:
        ClosedLoopError: the log is missing, empty or not a closedloop log.
    """
    path = Path(events_path)
    if not path.is_file():
        raise ClosedLoopError(f"{path}: no such event log")
    events = read_events(path)
    starts = [e for e in events if e.get("event") == "session_start"]
    if not starts:
        raise ClosedLoopError(f"{path}: not a closedloop event log (no session_start)")
    # the last session in the file is the one reported
    first = max(i for i, e in enumerate(events) if e.get("event") == "session_start")
    events = events[first:]
    config = events[0].get("config", {})
    data = SessionData(
        events=events, config=config,
        pulses=[e for e in events if e.get("event") in _PHASE_EVENTS],
        meps=[e for e in events if e.get("event") == "mep"],
        decisions=[e for e in events if e.get("event") == "decision"],
        refused=[e for e in events if e.get("event") == "pulse_refused"])
    data.true_phase_deg, data.truth_note = _true_phases(data, xdf_path)
    return data


def _true_phases(data: SessionData, xdf_path: str | Path | None
                 ) -> tuple[list[float | None], str]:
    if xdf_path is None:
        return [None] * len(data.pulses), ("no session recording given (--xdf): the true "
                                           "phase is not available; predicted phase shown")
    from closedloop.phase.truth import ground_truth  # noqa: PLC0415
    from closedloop.replay.recording import load_xdf  # noqa: PLC0415

    content = load_xdf(xdf_path)
    eeg = content.first("EEG")
    phase_cfg = data.config.get("phase", {})
    channel = phase_cfg.get("channel", "C3")
    refs = [r for r in phase_cfg.get("reference", []) if r in eeg.labels]
    if channel not in eeg.labels:
        return [None] * len(data.pulses), f"channel {channel} is not in the recording"
    x = eeg.channel(channel) - (np.mean([eeg.channel(r) for r in refs], axis=0)
                                if refs else 0.0)
    band = phase_cfg.get("band_hz", [8.0, 13.0])
    if band == "auto":
        cal = [e for e in data.events if e.get("event") == "calibrated"]
        band = cal[-1]["band_hz"] if cal else [8.0, 13.0]
    truth = ground_truth(np.asarray(x, dtype=np.float64), eeg.fs, (band[0], band[1]))
    out: list[float | None] = []
    for p in data.pulses:
        i = round((p["lsl_time"] - eeg.first_timestamp) * eeg.fs)
        out.append(math.degrees(truth.phase[i]) if 0 <= i < len(truth.phase) else None)
    ref_txt = f" - mean({', '.join(refs)})" if refs else ""
    return out, (f"true phase: Zrenner et al. 2020 ground truth of {channel}{ref_txt}, "
                 f"{band[0]:g}-{band[1]:g} Hz, from {Path(xdf_path).name}")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)
    return buf.getvalue()


def _figures(d: SessionData) -> dict[str, tuple[str, bytes]]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figs: dict[str, tuple[str, bytes]] = {}
    target = float(d.config.get("trigger", {}).get("target_phase_deg", 0.0))
    predicted = [p.get("predicted_phase_deg") for p in d.pulses]
    true = d.true_phase_deg
    have_true = any(t is not None for t in true)
    bins = np.linspace(-math.pi, math.pi, 37)

    # 1. phase: true vs targeted
    fig, axes = plt.subplots(1, 2, subplot_kw={"projection": "polar"}, figsize=(9, 4.2))
    for ax, values, name in ((axes[0], true, "true phase of the pulses"),
                             (axes[1], predicted, "predicted phase at the pulse")):
        v = np.radians([x for x in values if x is not None])
        title = name
        if len(v):
            counts, _ = np.histogram(np.angle(np.exp(1j * v)), bins=bins)
            ax.bar(bins[:-1], counts, width=np.diff(bins), align="edge", alpha=0.8)
            phase_err = wrap(v - math.radians(target))
            sd = math.degrees(circular_sd(phase_err))
            bias = math.degrees(circular_mean(phase_err))
            title += f"\nn={len(v)}, bias {bias:+.1f}°, circular SD {sd:.1f}°"
        else:
            title += "\n(not available)"
        ax.axvline(math.radians(target), color="r", lw=2)
        ax.set_title(title, fontsize=9)
        ax.set_yticklabels([])
    fig.suptitle(f"Pulse phase (red: target {target:g}°)", fontsize=10)
    fig.tight_layout()
    figs["phase"] = ("True vs targeted pulse phase", _png(fig))

    # 2. MEPs by phase and over time
    by_pulse: dict[float, list[dict[str, Any]]] = {}
    for m in d.meps:
        by_pulse.setdefault(round(m["pulse_lsl_time"], 4), []).append(m)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ph, amp, num = [], [], []
    for k, p in enumerate(d.pulses):
        ms = [m for m in by_pulse.get(round(p["lsl_time"], 4), [])
              if not m.get("rejected") and m.get("p2p_uv") is not None]
        if not ms:
            continue
        phase = true[k] if have_true else p.get("predicted_phase_deg")
        a = max(m["p2p_uv"] for m in ms)
        amp.append(a)
        num.append(k + 1)
        ph.append(phase)
    if amp:
        axes[0].scatter([x for x in ph if x is not None],
                        [a for a, x in zip(amp, ph, strict=True) if x is not None], s=12)
        axes[1].plot(num, amp, ".-", lw=0.6)
    axes[0].set(xlabel=("true" if have_true else "predicted") + " phase (°)",
                ylabel="MEP peak-to-peak (µV)", xlim=(-180, 180),
                title="MEP amplitude by phase" + ("" if amp else " (no MEPs)"))
    axes[1].set(xlabel="pulse", ylabel="MEP peak-to-peak (µV)", title="MEP amplitude over time")
    fig.tight_layout()
    figs["mep"] = ("MEP amplitude by phase and over time", _png(fig))

    # 3. recruitment / threshold track, when the intensity varied
    intensities = [p.get("intensity_pct") for p in d.pulses]
    if len({i for i in intensities if i is not None}) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        pairs = []
        for p in d.pulses:
            ms = [m for m in by_pulse.get(round(p["lsl_time"], 4), [])
                  if not m.get("rejected") and m.get("p2p_uv") is not None]
            if ms:
                pairs.append((p["intensity_pct"], max(m["p2p_uv"] for m in ms)))
        if pairs:
            axes[0].scatter(*zip(*pairs, strict=True), s=12)
        axes[0].set(xlabel="intensity (% of maximum)", ylabel="MEP peak-to-peak (µV)",
                    title="Recruitment")
        axes[1].plot(range(1, len(intensities) + 1), intensities, ".-", lw=0.6)
        results = [e for e in d.events if e.get("event") == "protocol_result"]
        for r in results:
            thr = r.get("threshold_pct") or r.get("result", {}).get("threshold_pct")
            if isinstance(thr, int | float):
                axes[1].axhline(thr, color="r", ls="--", lw=1)
        axes[1].set(xlabel="pulse", ylabel="intensity (%)", title="Intensity track")
        fig.tight_layout()
        figs["protocol"] = ("Recruitment curve and intensity track", _png(fig))

    # 4. timing
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    lat = [(p["decision_lsl_time"] - p["chunk_lsl_time"]) * 1000.0 for p in d.pulses
           if "decision_lsl_time" in p and "chunk_lsl_time" in p]
    err = [p["fire_error_ms"] for p in d.pulses if "fire_error_ms" in p]
    axes[0].hist(lat, bins=40)
    axes[0].set(xlabel="ms", title=f"EEG chunk → decision (n={len(lat)}"
                + (f", p99 {np.percentile(lat, 99):.2f} ms)" if lat else ")"))
    axes[1].hist(err, bins=40)
    axes[1].set(xlabel="ms", title=f"fire error, actual − scheduled (n={len(err)}"
                + (f", p99 {np.percentile(np.abs(err), 99):.3f} ms)" if err else ")"))
    fig.tight_layout()
    figs["timing"] = ("Latency and timing error", _png(fig))

    # 5. refusals
    reasons = Counter(e["reason"] for e in d.decisions if not e.get("fire"))
    reasons.update(e["reason"] for e in d.refused)
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.35 * len(reasons) + 1)))
    if reasons:
        ordered = reasons.most_common()
        ax.barh([r for r, _ in ordered], [c for _, c in ordered])
        ax.invert_yaxis()
    ax.set(xlabel="count", title="Decisions not fired and pulses refused, by reason"
           + ("" if reasons else " (none)"))
    fig.tight_layout()
    figs["refusals"] = ("Refusal reasons", _png(fig))
    return figs


def _health_rows(d: SessionData) -> list[tuple[str, str, str]]:
    rows = []
    t0 = d.events[0].get("lsl_time", 0.0)
    for e in d.events:
        kind = e.get("event", "")
        if kind.startswith("stream_") or kind in ("fault", "samples_lost",
                                                   "stimulator_reconnected", "eeg_clock_ok"):
            detail = {k: v for k, v in e.items()
                      if k not in ("event", "lsl_time", "wall_time", "at_lsl_time")}
            rows.append((f"{e.get('lsl_time', t0) - t0:.1f} s", kind,
                         ", ".join(f"{k}={v}" for k, v in detail.items())))
    return rows


def build_report(events_path: str | Path, *, xdf_path: str | Path | None = None,
                 out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` and the PNGs into ``out_dir``; return the HTML's path.

    Raises:
        MissingDependencyError: matplotlib (the extra ``report``) is not installed.
    """
    require_matplotlib("session reports")
    d = load_session(events_path, xdf_path)
    out = Path(out_dir) if out_dir is not None else Path(events_path).with_suffix("")
    out = out if out.suffix == "" else out.with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(d)
    start = d.events[0]
    end: dict[str, Any] = next(
        (e for e in reversed(d.events) if e.get("event") == "session_end"), {})
    meps_ok = [m for m in d.meps if not m.get("rejected")]
    summary = [
        ("version", start.get("version", "?")),
        ("started (UTC)", start.get("wall_time", "?")),
        ("config", start.get("config_source") or "(defaults and --set)"),
        ("pulses", str(len(d.pulses))),
        ("decisions", str(len(d.decisions))),
        ("MEPs measured / accepted", f"{len(d.meps)} / {len(meps_ok)}"),
        ("target phase", f"{d.config.get('trigger', {}).get('target_phase_deg', '?')}°"),
        ("phase", d.truth_note),
        ("ended", "yes" + (f", error: {end['error']}" if end.get("error") else "")
         if end else "no session_end: interrupted"),
    ]
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>closedloop session report: {html.escape(Path(events_path).name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:90%;text-align:left}img{max-width:100%}</style></head><body>",
             f"<h1>Session report: {html.escape(Path(events_path).name)}</h1>",
             "<table>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
              for k, v in summary]
    parts.append("</table>")
    for key, (title, png) in figs.items():
        (out / f"{key}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{html.escape(title)}</h2><img id='fig-{key}' alt='{key}' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append("<h2>Stream health and faults</h2>")
    rows = _health_rows(d)
    if rows:
        parts.append("<table><tr><th>time</th><th>event</th><th>detail</th></tr>")
        parts += [f"<tr><td>{a}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                  for a, b, c in rows]
        parts.append("</table>")
    else:
        parts.append("<p>No stream was lost, no fault.</p>")
    parts.append("</body></html>")
    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
