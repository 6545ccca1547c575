"""Segments: the unit in which an index holds rows in memory and on disk (one Arrow shard each).

A segment is immutable once created except for its deletion mask; appends create new segments and
`Index.compact()` merges them. Arrays may be memory-mapped views of a shard (read-only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .memory import held_bytes
from .quantizer import EncodedVectors

__all__ = ["Segment"]


@dataclass(eq=False)  # identity equality and hashing: backends key their caches by segment
class Segment:
    """Rows of an index.

    ids : (n,) int64
    encoded : EncodedVectors with n rows
    vectors : (n, d) float32 full-precision rows kept for rerank, or None
    deleted : (n,) bool mask of removed rows, or None when none were removed
    payload : pyarrow Table of n rows (metadata columns, `tqindex.payload`), or None
    shard : manifest entry (dict) of the committed files that hold these rows, or None if unsaved
    deletions_dirty : the deletion mask changed since the last commit
    partition : the list of a partitioned index these rows belong to (residual codes), else None
    """

    ids: np.ndarray
    encoded: EncodedVectors
    vectors: np.ndarray | None = None
    deleted: np.ndarray | None = None
    shard: dict | None = None
    deletions_dirty: bool = False
    payload: object = None
    partition: int | None = None
    # live_count, counted once: a segment's deletion mask is never changed in place (a removal makes a
    # copy of the segment with a new mask, `dataclasses.replace`, which starts this afresh).
    _live: int | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def live_count(self) -> int:
        if self._live is None:
            self._live = len(self.ids) - (int(np.count_nonzero(self.deleted)) if self.deleted is not None else 0)
        return self._live

    def nbytes(self, seen: set | None = None) -> int:
        """Bytes of its arrays (memory-mapped ones included), each buffer once (`held_bytes`)."""
        enc = self.encoded
        return held_bytes([self.ids, enc.codes, enc.blocks, enc.norm, enc.scale, enc.qjl, enc.residual_norm,
                           self.vectors, self.deleted, self.payload], seen)
