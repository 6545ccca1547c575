"""The LlamaIndex vector store: every method, every filter operator against LlamaIndex's own
evaluation of the same filters, persistence, and a VectorStoreIndex answering a retrieval query."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

pytest.importorskip("llama_index.core", reason="llama-index-core is not installed: pip install 'tqindex[llama-index]'")

from llama_index.core import StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode  # noqa: E402
from llama_index.core.vector_stores.types import (FilterCondition, FilterOperator, MetadataFilter,  # noqa: E402
                                                  MetadataFilters, VectorStoreQuery)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn  # noqa: E402

from tqindex.integrations.llama_index import TQIndexVectorStore  # noqa: E402

DIM = 32


def _vec(text: str) -> list[float]:
    """A bag-of-words embedding: texts sharing words point the same way."""
    v = np.zeros(DIM)
    for word in text.lower().split():
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        v += np.random.default_rng(seed).standard_normal(DIM)
    return (v / max(np.linalg.norm(v), 1e-9)).tolist()


class WordEmbedding(BaseEmbedding):
    def _get_text_embedding(self, text: str) -> list[float]:
        return _vec(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return _vec(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return _vec(query)


METADATA = [
    {"author": "ann", "year": 2001, "draft": True, "tags": ["a", "b"], "title": "Graph Search"},
    {"author": "bob", "year": 2010, "draft": False, "tags": ["b"], "title": "graph theory", "score": 0.5},
    {"author": "ann", "year": 2015, "tags": [], "title": ""},
    {"author": "cy", "year": 2020.5, "draft": False, "tags": ["c", "a"], "nums": [1, 2]},
    {"year": 1999, "tags": ["a"], "title": "Vectors", "nums": [2, 3]},
    {"author": "dee", "draft": True, "title": "search engines", "score": 2},
    {"author": "bob", "year": 2001, "nums": []},
    {},
]


def _nodes():
    nodes = []
    for i, meta in enumerate(METADATA):
        text = f"node {i} about {' '.join(str(v) for v in meta.values())}"
        node = TextNode(id_=f"n{i}", text=text, metadata=dict(meta), embedding=_vec(text))
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc{i % 3}")
        nodes.append(node)
    return nodes


@pytest.fixture()
def store():
    s = TQIndexVectorStore(bits=4)
    assert s.add(_nodes()) == [f"n{i}" for i in range(len(METADATA))]
    return s


FILTERS = [
    MetadataFilter(key="author", value="ann", operator=FilterOperator.EQ),
    MetadataFilter(key="author", value="ann", operator=FilterOperator.NE),
    MetadataFilter(key="year", value=2010, operator=FilterOperator.GT),
    MetadataFilter(key="year", value=2010, operator=FilterOperator.GTE),
    MetadataFilter(key="year", value=2010, operator=FilterOperator.LT),
    MetadataFilter(key="year", value=2001.0, operator=FilterOperator.LTE),
    MetadataFilter(key="author", value=["bob", "cy"], operator=FilterOperator.IN),
    MetadataFilter(key="author", value=["bob", "cy"], operator=FilterOperator.NIN),
    MetadataFilter(key="tags", value=["a", "c"], operator=FilterOperator.ANY),
    MetadataFilter(key="tags", value=["a", "b"], operator=FilterOperator.ALL),
    MetadataFilter(key="nums", value=[2], operator=FilterOperator.ALL),
    MetadataFilter(key="tags", value="a", operator=FilterOperator.CONTAINS),
    MetadataFilter(key="nums", value=3, operator=FilterOperator.CONTAINS),
    MetadataFilter(key="title", value="raph", operator=FilterOperator.CONTAINS),
    MetadataFilter(key="title", value="Graph", operator=FilterOperator.TEXT_MATCH),
    MetadataFilter(key="title", value="graph", operator=FilterOperator.TEXT_MATCH_INSENSITIVE),
    MetadataFilter(key="title", value=None, operator=FilterOperator.IS_EMPTY),
    MetadataFilter(key="tags", value=None, operator=FilterOperator.IS_EMPTY),
    MetadataFilter(key="nums", value=None, operator=FilterOperator.IS_EMPTY),
    MetadataFilter(key="score", value=0.5, operator=FilterOperator.EQ),
    MetadataFilter(key="score", value=1, operator=FilterOperator.GTE),
    MetadataFilter(key="missing", value=1, operator=FilterOperator.NE),
    MetadataFilter(key="missing", value=1, operator=FilterOperator.EQ),
]


def _reference(filters: MetadataFilters) -> set[str]:
    """LlamaIndex's own evaluation (SimpleVectorStore's filter function) of the same filters."""
    fn = build_metadata_filter_fn(lambda node_id: METADATA[int(node_id[1:])], filters)
    return {f"n{i}" for i in range(len(METADATA)) if fn(f"n{i}")}


def _ids(nodes) -> set[str]:
    return {n.node_id for n in nodes}


def test_every_operator_matches_llama_index_own_evaluation(store):
    assert {f.operator for f in FILTERS} == set(FilterOperator)   # every operator LlamaIndex defines
    for f in FILTERS:
        filters = MetadataFilters(filters=[f])
        expected = _reference(filters)
        assert _ids(store.get_nodes(filters=filters)) == expected, f
        result = store.query(VectorStoreQuery(query_embedding=_vec("graph"), similarity_top_k=20, filters=filters))
        assert set(result.ids) == expected, f


@pytest.mark.parametrize("condition", list(FilterCondition))
def test_conditions_combine_like_llama_index(store, condition):
    for a, b in itertools.combinations(FILTERS[::3], 2):
        filters = MetadataFilters(filters=[a, b], condition=condition)
        assert _ids(store.get_nodes(filters=filters)) == _reference(filters), (a, b, condition)


def test_nested_filters(store):
    inner = MetadataFilters(filters=FILTERS[6:8], condition=FilterCondition.OR)
    outer = MetadataFilters(filters=[inner, FILTERS[3]], condition=FilterCondition.AND)
    expected = _reference(inner) & _reference(MetadataFilters(filters=[FILTERS[3]]))
    assert _ids(store.get_nodes(filters=outer)) == expected


def test_query_ranks_and_restricts_by_ids(store):
    query = VectorStoreQuery(query_embedding=_vec(_nodes()[3].get_content()), similarity_top_k=3)
    result = store.query(query)
    assert result.ids[0] == "n3" and len(result.nodes) == 3
    assert result.similarities[0] == pytest.approx(max(result.similarities))
    assert result.nodes[0].metadata == METADATA[3] and result.nodes[0].get_content() == _nodes()[3].get_content()
    by_nodes = store.query(VectorStoreQuery(query_embedding=_vec("cy"), similarity_top_k=5, node_ids=["n1", "n4"]))
    assert set(by_nodes.ids) == {"n1", "n4"}
    by_docs = store.query(VectorStoreQuery(query_embedding=_vec("cy"), similarity_top_k=8, doc_ids=["doc1"]))
    assert set(by_docs.ids) == {"n1", "n4", "n7"}
    assert all(n.ref_doc_id == "doc1" for n in by_docs.nodes)
    unrestricted = store.query(VectorStoreQuery(query_embedding=_vec("cy"), similarity_top_k=8, node_ids=[]))
    assert len(unrestricted.ids) == 8


def test_deletes_and_clear(store):
    store.delete("doc0")                                    # by ref_doc_id
    assert _ids(store.get_nodes()) == {"n1", "n2", "n4", "n5", "n7"}
    store.delete_nodes(node_ids=["n1", "n2"], filters=MetadataFilters(filters=[FILTERS[0]]))  # both must hold
    assert _ids(store.get_nodes()) == {"n1", "n4", "n5", "n7"}
    store.delete_nodes(node_ids=["n5"])
    assert _ids(store.get_nodes(node_ids=["n4", "n5", "n9"])) == {"n4"}
    store.clear()
    assert store.get_nodes() == [] and store.query(VectorStoreQuery(query_embedding=_vec("x"))).ids == []
    store.add(_nodes()[:2])
    assert _ids(store.get_nodes()) == {"n0", "n1"}


def test_persist_and_load(store, tmp_path):
    store.delete("doc2")
    store.persist(str(tmp_path / "s"))
    loaded = TQIndexVectorStore.load(tmp_path / "s")
    assert _ids(loaded.get_nodes()) == {"n0", "n1", "n3", "n4", "n6", "n7"}
    filters = MetadataFilters(filters=[FILTERS[2]])
    assert _ids(loaded.get_nodes(filters=filters)) == _reference(filters) - {"n2", "n5"}
    node = loaded.get_nodes(node_ids=["n3"])[0]
    assert node.metadata == METADATA[3] and node.ref_doc_id == "doc0"


def test_vector_store_index_answers_a_retrieval_query():
    texts = ["the cat sat on the mat", "quantum computers use qubits", "vector search finds nearest neighbours",
             "bread is baked in an oven", "rivers flow into the sea"]
    nodes = [TextNode(id_=f"t{i}", text=t) for i, t in enumerate(texts)]
    store = TQIndexVectorStore(bits=4)
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=WordEmbedding())
    retrieved = index.as_retriever(similarity_top_k=2).retrieve("nearest neighbours vector search")
    assert retrieved[0].node.node_id == "t2" and retrieved[0].node.get_content() == texts[2]
    assert len(store.client) == 5
