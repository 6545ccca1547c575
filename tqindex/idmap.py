"""Id bookkeeping: where each live id sits among an index's segments.

Rows are addressed by *position*: their offset in the concatenation of the segments. `IdMap`
translates ids to positions and back and groups positions by segment; its lookups are rebuilt
lazily after any change (`invalidate`).
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterator

import numpy as np

from .memory import held_bytes

__all__ = ["IdMap", "grouped"]

#: Up to this many positions, `ids_at` looks each up on its own (cheaper than grouping by segment).
_FEW_POSITIONS = 64
#: Up to this many ids, `positions` without an index-wide lookup searches each segment's sorted ids.
_FEW_IDS = 64

# A segment's rows (`Segment.encoded`, shared by a removal's copy) → (its ids, their sorted values, the
# order that sorts them), the last two None where the ids are sorted already: kept while the rows live.
_SORTED_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sorted_ids(segment) -> tuple[np.ndarray, np.ndarray | None]:
    """A segment's ids in ascending order and the order that sorts them (None where they are in
    order already: ids that grow as rows are added, the common case, cost nothing to keep)."""
    kept = _SORTED_IDS.get(segment.encoded)
    if kept is None or kept[0] is not segment.ids:
        ids = np.asarray(segment.ids)
        if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
            kept = (segment.ids, None, None)
        else:
            order = np.argsort(ids, kind="stable")
            kept = (segment.ids, ids[order], order)
        _SORTED_IDS[segment.encoded] = kept
    return (np.asarray(kept[0]), None) if kept[2] is None else (kept[1], kept[2])


def grouped(values: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(value, indices of its entries, ascending) for each distinct value of a 1-D integer array, in
    value order: one stable sort, not a mask per value (there may be thousands of values)."""
    order = np.argsort(values, kind="stable")
    distinct, first = np.unique(values[order], return_index=True)
    return [(int(v), order[a:b]) for v, a, b in zip(distinct, first, np.r_[first[1:], len(order)])]


class IdMap:
    """Ids ↔ positions over the segments returned by `segments()` (read at each rebuild)."""

    def __init__(self, segments: Callable[[], list]):
        self._segments = segments
        self.invalidate()

    def invalidate(self) -> None:
        self._offsets: np.ndarray | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted live ids, their positions)
        self._keys: list | None = None  # per segment with rows: (first position, sorted ids, order, deleted)

    def nbytes(self, seen: set | None = None) -> int:
        """Memory held by the lookups built so far, and by the sorted ids of segments whose ids are
        not in order (not counting buffers in `seen`: `held_bytes`)."""
        kept = [_SORTED_IDS.get(segment.encoded) for segment in self._segments()]
        return held_bytes([self._offsets] + list(self._lookup or ()) + [k[1:] for k in kept if k is not None], seen)

    def offsets(self) -> np.ndarray:
        """(segments + 1,) int64: the first position of each segment, then the total row count."""
        if self._offsets is None:
            self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in self._segments()])]).astype(np.int64)
        return self._offsets

    def ids(self) -> np.ndarray:
        """(rows,) int64: the id at every position, removed rows included (a new array unless
        there is one segment; not kept)."""
        segments = self._segments()
        if len(segments) == 1:  # the segment's own array
            return np.asarray(segments[0].ids)
        return np.concatenate([np.asarray(s.ids) for s in segments]) if segments else np.empty(0, dtype=np.int64)

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Ids of positions (any shape), −1 where the position is −1. Read from each segment's own
        ids: no index-wide copy of the ids is made or kept for it."""
        segments = self._segments()
        missing = positions < 0
        if len(segments) == 1 and len(segments[0]):  # a search's common case, in three numpy calls
            out = np.asarray(segments[0].ids).take(positions, mode="clip")  # −1 → row 0, overwritten
            out[missing] = -1
            return out
        out = np.full(positions.shape, -1, dtype=np.int64)
        found = ~missing
        picked = positions[found]
        values = np.empty(len(picked), dtype=np.int64)
        if len(segments) == 1:
            values = np.asarray(segments[0].ids)[picked]
        elif len(picked) <= _FEW_POSITIONS:  # a query's k results: one look-up each, no grouping
            offsets = self.offsets()
            seg_of = np.searchsorted(offsets, picked, side="right") - 1
            for j, (s, p) in enumerate(zip(seg_of.tolist(), picked.tolist())):
                values[j] = segments[s].ids[p - offsets[s]]
        else:
            for segment, where, rows in self.by_segment(picked):
                values[where] = np.asarray(segment.ids)[rows]
        out[found] = values
        return out

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 positions of the live rows with these ids, −1 where absent. A few ids, when the
        index-wide lookup is not built (after any change), are searched in each segment's sorted ids
        instead: the lookup sorts every live id, which an add, remove or upsert of one row would pay."""
        if self._lookup is None and len(ids) <= _FEW_IDS:
            return self._positions_by_segment(np.asarray(ids, dtype=np.int64))
        if self._lookup is None:
            all_ids, offsets = self.ids(), self.offsets()
            live = np.ones(len(all_ids), dtype=bool)
            for s, segment in enumerate(self._segments()):
                if segment.deleted is not None:
                    live[offsets[s]:offsets[s + 1]] = ~segment.deleted
            positions = np.nonzero(live)[0]
            order = np.argsort(all_ids[positions], kind="stable")
            self._lookup = (all_ids[positions][order], positions[order])
        sorted_ids, sorted_pos = self._lookup
        if not len(sorted_ids):
            return np.full(len(ids), -1, dtype=np.int64)
        where = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[where] == ids, sorted_pos[where], -1).astype(np.int64)

    def _positions_by_segment(self, ids: np.ndarray) -> np.ndarray:
        """`positions` by a binary search of each segment's sorted ids (`_sorted_ids`): an id is in a
        segment at most once, and live in at most one segment."""
        out = np.full(len(ids), -1, dtype=np.int64)
        if self._keys is None:
            offsets = self.offsets()
            self._keys = [(int(offsets[s]),) + _sorted_ids(segment) + (segment.deleted,)
                          for s, segment in enumerate(self._segments()) if len(segment)]
        if len(ids) == 1:  # one add, upsert or removal: scalar steps, stopping at the live row
            value = int(ids[0])
            for first, keys, order, deleted in self._keys:
                at = int(keys.searchsorted(value))
                if at < len(keys) and keys[at] == value:
                    row = at if order is None else int(order[at])
                    if deleted is None or not deleted[row]:
                        out[0] = first + row
                        break
            return out
        for first, keys, order, deleted in self._keys:
            where = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
            hit = np.nonzero(keys[where] == ids)[0]
            if not len(hit):
                continue
            rows = where[hit] if order is None else order[where[hit]]
            if deleted is not None:
                live = ~np.asarray(deleted)[rows]
                hit, rows = hit[live], rows[live]
            out[hit] = first + rows
        return out

    def by_segment(self, positions: np.ndarray) -> Iterator[tuple[object, np.ndarray, np.ndarray]]:
        """Group positions by segment: yields (segment, indices into `positions`, local rows), one
        sort for all segments (an index may hold thousands: a partitioned index's lists)."""
        offsets, segments = self.offsets(), self._segments()
        for s, where in grouped(np.searchsorted(offsets, positions, side="right") - 1):
            yield segments[s], where, positions[where] - offsets[s]
