"""A LangChain vector store on a tqindex `Index` (``pip install 'tqindex[langchain]'``).

    from tqindex.integrations.langchain import TQIndexVectorStore
    store = TQIndexVectorStore(embedding=embeddings, bits=4)
    store.add_texts(["a text", "another"], metadatas=[{"year": 2021}, {"year": 2024}])
    store.similarity_search("query", k=4, filter={"year": {"$gte": 2022}})
    store.save("my-store"); store = TQIndexVectorStore.load("my-store", embedding=embeddings)

Documents keep their text, metadata (exactly, as JSON) and string ids in the index's payload columns,
in the same commit as the vectors. Filters are dicts (``{"key": value}``, ``{"key": {"$gte": v}}``,
$eq/$ne/$gt/$gte/$lt/$lte/$in/$nin, $and/$or/$not) on top-level string, number and bool metadata,
or a pyarrow compute Expression over the ``m.<key>`` columns; they run inside the scan. Searches
rerank with the kept full-precision vectors (``keep_vectors=True``, ``rerank=10`` by default), so
small collections rank exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow.compute as pc

try:
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("tqindex.integrations.langchain needs langchain-core: pip install 'tqindex[langchain]'") from exc

from ..index import Index
from .documents import DocumentIndex, dict_filter

__all__ = ["TQIndexVectorStore"]


class TQIndexVectorStore(VectorStore):
    """LangChain `VectorStore` backed by a tqindex `Index`.

    Parameters
    ----------
    embedding : Embeddings
    index : Index, optional
        An existing index of documents (as `load` opens); otherwise one is created at the first add.
    rerank : int
        Candidates per result rescored with the kept vectors (0: quantized scores only).
    **params
        `Index` parameters for a new index: bits (default 4), metric (default "cosine"), seed, ...;
        keep_vectors defaults to True.
    """

    def __init__(self, embedding: Embeddings, *, index: Index | None = None, rerank: int = 10, **params: Any):
        params = {"bits": 4, "metric": "cosine", "keep_vectors": True, **params}
        self._embedding = embedding
        self._docs = DocumentIndex(index, **params)
        self._rerank = rerank

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    @property
    def index(self) -> Index | None:
        """The underlying tqindex `Index` (None before the first add)."""
        return self._docs.index

    # -- writes ----------------------------------------------------------------------------------
    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *, ids: list[str] | None = None,
                  **kwargs: Any) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        vectors = np.asarray(self._embedding.embed_documents(texts), dtype=np.float32)
        return self._docs.add(vectors, texts, metadatas, ids)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete documents by id (unknown ids are ignored); every document when ids is None."""
        self._docs.delete(list(self._docs.ids()) if ids is None else ids)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [Document(id=d["id"], page_content=d["text"], metadata=d["metadata"]) for d in self._docs.get(ids)]

    # -- search ----------------------------------------------------------------------------------
    def _where(self, filter):
        if filter is None or isinstance(filter, pc.Expression):
            return filter
        if isinstance(filter, dict):
            return dict_filter(filter, None if self.index is None else self.index.schema)
        raise TypeError(f"filter must be a metadata dict or a pyarrow compute Expression, got {type(filter).__name__}")

    def _search(self, vector, k: int, filter=None) -> list[tuple[Document, float, float]]:
        hits = self._docs.search(vector, k, where=self._where(filter), rerank=self._rerank)
        return [(Document(id=d["id"], page_content=d["text"], metadata=d["metadata"]), score, dist)
                for d, score, dist in hits]

    def similarity_search(self, query: str, k: int = 4, filter=None, **kwargs: Any) -> list[Document]:
        return self.similarity_search_by_vector(self._embedding.embed_query(query), k, filter=filter)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, filter=None,
                                    **kwargs: Any) -> list[Document]:
        return [doc for doc, _, _ in self._search(embedding, k, filter)]

    def similarity_search_with_score(self, query: str, k: int = 4, filter=None,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """(document, score) pairs, best first: the similarity for "cosine" and "ip", the Euclidean
        distance for "l2"."""
        hits = self._search(self._embedding.embed_query(query), k, filter)
        if self.index is not None and self.index.metric == "l2":
            return [(doc, float(np.sqrt(max(dist, 0.0)))) for doc, _, dist in hits]
        return [(doc, score) for doc, score, _ in hits]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        metric = self.index.metric if self.index is not None else self._docs.params.get("metric", "cosine")
        if metric == "l2":
            return self._euclidean_relevance_score_fn
        if metric == "cosine":
            return lambda similarity: (1.0 + similarity) / 2.0
        return lambda similarity: similarity  # inner products of unnormalised vectors have no fixed range

    # -- construction and persistence ------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None, *,
                   ids: list[str] | None = None, **kwargs: Any) -> "TQIndexVectorStore":
        store = cls(embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def save(self, path) -> None:
        """Commit the store to directory `path` (vectors, texts, metadata and ids, atomically)."""
        self._docs.save(path)

    @classmethod
    def load(cls, path, embedding: Embeddings, *, rerank: int = 10, mmap: bool = True) -> "TQIndexVectorStore":
        """Open a store saved with `save`."""
        return cls(embedding, index=Index.load(path, mmap=mmap), rerank=rerank)
