"""Acquisition over real LSL: order, labels, loss and recovery."""

from __future__ import annotations

import threading
import time

import numpy as np
import pylsl
import pytest

from closedloop.config.schema import AcquisitionConfig, StreamSelector
from closedloop.errors import ChannelNotFoundError, StreamError, StreamNotFoundError
from closedloop.streams.reader import MarkerReader, StreamEvent, StreamReader
from tests.conftest import Pusher, unique

pytestmark = pytest.mark.lsl

ACQ = AcquisitionConfig(resolve_timeout_s=5.0, lost_after_ms=100.0, buffer_s=10.0)


class Events:
    def __init__(self) -> None:
        self.items: list[StreamEvent] = []
        self.cv = threading.Condition()

    def __call__(self, ev: StreamEvent) -> None:
        with self.cv:
            self.items.append(ev)
            self.cv.notify_all()

    def wait_for(self, kind: str, timeout: float = 5.0) -> StreamEvent:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for ev in self.items:
                    if ev.kind == kind:
                        self.items.remove(ev)
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no '{kind}' event; got {self.items}")
                self.cv.wait(left)


def reader(name: str, events: Events, **kw: object) -> StreamReader:
    r = StreamReader(role="eeg", selector=StreamSelector(name=name), acquisition=ACQ,
                     required_labels=kw.get("required", {"phase.channel": ["C3"]}),  # type: ignore[arg-type]
                     on_data=lambda: None, on_event=events)
    r.start()
    return r


def wait_until_live(r: StreamReader, timeout: float = 5.0) -> None:
    """LSL delivers the first chunks of a new connection late; wait until data is live."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = r.ring.newest_timestamp() if r.ring is not None else None
        if newest is not None and pylsl.local_clock() - newest < 0.03:
            time.sleep(0.1)
            return
        time.sleep(0.02)
    raise AssertionError("stream never became live")


def test_every_sample_arrives_once_and_in_order(pushers: list[Pusher]) -> None:
    name = unique("order")
    fs = 1000.0
    counter = {"n": 0}

    def sig(t: np.ndarray) -> np.ndarray:
        n0 = counter["n"]
        counter["n"] += len(t)
        return np.column_stack([np.arange(n0, n0 + len(t)), np.zeros(len(t))])

    pushers.append(Pusher(name, ("C3", "count"), fs, sig, chunk=7))
    events = Events()
    r = reader(name, events)
    try:
        summary = r.wait_connected(5.0)
        assert summary.labels == ("C3", "count")
        assert summary.rate_hz == fs
        time.sleep(1.5)
        assert r.ring is not None
        got = r.ring.read_from(0)
        values = got.data[:, 0]
        assert len(values) > 1000
        assert np.all(np.diff(values) == 1)  # nothing lost, duplicated or reordered
        assert np.all(np.diff(got.timestamps) > 0)
        assert abs(np.median(np.diff(got.timestamps)) - 1 / fs) < 1e-5
    finally:
        r.stop()


def test_missing_label_names_the_labels_the_stream_has(pushers: list[Pusher]) -> None:
    name = unique("labels")
    pushers.append(Pusher(name, ("Cz", "Pz"), 500.0, lambda t: np.zeros((len(t), 2))))
    r = reader(name, Events(), required={"phase.reference": ["FC1", "Pz"]})
    try:
        with pytest.raises(ChannelNotFoundError) as info:
            r.wait_connected(5.0)
        msg = str(info.value)
        assert "phase.reference" in msg
        assert "FC1" in msg
        assert "Cz, Pz" in msg
    finally:
        r.stop()


def test_absent_stream_is_a_clear_error() -> None:
    r = reader(unique("absent"), Events())
    try:
        with pytest.raises(StreamNotFoundError, match="no LSL stream matching name="):
            r.wait_connected(0.5)
    finally:
        r.stop()


def test_irregular_stream_is_refused_as_eeg() -> None:
    name = unique("irregular")
    info = pylsl.StreamInfo(name, "EEG", 1, pylsl.IRREGULAR_RATE, pylsl.cf_float32, name)
    outlet = pylsl.StreamOutlet(info)
    r = reader(name, Events(), required={})
    try:
        with pytest.raises(StreamError, match="irregular rate"):
            r.wait_connected(5.0)
    finally:
        r.stop()
        del outlet


def test_lost_within_200ms_and_recovered_also_under_a_new_source_id(
        pushers: list[Pusher]) -> None:
    name = unique("loss")
    p = Pusher(name, ("C3",), 1000.0, lambda t: np.sin(t)[:, None], chunk=10)
    pushers.append(p)
    events = Events()
    r = reader(name, events)
    try:
        r.wait_connected(5.0)
        events.wait_for("connected")
        wait_until_live(r)
        p.pause()  # the amplifier stalls
        time.sleep(0.02)
        last = p.last_push
        lost = events.wait_for("lost", 2.0)
        assert last is not None
        assert lost.lsl_time - last < 0.2
        assert r.lost
        p.resume()
        events.wait_for("recovered", 3.0)
        assert not r.lost
        p.kill()  # the source vanishes entirely ...
        events.wait_for("lost", 2.0)
        time.sleep(0.3)
        p.revive(source_id=unique("new-src"))  # ... and comes back as a new source
        rec = events.wait_for("recovered", 5.0)
        assert rec.kind == "recovered"
        n = r.ring.count if r.ring else 0
        time.sleep(0.3)
        assert r.ring is not None
        assert r.ring.count > n
    finally:
        r.stop()


def test_marker_reader_delivers_markers_with_times() -> None:
    name = unique("markers")
    info = pylsl.StreamInfo(name, "Markers", 1, pylsl.IRREGULAR_RATE, pylsl.cf_string, name)
    outlet = pylsl.StreamOutlet(info)
    got: list[tuple[str, float]] = []
    done = threading.Event()

    def on_marker(text: str, t: float) -> None:
        got.append((text, t))
        if len(got) == 3:
            done.set()

    r = MarkerReader(role="pulses", selector=StreamSelector(name=name), acquisition=ACQ,
                     on_marker=on_marker, on_event=Events())
    r.start()
    try:
        r.wait_connected(5.0)
        time.sleep(0.2)
        t0 = pylsl.local_clock()
        for i in range(3):
            outlet.push_sample([f"m{i}"], t0 + i)
        assert done.wait(3.0)
        assert [g[0] for g in got] == ["m0", "m1", "m2"]
        assert all(abs(g[1] - (t0 + i)) < 1e-3 for i, g in enumerate(got))
    finally:
        r.stop()
