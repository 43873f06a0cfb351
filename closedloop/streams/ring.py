"""Preallocated ring buffer of multichannel samples with their LSL timestamps.

One writer (an acquisition thread) and any number of readers, each keeping its own read
position as an absolute sample count; a reader that falls more than the capacity behind
is told how many samples it lost instead of silently reading overwritten data. No
allocation happens on the write path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["RingBuffer", "RingRead"]

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True, slots=True)
class RingRead:
    """Samples read from a ring: ``data`` (n, channels), ``timestamps`` (n,).

    ``start`` is the absolute index of the first sample returned; ``lost`` counts samples
    the reader asked for that were already overwritten.
    """

    data: FloatArray
    timestamps: npt.NDArray[np.float64]
    start: int
    lost: int


class RingBuffer:
    """Fixed-capacity, thread-safe sample store indexed by absolute sample count."""

    def __init__(self, capacity: int, n_channels: int, dtype: npt.DTypeLike = np.float64) -> None:
        if capacity < 1 or n_channels < 1:
            raise ValueError("capacity and n_channels must be positive")
        self.capacity = capacity
        self.n_channels = n_channels
        self._data = np.zeros((capacity, n_channels), dtype=dtype)
        self._ts = np.zeros(capacity, dtype=np.float64)
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Total samples ever written (the absolute index of the next sample)."""
        return self._count

    def write(self, data: npt.ArrayLike, timestamps: npt.ArrayLike) -> None:
        """Append samples (n, channels) with their timestamps (n,)."""
        arr = np.asarray(data)
        ts = np.asarray(timestamps, dtype=np.float64)
        n = arr.shape[0]
        if n == 0:
            return
        if arr.ndim != 2 or arr.shape[1] != self.n_channels or ts.shape != (n,):
            raise ValueError(f"expected ({n}, {self.n_channels}) samples and ({n},) timestamps")
        with self._lock:
            if n > self.capacity:
                arr, ts = arr[-self.capacity:], ts[-self.capacity:]
                skipped = n - self.capacity
                n = self.capacity
            else:
                skipped = 0
            pos = (self._count + skipped) % self.capacity
            first = min(n, self.capacity - pos)
            self._data[pos:pos + first] = arr[:first]
            self._ts[pos:pos + first] = ts[:first]
            if first < n:
                self._data[:n - first] = arr[first:]
                self._ts[:n - first] = ts[first:]
            self._count += n + skipped

    def read_from(self, start: int, max_samples: int | None = None) -> RingRead:
        """Copy the samples from absolute index ``start`` up to the newest."""
        with self._lock:
            end = self._count
            oldest = max(0, end - self.capacity)
            lost = max(0, oldest - start)
            start = max(start, oldest)
            if max_samples is not None:
                end = min(end, start + max_samples)
            return self._copy(start, end, lost)

    def latest(self, n: int) -> RingRead:
        """Copy the newest ``n`` samples (fewer if fewer were written)."""
        with self._lock:
            end = self._count
            start = max(0, end - min(n, self.capacity))
            return self._copy(start, end, 0)

    def between(self, t_start: float, t_end: float) -> RingRead:
        """Copy the samples whose timestamps lie in ``[t_start, t_end]``."""
        with self._lock:
            end = self._count
            start = max(0, end - self.capacity)
            everything = self._copy(start, end, 0)
        ts = everything.timestamps
        i0 = int(np.searchsorted(ts, t_start, side="left"))
        i1 = int(np.searchsorted(ts, t_end, side="right"))
        return RingRead(everything.data[i0:i1], ts[i0:i1], everything.start + i0, 0)

    def newest_timestamp(self) -> float | None:
        """Timestamp of the newest sample, or None when empty."""
        with self._lock:
            if self._count == 0:
                return None
            return float(self._ts[(self._count - 1) % self.capacity])

    def _copy(self, start: int, end: int, lost: int) -> RingRead:
        n = max(0, end - start)
        pos = start % self.capacity
        first = min(n, self.capacity - pos)
        if first == n:
            data = self._data[pos:pos + n].copy()
            ts = self._ts[pos:pos + n].copy()
        else:
            data = np.concatenate((self._data[pos:], self._data[:n - first]))
            ts = np.concatenate((self._ts[pos:], self._ts[:n - first]))
        return RingRead(data, ts, start, lost)
