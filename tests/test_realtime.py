"""The EEG pipeline stepped where the samples arrive (closedloop.control.realtime), with a
stand-in pipeline: what a step says reaches the loop in one batch with the times it was
said, an error stops the stepping for good, the quiet window before a fire command is
kept, and the tracker's lock is held while a step runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from closedloop.control.realtime import (
    QUIET_AFTER_S,
    QUIET_BEFORE_S,
    RealtimeHost,
    RealtimeStep,
)


class Pipeline:
    """Says two things per step (at the host's clock), or raises when told to."""

    def __init__(self, host: RealtimeHost, lock: threading.Lock) -> None:
        self.host, self.lock = host, lock
        self.steps: list[float] = []
        self.locked: list[bool] = []
        self.fail: BaseException | None = None

    def step(self) -> list[Any]:
        self.steps.append(time.monotonic())
        self.locked.append(self.lock.locked())
        if self.fail is not None:
            raise self.fail
        self.host.emit("decision", n=len(self.steps))
        self.host.emit("samples_lost", count=1, lsl_time=-1.0)
        return []


def make(next_command: Any = lambda: None) -> tuple[RealtimeStep, Pipeline, list[Any],
                                                    list[BaseException]]:
    t = iter(range(100, 10_000))
    host = RealtimeHost(clock=lambda: float(next(t)), holds=lambda _now: False,
                        reopen=lambda: None)
    lock = threading.Lock()
    pipe = Pipeline(host, lock)
    delivered: list[Any] = []
    failed: list[BaseException] = []
    step = RealtimeStep(pipe, host, lock=lock, next_command=next_command,  # type: ignore[arg-type]
                        clock=time.monotonic, deliver=delivered.append, failed=failed.append)
    return step, pipe, delivered, failed


def test_a_steps_events_reach_the_loop_in_one_batch_with_their_own_times() -> None:
    step, pipe, delivered, failed = make()
    step.on_data()
    step.on_data()
    assert len(pipe.steps) == 2 and pipe.locked == [True, True] and not failed
    assert [[(k, f["lsl_time"]) for k, f in batch] for batch in delivered] == [
        [("decision", 100.0), ("samples_lost", -1.0)],  # a time given is kept
        [("decision", 101.0), ("samples_lost", -1.0)]]
    assert delivered[1][0][1]["n"] == 2


def test_an_error_in_a_step_is_reported_once_and_no_step_follows() -> None:
    step, pipe, delivered, failed = make()
    step.on_data()
    pipe.fail = FloatingPointError("injected")
    step.on_data()
    step.on_data()
    assert [type(e) for e in failed] == [FloatingPointError] and not step.running
    assert len(pipe.steps) == 2 and len(delivered) == 1


def test_stopped_it_steps_no_more() -> None:
    step, pipe, _, _ = make()
    step.stop()
    step.on_data()
    assert pipe.steps == []


def test_no_step_starts_in_the_quiet_window_before_a_fire_command() -> None:
    due = time.monotonic() + QUIET_BEFORE_S / 2
    step, pipe, _, _ = make(next_command=lambda: due)
    step.on_data()
    assert pipe.steps[0] >= due + QUIET_AFTER_S * 0.9  # (sleep may end a hair early)
    far = time.monotonic() + 10 * QUIET_BEFORE_S  # a command far off: no wait
    step2, pipe2, _, _ = make(next_command=lambda: far)
    t0 = time.monotonic()
    step2.on_data()
    assert pipe2.steps[0] - t0 < QUIET_BEFORE_S


def test_calibrate_waits_for_the_step_under_way() -> None:
    step, pipe, _, _ = make()
    inside, release = threading.Event(), threading.Event()

    def slow_step() -> list[Any]:
        inside.set()
        release.wait(5)
        return []

    pipe.step = slow_step  # type: ignore[method-assign]
    worker = threading.Thread(target=step.on_data)
    worker.start()
    assert inside.wait(5)
    assert not step.lock.acquire(blocking=False)  # what calibrate and set_band take
    release.set()
    worker.join(5)
    assert step.lock.acquire(timeout=1)
    step.lock.release()


@pytest.mark.parametrize("kind", ["phase_estimator", "calibrated"])
def test_the_estimators_news_are_recorded_with_their_fields(kind: str) -> None:
    host = RealtimeHost(clock=lambda: 5.0, holds=lambda _now: False, reopen=lambda: None)

    class Tracker:
        class cfg:  # noqa: N801 - a stand-in
            estimator = "ar"
        training_state = "off"
        wiener = None
        estimator = None

        class peak:  # noqa: N801
            peak_hz, snr_db, band_hz = 10.0, 6.123, (8.0, 12.0)

    if kind == "calibrated":
        host.calibrated(Tracker())  # type: ignore[arg-type]
        assert host.pending == [("calibrated", {"peak_hz": 10.0, "snr_db": 6.12,
                                                "band_hz": [8.0, 12.0], "lsl_time": 5.0})]
    else:
        host.estimator_changed(Tracker())  # type: ignore[arg-type]
        assert host.pending == [("phase_estimator", {"estimator": "ar", "training": "off",
                                                     "lsl_time": 5.0})]
