"""Filtered search (tqindex.filters): exactly the top k of the allowed rows, on every backend."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from tqindex import Index
from tqindex import index as index_module
from tqindex.backends import fastscan
from tqindex.backends.torch_scan import BlockDecoder, scan_topk

from conftest import clustered

SELECTIVITIES = [0.001, 0.01, 0.1, 0.5, 1.0]


def _index(metric, seed=0, n=4000, d=48, bits=3, device="cpu"):
    rng = np.random.default_rng(seed)
    x, q = clustered(rng, n, d, clusters=50, queries=12)
    x *= rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    index = Index(dim=d, bits=bits, metric=metric, seed=3, device=device)
    # Larger first, so the second add is not merged into it: several segments, and deletions.
    index.add(x[:2500], metadata={"group": (np.arange(2500) % 10).tolist()})
    index.add(x[2500:], metadata={"group": (np.arange(2500, n) % 10).tolist()})
    index.remove(np.arange(0, n, 13))
    assert len(index._segments) == 2
    return index, q


def _all_scores(index, queries):
    """Every row's quantized score (torch scan, k = all), by id; −inf for removed rows."""
    q = torch.from_numpy(queries)
    if index.metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True)
    segments = index._segments
    n = sum(len(s) for s in segments)
    rotated, _ = index._quantizer.prepare_queries(q)
    scores, pos = scan_topk(index._quantizer, BlockDecoder(index._quantizer), segments, rotated, None,
                            q.square().sum(1), n, index.metric)
    ids = np.concatenate([s.ids for s in segments])
    full = np.full((len(queries), ids.max() + 1), -np.inf)
    valid = pos.numpy() >= 0
    for row in range(len(queries)):
        full[row, ids[pos.numpy()[row][valid[row]]]] = scores.numpy()[row][valid[row]]
    return full


def _check(result, ref, allowed, k, metric):
    """The answer is the exact filtered top k of `ref` (tie-aware), padded when fewer are allowed."""
    ids, scores = np.atleast_2d(result.ids), np.atleast_2d(result.scores)
    if metric == "l2":
        scores = -scores
    ref = np.where(allowed[None, :], ref, -np.inf)
    live = np.isfinite(ref).sum(axis=1)
    for row in range(len(ids)):
        m = min(k, int(live[row]))
        got = ids[row, :m]
        assert (ids[row, m:] == -1).all() and (got >= 0).all(), f"query {row}: {ids[row]}"
        assert allowed[got].all(), "a row the filter does not allow was returned"
        assert len(set(got.tolist())) == m
        tol = 1e-4 * max(np.abs(ref[row][np.isfinite(ref[row])]).max(), 1e-30)
        np.testing.assert_allclose(scores[row, :m], ref[row, got], atol=tol, rtol=0)
        if m:
            must = np.flatnonzero(ref[row] > ref[row, got].min() + tol)
            assert set(must.tolist()) <= set(got.tolist()), f"query {row}: allowed rows beat the k-th result"


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "native":
        if not fastscan.available():
            pytest.skip("no SIMD fast scan on this machine")
    else:
        monkeypatch.setattr(fastscan, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("selectivity", SELECTIVITIES)
def test_filter_is_the_exact_top_k_of_the_allowed_rows(backend, metric, selectivity):
    index, q = _index(metric)
    assert index._scanner().name == ("fastscan" if backend == "native" else "torch")
    ref = _all_scores(index, q)
    rng = np.random.default_rng(int(selectivity * 1000))
    next_id = ref.shape[1]
    allowed = rng.random(next_id) < selectivity
    allowed[np.arange(0, next_id, 13)] &= rng.random(len(range(0, next_id, 13))) < 0.5  # some removed rows allowed
    live = np.isfinite(ref[0])
    for k in (1, 10, 100):
        by_ids = index.search(q, k, filter=np.flatnonzero(allowed))
        by_mask = index.search(q, k, filter=allowed)
        _check(by_ids, ref, allowed & live, k, metric)
        np.testing.assert_array_equal(by_ids.ids, by_mask.ids)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("decode_below", [0, 4096])   # gathered rows scanned by the backend, or decoded
def test_direct_and_scanned_filters_agree(backend, metric, decode_below, monkeypatch):
    monkeypatch.setattr(index_module, "_DECODE_BELOW_ROWS", decode_below)
    index, q = _index(metric, seed=2)
    allowed = np.zeros(4000, dtype=bool)
    allowed[np.random.default_rng(1).choice(4000, 60, replace=False)] = True
    monkeypatch.setattr(index_module, "_DIRECT_FRACTION", 1.0)     # gather the allowed rows first
    direct = index.search(q, 10, filter=allowed)
    monkeypatch.setattr(index_module, "_DIRECT_FRACTION", 0.0)     # scan everything, skip the rest
    scanned = index.search(q, 10, filter=allowed)
    np.testing.assert_array_equal(direct.ids, scanned.ids)
    np.testing.assert_allclose(direct.scores, scanned.scores, rtol=1e-5)
    _check(direct, _all_scores(index, q), allowed & np.isfinite(_all_scores(index, q)[0]), 10, metric)


def test_expression_filter_over_metadata(backend):
    index, q = _index("ip", seed=1)
    ref = _all_scores(index, q)
    groups = np.zeros(ref.shape[1], dtype=np.int64)
    got = index.get(np.flatnonzero(np.isfinite(ref[0])), columns=["group"])
    groups[got.column("id").to_numpy()] = got.column("group").to_numpy()
    allowed = np.isfinite(ref[0]) & np.isin(groups, [2, 7])
    result = index.search(q, 10, filter=pc.field("group").isin([2, 7]), columns=["group"])
    _check(result, ref, allowed, 10, "ip")
    assert set(result.payload.column("group").to_pylist()) <= {2, 7}


def test_expression_rows_with_null_metadata_are_not_allowed():
    index = Index(dim=8, bits=4)
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    index.add(x[:10], metadata={"year": list(range(2010, 2020))})
    index.add(x[10:])                                   # no metadata: year is null
    result = index.search(x, 20, filter=pc.field("year") >= 2015)
    assert set(result.ids[result.ids >= 0].tolist()) == set(range(5, 10))
    assert (np.sort(result.ids, axis=1)[:, :15] == -1).all()


def test_filter_with_rerank_and_k_beyond_the_allowed_rows():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    index = Index(dim=24, bits=2, keep_vectors=True)
    index.add(x)
    allowed_ids = np.array([3, 40, 41, 400, 499])
    result = index.search(x[:4], 8, filter=allowed_ids, rerank=4)
    assert (result.ids[:, 5:] == -1).all()
    assert (np.sort(result.ids[:, :5], axis=1) == allowed_ids).all()
    exact = x[:4] @ x[allowed_ids].T
    np.testing.assert_allclose(result.scores[:, :5], -np.sort(-exact, axis=1), rtol=1e-5)
    assert (index.search(x[:2], 3, filter=np.array([], dtype=np.int64)).ids == -1).all()


def test_bad_filters_name_the_problem():
    index = Index(dim=8, bits=4)
    index.add(np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32))
    q = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="filter must be"):
        index.search(q, 3, filter=np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="non-negative"):
        index.search(q, 3, filter=np.array([-1, 2]))
    with pytest.raises(ValueError, match="needs metadata"):
        index.search(q, 3, filter=pc.field("year") > 1)
    with pytest.raises(ValueError, match="1-D"):
        index.search(q, 3, filter=np.ones((2, 5), dtype=bool))
    index.add(np.ones((1, 8), np.float32), metadata={"year": [1]})
    with pytest.raises(ValueError, match="cannot be evaluated"):
        index.search(q, 3, filter=pc.field("nope") > 1)


@pytest.mark.cuda
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("selectivity", [0.01, 0.5])
def test_filter_on_the_gpu(metric, selectivity):
    index, q = _index(metric, seed=5)
    ref = _all_scores(index, q)
    allowed = np.random.default_rng(9).random(ref.shape[1]) < selectivity
    index.to("cuda")
    _check(index.search(q, 10, filter=allowed), ref, allowed & np.isfinite(ref[0]), 10, metric)


def test_contiguous_filters_skip_whole_blocks_and_stay_exact(backend):
    # Allowing one id range leaves most 32-row blocks with no allowed row: the kernels skip those.
    index, q = _index("ip", seed=6)
    ref = _all_scores(index, q)
    allowed = np.zeros(ref.shape[1], dtype=bool)
    allowed[1000:2000] = True
    allowed[3500:3517] = True                                # a partial block in the second segment
    for k in (1, 10, 50):
        _check(index.search(q, k, filter=allowed), ref, allowed & np.isfinite(ref[0]), k, "ip")
    if backend == "native":
        segment = index._segments[0]
        filtered = index_module._filtered(index._view, allowed, index._quantizer.layout).segments[0]
        index._scanner().topk([filtered], index_module.Queries(*index._quantizer.prepare_queries(
            torch.from_numpy(q)), torch.from_numpy((q ** 2).sum(1))), 5)
        live = index._scanner().cache.peek(segment, "layout")["removed"][2]
        assert 0 < live.sum() < len(live) // 2          # most blocks skipped, the allowed ones scanned
