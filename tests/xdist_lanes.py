"""How the suite shares this machine under pytest-xdist (``-n`` in pyproject's addopts).

Every worker collects the same tests and sorts them into the same lanes; the controller
hands them out in that order (a worker holds the test it runs and the next one):

1. ``timing``: real-time precision of a few ms (pulse times to 2 ms, units delivered
   with the fire scheduler's 1 ms lateness). On the 2-core machine even idle-priority
   load makes a sleep-then-spin wait like the fire thread's miss by a few ms now and then
   (p99.9 lateness of 1500 waits of 4 ms in Python, 2026-12-01: 0.2 ms idle, 1.7 ms beside
   two nice-19 busy loops, 3.4 ms beside two SCHED_IDLE ones), so these run first and alone:
   one at a time (a file lock), and no other test starts before all of them have ended.
2. ``slow``: the real-time replays and simulated sessions (up to 80 s each), started next
   so that the workers end together; taken from each module in turn, so that the long
   tests of one module (the two replays of test_offline.py) do not wait for each other
   (the next test of a worker waits for the one it runs).
3. the rest.
4. ``compute``: CPU-bound with no real-time deadline. A worker lowers its CPU priority to
   the lowest (nice 19) before its first one, for good: they take only the CPU that the
   other workers' real-time tests leave. Since the workers are handed tests in lane order,
   no worker runs a test of another lane after a ``compute`` one (a test re-run after a
   worker crashed aside).

The full simulated sessions (a simulator process beside the service, or ``closedloop
demo``: most of a core each) share ``xdist_group("simulator")``: ``--dist loadgroup``
hands them to one worker, which runs them one after the other.

A serial run (no xdist worker) keeps the file order and its priority, and waits for
nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import IO

import pytest

__all__ = ["TimingLane", "lane", "lower_priority_for_good", "ordered"]

# no test of the lane should take this long; past it the others start anyway (and fail
# or pass on their own) rather than hang the run, e.g. after a worker died in one
_MAX_WAIT_S = 900.0
_POLL_S = 0.05
_LOWEST_NICE = 19


def lane(item: pytest.Item) -> int:
    """The lane of a test: its place in the order (0 runs first)."""
    if item.get_closest_marker("timing") is not None:
        return 0
    if item.get_closest_marker("compute") is not None:
        return 3
    return 1 if item.get_closest_marker("slow") is not None else 2


def ordered(items: list[pytest.Item]) -> list[pytest.Item]:
    """The tests in lane order; the file order within a lane, but for ``slow``, whose
    modules take turns."""
    lanes: list[list[pytest.Item]] = [[], [], [], []]
    for item in items:
        lanes[lane(item)].append(item)
    by_module: dict[str, list[pytest.Item]] = {}
    for item in lanes[1]:
        by_module.setdefault(str(item.path), []).append(item)
    taking_turns: list[pytest.Item] = []
    for k in range(max(map(len, by_module.values()), default=0)):
        taking_turns += [module[k] for module in by_module.values() if k < len(module)]
    return [*lanes[0], *taking_turns, *lanes[2], *lanes[3]]


def lower_priority_for_good() -> None:
    """Lower the calling thread's CPU priority to the lowest (Linux: nice is per thread;
    the threads and processes it starts from now on inherit it). It cannot be raised
    again without privileges."""
    if hasattr(os, "setpriority") and os.getpriority(os.PRIO_PROCESS, 0) < _LOWEST_NICE:
        os.setpriority(os.PRIO_PROCESS, 0, _LOWEST_NICE)


class TimingLane:
    """The ``timing`` tests of one run, shared by its workers through a folder.

    Each of them holds an exclusive lock on ``lock`` while it runs and leaves a file in
    ``done/`` when it has ended (passed, failed or skipped); every other test waits until
    ``done/`` holds one file per ``timing`` test of the run.
    """

    def __init__(self, folder: Path, total: int) -> None:
        self.total = total
        self._done = folder / "done"
        self._done.mkdir(parents=True, exist_ok=True)
        self._lock_path = folder / "lock"
        self._held: IO[bytes] | None = None
        self._gave_up = False

    def acquire(self) -> None:
        """Wait until no other ``timing`` test runs; then hold the lane."""
        f = self._lock_path.open("ab")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except BaseException:
            f.close()
            raise
        self._held = f

    def release(self, nodeid: str) -> None:
        """Count ``nodeid`` as ended and let the next one run."""
        name = hashlib.sha256(nodeid.encode()).hexdigest()[:32]
        (self._done / name).touch()
        if self._held is not None:
            with contextlib.closing(self._held):
                fcntl.flock(self._held, fcntl.LOCK_UN)
            self._held = None

    def wait_until_ended(self) -> None:
        """Return once every ``timing`` test of the run has ended.

        Raises:
            TimeoutError: they had not ended after ``_MAX_WAIT_S`` (a worker died in one?);
                raised once, later calls return at once.
        """
        deadline = time.monotonic() + _MAX_WAIT_S
        while not self._gave_up and sum(1 for _ in self._done.iterdir()) < self.total:
            if time.monotonic() > deadline:
                self._gave_up = True
                raise TimeoutError(f"the {self.total} timing tests had not ended after "
                                   f"{_MAX_WAIT_S:g} s")
            time.sleep(_POLL_S)
