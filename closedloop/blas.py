"""BLAS runs single-threaded in closedloop's processes.

The pipeline multiplies small matrices (tens of rows) hundreds of times a second. A
multi-threaded BLAS (numpy's OpenBLAS) wakes its worker threads for some of them and
leaves them spinning; on a 2-core acquisition PC they take the core the real-time
threads need. Measured: the offline mode ran 33x real time with OpenBLAS threads and 53x
without (``tools/bench_offline.py``). threadpoolctl sets the limit at run time, whatever
was imported first.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits

__all__ = ["single_threaded_blas"]

_state = {"limited": False}


def single_threaded_blas() -> None:
    """Limit every BLAS loaded in this process to one thread (once; idempotent)."""
    if not _state["limited"]:
        threadpool_limits(limits=1, user_api="blas")
        _state["limited"] = True
