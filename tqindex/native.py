"""The optional compiled kernels (tqindex/_native.c) and the threads that run them.

`setup.py` builds the extension when a C compiler is present; without it every caller falls back to
torch, with the same results. TQINDEX_NATIVE=0 turns the kernels off (to compare, or to rule them out).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    from . import _native as kernels
except ImportError:  # built without a C compiler
    kernels = None

__all__ = ["kernels", "enabled", "simd", "parallel_ranges"]

_EXECUTOR: ThreadPoolExecutor | None = None


def enabled() -> bool:
    """Whether the compiled kernels are built and not turned off with TQINDEX_NATIVE=0."""
    return kernels is not None and os.environ.get("TQINDEX_NATIVE", "1") != "0"


def simd() -> str | None:
    """'avx2' or 'portable': the scan kernel this CPU runs; None without the extension."""
    return None if kernels is None else kernels.simd()


def parallel_ranges(count: int, fn, threads: int | None = None, min_per_thread: int = 1) -> list:
    """Run fn(start, stop) over `threads` contiguous slices of range(count) (the kernels release
    the GIL) and return the results in order."""
    threads = max(1, min(threads or torch.get_num_threads(), count // max(1, min_per_thread)))
    if threads == 1:
        return [fn(0, count)]
    global _EXECUTOR
    if _EXECUTOR is None or _EXECUTOR._max_workers < threads:
        _EXECUTOR = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tqindex")
    edges = np.linspace(0, count, threads + 1).astype(int)
    return list(_EXECUTOR.map(lambda i: fn(edges[i], edges[i + 1]), range(threads)))
