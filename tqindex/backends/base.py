"""The scanner protocol: every search backend answers the same request the same way.

A backend is chosen by what it supports (`Scanner.supports`), not by flags: `Index` asks its
scanners in order of preference (`tqindex.backends.make_scanners`) and the first that supports the
quantizer, metric and device runs. Each scanner owns the caches it builds (kernel layouts, GPU
uploads), keyed by segment, so moving an index between devices never throws away another
backend's work.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..memory import held_bytes

__all__ = ["Queries", "Scanner", "SegmentCache", "TopK"]


@dataclass(frozen=True)
class Queries:
    """Queries prepared for a scan, on the scan's device.

    rotated : (nq, d) float32, Πq
    projected : (nq, d) float32, GΠq for the prod variant, else None
    sq_norms : (nq,) float32, ‖q‖² (used by "l2")
    tables : a backend's per-query tables made once for several scans (`Scanner.with_tables`): a
        tuple of host arrays with nq rows each, or None
    """

    rotated: torch.Tensor
    projected: torch.Tensor | None
    sq_norms: torch.Tensor
    tables: tuple | None = None

    def __len__(self) -> int:
        return self.rotated.shape[0]

    def to(self, device) -> "Queries":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Queries(move(self.rotated), move(self.projected), move(self.sq_norms), self.tables)

    def take(self, rows: torch.Tensor) -> "Queries":
        """These queries (int64 row numbers), tables included."""
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        tables = None if self.tables is None else tuple(a[rows.numpy()] for a in self.tables)
        return Queries(pick(self.rotated), pick(self.projected), pick(self.sq_norms), tables)


@dataclass
class TopK:
    """A scan's answer: the exact top k of the quantized scores over the live rows.

    scores : (nq, k) float32, higher is better (l2: −‖q − x̃‖²), −inf where fewer than k rows exist
    positions : (nq, k) int64, row positions in the concatenation of the scanned segments, −1 padding
    stats : what the scan did (backend-specific counts, for tests and benchmarks)
    """

    scores: torch.Tensor
    positions: torch.Tensor
    stats: dict = field(default_factory=dict)


class SegmentCache:
    """Per-segment values a backend derived (kernel layouts, uploads), dropped with the segment.

    Keyed by the segment's encoded rows, which a removal's copy of the segment shares (only its
    deletion mask is new), so removing rows never rebuilds a layout."""

    def __init__(self):
        self._values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, segment, key, make):
        entry = self._values.setdefault(segment.encoded, {})
        if key not in entry:
            entry[key] = make()
        return entry[key]

    def peek(self, segment, key):
        return self._values.get(segment.encoded, {}).get(key)

    def nbytes(self, seen: set | None = None) -> int:
        """Host memory held by the cached values (numpy arrays and CPU tensors, in dicts or not),
        not counting buffers already in `seen` (see `tqindex.memory.held_bytes`)."""
        return held_bytes(list(self._values.values()), seen)

    def clear(self) -> None:
        self._values = weakref.WeakKeyDictionary()


class Scanner(ABC):
    """A search backend for one quantizer and metric.

    Subclasses set `name` and implement `supports` and `topk`; `last_stats` holds the stats of
    this scanner's last call (the same dict `topk` returned).
    """

    name = "?"
    #: Whether this backend's cache holds GPU memory (released when the index leaves the GPU).
    caches_on_device = False

    def __init__(self, quantizer, metric: str):
        self.quantizer, self.metric = quantizer, metric
        self.cache = SegmentCache()
        self.last_stats: dict = {}

    @abstractmethod
    def supports(self, device: str) -> bool:
        """Whether this backend can run this quantizer and metric on `device` ("cpu" or "cuda") here."""

    @abstractmethod
    def topk(self, segments: list, queries: Queries, k: int) -> TopK:
        """Exact top k of the quantized scores over the live rows of `segments` (see `TopK`)."""

    def with_tables(self, queries: Queries) -> Queries:
        """`queries` with this backend's per-query tables made once, for a caller that scans several
        groups of segments with them (a partitioned index's lists); by default none."""
        return queries

    def prepare(self, segment) -> None:
        """Build what this backend needs to scan `segment` (called when rows are added, merged or
        loaded, so that no search pays for it); by default nothing."""

    def release(self) -> None:
        """Drop what this backend cached (e.g. when the index leaves its device)."""
        self.cache.clear()
