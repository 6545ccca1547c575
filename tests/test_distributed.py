"""Sharded build and search on a local Ray (tqindex.distributed): the same answers as one Index."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'tqindex[ray]'")

import tqindex.distributed as td  # noqa: E402
from tqindex import Index  # noqa: E402

from conftest import clustered  # noqa: E402

DIM = 24


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x, q = clustered(rng, n, DIM, clusters=40, queries=15)
    return x, q


def _single(x, metric="ip", **params):
    index = Index(dim=DIM, bits=3, metric=metric, seed=5, **params)
    index.add(x)
    return index


def _same(a, b):
    """The same answer: equal scores everywhere, and equal ids wherever scores are not tied."""
    np.testing.assert_array_equal(a.scores, b.scores)
    for row in range(len(a.ids)):
        for s in np.unique(a.scores[row]):
            assert set(a.ids[row][a.scores[row] == s]) == set(b.ids[row][b.scores[row] == s]) or \
                s == a.scores[row][-1], row  # the k-th score's ties may be cut differently


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_build_from_numpy_gives_the_single_index(local_ray, tmp_path, metric):
    x, q = _data()
    td.build(x, tmp_path / "ix", dim=DIM, bits=3, metric=metric, seed=5, block_rows=700)
    loaded = Index.load(tmp_path / "ix")
    single = _single(x, metric)
    assert len(loaded) == len(x) and len(loaded._segments) == 5          # one shard per task
    _same(loaded.search(q, 10), single.search(q, 10))


def test_build_from_a_ray_dataset(local_ray, tmp_path):
    x, q = _data(seed=1)
    ids = np.arange(len(x)) * 3 + 7
    ds = ray.data.from_items([{"vector": v, "id": int(i)} for v, i in zip(x, ids)])
    td.build(ds, tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=1000)
    loaded = Index.load(tmp_path / "ix")
    single = Index(dim=DIM, bits=3, seed=5)
    single.add(x, ids=ids)
    assert loaded.next_id == ids.max() + 1
    _same(loaded.search(q, 10), single.search(q, 10))


def test_a_build_with_repeated_ids_commits_nothing(local_ray, tmp_path):
    x, _ = _data(n=400, seed=6)
    ds = ray.data.from_items([{"vector": v, "id": int(i % 300)} for i, v in enumerate(x)])   # ids 0..99 twice
    with pytest.raises(td.storage.IndexFormatError, match="more than once"):
        td.build(ds, tmp_path / "ix", dim=DIM, bits=3, block_rows=300)
    assert not (tmp_path / "ix" / "MANIFEST.json").exists()
    td.build(x, tmp_path / "ix", dim=DIM, bits=3, block_rows=300)       # the directory can still take a build
    assert len(Index.load(tmp_path / "ix")) == 400


@pytest.mark.parametrize("actors", [1, 2, 3])
def test_search_over_actors_equals_one_index(local_ray, tmp_path, actors):
    x, q = _data(seed=2)
    td.build(x, tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=800, keep_vectors=True)
    single = _single(x, keep_vectors=True)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=actors)
    try:
        assert len(index) == len(x)
        _same(index.search(q, 10), single.search(q, 10))
        _same(index.search(q, 7, rerank=3), single.search(q, 7, rerank=3))
        allowed = np.arange(0, len(x), 5)
        _same(index.search(q, 10, filter=allowed), single.search(q, 10, filter=allowed))
        one = index.search(q[0], 4)
        assert one.ids.shape == (4,) and one.ids[0] == single.search(q[0], 4).ids[0]
        with pytest.raises(ValueError, match="NaN"):
            index.search(np.full(DIM, np.nan, np.float32), 3)
    finally:
        index.close()


def test_restarts_are_waited_for_and_lost_shares_named(local_ray, tmp_path):
    x, q = _data(seed=3)
    td.build(x, tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=1000)
    single = _single(x)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=2, max_restarts=1)
    try:
        index._actors[1].crash.remote()                 # the process exits; Ray restarts it
        _same(index.search(q, 10), single.search(q, 10))  # the restarted share reloaded from disk
        assert index.answered == [0, 1]
        ray.kill(index._actors[1], no_restart=True)     # now gone for good
        with pytest.raises(RuntimeError, match=r"shares \[1\]"):
            index.search(q, 5)
        partial = index.search(q, 5, allow_partial=True)
        assert index.answered == [0] and (partial.ids >= 0).all()
        own = td.storage.load(Index, tmp_path / "ix", part=(0, 2))   # what share 0 holds
        _same(partial, own.search(q, 5))
    finally:
        index.close()


def test_refresh_sees_a_later_commit(local_ray, tmp_path):
    x, q = _data(seed=5)
    td.build(x[:2000], tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=1000)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=1)
    try:
        writer = Index.load(tmp_path / "ix")
        writer.add(x[2000:], ids=np.arange(2000, len(x)))
        writer.remove([0, 1, 2])
        writer.save()
        writer.close()
        assert len(index) == 2000
        index.refresh()
        assert len(index) == len(x) - 3
        _same(index.search(q, 10), Index.load(tmp_path / "ix").search(q, 10))
    finally:
        index.close()
