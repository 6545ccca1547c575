"""Search filters: which rows a filtered search may return.

A filter is one of
- an allow-list of ids: an integer array (numpy, torch or a list);
- a boolean mask indexed by id: ``mask[id]`` allows the row with that id (ids at or past the end of
  the mask are not allowed);
- a pyarrow compute Expression over the payload columns, e.g. ``pc.field("year") >= 2020`` (a row
  whose expression is null is not allowed).

`allowed_rows` turns it into one boolean mask per segment (True: allowed); the index then scans
each segment with its disallowed rows treated as removed, so every backend applies the filter inside
its scan and the result is exactly the top k of the allowed rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import payload as payloads

__all__ = ["allowed_rows"]


def allowed_rows(view, where) -> list[np.ndarray]:
    """(n,) bool per segment of `view` (an index snapshot): the rows `where` allows."""
    segments = view.segments
    if type(where).__module__.startswith("pyarrow"):
        # pyarrow.compute (several MB) is imported only by a search that passes an expression.
        import pyarrow.compute as pc
        if isinstance(where, pc.Expression):
            return [_expression_rows(s, view.schema, where) for s in segments]
    if hasattr(where, "detach"):  # a torch tensor
        where = where.detach().cpu().numpy()
    arr = np.asarray(where)
    if arr.dtype == bool:
        if arr.ndim != 1:
            raise ValueError(f"a boolean filter must be 1-D, indexed by id; got shape {arr.shape}")
        out = []
        for s in segments:
            ids = np.asarray(s.ids)
            inside = ids < len(arr)
            mask = np.zeros(len(ids), dtype=bool)
            mask[inside] = arr[ids[inside]]
            out.append(mask)
        return out
    if arr.dtype.kind in "iu" or arr.size == 0:
        ids = arr.reshape(-1).astype(np.int64)
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"filter ids must be non-negative, got {int(ids.min())}")
        out = [np.zeros(len(s), dtype=bool) for s in segments]
        positions = view.ids.positions(ids)
        positions = positions[positions >= 0]
        index_of = {id(s): i for i, s in enumerate(segments)}
        for segment, _, rows in view.ids.by_segment(positions):
            out[index_of[id(segment)]][rows] = True
        return out
    raise TypeError(f"filter must be an id array, a boolean mask indexed by id, or a pyarrow compute Expression; "
                    f"got {type(where).__name__} of dtype {arr.dtype}")


def _expression_rows(segment, schema: pa.Schema | None, expression) -> np.ndarray:
    if schema is None or not len(schema):
        raise ValueError("a filter expression needs metadata columns, and this index has none "
                         "(add vectors with metadata=...)")
    n = len(segment)
    table = payloads.conform(segment.payload, n, schema).append_column("__row", pa.array(np.arange(n)))
    try:
        rows = table.filter(expression).column("__row").to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError) as exc:
        raise ValueError(f"filter expression {expression} cannot be evaluated on the metadata columns "
                         f"{schema.names}: {exc}") from None
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask
