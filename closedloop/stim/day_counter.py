"""Pulses per calendar day and participant, counted across sessions, restarts and processes.

The daily limit only means something if every pulse a participant received today is
counted, whichever session, process or folder of recordings it came from. So the count is
kept in one lab-wide state folder (:func:`default_state_dir`), one small JSON file per
participant, ``pulses-<participant>.json``, mapping local calendar days to counts
(``{"2024-05-01": 1200}``; the last seven days are kept, for the record).

Reserve, then settle. A pulse is counted *before* it is fired: :meth:`DayCounter.reserve`
asks for ``n`` pulses, is granted at most what is left of today's limit, and writes the
new count durably (temporary file, ``fsync``, ``os.replace``, ``fsync`` of the folder)
before it returns. The caller fires at most the granted pulses and gives back, with
:meth:`DayCounter.release`, those it did not fire (a unit cut short by a refusal, a
disarm, a late trigger). A crash therefore never forgets a delivered pulse; the cost of a
crash is the opposite, conservative error: the pulses reserved but not yet fired stay
counted (at most one unit: 600 pulses of a cTBS block). A reservation made before
midnight is not given back after it: the old day's count stays as it was, high.

Two processes (two sessions, the service and ``closedloop check``) may share a counter:
every read-modify-write happens under an exclusive :func:`fcntl.flock` on a lock file
beside the counter, ``pulses-<participant>.lock``, and the counter is re-read under that
lock each time, so no update is lost. The lock is taken per call (a fresh open file
description each time, so threads of one process exclude each other too) and is given up
after ``lock_timeout_s`` with an error rather than blocking the pulse path forever.

A counter file that cannot be read, or holds anything but non-negative integer counts
under ISO dates, is a :class:`DayCounterError`: it is never silently reset, since that
would lift the daily limit. Deleting the file knowingly is the way to reset it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from closedloop.config.schema import HARD_MAX_PULSES_PER_DAY
from closedloop.errors import ClosedLoopError

__all__ = ["DayCounter", "DayCounterError", "default_state_dir"]

_KEEP_DAYS = 7  # today and the six days before it
_UNSPECIFIED = "unspecified"  # file name part for participant ""
_LOCK_POLL_S = 0.0005


def default_state_dir() -> Path:
    """The lab-wide folder for state that outlives a session.

    Returns:
        ``$CLOSEDLOOP_STATE_DIR`` if set and not empty, else ``$XDG_STATE_HOME/closedloop``
        (the XDG Base Directory rule: only an absolute ``XDG_STATE_HOME`` counts), else
        ``~/.local/state/closedloop``.
    """
    explicit = os.environ.get("CLOSEDLOOP_STATE_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "closedloop"
    return Path.home() / ".local" / "state" / "closedloop"


class DayCounterError(ClosedLoopError):
    """A pulse counter that cannot be read, written or locked.

    Attributes:
        path: The file concerned (the counter, its lock file or its folder).
        problem: What went wrong.
        advice: What to do about it.
    """

    def __init__(self, *, path: Path, problem: str, advice: str) -> None:
        self.path = path
        self.problem = problem
        self.advice = advice
        super().__init__(f"{path}: {problem}; {advice}")


_ADVICE_UNREADABLE = ("it is not reset automatically, since that would lift the daily "
                      "pulse limit: repair it, or remove it knowingly (today's pulses of this "
                      "participant are then forgotten)")
_ADVICE_WRITE = ("check that the folder exists, is writable and the disk is not full "
                 "(set safety.day_counter_dir or $CLOSEDLOOP_STATE_DIR to use another)")


class DayCounter:
    """Today's pulses of one participant, shared by every process that uses the same folder.

    Args:
        directory: The state folder (see :func:`default_state_dir`); created if missing.
        participant: The participant id; ``""`` means unspecified (one shared counter,
            ``pulses-unspecified.json``).
        limit: Most pulses in one calendar day; clamped by the hard cap in code.
        today: Returns the local date as ``YYYY-MM-DD`` (injected in tests).
        lock_timeout_s: Longest wait for another process's lock before giving up.

    Raises:
        DayCounterError: The folder cannot be created, the participant id could escape
            it, or the counter file exists but is unreadable or corrupt.
        ValueError: ``limit`` or ``lock_timeout_s`` is negative.
    """

    def __init__(self, directory: str | Path, participant: str, *, limit: int,
                 today: Callable[[], str] | None = None,
                 lock_timeout_s: float = 5.0) -> None:
        directory = Path(directory)
        if participant.startswith(".") or any(c in participant for c in "/\\\0"):
            raise DayCounterError(
                path=directory, problem=f"participant id {participant[:80]!r} could name a "
                "file outside the counter folder",
                advice="use letters, digits, '-', '_' and '.' only, not starting with '.'")
        if isinstance(limit, bool) or limit < 0:
            raise ValueError(f"limit must be a non-negative int, not {limit!r}")
        if not lock_timeout_s >= 0:
            raise ValueError(f"lock_timeout_s must be >= 0, not {lock_timeout_s!r}")
        self.limit = min(int(limit), HARD_MAX_PULSES_PER_DAY)
        self.participant = participant
        self._dir = directory
        name = f"pulses-{participant or _UNSPECIFIED}"
        self._path = directory / f"{name}.json"
        self._lock_path = directory / f"{name}.lock"
        self._tmp_path = directory / f"{name}.json.tmp"
        self._today = today or (lambda: _dt.date.today().isoformat())
        self._lock_timeout_s = float(lock_timeout_s)
        self._held_day: str | None = None  # the day of this instance's reservations
        self._held = 0  # pulses reserved on that day and not given back
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DayCounterError(path=directory, problem=f"cannot create the pulse counter "
                                  f"folder ({exc})", advice=_ADVICE_WRITE) from exc
        with self._locked(fcntl.LOCK_SH):
            self._read()

    @property
    def path(self) -> Path:
        """The counter file, ``<directory>/pulses-<participant>.json``."""
        return self._path

    @property
    def lock_path(self) -> Path:
        """The lock file beside it."""
        return self._lock_path

    def day(self) -> str:
        """The calendar day (``YYYY-MM-DD``) the counter counts in now."""
        return self._day()

    def count(self) -> int:
        """Today's pulses (reserved ones included), re-read from disk under the lock."""
        day = self._day()
        with self._locked(fcntl.LOCK_SH):
            return self._read().get(day, 0)

    def reserve(self, n: int) -> int:
        """Reserve up to ``n`` pulses of today's limit, durably, before firing them.

        The grant counts as delivered from now on: fire at most that many, and give back
        the ones not fired with :meth:`release`.

        Args:
            n: The pulses wanted (e.g. all of one unit).

        Returns:
            The pulses granted, ``min(n, limit - today)`` and at least 0; written and
            synced to disk when this returns.

        Raises:
            DayCounterError: The counter cannot be read, written or locked; nothing is
                granted then.
            ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"cannot reserve {n} pulses")
        day = self._day()
        with self._locked(fcntl.LOCK_EX):
            counts = self._read()
            now = counts.get(day, 0)
            granted = max(0, min(n, self.limit - now))
            if granted:
                counts[day] = now + granted
                self._write(counts, day)
        if granted:
            if self._held_day != day:
                self._held_day, self._held = day, 0
            self._held += granted
        return granted

    def release(self, n: int) -> None:
        """Give back ``n`` reserved pulses that were not delivered.

        At most what this instance reserved today and has not given back yet is returned,
        and the count never goes below 0. Reservations of an earlier day are not given
        back (that day's count stays conservative).

        Args:
            n: The pulses reserved but not fired.

        Raises:
            DayCounterError: The counter cannot be read, written or locked; the pulses
                then stay counted.
            ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"cannot release {n} pulses")
        day = self._day()
        give = min(n, self._held) if self._held_day == day else 0
        if give == 0:
            return
        with self._locked(fcntl.LOCK_EX):
            counts = self._read()
            now = counts.get(day, 0)
            counts[day] = max(0, now - give)
            self._write(counts, day)
        self._held -= give

    # -- inside the lock -------------------------------------------------------------------

    def _day(self) -> str:
        day = self._today()
        if not _is_iso_date(day):
            raise ValueError(f"today() must return YYYY-MM-DD, not {day!r}")
        return day

    @contextlib.contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise DayCounterError(path=self._lock_path, problem=f"cannot open the lock file "
                                  f"({exc})", advice=_ADVICE_WRITE) from exc
        try:
            deadline = time.perf_counter() + self._lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, kind | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                        raise DayCounterError(path=self._lock_path, problem=f"cannot lock "
                                              f"({exc})", advice=_ADVICE_WRITE) from exc
                    if time.perf_counter() >= deadline:
                        raise DayCounterError(
                            path=self._lock_path, problem="still locked by another process "
                            f"after {self._lock_timeout_s:g} s",
                            advice="find the process that holds it (e.g. `fuser` on the "
                            "lock file) and stop it; nothing was counted") from exc
                    time.sleep(_LOCK_POLL_S)
            yield  # closing the descriptor releases the lock
        finally:
            os.close(fd)

    def _read(self) -> dict[str, int]:
        try:
            with open(self._path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise DayCounterError(path=self._path, problem=f"cannot read the pulse counter "
                                  f"({exc})", advice=_ADVICE_UNREADABLE) from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise DayCounterError(path=self._path, problem=f"the pulse counter is not JSON "
                                  f"({exc})", advice=_ADVICE_UNREADABLE) from exc
        if not isinstance(data, dict):
            raise DayCounterError(path=self._path, problem="the pulse counter is not "
                                  '{"YYYY-MM-DD": count, ...}', advice=_ADVICE_UNREADABLE)
        for key, value in data.items():
            if not _is_iso_date(key) or isinstance(value, bool) or not isinstance(value, int) \
                    or value < 0:
                raise DayCounterError(path=self._path, problem=f"bad entry {key!r}: "
                                      f"{value!r} in the pulse counter (expected "
                                      '"YYYY-MM-DD": count >= 0)', advice=_ADVICE_UNREADABLE)
        return data

    def _write(self, counts: dict[str, int], day: str) -> None:
        oldest = (_dt.date.fromisoformat(day) - _dt.timedelta(days=_KEEP_DAYS - 1)).isoformat()
        kept = {k: v for k, v in counts.items() if k >= oldest}
        data = json.dumps(kept, sort_keys=True).encode()
        try:
            fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._tmp_path, self._path)
            dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise DayCounterError(path=self._path, problem=f"cannot save the pulse counter "
                                  f"({exc})", advice=_ADVICE_WRITE) from exc


def _is_iso_date(text: object) -> bool:
    """``YYYY-MM-DD`` exactly (the form whose string order is the calendar order)."""
    try:
        return isinstance(text, str) and _dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False
