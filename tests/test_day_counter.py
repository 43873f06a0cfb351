"""The daily pulse counter: durable, shared by processes, never silently reset."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

import closedloop.stim.day_counter as day_counter_module
from closedloop.config.schema import HARD_MAX_PULSES_PER_DAY
from closedloop.errors import ClosedLoopError
from closedloop.stim.day_counter import DayCounter, DayCounterError, default_state_dir

DAY = "2024-05-01"


def fixed(day: str = DAY) -> Any:
    return lambda: day


def _reserve_many(directory: str, limit: int, times: int, start: Any, out: Any) -> None:
    """A worker process: reserve 1 pulse ``times`` times, report the sum of the grants.

    ``fsync`` is skipped here (it is tested on its own): on a busy disk it takes
    milliseconds and this test is about the lock.
    """
    os.fsync = lambda _fd: None
    try:
        counter = DayCounter(directory, "p01", limit=limit, today=lambda: DAY)
        start.wait(timeout=10)
        out.put(sum(counter.reserve(1) for _ in range(times)))
    except Exception as exc:  # reported to the test, which fails with it
        out.put(repr(exc))
        raise


def _run_workers(directory: Path, limit: int, *, workers: int = 2, times: int = 200) -> int:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(workers)
    out = ctx.Queue()
    procs = [ctx.Process(target=_reserve_many, args=(str(directory), limit, times, start, out))
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:  # the results are a few bytes: they fit in the pipe, exit is not held
            p.join(timeout=20)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    grants = [out.get(timeout=5) for p in procs if p.exitcode is not None]
    assert [p.exitcode for p in procs] == [0] * workers, grants
    assert all(isinstance(g, int) for g in grants), grants
    return sum(grants)


def test_public_names_are_all_exported() -> None:
    public = {n for n in vars(day_counter_module) if not n.startswith("_")}
    defined_here = {n for n in public
                    if getattr(getattr(day_counter_module, n), "__module__", None)
                    == day_counter_module.__name__}
    assert defined_here == set(day_counter_module.__all__)
    assert issubclass(DayCounterError, ClosedLoopError)


def test_two_processes_lose_no_update(tmp_path: Path) -> None:
    assert _run_workers(tmp_path, limit=10_000) == 400
    assert DayCounter(tmp_path, "p01", limit=10_000, today=fixed()).count() == 400
    assert json.loads((tmp_path / "pulses-p01.json").read_text()) == {DAY: 400}


def test_two_processes_never_grant_beyond_the_limit(tmp_path: Path) -> None:
    assert _run_workers(tmp_path, limit=300) == 300
    assert DayCounter(tmp_path, "p01", limit=300, today=fixed()).count() == 300


def test_count_persists_across_instances_and_sessions(tmp_path: Path) -> None:
    first = DayCounter(tmp_path, "p01", limit=2000, today=fixed())
    assert first.path == tmp_path / "pulses-p01.json"
    assert first.reserve(120) == 120
    # the participant's second session: same folder, same participant, same count
    second = DayCounter(tmp_path, "p01", limit=2000, today=fixed())
    assert second.count() == 120
    assert second.reserve(30) == 30
    assert first.count() == 150  # re-read from disk, not cached
    assert DayCounter(tmp_path, "p01", limit=2000, today=fixed("2024-05-02")).count() == 0


def test_participants_are_counted_apart(tmp_path: Path) -> None:
    a = DayCounter(tmp_path, "p01", limit=100, today=fixed())
    b = DayCounter(tmp_path, "p02", limit=100, today=fixed())
    nobody = DayCounter(tmp_path, "", limit=100, today=fixed())
    assert a.reserve(100) == 100
    assert b.reserve(40) == 40
    assert nobody.reserve(5) == 5
    assert (a.count(), b.count(), nobody.count()) == (100, 40, 5)
    assert nobody.path.name == "pulses-unspecified.json"
    assert a.lock_path == tmp_path / "pulses-p01.lock"


def test_reserve_grants_partially_at_the_limit(tmp_path: Path) -> None:
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed())
    assert c.reserve(600) == 600
    assert c.reserve(600) == 400
    assert c.reserve(1) == 0
    assert c.reserve(0) == 0
    assert c.count() == 1000
    with pytest.raises(ValueError, match="reserve"):
        c.reserve(-1)
    # a lowered limit leaves the count as it is and grants nothing
    assert DayCounter(tmp_path, "p01", limit=10, today=fixed()).reserve(5) == 0


def test_limit_is_clamped_by_the_hard_cap(tmp_path: Path) -> None:
    c = DayCounter(tmp_path, "p01", limit=10**9, today=fixed())
    assert c.limit == HARD_MAX_PULSES_PER_DAY
    with pytest.raises(ValueError, match="limit"):
        DayCounter(tmp_path, "p01", limit=-1)


def test_release_gives_back_only_what_was_reserved_today(tmp_path: Path) -> None:
    day = [DAY]
    c = DayCounter(tmp_path, "p01", limit=1000, today=lambda: day[0])
    other = DayCounter(tmp_path, "p01", limit=1000, today=lambda: day[0])
    assert other.reserve(50) == 50
    assert c.reserve(600) == 600
    c.release(590)  # a burst cut short after 10 pulses
    assert c.count() == 60
    c.release(1000)  # more than is held: only the 10 still held go back
    assert c.count() == 50  # the other instance's pulses stay counted
    c.release(1)
    assert c.count() == 50
    other.release(50)
    assert c.count() == 0
    assert c.reserve(300) == 300
    day[0] = "2024-05-02"  # midnight between reservation and release
    c.release(300)
    assert json.loads(c.path.read_text()) == {"2024-05-01": 300}
    with pytest.raises(ValueError, match="release"):
        c.release(-1)


def test_release_never_goes_below_zero(tmp_path: Path) -> None:
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed())
    assert c.reserve(100) == 100
    c.path.write_text(json.dumps({DAY: 30}))  # e.g. fixed by hand meanwhile
    c.release(100)
    assert c.count() == 0


def test_keeps_the_last_seven_days(tmp_path: Path) -> None:
    old = {f"2024-04-{d:02d}": d for d in range(20, 31)}
    (tmp_path / "pulses-p01.json").write_text(json.dumps(old))
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed())
    assert c.count() == 0
    assert c.reserve(7) == 7
    kept = json.loads(c.path.read_text())
    assert kept == {"2024-04-25": 25, "2024-04-26": 26, "2024-04-27": 27, "2024-04-28": 28,
                    "2024-04-29": 29, "2024-04-30": 30, DAY: 7}


def test_reserve_fsyncs_file_and_folder_before_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed())
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert c.reserve(3) == 3
    file_ino, dir_ino = c.path.stat().st_ino, tmp_path.stat().st_ino
    # the new file is synced, then renamed into place, then the folder is synced
    assert events == [("fsync", file_ino), ("replace", file_ino), ("fsync", dir_ino)]
    events.clear()
    c.release(1)
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2]", '{"2024-05-01": -3}', '{"2024-05-01": 1.5}',
    '{"2024-05-01": true}', '{"yesterday": 4}', '{"20240501": 4}', "\xff\xfe",
])
def test_a_corrupt_counter_is_an_error_naming_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "pulses-p01.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DayCounterError, match=r"pulses-p01\.json") as info:
        DayCounter(tmp_path, "p01", limit=1000, today=fixed())
    assert info.value.path == path
    assert "remove it knowingly" in str(info.value)
    assert path.read_bytes() == content.encode("latin-1")  # never reset


def test_corruption_after_construction_refuses_to_grant(tmp_path: Path) -> None:
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed())
    assert c.reserve(10) == 10
    c.path.write_text("garbage")
    with pytest.raises(DayCounterError, match=r"pulses-p01\.json"):
        c.reserve(1)
    with pytest.raises(DayCounterError, match=r"pulses-p01\.json"):
        c.count()


def test_an_unreadable_counter_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pulses-p01.json").mkdir()
    with pytest.raises(DayCounterError, match="cannot read"):
        DayCounter(tmp_path, "p01", limit=1000, today=fixed())


def test_a_folder_that_cannot_be_created_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DayCounterError, match="a-file") as info:
        DayCounter(blocker / "state", "p01", limit=1000)
    assert "CLOSEDLOOP_STATE_DIR" in str(info.value)


def test_a_failed_write_grants_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed())

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(DayCounterError, match="cannot save"):
        c.reserve(5)
    monkeypatch.undo()
    assert c.count() == 0


def test_a_lock_held_too_long_is_an_error(tmp_path: Path) -> None:
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed(), lock_timeout_s=0.05)
    fd = os.open(c.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(DayCounterError, match="still locked"):
            c.reserve(1)
    finally:
        os.close(fd)
    assert c.reserve(1) == 1


@pytest.mark.parametrize("participant", ["../p01", "a/b", ".hidden", "..", "a\\b"])
def test_participant_ids_that_could_escape_are_refused(tmp_path: Path,
                                                       participant: str) -> None:
    with pytest.raises(DayCounterError, match="participant"):
        DayCounter(tmp_path / "state", participant, limit=1000)
    assert not (tmp_path / "state").exists()


def test_a_bad_today_is_a_programming_error(tmp_path: Path) -> None:
    c = DayCounter(tmp_path, "p01", limit=1000, today=fixed("01/05/2024"))
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        c.reserve(1)


def test_default_state_dir_follows_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLOSEDLOOP_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "closedloop"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "closedloop"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "closedloop"
    monkeypatch.setenv("CLOSEDLOOP_STATE_DIR", str(tmp_path / "lab"))
    assert default_state_dir() == tmp_path / "lab"
    monkeypatch.setenv("CLOSEDLOOP_STATE_DIR", "")
    assert default_state_dir() == tmp_path / "xdg" / "closedloop"
