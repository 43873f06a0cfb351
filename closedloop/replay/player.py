"""Play a recording over LSL in real time, like an amplifier.

Samples are pushed in small chunks on an absolute schedule: chunk ``k`` is pushed when
its last sample's time ``t0 + (end - 1) / fs`` arrives, and stamped with exactly that
time, so there is no cumulative drift however long the replay runs (mne-lsl's player
does the same: sleep most of the wait, then spin the rest).

With ``speed`` N ≠ 1 the chunks are pushed N times faster but keep the recording's time
base (sample ``i`` is stamped ``t0 + i / fs``), so a recorder or an offline consumer gets
the original timing; a closed-loop service refuses such data (it is stamped in the future)
and is evaluated faster than real time with ``closedloop offline`` instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pylsl

from closedloop.replay.recording import MarkerTrack, Recording

__all__ = ["play", "play_markers"]

_LINGER_S = 0.5


def play(rec: Recording, *, name: str, stream_type: str = "EEG", chunk_ms: float = 10.0,
         start_s: float = 0.0, duration_s: float | None = None, loop: bool = False,
         stop: threading.Event | None = None,
         on_start: Callable[[float], None] | None = None, t0: float | None = None,
         on_progress: Callable[[float], None] | None = None, speed: float = 1.0) -> float:
    """Push ``rec`` over an LSL outlet named ``name`` until done or ``stop`` is set.

    Args:
        on_start: Called with ``t0``, the LSL time of the first sample played (sample
            ``i`` of the played span has LSL time ``t0 + i / fs``).

    Returns:
        ``t0``.
    """
    stop = stop or threading.Event()
    if not speed > 0:
        raise ValueError(f"speed must be > 0, not {speed}")
    info = pylsl.StreamInfo(name, stream_type, len(rec.labels), rec.fs, pylsl.cf_float32,
                            f"{name}-replay")
    chans = info.desc().append_child("channels")
    unit = "microvolts" if rec.unit.lower() in ("uv", "µv") else rec.unit
    for label in rec.labels:
        ch = chans.append_child("channel")
        ch.append_child_value("label", label)
        ch.append_child_value("unit", unit)
    outlet = pylsl.StreamOutlet(info, chunk_size=0, max_buffered=60)
    first = int(start_s * rec.fs)
    last = rec.data.shape[0] if duration_s is None else min(
        rec.data.shape[0], first + int(duration_s * rec.fs))
    if last <= first:
        raise ValueError("nothing to play: start_s/duration_s select no samples")
    span = rec.data[first:last].astype(np.float32)
    n_chunk = max(1, round(chunk_ms / 1000.0 * rec.fs))
    t0 = float(pylsl.local_clock()) + 0.05 if t0 is None else t0
    if on_start is not None:
        on_start(t0)
    k = 0  # samples played
    total = len(span)
    while not stop.is_set():
        i = k % total
        if i == 0 and k > 0 and not loop:
            break
        n = min(n_chunk, total - i)
        t_last = t0 + (k + n - 1) / rec.fs
        t_push = t0 + (k + n - 1) / rec.fs / speed
        wait = t_push - pylsl.local_clock()
        if wait > 0.002:
            time.sleep(wait - 0.001)
        while pylsl.local_clock() < t_push:
            time.sleep(0.0001)
        outlet.push_chunk(span[i:i + n], t_last)
        k += n
        if on_progress is not None and k % max(1, int(rec.fs)) < n:  # about once a second
            on_progress(k / rec.fs)
    # an outlet dropped at once takes its last chunks with it: give the inlets a moment
    stop.wait(_LINGER_S)
    return t0


def play_markers(track: MarkerTrack, *, t0: float, first_timestamp: float,
                 stop: threading.Event | None = None, speed: float = 1.0) -> None:
    """Push a marker track at its recorded times (shifted so the recording starts at t0)."""
    stop = stop or threading.Event()
    info = pylsl.StreamInfo(track.name, track.stype, 1, pylsl.IRREGULAR_RATE,
                            pylsl.cf_string, f"{track.name}-replay")
    outlet = pylsl.StreamOutlet(info)
    for text, ts in zip(track.markers, track.timestamps, strict=True):
        when = t0 + (float(ts) - first_timestamp)
        push_at = t0 + (float(ts) - first_timestamp) / speed
        while not stop.is_set() and pylsl.local_clock() < push_at:
            stop.wait(min(0.01, max(0.0, push_at - pylsl.local_clock())))
        if stop.is_set():
            return
        outlet.push_sample([text], when)
    stop.wait(_LINGER_S)  # as play(): the last marker must reach the inlets
