"""Documents in an Index: what the framework adapters share (no framework is imported here).

A document is one row: its vector, and payload columns
- ``doc_id``: the framework's string id (unique among live rows);
- ``text``: the document's text;
- ``metadata``: its metadata as JSON (returned exactly as given);
- ``m.<key>``: each top-level metadata value that is a string, number or bool, typed (numbers as
  float64), so that filters run on Arrow columns inside the scan. A key whose type changes between
  documents is refused by the index, naming the column;
- ``l.<key>``: each top-level list of such values, as one string of tagged items between separators
  (``\x1fs:text\x1fn:2.0\x1f``), so that membership (contains, any, all) is a substring match.

`DocumentIndex` maps string ids to the index's int64 ids (rebuilt from ``doc_id`` when loaded) and
replaces a document added again under the same id.
"""

from __future__ import annotations

import json
import uuid
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..index import Index

__all__ = ["DocumentIndex", "column", "dict_filter", "item", "list_column"]

PREFIX, LIST_PREFIX, SEP = "m.", "l.", "\x1f"


def column(key: str) -> str:
    """The payload column holding metadata key `key` (scalar values)."""
    return PREFIX + key


def list_column(key: str) -> str:
    """The payload column holding metadata key `key` when its value is a list."""
    return LIST_PREFIX + key


def item(value) -> str | None:
    """A list item's tagged text (None for values lists cannot hold in their column)."""
    if isinstance(value, bool):
        return "b:" + ("1" if value else "0")
    if isinstance(value, (int, float)):
        return "n:" + repr(float(value))
    if isinstance(value, str) and SEP not in value:
        return "s:" + value
    return None


def _flat(metadata: dict) -> dict:
    out = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            out[column(key)] = value
        elif isinstance(value, (int, float)):
            out[column(key)] = float(value)
        elif isinstance(value, str):
            out[column(key)] = value
        elif isinstance(value, (list, tuple)):
            items = [item(v) for v in value]
            if all(i is not None for i in items):
                out[list_column(key)] = SEP + "".join(i + SEP for i in items)
    return out


class DocumentIndex:
    """An `Index` of documents with string ids.

    Parameters
    ----------
    index : Index, optional
        An existing index (e.g. loaded); created at the first add (from the vectors' dimension and
        `params`) when None.
    params : dict
        Keyword arguments for `Index` when this creates it.
    """

    def __init__(self, index: Index | None = None, **params):
        self.index, self.params = index, params
        self._ids: dict[str, int] = {}
        if index is not None and len(index):
            live = index.select()
            docs = index.get(live, columns=["doc_id"]).column("doc_id").to_pylist()
            self._ids = dict(zip(docs, live.tolist()))

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, vectors, texts: Sequence[str], metadatas: Sequence[dict] | None = None,
            ids: Sequence[str | None] | None = None, filterable: Sequence[dict] | None = None) -> list[str]:
        """Add documents (replacing those whose id exists); returns their string ids. `filterable`:
        the metadata to make filter columns of, per document (default: `metadatas`)."""
        n = len(texts)
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in range(n)]
        ids = list(ids) if ids is not None else [None] * n
        if len(metadatas) != n or len(ids) != n:
            raise ValueError(f"{n} texts, {len(metadatas)} metadatas and {len(ids)} ids: one of each per text")
        ids = [str(i) if i is not None else uuid.uuid4().hex for i in ids]
        if len(set(ids)) != n:
            raise ValueError("ids repeat within one call")
        vectors = np.asarray(vectors, dtype=np.float32).reshape(n, -1)
        if self.index is None:
            self.index = Index(dim=vectors.shape[1], **self.params)
        filterable = metadatas if filterable is None else list(filterable)
        rows = [{"doc_id": i, "text": t, "metadata": json.dumps(m, sort_keys=True), **_flat(f)}
                for i, t, m, f in zip(ids, texts, metadatas, filterable)]
        internal = np.array([self._ids.get(i, -1) for i in ids], dtype=np.int64)
        fresh = internal < 0
        if fresh.any():
            start = self.index.next_id
            internal[fresh] = np.arange(start, start + int(fresh.sum()))
        self.index.add(vectors, ids=internal, upsert=True, metadata=rows)
        self._ids.update(zip(ids, internal.tolist()))
        return ids

    def delete(self, ids: Iterable[str]) -> int:
        """Remove documents by string id (unknown ids are ignored); returns how many were removed."""
        found = [self._ids.pop(str(i)) for i in ids if str(i) in self._ids]
        if found and self.index is not None:
            self.index.remove(found)
        return len(found)

    def ids(self) -> list[str]:
        """The string ids of every document held."""
        return list(self._ids)

    def internal(self, ids: Iterable[str]) -> np.ndarray:
        """int64 ids of the documents with these string ids (unknown ones left out)."""
        return np.array([self._ids[str(i)] for i in ids if str(i) in self._ids], dtype=np.int64)

    def get(self, ids: Sequence[str]) -> list[dict]:
        """Documents by string id, in order, unknown ids left out: dicts of id, text, metadata."""
        return self.rows(self.internal(ids))

    def rows(self, internal: np.ndarray) -> list[dict]:
        """Documents by int64 id, in order: dicts of id, text, metadata."""
        if self.index is None or not len(internal):
            return []
        return _documents(self.index.get(internal, columns=list(_DOC_COLUMNS)))

    def search(self, vector, k: int, *, where=None, rerank: int = 0) -> list[tuple[dict, float, float]]:
        """The k nearest documents: (document dict, score, distance) triples, best first. `where` is a
        filter for `Index.search` (an Arrow expression, int64 ids or a mask)."""
        if self.index is None or not len(self._ids):
            return []
        if rerank and not self.index.keep_vectors:
            rerank = 0
        result = self.index.search(np.asarray(vector, dtype=np.float32), k, filter=where, rerank=rerank,
                                   columns=list(_DOC_COLUMNS))
        found = result.ids >= 0  # padding comes last
        docs = _documents(result.payload.filter(pa.array(found)))
        return [(doc, float(score), float(dist))
                for doc, score, dist in zip(docs, result.scores[found], result.distances[found])]

    def save(self, path) -> None:
        if self.index is None:
            raise ValueError("nothing to save: no document was added yet")
        self.index.save(path)


_DOC_COLUMNS = ("doc_id", "text", "metadata")


def _documents(table: pa.Table) -> list[dict]:
    """Payload rows of documents → dicts of id, text and metadata (decoded from its JSON)."""
    return [{"id": d, "text": t, "metadata": json.loads(m)}
            for d, t, m in zip(*(table.column(c).to_pylist() for c in _DOC_COLUMNS))]


_OPERATORS = {
    "$eq": lambda f, v: f == v, "$ne": lambda f, v: f != v, "$gt": lambda f, v: f > v, "$gte": lambda f, v: f >= v,
    "$lt": lambda f, v: f < v, "$lte": lambda f, v: f <= v,
    "$in": lambda f, v: f.isin(list(v)), "$nin": lambda f, v: ~f.isin(list(v)),
}


def _value(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def dict_filter(spec: dict, schema: pa.Schema | None) -> pc.Expression:
    """A metadata filter dict as an Arrow expression over the ``m.<key>`` columns.

    Forms: ``{"key": value}`` (equality), ``{"key": {"$op": value}}`` with $eq, $ne, $gt, $gte, $lt,
    $lte, $in, $nin, and ``{"$and": [...]}``, ``{"$or": [...]}``, ``{"$not": {...}}``; several keys in
    one dict must all hold. A key no document has matches nothing (raises nothing).
    """
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"a metadata filter must be a non-empty dict, got {spec!r}")
    names = set() if schema is None else set(schema.names)
    parts = []
    for key, cond in spec.items():
        if key in ("$and", "$or"):
            subs = [dict_filter(s, schema) for s in cond]
            expr = subs[0]
            for s in subs[1:]:
                expr = (expr & s) if key == "$and" else (expr | s)
            parts.append(expr)
            continue
        if key == "$not":
            parts.append(~dict_filter(cond, schema))
            continue
        if key.startswith("$"):
            raise ValueError(f"unknown filter operator {key!r}")
        if column(key) not in names:
            parts.append(pc.scalar(False))
            continue
        field = pc.field(column(key))
        if isinstance(cond, dict):
            for op, value in cond.items():
                if op not in _OPERATORS:
                    raise ValueError(f"unknown filter operator {op!r} for key {key!r}; known: {sorted(_OPERATORS)}")
                value = [_value(v) for v in value] if op in ("$in", "$nin") else _value(value)
                parts.append(_OPERATORS[op](field, value))
        else:
            parts.append(field == _value(cond))
    expr = parts[0]
    for p in parts[1:]:
        expr = expr & p
    return expr
