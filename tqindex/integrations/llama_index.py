"""A LlamaIndex vector store on a tqindex `Index` (``pip install 'tqindex[llama-index]'``).

    from tqindex.integrations.llama_index import TQIndexVectorStore
    from llama_index.core import StorageContext, VectorStoreIndex
    store = TQIndexVectorStore(bits=4)
    index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=store))
    store.persist("my-store"); store = TQIndexVectorStore.load("my-store")

Nodes are stored whole (text, metadata and relationships, ``stores_text=True``) in the index's payload
columns, in the same commit as their vectors. `query` takes `VectorStoreQuery` with
``similarity_top_k``, ``doc_ids`` (ref_doc_ids), ``node_ids`` and ``filters``: `MetadataFilters` with
every `FilterOperator` (==, !=, >, >=, <, <=, in, nin, any, all, contains, text_match,
text_match_insensitive, is_empty), nested, under and / or / not, evaluated as LlamaIndex's own
`SimpleVectorStore` evaluates them (a missing key matches only != and nin), as Arrow expressions
inside the scan.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

try:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.schema import BaseNode
    from llama_index.core.vector_stores.types import (BasePydanticVectorStore, FilterCondition, FilterOperator,
                                                      MetadataFilter, MetadataFilters, VectorStoreQuery,
                                                      VectorStoreQueryMode, VectorStoreQueryResult)
    from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("tqindex.integrations.llama_index needs llama-index-core: "
                      "pip install 'tqindex[llama-index]'") from exc

from ..index import Index
from .documents import SEP, DocumentIndex, column, item, list_column

__all__ = ["TQIndexVectorStore", "metadata_filter"]

_REF = "__ref_doc_id"  # the filter column of a node's ref_doc_id


class TQIndexVectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store backed by a tqindex `Index`.

    Parameters
    ----------
    index : Index, optional
        An index of nodes (as `load` opens); otherwise one is created at the first add.
    rerank : int
        Candidates per result rescored with the kept full-precision vectors (0: quantized only).
    **params
        `Index` parameters for a new index: bits (default 4), metric (default "cosine"), seed, ...;
        keep_vectors defaults to True.
    """

    stores_text: bool = True
    flat_metadata: bool = False
    rerank: int = 10

    _docs: DocumentIndex = PrivateAttr()

    def __init__(self, index: Index | None = None, *, rerank: int = 10, **params: Any):
        super().__init__(rerank=rerank)
        self._docs = DocumentIndex(index, **{"bits": 4, "metric": "cosine", "keep_vectors": True, **params})

    @classmethod
    def class_name(cls) -> str:
        return "TQIndexVectorStore"

    @property
    def client(self) -> Index | None:
        """The underlying tqindex `Index` (None before the first add)."""
        return self._docs.index

    # -- writes ----------------------------------------------------------------------------------
    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> List[str]:
        if not nodes:
            return []
        vectors = np.asarray([node.get_embedding() for node in nodes], dtype=np.float32)
        texts = [node.get_content(metadata_mode="none") for node in nodes]
        stored = [node_to_metadata_dict(node, remove_text=True, flat_metadata=self.flat_metadata) for node in nodes]
        filterable = [{**node.metadata, _REF: node.ref_doc_id} for node in nodes]
        return self._docs.add(vectors, texts, stored, [node.node_id for node in nodes], filterable=filterable)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the document `ref_doc_id`."""
        self._delete_internal(self._select(expression=pc.field(column(_REF)) == ref_doc_id))

    def delete_nodes(self, node_ids: Optional[List[str]] = None, filters: Optional[MetadataFilters] = None,
                     **delete_kwargs: Any) -> None:
        if node_ids is None and filters is None:
            return
        self._delete_internal(self._select(node_ids=node_ids, filters=filters))

    def clear(self) -> None:
        if self.client is not None:
            self._delete_internal(self.client.select())

    def get_nodes(self, node_ids: Optional[List[str]] = None,
                  filters: Optional[MetadataFilters] = None) -> List[BaseNode]:
        if self.client is None:
            return []
        internal = self._select(node_ids=node_ids, filters=filters)
        return [self._node(row) for row in self._docs.rows(internal)]

    # -- queries ---------------------------------------------------------------------------------
    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise NotImplementedError(f"TQIndexVectorStore answers the default query mode only, not {query.mode}")
        if query.query_embedding is None:
            raise ValueError("TQIndexVectorStore needs query.query_embedding")
        if self.client is None or not len(self._docs):
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        # Empty node_ids / doc_ids mean "no restriction" (LlamaIndex's retriever passes node_ids=[]
        # when it has none), as in its other integrations.
        where = None
        if query.node_ids or query.doc_ids or query.filters is not None:
            expression = None
            if query.doc_ids:
                expression = pc.field(column(_REF)).isin(list(query.doc_ids))
            where = self._select(node_ids=query.node_ids or None, filters=query.filters, expression=expression)
        hits = self._docs.search(query.query_embedding, query.similarity_top_k, where=where, rerank=self.rerank)
        nodes = [metadata_dict_to_node(doc["metadata"], text=doc["text"]) for doc, _, _ in hits]
        return VectorStoreQueryResult(nodes=nodes, similarities=[score for _, score, _ in hits],
                                      ids=[doc["id"] for doc, _, _ in hits])

    # -- persistence -----------------------------------------------------------------------------
    def persist(self, persist_path: str, fs: Any = None) -> None:
        """Commit the store to directory `persist_path` (local file systems only)."""
        if fs is not None and getattr(fs, "protocol", "file") not in ("file", ("file", "local")):
            raise NotImplementedError("TQIndexVectorStore persists to a local directory only")
        self._docs.save(persist_path)

    @classmethod
    def load(cls, path, *, rerank: int = 10, mmap: bool = True) -> "TQIndexVectorStore":
        """Open a store saved with `persist`."""
        return cls(Index.load(path, mmap=mmap), rerank=rerank)

    # -- helpers ---------------------------------------------------------------------------------
    def _select(self, *, node_ids=None, filters=None, expression=None) -> np.ndarray:
        """int64 ids of the live nodes that every given condition allows."""
        index = self.client
        if index is None:
            return np.empty(0, dtype=np.int64)
        if filters is not None:
            f = metadata_filter(filters, index.schema)
            expression = f if expression is None else (expression & f)
        if expression is not None and index.schema is None:
            return np.empty(0, dtype=np.int64)
        chosen = index.select(expression)
        if node_ids is not None:
            chosen = np.intersect1d(chosen, self._docs.internal(node_ids))
        return chosen

    def _delete_internal(self, internal: np.ndarray) -> None:
        if len(internal):
            docs = self.client.get(internal, columns=["doc_id"]).column("doc_id").to_pylist()
            self._docs.delete(docs)

    @staticmethod
    def _node(row: dict) -> BaseNode:
        return metadata_dict_to_node(row["metadata"], text=row["text"])


# -- filters ------------------------------------------------------------------------------------
def _field(schema: pa.Schema | None, name: str):
    """(expression, type) of a payload column, or (null scalar, null type) when no row has it."""
    if schema is not None and name in schema.names:
        return pc.field(name), schema.field(name).type
    return pc.scalar(None), pa.null()


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_floating(t):
        return "num"
    return "none"


def _value_kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    return "str" if isinstance(v, str) else "other"


def _scalar(v):
    return float(v) if _value_kind(v) == "num" else v


_FALSE = pc.scalar(False)


def _true(expr):
    """Where `expr` is null (a missing value, or a type that cannot compare), False."""
    return pc.coalesce(expr, _FALSE)


def _contains(schema, key: str, value) -> pc.Expression:
    """LlamaIndex's ``value in metadata[key]``: a substring of a string value, an item of a list."""
    out = _FALSE
    m, mt = _field(schema, column(key))
    if _kind(mt) == "str" and isinstance(value, str):
        out = _true(pc.match_substring(m, value))
    tagged = item(value)
    lst, lt = _field(schema, list_column(key))
    if tagged is not None and _kind(lt) == "str":
        out = out | _true(pc.match_substring(lst, SEP + tagged + SEP))
    return out


def _one(f: MetadataFilter, schema) -> pc.Expression:
    op, key, v = f.operator, f.key, f.value
    m, mt = _field(schema, column(key))
    lst, lt = _field(schema, list_column(key))
    missing = m.is_null() & lst.is_null()
    comparable = _kind(mt) == _value_kind(v) or (op in (FilterOperator.IN, FilterOperator.NIN))
    if op in (FilterOperator.EQ, FilterOperator.NE, FilterOperator.GT, FilterOperator.GTE, FilterOperator.LT,
              FilterOperator.LTE):
        if not comparable or _kind(mt) == "none":
            test = _FALSE
        else:
            s = _scalar(v)
            test = {FilterOperator.EQ: m == s, FilterOperator.NE: m == s, FilterOperator.GT: m > s,
                    FilterOperator.GTE: m >= s, FilterOperator.LT: m < s, FilterOperator.LTE: m <= s}[op]
            test = _true(test)
        return ~test if op == FilterOperator.NE else test  # != holds for missing and other-typed values
    if op in (FilterOperator.IN, FilterOperator.NIN):
        values = [_scalar(x) for x in v if _value_kind(x) == _kind(mt)] if _kind(mt) != "none" else []
        test = _true(m.isin(values)) if values else _FALSE
        return ~test if op == FilterOperator.NIN else test
    if op == FilterOperator.CONTAINS:
        return _contains(schema, key, v)
    if op in (FilterOperator.ANY, FilterOperator.ALL):
        parts = [_contains(schema, key, x) for x in v]
        if not parts:
            return _FALSE if op == FilterOperator.ANY else ~missing
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if op == FilterOperator.ANY else (out & p)
        return out
    if op in (FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE):
        if not isinstance(v, str):
            raise TypeError(f"{op.value} filters need a string value, got {v!r}")
        if _kind(mt) != "str":
            return _FALSE
        return _true(pc.match_substring(m, v, ignore_case=op == FilterOperator.TEXT_MATCH_INSENSITIVE))
    if op == FilterOperator.IS_EMPTY:
        out = missing
        if _kind(mt) == "str":
            out = out | _true(m == "")
        if _kind(lt) == "str":
            out = out | _true(lst == SEP)
        return out
    raise ValueError(f"unsupported filter operator {op!r}")


def metadata_filter(filters: MetadataFilters, schema: pa.Schema | None) -> pc.Expression:
    """`MetadataFilters` (nested, under and / or / not) as an Arrow expression over the payload."""
    parts = [metadata_filter(f, schema) if isinstance(f, MetadataFilters) else _one(f, schema)
             for f in filters.filters]
    condition = filters.condition or FilterCondition.AND
    if not parts:
        return pc.scalar(True)
    out = parts[0]
    for p in parts[1:]:
        out = (out & p) if condition == FilterCondition.AND else (out | p)
    return ~out if condition == FilterCondition.NOT else out
