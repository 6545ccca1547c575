"""Partitioned (IVF) mode: residual codes per list, nprobe, and everything the flat index does."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from tqindex import Index, IndexFormatError
from tqindex.storage import MANIFEST

from conftest import assert_topk_matches, clustered, exact_topk, recall_at

DIM = 32
NLIST = 16


def _data(n=4000, seed=0, queries=40):
    rng = np.random.default_rng(seed)
    return clustered(rng, n, DIM, clusters=30, queries=queries)


def _reference(index: Index, x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """Every row's score as the residual codes define it: c + the residual's estimate (what
    `reconstruct` returns), with ‖x‖ itself for "l2"; (nq, n) over ids 0..n−1."""
    xt = index.reconstruct(np.arange(len(x))).astype(np.float64)
    qd = q.astype(np.float64)
    if metric == "cosine":
        qd = qd / np.linalg.norm(qd, axis=1, keepdims=True)
    if metric == "l2":
        xn = np.square(np.linalg.norm(x.astype(np.float64), axis=1))
        return -(np.square(qd).sum(1)[:, None] + xn[None, :] - 2 * qd @ xt.T)   # higher is better
    return qd @ xt.T


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("bits", [2, 4])
def test_probing_every_list_is_the_flat_scan_of_the_residual_codes(metric, bits):
    x, q = _data()
    if metric == "l2":
        x = x * np.random.default_rng(1).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    index = Index(dim=DIM, bits=bits, metric=metric, partitions=NLIST)
    index.add(x)
    assert index.trained and index.centroids.shape == (NLIST, DIM)
    ref = _reference(index, x, q, metric)
    result = index.search(q, 10, nprobe=NLIST)
    scores = -result.scores if metric == "l2" else result.scores
    assert_topk_matches(result.ids, scores, ref, rtol=1e-4)
    # The torch scan of the same lists agrees with the fast scan (tie-aware, through the same merge).
    view = index._view
    torch_scores, positions = index._scan(view, torch.from_numpy(q), 10, index._backend("torch"), NLIST)
    ids = view.ids.ids_at(positions.numpy())
    assert_topk_matches(ids, torch_scores.numpy(), ref, rtol=1e-4)


def test_recall_rises_with_nprobe_and_the_work_with_the_lists_probed():
    x, q = _data(n=6000, seed=2, queries=60)
    index = Index(dim=DIM, bits=4, partitions=NLIST)
    index.add(x)
    truth = exact_topk(q, x, 10)
    scanned = []
    scanner = index._scanner()
    real = scanner.topk_lists

    def counting(request, queries, k):   # rows in the lists each query scans
        size = {lst: sum(len(request.segments[i]) for i in where) for lst, where in request.members.items()}
        scanned.append(sum(size.get(int(lst), 0) for lst in request.lists.reshape(-1)))
        return real(request, queries, k)

    scanner.topk_lists = counting
    recalls, work = [], []
    for nprobe in (1, 2, 4, 8, 16):
        scanned.clear()
        # torch queries take the general path, whose list scan `counting` watches
        recalls.append(recall_at(index.search(torch.from_numpy(q), 10, nprobe=nprobe).ids.numpy(), truth))
        work.append(sum(scanned) / len(q))
    assert all(a <= b for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[0] < recalls[-1]
    assert all(a < b for a, b in zip(work, work[1:])), work
    assert work[-1] == len(x)                                   # every list: every row, once
    assert work[0] < 3 * len(x) / NLIST                          # one list: about n / nlist rows


def test_training_explicit_automatic_and_refused():
    x, q = _data(n=3000, seed=3)
    with pytest.raises(ValueError, match="not trained: call train"):
        Index(dim=DIM, partitions=NLIST).add(x[:100])
    with pytest.raises(ValueError, match="flat index needs no training"):
        Index(dim=DIM).train(x)
    with pytest.raises(ValueError, match="at least 64 vectors"):
        Index(dim=DIM, partitions=NLIST).train(x[:10])
    with pytest.raises(ValueError, match="partitions"):
        Index(dim=DIM, partitions=-1)
    with pytest.raises(ValueError, match="center or partitions"):
        Index(dim=DIM, partitions=4, center=np.zeros(DIM))

    auto = Index(dim=DIM, partitions=NLIST, seed=4)
    auto.add(x[:39 * NLIST])                                     # the first add trains
    explicit = Index(dim=DIM, partitions=NLIST, seed=4)
    explicit.train(x[:39 * NLIST])
    np.testing.assert_array_equal(auto.centroids, explicit.centroids)   # seeded: the same fit
    before = auto.centroids
    auto.add(x[39 * NLIST:])                                     # later adds are assigned, not refitted
    np.testing.assert_array_equal(auto.centroids, before)
    with pytest.raises(ValueError, match="refit=True"):
        auto.train(x)
    with pytest.raises(ValueError, match="keep_vectors"):
        auto.train(x, refit=True)
    np.testing.assert_array_equal(auto.centroids, before)        # refused: nothing changed

    kept = Index(dim=DIM, partitions=NLIST, keep_vectors=True, seed=4)
    kept.train(x[:1000])
    kept.add(x, metadata={"n": np.arange(len(x))})
    kept.remove([0, 1, 2])
    kept.train(x[1000:], refit=True)                              # every row re-encoded
    fresh = Index(dim=DIM, partitions=NLIST, keep_vectors=True, seed=4)
    fresh.train(x[1000:])
    fresh.add(x[3:], ids=np.arange(3, len(x)))
    np.testing.assert_array_equal(kept.centroids, fresh.centroids)
    assert len(kept) == len(x) - 3
    a, b = kept.search(q, 10, nprobe=NLIST), fresh.search(q, 10, nprobe=NLIST)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert kept.get([5]).column("n").to_pylist() == [5]


def test_removes_rerank_filters_and_upserts_work_as_in_the_flat_index():
    x, q = _data(n=3000, seed=5)
    index = Index(dim=DIM, bits=4, partitions=NLIST, keep_vectors=True)
    index.add(x, metadata={"year": np.arange(len(x)) % 50})
    gone = np.arange(0, len(x), 4)
    ref = _reference(index, x, q, "ip")
    index.remove(gone)
    ref[:, gone] = -np.inf
    r = index.search(q, 10, nprobe=NLIST)
    assert_topk_matches(r.ids, r.scores, ref)
    assert not np.isin(r.ids, gone).any()
    # Rerank: exact scores of the quantized top k·rerank.
    rr = index.search(q, 5, nprobe=NLIST, rerank=4)
    np.testing.assert_allclose(rr.scores, np.take_along_axis(q @ x.T, rr.ids, axis=1), rtol=1e-5)
    # Filters: the top k of the allowed rows, inside the probed lists.
    allowed = np.setdiff1d(np.arange(0, len(x), 7), gone)
    f = index.search(q, 10, nprobe=NLIST, filter=allowed)
    ref_f = np.full_like(ref, -np.inf)
    ref_f[:, allowed] = ref[:, allowed]
    assert_topk_matches(f.ids, f.scores, ref_f)
    e = index.search(q, 10, nprobe=NLIST, filter=pc.field("year") < 3, columns=["year"])
    assert (np.asarray(e.payload.column("year").to_pylist()) < 3).all()
    assert set(e.ids.reshape(-1)) <= set(index.select(pc.field("year") < 3))
    # An upsert moves the row to the list of its new vector.
    index.add(-x[1:2], ids=[1], upsert=True)
    np.testing.assert_allclose(index.search(-x[1], 1, nprobe=NLIST).ids, [1])
    index.compact()
    assert len(index._segments) <= NLIST and all(s.partition is not None for s in index._segments)
    assert len(index) == len(x) - len(gone)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip_keeps_lists_and_the_fit(tmp_path, mmap):
    x, q = _data(n=3000, seed=6)
    index = Index(dim=DIM, bits=3, metric="l2", partitions=NLIST, seed=9)
    index.add(x[:2000])
    index.save(tmp_path / "ix")
    index.add(x[2000:])
    index.remove([5, 6])
    index.save()                                             # incremental: the centroids are not rewritten
    body = json.loads((tmp_path / "ix" / MANIFEST).read_text())["body"]
    assert body["params"]["partitions"] == NLIST and body["coarse"]["fit"]["seed"] == 9
    assert {e["partition"] for e in body["shards"]} <= set(range(NLIST))
    assert len([p for p in (tmp_path / "ix" / "shards").iterdir() if p.name.startswith("centroids-")]) == 1
    loaded = Index.load(tmp_path / "ix", mmap=mmap)
    np.testing.assert_array_equal(loaded.centroids, index.centroids)
    for nprobe in (2, NLIST):
        a, b = loaded.search(q, 10, nprobe=nprobe), index.search(q, 10, nprobe=nprobe)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
    loaded.add(x[:5] * 2)                                    # adds after a load go to the loaded lists
    assert len(loaded) == len(x) - 2 + 5


def test_a_damaged_partition_manifest_is_refused(tmp_path):
    x, _ = _data(n=1000, seed=7)
    index = Index(dim=DIM, partitions=8)
    index.add(x)
    index.save(tmp_path / "ix")
    path = tmp_path / "ix" / MANIFEST

    def damaged(change):
        doc = json.loads(path.read_text())
        change(doc["body"])
        from tqindex.storage import _canonical
        import zlib
        doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
        (tmp_path / "bad").mkdir(exist_ok=True)
        import shutil
        shutil.rmtree(tmp_path / "bad")
        shutil.copytree(tmp_path / "ix", tmp_path / "bad")
        (tmp_path / "bad" / MANIFEST).write_text(json.dumps(doc))
        return tmp_path / "bad"

    with pytest.raises(IndexFormatError, match="partition"):
        Index.load(damaged(lambda b: b["shards"][0].update(partition=8)))
    with pytest.raises(IndexFormatError, match="coarse"):
        Index.load(damaged(lambda b: b.update(coarse=None)))
    with pytest.raises(IndexFormatError, match="centroids.rows"):
        Index.load(damaged(lambda b: b["coarse"]["centroids"].update(rows=7)))
    with pytest.raises(IndexFormatError, match="partition"):
        Index.load(damaged(lambda b: b["params"].update(partitions=0)))
    centroids = next(p for p in (tmp_path / "ix" / "shards").iterdir() if p.name.startswith("centroids-"))
    data = bytearray(centroids.read_bytes())
    data[len(data) // 2] ^= 0xFF
    centroids.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="checksum"):
        Index.load(tmp_path / "ix")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_a_single_query_probes_the_lists_a_batch_gives_it(metric):
    from tqindex.partition import fit_kmeans
    x, q = _data(queries=12)
    coarse = fit_kmeans(torch.from_numpy(x), NLIST, seed=3)
    q[5] = q[4]  # equal rows: the same lists, ties broken the same way
    for nprobe in (1, 3, NLIST - 1, NLIST):
        lists, offsets = coarse.probe(torch.from_numpy(q), metric, nprobe)
        for i in range(len(q)):
            one, one_offsets = coarse.probe(torch.from_numpy(q[i:i + 1]), metric, nprobe)
            np.testing.assert_array_equal(one.numpy(), lists[i:i + 1].numpy())
            # One row or many: BLAS may round the centroid products differently in the last bit.
            np.testing.assert_allclose(one_offsets.numpy(), offsets[i:i + 1].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("bits", [2, 4])
def test_a_batch_answers_each_query_as_alone(metric, bits):
    # A batch probing one list a query is scanned in order of the lists (each list's queries one run)
    # and put back in the callers' order; with more lists, in the callers' order. Each query's ids and
    # scores must be those it gets alone (a torch query: the general path, one query).
    x, q = _data(queries=60)
    index = Index(dim=DIM, bits=bits, metric=metric, partitions=NLIST, seed=2)
    index.add(x)
    for nprobe in (1, 3):
        batch = index.search(torch.from_numpy(q), 7, nprobe=nprobe)
        lists, _ = index._coarse.probe(torch.from_numpy(q), metric, nprobe)
        assert (np.diff(lists[:, 0].numpy()) < 0).any()  # the queries are not in order of their lists
        for i in range(len(q)):
            alone = index.search(torch.from_numpy(q[i:i + 1]), 7, nprobe=nprobe)
            np.testing.assert_array_equal(batch.ids[i].numpy(), alone.ids[0].numpy())
            np.testing.assert_array_equal(batch.scores[i].numpy(), alone.scores[0].numpy())


def test_a_snapshot_keeps_the_scan_entries_of_the_lists_probed_only():
    # The native scan's per-list arguments are made once per snapshot, for the lists a query
    # probes (a filtered search has a snapshot of its own, so making every list's would cost more
    # than its scan); a new snapshot (an add) starts afresh, and its answers see the new rows.
    from tqindex.backends import fastscan
    if not fastscan.available():
        pytest.skip("needs the compiled fast scan (AVX-512, AVX2 or NEON)")
    x, q = _data(queries=4)
    index = Index(dim=x.shape[1], bits=4, partitions=NLIST, metric="l2")
    index.add(x)
    memo = index._view.lists()[2]
    before = index.search(q[0], 5, nprobe=3)
    probed = index._coarse.probe(torch.from_numpy(q[:1]), "l2", 3)[0].numpy()[0]
    assert set(memo["fastscan"]) == set(probed.tolist())
    kept = {lst: memo["fastscan"][lst] for lst in probed.tolist()}
    assert (index.search(q[0], 5, nprobe=3).ids == before.ids).all()
    assert all(memo["fastscan"][lst] is kept[lst] for lst in kept)    # reused, not made again
    index.add(q[:1] * 1.0, ids=[10 ** 6])                              # the query itself, as a new row
    assert index._view.lists()[2] is not memo
    assert 10 ** 6 in index.search(q[0], 5, nprobe=3).ids      # in its nearest list, which is probed first


def _two_segments_a_list(bits, metric, queries):
    """(index, rows, queries, ids): a partitioned index of two adds (two segments in most lists), ids not
    positions; skipped without the compiled fast scan, whose direct lanes these tests compare."""
    from tqindex.backends import fastscan
    if not fastscan.available():
        pytest.skip("needs the compiled fast scan (AVX-512, AVX2 or NEON)")
    x, q = _data(queries=queries)
    ids = np.r_[np.arange(2500) * 2 + 1, np.arange(1500) + 10 ** 5]
    index = Index(dim=DIM, bits=bits, partitions=NLIST, metric=metric)
    index.add(x[:2500], ids=ids[:2500])
    index.add(x[2500:], ids=ids[2500:])
    return index, x, q, ids


def _search_calls(monkeypatch, name: str = "search") -> list:
    """The keyword arguments of every call of `_native.<name>` from Python from now on (the call still runs)."""
    from tqindex import native
    calls = []
    kernel = getattr(native.kernels, name)
    monkeypatch.setattr(native.kernels, name, lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    return calls


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("bits", [2, 4])
def test_a_single_numpy_query_takes_one_call_with_the_general_paths_results(metric, bits, monkeypatch):
    # A numpy query of a partitioned index is checked, scaled (cosine), probed and scanned in one
    # native call (search_probing) over its lists' segments (each with its list's offset; ids mapped in
    # the call); the same values as a torch tensor take the general path. Ids and scores are the same,
    # bit for bit, with two segments per list, removals, and every nprobe.
    index, x, q, _ = _two_segments_a_list(bits, metric, queries=6)
    index.remove(np.arange(1, 5000, 14))
    calls, probing = _search_calls(monkeypatch), _search_calls(monkeypatch, "search_probing")
    for nprobe in (1, 3, NLIST):
        for k in (1, 10):
            for i in range(len(q)):
                calls.clear()
                probing.clear()
                direct = index.search(q[i], k=k, nprobe=nprobe)
                assert len(probing) == 1 and not calls
                assert probing[0]["normalize"] == (metric == "cosine")
                general = index.search(torch.from_numpy(q[i]), k=k, nprobe=nprobe)
                assert len(probing) == 1 and not calls  # the general path's list scan is scan_segments
                np.testing.assert_array_equal(direct.ids, general.ids.numpy())
                np.testing.assert_array_equal(direct.scores, general.scores.numpy())
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(np.full(DIM, np.nan, np.float32), k=3)
    if metric == "cosine":
        with pytest.raises(ValueError, match="row 0 is zero"):
            index.search(np.zeros(DIM, np.float32), k=3)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("bits", [2, 4])
def test_a_numpy_batch_takes_one_call_with_the_general_paths_results(metric, bits, monkeypatch):
    # A numpy batch of a partitioned index is checked, scaled (cosine), probed and scanned in one native
    # search: every list's entries (or, for a batch probing under half the lists, its lists' only), each
    # query's lists and offsets; the kernel groups the queries by list. The same values as a torch
    # tensor take the general path (a native call per list). Ids and scores are the same, bit for bit,
    # with two segments per list, removals, a list left empty, 1-3 threads and every nprobe.
    from tqindex import set_num_threads, get_num_threads
    index, x, q, ids = _two_segments_a_list(bits, metric, queries=70)
    assign = index._coarse.assign(torch.from_numpy(x)).numpy()
    emptied = ids[assign == np.bincount(assign, minlength=NLIST).argmax()]  # a list's every row
    index.remove(emptied)
    index.remove(np.setdiff1d(np.arange(1, 5000, 14), emptied))
    calls = _search_calls(monkeypatch)
    threads = get_num_threads()
    try:
        for t in (1, 2, 3):
            set_num_threads(t)
            for nprobe in (1, 3, NLIST):
                for k in (1, 10):
                    for rows in (slice(0, 2), slice(0, 70)):    # few lists probed; all of them
                        calls.clear()
                        direct = index.search(q[rows], k=k, nprobe=nprobe)
                        assert len(calls) == 1 and calls[0]["probes"] is not None and calls[0]["row_ids"]
                        general = index.search(torch.from_numpy(q[rows]), k=k, nprobe=nprobe)
                        np.testing.assert_array_equal(direct.ids, general.ids.numpy())
                        np.testing.assert_array_equal(direct.scores, general.scores.numpy())
    finally:
        set_num_threads(threads)
    bad = q[:3].copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        index.search(bad, k=3)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_a_wide_single_query_splits_its_products_over_threads_bit_for_bit(metric, monkeypatch):
    # At 520-d the rotation (1.08 MB) and, with 512 lists, the probe's centroids are split by columns over
    # the thread share (parts [0, 256) and [256, 520), a masked tail of 8); each output is summed as the
    # unsplit product sums it, so one thread, two threads and the general path (a torch query) agree
    # bit for bit, flat and partitioned.
    from tqindex import native
    from tqindex.backends import fastscan
    if not fastscan.available():
        pytest.skip("needs the compiled fast scan (AVX-512, AVX2 or NEON)")
    rng = np.random.default_rng(9)
    dim = 520
    x, q = clustered(rng, 3000, dim, clusters=40, queries=4)
    flat = Index(dim=dim, bits=2, metric=metric)
    flat.add(x)
    lists = Index(dim=dim, bits=2, metric=metric, partitions=512)
    lists.train(x)
    lists.add(x)
    probing = _search_calls(monkeypatch, "search_probing")
    try:
        for index, nprobes in ((flat, (None,)), (lists, (1, 3))):
            for nprobe in nprobes:
                for i in range(len(q)):
                    got = []
                    for threads in (1, 2):
                        native.set_num_threads(threads)
                        got.append(index.search(q[i], k=10, nprobe=nprobe))
                    general = index.search(torch.from_numpy(q[i]), k=10, nprobe=nprobe)
                    for result in got:
                        np.testing.assert_array_equal(result.ids, general.ids.numpy())
                        np.testing.assert_array_equal(result.scores, general.scores.numpy())
    finally:
        native.set_num_threads(None)
    assert len(probing) == 2 * 2 * len(q)                               # the partitioned queries took the call


def _one_call(monkeypatch, name: str, run):
    """(the kernel, its positional and keyword arguments, run()'s result) of the one call of
    `_native.<name>` that run() makes from Python; the kernel is unpatched again after it."""
    from tqindex import native
    calls = []
    kernel = getattr(native.kernels, name)
    monkeypatch.setattr(native.kernels, name, lambda *a, **kw: calls.append((a, kw)) or kernel(*a, **kw))
    result = run()
    monkeypatch.undo()
    (args, kw), = calls
    return kernel, args, kw, result


def _kernel_index(bits: int, queries: int) -> tuple[Index, np.ndarray]:
    """A partitioned "ip" index of the test data and `queries` queries, for the kernels' own tests
    (skipped where the fast scan is not compiled)."""
    from tqindex.backends import fastscan
    if not fastscan.available():
        pytest.skip("needs the compiled fast scan (AVX-512, AVX2 or NEON)")
    x, q = _data(queries=queries)
    index = Index(dim=DIM, bits=bits, partitions=NLIST, metric="ip")
    index.add(x)
    return index, q


def test_the_batch_kernel_refuses_lists_it_cannot_scan(monkeypatch):
    # search's probes name lists of list_entries; a list outside them, a list twice for one query, entries
    # that do not cover the segments given, or probes without their offsets are refused before anything
    # is scanned.
    index, q = _kernel_index(bits=4, queries=4)
    kernel, args, kw, _ = _one_call(monkeypatch, "search", lambda: index.search(q, k=5, nprobe=NLIST))
    out = [np.empty((4, 5), np.float32), np.empty((4, 5), np.int64), np.empty(4, np.int64)]
    for change, message in [({"probes": np.full((4, 2), NLIST, np.int64)}, "outside"),
                            ({"probes": np.full((4, 2), 3, np.int64)}, "probes list 3 twice"),
                            ({"list_entries": kw["list_entries"][:-1]}, "from 0 to len"),
                            ({"list_entries": kw["list_entries"][::-1].copy()}, "from 0 to len"),
                            ({"list_offsets": None}, "go together"),
                            ({"offsets": np.zeros((len(args[2]), 4), np.float32)}, "go together")]:
        with pytest.raises(ValueError, match=message):
            kernel(*args[:3], *out, *args[6:], **{**kw, **change})


def test_the_probing_kernel_refuses_what_it_cannot_scan(monkeypatch):
    # search_probing's per_list items are made by `make` for probed lists only and kept; a malformed
    # item, a probe wider than the lists, centroids of another count, or more than one query are refused
    # with an error that names it, and nothing of the outputs is then trusted.
    index, q = _kernel_index(bits=2, queries=2)
    kernel, args, kw, expected = _one_call(monkeypatch, "search_probing", lambda: index.search(q[0], k=5, nprobe=2))
    args = list(args)
    per_list = args[7]
    assert sum(item is not None for item in per_list) == 2        # the probed lists only, kept
    out = lambda: [np.empty((1, 5), np.float32), np.empty((1, 5), np.int64), np.empty(1, np.int64)]

    def call(change: dict, outputs=None):
        """The recorded call with the positional arguments at these places changed, fresh outputs."""
        a = [change.get(i, v) for i, v in enumerate(args)]
        return kernel(*a[:9], *(outputs or out()), *a[12:], **kw)

    got = out()
    assert call({}, got) == -1
    np.testing.assert_array_equal(got[1][0], expected.ids)
    fresh = [None] * NLIST
    assert call({7: fresh}) == -1 and sum(item is not None for item in fresh) == 2
    for change, message in [({7: [("not", "a", "list")] * NLIST}, "item must be"),
                            ({7: [None] * NLIST, 8: lambda lst: (tuple(per_list[lst][0]), (), 0)}, "item must be"),
                            ({5: np.empty(NLIST + 1, np.int64)}, "1 <= nprobe <= nlist"),
                            ({7: [None] * (NLIST - 1)}, "centroids_t"),
                            ({1: np.stack([q[0], q[0]])}, "one query")]:
        with pytest.raises(ValueError, match=message):
            call(change)


def test_probe_kernel_splits_a_batch_over_threads_bit_for_bit():
    # A batch's probe runs in even shares of its queries, each with its own heap scratch: lists and
    # offsets are the same bits for every thread count (shares of 1-17 queries, some empty).
    from tqindex import native
    from tqindex.partition import CoarseQuantizer
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    rng = np.random.default_rng(11)
    coarse = CoarseQuantizer(torch.from_numpy(rng.standard_normal((40, DIM)).astype(np.float32)), {})
    q = rng.standard_normal((50, DIM)).astype(np.float32)
    for l2 in (False, True):
        got = []
        for threads in (1, 2, 3, 64):
            lists, offsets = np.empty((50, 7), np.int64), np.empty((50, 40), np.float32)
            native.kernels.probe(q, coarse.centroids_t, coarse.sq_norms, lists, offsets, DIM, 40, l2, threads)
            got.append((lists, offsets))
        for lists, offsets in got[1:]:
            np.testing.assert_array_equal(lists, got[0][0])
            np.testing.assert_array_equal(offsets, got[0][1])
    with pytest.raises(ValueError, match="threads must be at least 1"):
        native.kernels.probe(q, coarse.centroids_t, coarse.sq_norms, lists, offsets, DIM, 40, False, 0)


def test_probe_kernel_orders_lists_by_key_then_by_list():
    # The kernel's lists are the numpy order (a stable sort of every list by key): best first, equal
    # keys to the lower list; duplicated centroids make exact ties. Offsets are its own product,
    # within float rounding of numpy's.
    from tqindex import native
    from tqindex.partition import CoarseQuantizer
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    rng = np.random.default_rng(4)
    c = rng.standard_normal((12, DIM)).astype(np.float32)
    c[7] = c[2]
    c[11] = c[2]
    coarse = CoarseQuantizer(torch.from_numpy(c), {})
    q = rng.standard_normal((5, DIM)).astype(np.float32)
    q[3] = c[2]
    for metric in ("ip", "l2"):
        for nprobe in (1, 2, 3, 5, 12):
            lists, offsets = coarse.probe(torch.from_numpy(q), metric, nprobe)
            want = q.astype(np.float64) @ c.T.astype(np.float64) * (2 if metric == "l2" else 1)
            np.testing.assert_allclose(offsets.numpy(), want, rtol=1e-5, atol=1e-5)
            key = offsets.numpy() - (np.square(c).sum(1)[None, :] if metric == "l2" else 0)
            np.testing.assert_array_equal(lists.numpy(), np.argsort(-key, axis=1, kind="stable")[:, :nprobe])
        tied = coarse.probe(torch.from_numpy(q[3:4]), metric, 3)[0].numpy()[0]
        assert tied.tolist() == [2, 7, 11]
    with pytest.raises(ValueError, match="out_lists must be int64"):
        native.kernels.probe(q, coarse._centroids_t, coarse._sq_norms, np.empty((5, 13), np.int64),
                             np.empty((5, 12), np.float32), DIM, 12, False)
