"""Acquisition threads: LSL inlets read into ring buffers, off the event loop.

Each :class:`StreamReader` owns one inlet in a dedicated thread. It resolves the stream
from its :class:`~closedloop.config.schema.StreamSelector`, checks the channel labels the
configuration needs, pulls chunks with clock synchronisation (and dejitter for regular
streams) into a preallocated :class:`~closedloop.streams.ring.RingBuffer`, and tells the
asyncio side through two callbacks that are called *from the reader thread* (wrap them in
``loop.call_soon_threadsafe``):

- ``on_data()`` after each chunk;
- ``on_event(StreamEvent)`` on connected / lost / recovered / error.

A stream whose newest sample is older than ``lost_after_ms`` is *lost*. A lost stream is
looked for again (any source matching the selector, so an amplifier that restarts with a
new ``source_id`` is picked up); if it returns with other channels or another rate it is
an error, never a silent change of meaning.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pylsl
from pylsl.util import LostError

from closedloop.config.schema import AcquisitionConfig, StreamSelector
from closedloop.errors import StreamError, StreamNotFoundError
from closedloop.streams.lsl_info import StreamSummary, check_labels, summarize
from closedloop.streams.ring import RingBuffer

__all__ = ["MarkerReader", "StreamEvent", "StreamReader", "visible_stream_names"]

EventKind = Literal["connected", "lost", "recovered", "error"]

_POLL_S = 0.005
_RESOLVE_SLICE_S = 0.25
_REOPEN_AFTER_LOST_S = 1.5

_NUMPY_DTYPES: dict[int, Any] = {
    pylsl.cf_float32: np.float32, pylsl.cf_double64: np.float64,
    pylsl.cf_int32: np.int32, pylsl.cf_int16: np.int16, pylsl.cf_int8: np.int8,
}


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A change in a stream's health, stamped with ``local_clock()``."""

    role: str
    kind: EventKind
    lsl_time: float
    detail: dict[str, Any] = field(default_factory=dict)


def visible_stream_names(wait_s: float = 0.5) -> list[str]:
    """Names of the LSL streams visible right now (for error messages)."""
    return sorted({info.name() for info in pylsl.resolve_streams(wait_time=wait_s)})


class _LslThread:
    """Resolve, open, pull, and re-resolve after loss, in one daemon thread."""

    def __init__(self, *, role: str, selector: StreamSelector,
                 acquisition: AcquisitionConfig,
                 on_event: Callable[[StreamEvent], None]) -> None:
        self.role = role
        self.selector = selector
        self.acq = acquisition
        self._on_event = on_event
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._reopen = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lsl-{role}", daemon=True)
        self.summary: StreamSummary | None = None
        self.error: BaseException | None = None
        self.lost = False
        self.last_arrival: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request_reopen(self) -> None:
        """Close and re-resolve the inlet (resets LSL's clock sync, dejitter, monotonize)."""
        self._reopen.set()

    def wait_connected(self, timeout: float) -> StreamSummary:
        """Block until the stream is open; raise what went wrong otherwise."""
        if not self._connected.wait(timeout):
            if self.error is not None:
                raise self.error
            raise StreamNotFoundError(role=self.role, predicate=self.selector.predicate(),
                                      timeout_s=timeout, visible=visible_stream_names())
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary

    # -- to be specialised -------------------------------------------------------------
    def _processing_flags(self) -> int:
        return int(pylsl.proc_clocksync | pylsl.proc_threadsafe)

    def _opened(self, inlet: pylsl.StreamInlet, summary: StreamSummary, first: bool) -> None:
        """Called in the thread when an inlet opens; raise to refuse the stream."""

    def _pull(self, inlet: pylsl.StreamInlet) -> int:
        """Pull once (waiting at most ``_POLL_S``); return the number of samples."""
        raise NotImplementedError

    # -- the thread --------------------------------------------------------------------
    def _emit(self, kind: EventKind, **detail: Any) -> None:
        self._on_event(StreamEvent(self.role, kind, pylsl.local_clock(), detail))

    def _resolve(self) -> pylsl.StreamInlet | None:
        found = pylsl.resolve_bypred(self.selector.predicate(), 1, _RESOLVE_SLICE_S)
        if not found:
            return None
        inlet = pylsl.StreamInlet(found[0], max_buflen=max(1, int(self.acq.buffer_s)),
                                  recover=False, processing_flags=self._processing_flags())
        inlet.open_stream(timeout=2.0)
        return inlet

    def _run(self) -> None:
        inlet: pylsl.StreamInlet | None = None
        lost_since: float | None = None
        try:
            while not self._stop.is_set():
                if inlet is None:
                    inlet = self._resolve()
                    if inlet is None:
                        continue
                    summary = summarize(inlet.info())
                    first = self.summary is None
                    self._opened(inlet, summary, first)
                    self.summary = summary
                    self.last_arrival = pylsl.local_clock()
                    if first:
                        self._emit("connected", name=summary.name, source_id=summary.source_id,
                                   rate_hz=summary.rate_hz, n_channels=summary.n_channels)
                    else:  # still lost until data flows again; reopen if it does not
                        lost_since = self.last_arrival
                    self._connected.set()
                try:
                    n = self._pull(inlet)
                except LostError:
                    n = 0
                    self._stop.wait(_POLL_S)  # the source is gone: do not spin
                now = pylsl.local_clock()
                if n > 0:
                    self.last_arrival = now
                    if self.lost:
                        self.lost, lost_since = False, None
                        s = self.summary
                        assert s is not None
                        self._emit("recovered", name=s.name, source_id=s.source_id)
                else:
                    assert self.last_arrival is not None
                    silent = now - self.last_arrival
                    if not self.lost and silent * 1000.0 > self.acq.lost_after_ms:
                        self.lost = True
                        lost_since = now
                        self._emit("lost", silent_ms=round(silent * 1000.0, 1))
                    if (self.lost and lost_since is not None
                            and now - lost_since > _REOPEN_AFTER_LOST_S):
                        inlet.close_stream()
                        inlet = None  # look again: the source may come back under a new id
                if self._reopen.is_set() and inlet is not None:
                    self._reopen.clear()
                    inlet.close_stream()
                    inlet = None
        except Exception as exc:  # reported, never swallowed: the service stops on it
            self.error = exc if isinstance(exc, StreamError) else StreamError(
                f"streams.{self.role}: {type(exc).__name__}: {exc}")
            self.error.__cause__ = exc
            self._emit("error", message=str(self.error))
            self._connected.set()
        finally:
            if inlet is not None:
                inlet.close_stream()


class StreamReader(_LslThread):
    """A regular (sampled) stream read into a ring buffer."""

    def __init__(self, *, role: str, selector: StreamSelector, acquisition: AcquisitionConfig,
                 required_labels: Mapping[str, Sequence[str]],
                 on_data: Callable[[], None], on_event: Callable[[StreamEvent], None]) -> None:
        super().__init__(role=role, selector=selector, acquisition=acquisition,
                         on_event=on_event)
        self.required_labels = dict(required_labels)
        self._on_data = on_data
        self.ring: RingBuffer | None = None
        self._stage: np.ndarray[Any, Any] | None = None
        self._max_chunk = 0
        self.chunks = 0

    def _processing_flags(self) -> int:
        flags = pylsl.proc_clocksync | pylsl.proc_threadsafe | pylsl.proc_monotonize
        if self.selector.dejitter:
            flags |= pylsl.proc_dejitter
        return int(flags)

    def _opened(self, inlet: pylsl.StreamInlet, summary: StreamSummary, first: bool) -> None:
        if summary.rate_hz <= 0:
            raise StreamError(f"streams.{self.role}: stream '{summary.name}' has an irregular "
                              "rate; a sampled stream is needed")
        if summary.channel_format not in _NUMPY_DTYPES:
            raise StreamError(f"streams.{self.role}: stream '{summary.name}' is not numeric")
        check_labels(summary, self.required_labels)
        if first:
            dtype = np.float32 if summary.channel_format == pylsl.cf_float32 else np.float64
            capacity = int(summary.rate_hz * self.acq.buffer_s)
            self.ring = RingBuffer(capacity, summary.n_channels, dtype)
        else:
            old = self.summary
            assert old is not None
            if (old.labels, old.rate_hz, old.n_channels) != (
                    summary.labels, summary.rate_hz, summary.n_channels):
                raise StreamError(
                    f"streams.{self.role}: stream '{summary.name}' came back with other "
                    f"channels or rate ({summary.n_channels} ch at {summary.rate_hz:g} Hz, "
                    f"was {old.n_channels} ch at {old.rate_hz:g} Hz)")
        self._max_chunk = max(64, int(summary.rate_hz * 0.25))
        self._stage = np.zeros((self._max_chunk, summary.n_channels),
                               dtype=_NUMPY_DTYPES[summary.channel_format])

    def _pull(self, inlet: pylsl.StreamInlet) -> int:
        assert self._stage is not None and self.ring is not None
        _, ts = inlet.pull_chunk(timeout=_POLL_S, max_samples=self._max_chunk,
                                 dest_obj=self._stage, min_samples=1, as_numpy=True)
        n = len(ts)
        if n:
            offset = self.selector.time_offset_ms / 1000.0
            self.ring.write(self._stage[:n], ts - offset if offset else ts)
            self.chunks += 1
            self._on_data()
        return n


class MarkerReader(_LslThread):
    """A string marker stream; each marker is handed to ``on_marker(text, lsl_time)``."""

    def __init__(self, *, role: str, selector: StreamSelector, acquisition: AcquisitionConfig,
                 on_marker: Callable[[str, float], None],
                 on_event: Callable[[StreamEvent], None]) -> None:
        super().__init__(role=role, selector=selector, acquisition=acquisition,
                         on_event=on_event)
        self._on_marker = on_marker

    def _opened(self, inlet: pylsl.StreamInlet, summary: StreamSummary, first: bool) -> None:
        if summary.channel_format != pylsl.cf_string:
            raise StreamError(f"streams.{self.role}: stream '{summary.name}' is not a string "
                              "marker stream")

    def _pull(self, inlet: pylsl.StreamInlet) -> int:
        sample, ts = inlet.pull_sample(timeout=_POLL_S)
        if sample is None:
            # markers are irregular: silence is not loss, so keep the stream 'fresh'
            self.last_arrival = pylsl.local_clock()
            return 0
        offset = self.selector.time_offset_ms / 1000.0
        self._on_marker(str(sample[0]) if sample else "", float(ts) - offset)
        return 1
