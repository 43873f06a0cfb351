"""The daemon's once-a-minute ``malloc_trim`` (closedloop.control.memory)."""

from __future__ import annotations

import platform

import pytest

from closedloop.control.memory import trim_heap


def test_heap_trim_gives_freed_memory_back() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    blocks = [bytearray(64 * 1024) for _ in range(400)]  # 25 MB below the mmap threshold
    del blocks[:-1]  # all but the last: the freed space is not at the top of the heap
    assert trim_heap() is True
