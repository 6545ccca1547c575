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
def local_ray(monkeypatch_module):
    # Ray starts its workers at niceness 15: on a busy machine they then get a sliver of a core, and an
    # actor's restart (a process importing torch) took minutes. The tests' workers run at the
    # driver's priority instead (the raylet reads this variable when ray.init starts it).
    monkeypatch_module.setenv("RAY_worker_niceness", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


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


def _wait_until_dead(actor) -> None:
    """Return once Ray reports the actor dead. `ray.kill` only sends the request, so a call made
    right after it may still be answered; the wait ends on Ray's own answer, not on a clock."""
    while True:
        try:
            ray.get(actor.state.remote())
        except ray.exceptions.RayActorError:
            return


def test_restarts_are_waited_for_and_lost_shares_named(local_ray, tmp_path):
    x, q = _data(seed=3)
    td.build(x, tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=1000)
    single = _single(x)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=2, max_restarts=1)
    try:
        index._actors[1].crash.remote()                 # the process exits; Ray restarts it
        _same(index.search(q, 10), single.search(q, 10))  # the restarted share reloaded from disk
        assert index.answered == [0, 1]
        ray.kill(index._actors[1], no_restart=True)     # now gone for good ...
        _wait_until_dead(index._actors[1])              # ... once Ray says so: the kill is only a request
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


def test_an_actor_killed_mid_search_is_restarted_and_the_search_is_exact(local_ray, tmp_path):
    x, q = _data(seed=7)
    td.build(x, tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=1000)
    single = _single(x)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=2, max_restarts=2)
    try:
        first = index._tokens[1]
        ray.get(index._actors[1].crash_in_next_search.remote())
        _same(index.search(q, 10), single.search(q, 10))      # share 1 died inside this search
        assert index._tokens[1] != first                        # ... was restarted, reloaded from disk
        _same(index.search(q, 10), single.search(q, 10))      # and the next search is exact too
    finally:
        index.close()


def test_writes_through_the_actors_then_index_load_sees_the_same_rows(local_ray, tmp_path):
    x, q = _data(n=4000, seed=8)
    td.build(x[:3000], tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=1000, keep_vectors=True)
    single = _single(x[:3000], keep_vectors=True)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=3)
    try:
        before = index._rows()
        new = index.add(x[3000:3900])                          # automatic ids continue after the build's
        np.testing.assert_array_equal(new, single.add(x[3000:3900]))
        after = index._rows()
        assert sum(after) == 3900 and max(after) - min(after) <= 1 and after != before   # spread evenly
        given = np.array([10_000, 10_005, 10_009])
        index.add(x[3900:3903], ids=given)
        single.add(x[3900:3903], ids=given)
        with pytest.raises(ValueError, match="already in the index"):
            index.add(x[:2], ids=[5, 10_005])
        with pytest.raises(KeyError, match="77777"):
            index.remove([1, 77777])                            # refused whole: row 1 stays
        gone = np.r_[np.arange(0, 3900, 7), 10_005]
        assert index.remove(gone) == len(gone)
        single.remove(gone)
        index.add(x[3903:3905], ids=[1, 10_009], upsert=True)  # replaces rows on whichever share holds them
        single.add(x[3903:3905], ids=[1, 10_009], upsert=True)
        assert len(index) == len(single) and index.next_id == single.next_id
        _same(index.search(q, 10), single.search(q, 10))       # searches see unsaved writes
        _same(index.search(q, 5, rerank=4), single.search(q, 5, rerank=4))
        assert len(Index.load(tmp_path / "ix")) == 3000        # nothing committed yet
        index.save()
        loaded = Index.load(tmp_path / "ix")
        np.testing.assert_array_equal(loaded.select(), single.select())
        _same(loaded.search(q, 10), single.search(q, 10))
        _same(index.search(q, 10), single.search(q, 10))       # the shares reloaded the commit
        index.remove([2])                                       # a second commit, incremental
        single.remove([2])
        index.save()
        np.testing.assert_array_equal(Index.load(tmp_path / "ix").select(), single.select())
        names = {p.name for p in (tmp_path / "ix" / "shards").iterdir()}
        body = td.storage._read_manifest(tmp_path / "ix")
        named = {e[part]["name"] for e in body["shards"] for part in ("rows", "codes", "vectors", "deleted")
                 if e.get(part)}
        assert names == named                                   # superseded files collected
    finally:
        index.close()


def test_metadata_filters_and_columns_through_the_actors(local_ray, tmp_path):
    pc = pytest.importorskip("pyarrow.compute")
    x, q = _data(n=2000, seed=9)
    td.build(x[:1000], tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=500)
    single = _single(x[:1000])
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=2)
    try:
        meta = {"year": list(range(1000, 2000)), "title": [f"t{i}" for i in range(1000)]}
        index.add(x[1000:], metadata=meta)
        single.add(x[1000:], metadata=meta)
        assert index.schema == single.schema
        with pytest.raises(ValueError, match="'year'"):
            index.add(x[:1], metadata={"year": ["not a number"]})
        where = pc.field("year") >= 1500
        a = index.search(q, 10, filter=where, columns=["title", "year"])
        b = single.search(q, 10, filter=where, columns=["title", "year"])
        _same(a, b)
        assert a.payload.column("title").to_pylist() == \
            [f"t{i - 1000}" for i in a.ids.reshape(-1)]                 # each row's own metadata
        with pytest.raises(KeyError, match="nope"):
            index.search(q, 3, columns=["nope"])
        got = index.get([1999, 1000, 5], columns=["title"])
        assert got.column("id").to_pylist() == [1999, 1000, 5]
        assert got.column("title").to_pylist() == ["t999", "t0", None]
        index.save()
        assert Index.load(tmp_path / "ix").get([1500]).column("year").to_pylist() == [1500]
    finally:
        index.close()


def test_a_restart_that_loses_unsaved_writes_is_reported_not_hidden(local_ray, tmp_path):
    x, q = _data(n=2000, seed=10)
    td.build(x[:1000], tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=500)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=2, max_restarts=2)
    try:
        index.add(x[1000:1010])                             # five new rows on each share
        index._actors[0].crash.remote()
        with pytest.raises(RuntimeError, match=r"share 0 .* restarted and lost the writes"):
            index.search(q, 5)
        with pytest.raises(RuntimeError, match="refresh"):
            index.save()
        assert len(Index.load(tmp_path / "ix")) == 1000     # nothing half-committed
        index.refresh()                                      # back to the last commit
        assert len(index) == 1000
        _same(index.search(q, 10), _single(x[:1000]).search(q, 10))
    finally:
        index.close()


def test_a_save_after_another_writer_committed_is_refused(local_ray, tmp_path):
    x, _ = _data(n=1500, seed=11)
    td.build(x[:1000], tmp_path / "ix", dim=DIM, bits=3, seed=5, block_rows=500)
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=2)
    try:
        index.add(x[1000:1100])
        other = Index.load(tmp_path / "ix")
        other.remove([0])
        other.save()
        other.close()
        with pytest.raises(RuntimeError, match="changed by another writer"):
            index.save()
        assert len(Index.load(tmp_path / "ix")) == 999
        index.refresh()
        index.add(x[1100:1200])
        index.save()
        assert len(Index.load(tmp_path / "ix")) == 1099
    finally:
        index.close()


@pytest.mark.parametrize("rows, n, want", [
    ([0, 0, 0], 7, [3, 2, 2]),
    ([10, 0, 4], 6, [0, 5, 1]),
    ([10, 0, 4], 20, [2, 11, 7]),
    ([5], 3, [3]),
    ([3, 3], 0, [0, 0]),
])
def test_new_rows_level_the_shares(rows, n, want):
    assert td._share_out(rows, n) == want


def test_a_partitioned_index_over_actors_equals_one_index(local_ray, tmp_path):
    x, q = _data(n=3000, seed=12)
    with pytest.raises(ValueError, match="partitioned"):
        td.build(x, tmp_path / "no", dim=DIM, partitions=8)
    Index(dim=DIM, bits=3, partitions=8).save(tmp_path / "untrained")
    untrained = td.DistributedIndex.open(tmp_path / "untrained", num_actors=2)
    try:
        with pytest.raises(ValueError, match="no centroids yet"):
            untrained.add(x)
    finally:
        untrained.close()
    single = Index(dim=DIM, bits=3, seed=5, partitions=8)
    single.add(x)
    single.save(tmp_path / "ix")
    single.close()
    index = td.DistributedIndex.open(tmp_path / "ix", num_actors=3)
    try:
        for nprobe in (2, 8):
            _same(index.search(q, 10, nprobe=nprobe), single.search(q, 10, nprobe=nprobe))
        index.add(x[:50] * 0.5)
        index.save()
        loaded = Index.load(tmp_path / "ix")
        np.testing.assert_array_equal(loaded.centroids, single.centroids)
        assert len(loaded) == 3050
        _same(index.search(q, 10, nprobe=3), loaded.search(q, 10, nprobe=3))
    finally:
        index.close()
