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

import numpy as np
import torch

from ..idmap import grouped
from ..memory import held_bytes
from ..topk import topk_padded

__all__ = ["ListScan", "Queries", "Scanner", "SegmentCache", "TopK"]


@dataclass(frozen=True)
class Queries:
    """Queries prepared for a scan, on the scan's device.

    rotated : (nq, d) float32, Πq
    projected : (nq, d) float32, GΠq for the prod variant, else None
    sq_norms : (nq,) float32, ‖q‖² for "l2" (zeros for the other metrics, which do not use it)
    """

    rotated: torch.Tensor
    projected: torch.Tensor | None
    sq_norms: torch.Tensor

    @classmethod
    def of(cls, quantizer, q: torch.Tensor, metric: str) -> "Queries":
        """Queries q (nq, d) float32 prepared by `quantizer` (rotated once) for `metric`."""
        rotated, projected = quantizer.prepare_queries(q)
        # ‖q‖² summed in float64 and rounded once, as the native search sums it (the same float32 value
        # but in a case of one in billions), so either way of searching scores alike.
        sq_norms = (q.double().square().sum(dim=1).float() if metric == "l2"
                    else torch.zeros(q.shape[0], device=q.device))
        return cls(rotated, projected, sq_norms)

    def __len__(self) -> int:
        return self.rotated.shape[0]

    def to(self, device) -> "Queries":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Queries(move(self.rotated), move(self.projected), move(self.sq_norms))

    def take(self, rows: torch.Tensor) -> "Queries":
        """These queries (int64 row numbers)."""
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return Queries(pick(self.rotated), pick(self.projected), pick(self.sq_norms))


@dataclass(frozen=True)
class ListScan:
    """A partitioned index's scan: each query's probed lists, and the segments that form each list.

    segments : the snapshot's segments (positions are over their concatenation)
    starts : (len(segments) + 1,) int64, each segment's first position
    members : {list: [segment numbers]} for the lists that hold live rows
    lists : (nq, nprobe) int64, the lists each query scans
    offsets : (nq, nlist) float32, what list L adds to every score of query q's rows
    memo : what backends keep for this snapshot of the index (made once, dropped with it), by name
    """

    segments: tuple
    starts: np.ndarray
    members: dict
    lists: np.ndarray
    offsets: np.ndarray
    memo: dict = field(default_factory=dict)

    def by_list(self):
        """(list, segment numbers, the queries probing it (ascending)) for every probed list with rows
        (a query's lists are distinct: `CoarseQuantizer.probe` takes the top nprobe)."""
        nprobe = self.lists.shape[1]
        if len(self.lists) == 1:  # one query: its lists, each once (no grouping to do)
            for lst in self.lists[0].tolist():
                where = self.members.get(lst)
                if where is not None:
                    yield lst, where, np.zeros(1, dtype=np.int64)
            return
        for lst, entries in grouped(self.lists.reshape(-1)):
            where = self.members.get(lst)
            if where is not None:
                yield lst, where, entries // nprobe


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

    def put(self, segment, key, value) -> None:
        self._values.setdefault(segment.encoded, {})[key] = value

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
    #: Whether it has the one-call searches `search_direct`, `search_direct_lists` and `probing_search`.
    direct = False

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

    def topk_queries(self, segments: list, queries: torch.Tensor, k: int) -> TopK:
        """`topk` for queries not yet rotated: (nq, d) float32 on the scan's device, as the index scores
        them (centred, normalised). This default prepares them (`Queries.of`) and calls `topk`; a
        backend may rotate them in the call that scans."""
        return self.topk(segments, Queries.of(self.quantizer, queries, self.metric), k)

    def search_direct(self, segments: list, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A whole search of unprepared queries in one call, where a backend has one: queries
        (nq, d) float32 numpy, C-contiguous, as given to `Index.search` (the norm checks of
        `validation.check_norms` and, for "cosine", the scaling to unit norm are this call's);
        k ≤ the live rows. Returns ids (nq, k) int64 and scores (nq, k) float32, best first, as
        `topk` orders them (l2 scores are −‖q − x̃‖²), or None: no such path here, or a query fails a
        check (the caller's general path then raises the error). This default has none."""
        return None

    def search_direct_lists(self, request: ListScan, queries: np.ndarray,
                            k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """`search_direct` for a partitioned index's queries (request.lists (nq, nprobe), their lists
        probed already): queries (nq, d) float32 numpy, C-contiguous, checked and, for "cosine",
        scaled to unit norm by the caller; scores include the lists' offsets. None where the backend
        has no such path (this default)."""
        return None

    def probing_search(self, request: ListScan, coarse):
        """Where a backend has one, a function ``search(query, k, nprobe) -> (ids, scores) | None`` that
        does `search_direct` of one query of a partitioned index, its nprobe lists probed in the call
        (`coarse`: the index's `CoarseQuantizer`; request.lists and request.offsets are not read):
        query (1, d) float32 numpy, C-contiguous, as given to `Index.search` (norm checks and the
        "cosine" scaling are the call's). The caller keeps the function for the request's snapshot; it
        returns None where the query fails a check or the backend no longer applies. None (this
        default): no such path."""
        return None

    def topk_lists(self, request: ListScan, queries: Queries, k: int) -> TopK:
        """Exact top k over each query's probed lists (see `ListScan`), scores with their list's
        offset. This default scans list by list with `topk` (a list's offset does not change the
        order inside it) and merges; a backend may do it in one pass."""
        nq = len(queries)
        nprobe = request.lists.shape[1]
        cand_s = torch.full((nq, nprobe * k), -torch.inf, dtype=torch.float32)
        cand_p = torch.full((nq, nprobe * k), -1, dtype=torch.int64)
        filled = np.zeros(nq, dtype=np.int64)   # candidate columns used per query
        device = queries.rotated.device
        for lst, where, qs in request.by_list():
            result = self.topk([request.segments[i] for i in where], queries.take(torch.from_numpy(qs)), k)
            scores, local = result.scores.cpu(), result.positions.cpu().numpy()
            # Positions over this list's segments → the snapshot's positions.
            bounds = np.cumsum([0] + [len(request.segments[i]) for i in where])
            j = np.clip(np.searchsorted(bounds, local, side="right") - 1, 0, len(where) - 1)
            glob = np.where(local >= 0, request.starts[np.asarray(where)][j] + local - bounds[j], -1)
            scores = scores + torch.from_numpy(request.offsets[qs, lst])[:, None]
            cols = torch.from_numpy(filled[qs][:, None] + np.arange(scores.shape[1])[None, :])
            rows = torch.from_numpy(qs)[:, None].expand_as(cols)
            cand_s[rows, cols] = scores
            cand_p[rows, cols] = torch.from_numpy(glob)
            filled[qs] += scores.shape[1]
        scores, positions = topk_padded(cand_s, cand_p, k)
        self.last_stats = {"queries": nq}
        return TopK(scores.to(device), positions.to(device), self.last_stats)

    def prepare(self, segment) -> None:
        """Build what this backend needs to scan `segment` (called when rows are added, merged or
        loaded, so that no search pays for it); by default nothing."""

    def release(self) -> None:
        """Drop what this backend cached (e.g. when the index leaves its device)."""
        self.cache.clear()
