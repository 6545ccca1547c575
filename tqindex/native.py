"""The optional compiled kernels (tqindex/_native.c) and the threads that run them.

`setup.py` builds the extension when a C compiler is present; without it every caller falls back to
torch, with the same results. TQINDEX_NATIVE=0 turns the kernels off (to compare, or to rule them out);
TQINDEX_SIMD caps the fast scan's SIMD level (`set_simd_limit`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

try:
    from . import _native as kernels
except ImportError:  # built without a C compiler
    kernels = None

__all__ = ["kernels", "enabled", "simd", "set_simd_limit", "SIMD_LEVELS", "parallel_ranges", "thread_share",
           "get_num_threads", "set_num_threads", "set_worker_spin"]

#: The fast scan's SIMD levels, lowest first (the portable loop is the oracle of the others).
SIMD_LEVELS = ("portable", "neon", "avx2", "avx512", "avx512vbmi")

_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()
_THREADS: int | None = None
_ACTIVE = 0  # parallel_ranges calls in flight, from any thread


def set_num_threads(threads: int | None) -> None:
    """Threads every tqindex kernel may use at once (the scan, the encoder, query tables), process-wide,
    as `faiss.omp_set_num_threads`; None restores the default, `torch.get_num_threads()`."""
    global _THREADS
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    _THREADS = threads


def get_num_threads() -> int:
    """The thread count set by `set_num_threads`, else `torch.get_num_threads()`."""
    return _THREADS or torch.get_num_threads()


def enabled() -> bool:
    """Whether the compiled kernels are built and not turned off with TQINDEX_NATIVE=0."""
    return kernels is not None and os.environ.get("TQINDEX_NATIVE", "1") != "0"


def simd() -> str | None:
    """'avx512vbmi', 'avx512', 'avx2', 'neon' or 'portable': the scan kernel this CPU runs (the highest
    level it has, up to `set_simd_limit`'s limit); None without the extension."""
    return None if kernels is None else kernels.simd()


def set_simd_limit(level: str) -> str:
    """Cap the fast scan's SIMD level process-wide (one of `SIMD_LEVELS`; the CPU's own level where
    lower), as faiss's FAISS_OPT_LEVEL: to compare levels, or to keep AVX-512's clock penalty off a
    CPU that has one. Results are the same at every level. Returns the previous limit. The
    environment variable TQINDEX_SIMD sets it at import."""
    if kernels is None:
        raise RuntimeError("the compiled kernels are not built: there is no SIMD level to limit")
    if level not in SIMD_LEVELS:
        raise ValueError(f"unknown SIMD level {level!r}; expected one of {SIMD_LEVELS}")
    return kernels.set_simd_limit(level)


def set_worker_spin(microseconds: int) -> int:
    """How long the scan's idle worker threads watch for work before they sleep, process-wide, as
    OpenMP's wait policy (default 200 µs): a sleeping thread takes tens of microseconds to wake (more
    in a virtual machine), which a single query's scan waits for, while a watching thread holds its
    core. 0 sleeps at once. Returns the previous value. The environment variable TQINDEX_SPIN_US sets
    it at import."""
    if kernels is None:
        raise RuntimeError("the compiled kernels are not built: there are no worker threads")
    if isinstance(microseconds, bool) or not isinstance(microseconds, int):
        raise TypeError(f"microseconds must be an integer, got {type(microseconds).__name__}")
    return kernels.set_worker_spin(microseconds)


if kernels is not None and os.environ.get("TQINDEX_SPIN_US"):
    try:
        set_worker_spin(int(os.environ["TQINDEX_SPIN_US"]))
    except ValueError as exc:
        raise ValueError(f"environment variable TQINDEX_SPIN_US: {exc}") from None

if kernels is not None and os.environ.get("TQINDEX_SIMD"):
    try:
        set_simd_limit(os.environ["TQINDEX_SIMD"])
    except ValueError as exc:
        raise ValueError(f"environment variable TQINDEX_SIMD: {exc}") from None


class thread_share:
    """This call's share of the thread budget (`threads`, default `get_num_threads()`), as an int:
    calls in flight at once (several Python threads searching one index) divide it between them, so
    concurrent single queries run side by side instead of queueing for the same threads. Use as
    `with thread_share() as share:` (a class, not a generator: a single query enters it every call)."""

    __slots__ = ("threads",)

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __enter__(self) -> int:
        return enter_share(self.threads)

    def __exit__(self, *exc) -> None:
        leave_share()


def enter_share(threads: int | None = None) -> int:
    """`thread_share` without the object, for a path each single query takes: this call's share of
    `threads` (default `get_num_threads()`). Every call must be matched by `leave_share()` (try/finally)."""
    global _ACTIVE
    with _EXECUTOR_LOCK:
        _ACTIVE += 1
        sharing = _ACTIVE
    return max(1, (threads or get_num_threads()) // sharing)


def leave_share() -> None:
    """The end of a call `enter_share` began."""
    global _ACTIVE
    with _EXECUTOR_LOCK:
        _ACTIVE -= 1


def parallel_ranges(count: int, fn, threads: int | None = None, min_per_thread: int = 1) -> list:
    """Run fn(start, stop) over `threads` contiguous slices of range(count) (the kernels release
    the GIL) and return the results in order. The calling thread runs the first slice itself, so a
    call hands at most threads − 1 slices to the pool (one hand-off fewer, which counts on a busy
    machine, where a pool thread may wait for a core). The threads are this call's `thread_share`.
    Results never depend on the split."""
    global _EXECUTOR
    if count // max(1, min_per_thread) <= 1:  # one slice whatever the share: no budget to take
        return [fn(0, count)]
    with thread_share(threads) as share:
        threads = max(1, min(share, count // max(1, min_per_thread)))
        if threads == 1:
            return [fn(0, count)]
        with _EXECUTOR_LOCK:
            if _EXECUTOR is None or _EXECUTOR._max_workers < threads - 1:
                _EXECUTOR = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="tqindex")
            executor = _EXECUTOR
        edges = [count * i // threads for i in range(threads + 1)]
        futures = [executor.submit(fn, edges[i], edges[i + 1]) for i in range(1, threads)]
        first = fn(edges[0], edges[1])
        return [first] + [f.result() for f in futures]
