"""The LangChain vector store: the standard langchain-tests suite, filters, persistence."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core", reason="langchain-core is not installed: pip install 'tqindex[langchain]'")
pytest.importorskip("langchain_tests", reason="langchain-tests is not installed: pip install 'tqindex[test]'")

import pyarrow.compute as pc  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: E402
from langchain_tests.integration_tests import VectorStoreIntegrationTests  # noqa: E402

from tqindex.integrations.langchain import TQIndexVectorStore  # noqa: E402


class TestTQIndexVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self):
        return TQIndexVectorStore(embedding=self.get_embeddings())


def _store(**kwargs):
    return TQIndexVectorStore(embedding=DeterministicFakeEmbedding(size=32), **kwargs)


def _docs():
    return [Document(page_content=f"text {i}", metadata={"year": 2000 + i, "kind": "ab"[i % 2], "tags": [i]})
            for i in range(40)]


def test_metadata_filters_as_dicts_and_expressions():
    store = _store()
    store.add_documents(_docs(), ids=[f"d{i}" for i in range(40)])
    hits = store.similarity_search("text 3", k=40, filter={"year": {"$gte": 2030}, "kind": "b"})
    assert sorted(d.id for d in hits) == [f"d{i}" for i in range(31, 40, 2)]
    hits = store.similarity_search("x", k=40, filter={"$or": [{"year": 2001}, {"year": {"$in": [2005, 2006]}}]})
    assert sorted(d.metadata["year"] for d in hits) == [2001, 2005, 2006]
    hits = store.similarity_search("x", k=40, filter={"$not": {"kind": "a"}})
    assert len(hits) == 20 and all(d.metadata["kind"] == "b" for d in hits)
    assert store.similarity_search("x", k=5, filter={"missing_key": 1}) == []
    hits = store.similarity_search("x", k=40, filter=pc.field("m.year") < 2003)
    assert sorted(d.id for d in hits) == ["d0", "d1", "d2"]
    assert hits[0].metadata["tags"] == [int(hits[0].id[1:])]        # metadata comes back exactly
    with pytest.raises(ValueError, match="unknown filter operator"):
        store.similarity_search("x", k=3, filter={"year": {"$like": 3}})


def test_scores_relevance_and_from_texts():
    store = TQIndexVectorStore.from_texts(["alpha", "beta", "gamma"], DeterministicFakeEmbedding(size=16),
                                          metadatas=[{"n": 1}, {"n": 2}, {"n": 3}], ids=["a", "b", "c"])
    (doc, score), *_ = store.similarity_search_with_score("beta", k=3)
    assert doc.id == "b" and score == pytest.approx(1.0, abs=1e-5)          # cosine similarity to itself
    rel = store.similarity_search_with_relevance_scores("beta", k=3)
    assert rel[0][1] == pytest.approx(1.0, abs=1e-5) and all(0.0 <= r <= 1.0 for _, r in rel)
    l2 = TQIndexVectorStore.from_texts(["alpha", "beta"], DeterministicFakeEmbedding(size=16), metric="l2")
    (doc, dist), _ = l2.similarity_search_with_score("alpha", k=2)
    assert doc.page_content == "alpha" and dist == pytest.approx(0.0, abs=1e-3)


def test_save_and_load_keep_documents_ids_and_deletes(tmp_path):
    store = _store()
    store.add_documents(_docs(), ids=[f"d{i}" for i in range(40)])
    store.delete(["d3", "d4"])
    store.add_documents([Document(page_content="new 5", metadata={"year": 1})], ids=["d5"])
    store.save(tmp_path / "s")
    loaded = TQIndexVectorStore.load(tmp_path / "s", embedding=DeterministicFakeEmbedding(size=32))
    assert loaded.get_by_ids(["d3", "d5", "d6"]) == [
        Document(id="d5", page_content="new 5", metadata={"year": 1}),
        Document(id="d6", page_content="text 6", metadata={"year": 2006, "kind": "a", "tags": [6]})]
    assert len(loaded.index) == 38
    loaded.add_texts(["more"], ids=["d7"])                              # replaces d7 after the load too
    assert len(loaded.index) == 38 and loaded.get_by_ids(["d7"])[0].page_content == "more"


def test_delete_without_ids_empties_the_store():
    store = _store()
    store.add_documents(_docs()[:5])
    assert store.delete() is True
    assert store.similarity_search("text 1", k=3) == [] and len(store.index) == 0


def test_conflicting_metadata_types_are_refused_by_name():
    store = _store()
    store.add_texts(["a"], metadatas=[{"year": 2001}])
    with pytest.raises(ValueError, match="m.year"):
        store.add_texts(["b"], metadatas=[{"year": "2002"}])
    assert len(store.index) == 1
