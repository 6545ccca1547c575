import numpy as np
import pytest
import torch

from tqindex import Index, reference
from tqindex.packing import unpack_codes

from conftest import assert_topk_matches, clustered, exact_topk, recall_at


@pytest.fixture(scope="module")
def clustered_20k():
    return clustered(np.random.default_rng(2024), 20_000, 384)


def test_recall_at_4_bits_and_rerank(clustered_20k):
    x, queries = clustered_20k
    truth = exact_topk(queries, x, 10)
    index = Index(dim=384, bits=4, keep_vectors=True, seed=0)
    index.add(x)
    plain = recall_at(index.search(queries, 10).ids, truth)
    assert plain >= 0.85
    assert recall_at(index.search(queries, 10, rerank=4).ids, truth) >= 0.99


def _reference_scores(index: Index, x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Scores of every (query, row) pair: the reference decoder (float64) applied to the index's own
    codes, with the same estimator. Code equality with the reference is test_quantizer's job; this
    isolates the scan (decode tables, GEMM, per-vector factors, top-k merge)."""
    pi = index._quantizer.rotation.matrix()
    x64, q64 = x.astype(np.float64), queries.astype(np.float64)
    if index.metric == "cosine":
        x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    norms = np.linalg.norm(x64, axis=1)
    unit = x64 / norms[:, None]
    (segment,) = index._segments
    mse_bits = index.bits if index.variant == "mse" else index.bits - 1
    idx = index._quantizer.unpack(index._quantizer.row_codes(segment.encoded)).astype(np.int64) if mse_bits else None
    if index.variant == "mse":
        unit_hat = reference.dequantize_mse(idx, np.ones(len(x)), pi, index.bits, index.codebook)
        factor = norms / np.sum(unit_hat * unit, axis=1) if index.rescale else norms
        if index.scale_dtype == "float16":
            # The stored scale, rounded from a float32 computation (test_quantizer checks the rounding):
            # recomputing it in float64 could round the other way at a float16 midpoint.
            factor = segment.encoded.scale.astype(np.float64)
        ip = (q64 @ unit_hat.T) * factor
    else:
        base = reference.dequantize_mse(idx, np.ones(len(x)), pi, mse_bits, index.codebook) if mse_bits else 0 * unit
        rnorm = np.linalg.norm(unit - base, axis=1)
        signs = unpack_codes(segment.encoded.qjl, 1, index.dim).astype(np.int8) * 2 - 1
        # prod's scale is ‖x‖ (stored float16 or float32; see the mse branch for why the stored one).
        scale = segment.encoded.scale.astype(np.float64) if index.scale_dtype == "float16" else norms
        ip = q64 @ reference.dequantize_prod(idx, signs, rnorm, scale, pi, index.bits, index.seed, index.codebook).T
    if index.metric == "l2":
        if index.scale_dtype == "float16" and segment.encoded.norm is None:  # the scale stands in for ‖x‖
            norms = segment.encoded.scale.astype(np.float64)
        return (q64 ** 2).sum(1)[:, None] + norms[None, :] ** 2 - 2 * ip
    return ip


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("variant,bits,scale_dtype,codebook", [
    ("mse", 1, "float32", "vq"), ("mse", 1, "float32", "scalar"), ("mse", 2, "float32", "vq"),
    ("mse", 2, "float32", "scalar"), ("mse", 3, "float32", "vq"), ("mse", 4, "float32", "vq"),
    ("prod", 2, "float32", "vq"), ("prod", 3, "float32", "vq"), ("prod", 3, "float32", "scalar"),
    ("prod", 4, "float32", "vq"), ("mse", 2.5, "float32", "vq"), ("mse", 2.5, "float32", "scalar"),
    ("prod", 3.25, "float32", "vq"), ("mse", 2.52, "float16", "vq"), ("mse", 4, "float16", "vq"),
    ("prod", 3, "float16", "vq")])
@pytest.mark.parametrize("d", [97, 1000])
def test_search_equals_reference_topk(metric, variant, bits, scale_dtype, codebook, d):
    rng = np.random.default_rng(int(d * 10 + 4 * bits))
    n = 1237  # not a multiple of any block size
    x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)
    queries = rng.standard_normal((13, d)).astype(np.float32)
    index = Index(dim=d, bits=bits, metric=metric, variant=variant, seed=4, scale_dtype=scale_dtype,
                  codebook=codebook)
    index.add(x)
    result = index.search(queries, 25)
    ref = _reference_scores(index, x, queries)
    # float32 accumulation over d ≤ 1000 terms: relative error well below 1e-4 of the largest score.
    assert_topk_matches(result.ids, result.scores, ref, rtol=1e-4, higher_is_better=metric != "l2")


def test_small_index_pads_results():
    index = Index(dim=8, bits=2)
    index.add(np.eye(8, dtype=np.float32)[:3])
    res = index.search(np.ones(8, dtype=np.float32), 5)
    assert res.ids.shape == (5,) and res.scores.shape == (5,)
    assert sorted(res.ids[:3].tolist()) == [0, 1, 2] and res.ids[3:].tolist() == [-1, -1]
    assert np.all(np.isneginf(res.scores[3:]))
    l2 = Index(dim=8, bits=2, metric="l2")
    l2.add(np.eye(8, dtype=np.float32)[:1])
    res = l2.search(np.zeros((2, 8), dtype=np.float32), 3)
    assert res.ids.tolist() == [[0, -1, -1]] * 2 and np.all(np.isposinf(res.scores[:, 1:]))
    empty = Index(dim=8).search(np.zeros((2, 8), dtype=np.float32), 2)
    assert empty.ids.tolist() == [[-1, -1]] * 2


def test_l2_scores_ascend_and_ip_descend():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    for metric in ["ip", "l2", "cosine"]:
        index = Index(dim=32, bits=4, metric=metric)
        index.add(x)
        s = index.search(x[:5], 10).scores
        assert np.all(np.diff(s, axis=1) >= 0) if metric == "l2" else np.all(np.diff(s, axis=1) <= 0)


def test_input_kinds_and_dtypes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 16))
    index = Index(dim=16, bits=4)
    ids = index.add(x.astype(np.float16))
    assert ids.dtype == np.int64 and ids.tolist() == list(range(50))
    assert index.add(torch.from_numpy(x[0])).tolist() == [50]  # one vector, torch float64
    res = index.search(torch.from_numpy(x[:3]).float(), 4)
    assert isinstance(res.ids, torch.Tensor) and res.ids.dtype == torch.int64 and res.scores.dtype == torch.float32
    ids_np, scores_np = index.search(x[:3], 4)  # unpacks like a tuple
    np.testing.assert_array_equal(ids_np, res.ids.numpy())
    assert index.search(x[0], 4).ids.shape == (4,)
    assert len(index) == 51 and index.dim == 16 and index.bits == 4 and index.metric == "ip"
    assert "n=51" in repr(index) and index.memory_bytes() > 51 * index.bytes_per_vector()


def test_user_ids_and_auto_ids_continue():
    index = Index(dim=4, bits=2)
    index.add(np.eye(4, dtype=np.float32), ids=[10, 20, 30, 40])
    assert index.add(np.ones((2, 4), dtype=np.float32)).tolist() == [41, 42]
    assert index.search(np.eye(4, dtype=np.float32)[1], 1).ids.tolist() == [20]


def _snapshot(index: Index, probe: np.ndarray):
    res = index.search(probe, 7)
    return len(index), res.ids.copy(), res.scores.copy(), index._next_id


BAD_ADDS = [
    (lambda x: x[:, :15], {}, ValueError, "dimension 15.*dimension 16"),
    (lambda x: np.where(np.arange(16) == 3, np.nan, x), {}, ValueError, "NaN or inf"),
    (lambda x: np.where(np.arange(16) == 3, np.inf, x), {}, ValueError, "NaN or inf"),
    (lambda x: x.astype(np.int32), {}, TypeError, "floating dtype"),
    (lambda x: x[:0], {}, ValueError, "empty batch"),
    (lambda x: x[None], {}, ValueError, "1-D .* or 2-D"),
    (lambda x: x, {"ids": np.arange(4)}, ValueError, "length 5"),
    (lambda x: x, {"ids": [1, 2, 3, 3, 4]}, ValueError, "duplicate ids"),
    (lambda x: x, {"ids": [100, 101, 102, 103, 0]}, ValueError, r"already in the index: \[0\]"),
    (lambda x: x, {"ids": [-1, 200, 201, 202, 203]}, ValueError, "non-negative"),
    (lambda x: x, {"ids": np.linspace(300, 304, 5)}, TypeError, "integer dtype"),
]


@pytest.mark.parametrize("make,kwargs,exc,match", BAD_ADDS)
def test_bad_add_raises_and_leaves_index_unchanged(make, kwargs, exc, match):
    rng = np.random.default_rng(5)
    index = Index(dim=16, bits=3, keep_vectors=True)
    index.add(rng.standard_normal((40, 16)).astype(np.float32))
    probe = rng.standard_normal((3, 16)).astype(np.float32)
    before = _snapshot(index, probe)
    with pytest.raises(exc, match=match):
        index.add(make(rng.standard_normal((5, 16))), **kwargs)
    after = _snapshot(index, probe)
    assert before[0] == after[0] and before[3] == after[3]
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[2], after[2])


@pytest.mark.parametrize("factor", [1e5, 1e-6])
def test_float16_scale_out_of_range_raises_and_leaves_index_unchanged(factor):
    rng = np.random.default_rng(6)
    index = Index(dim=16, bits=3, keep_vectors=True, scale_dtype="float16")
    index.add(rng.standard_normal((40, 16)).astype(np.float32))
    probe = rng.standard_normal((3, 16)).astype(np.float32)
    before = _snapshot(index, probe)
    batch = rng.standard_normal((5, 16)).astype(np.float32)
    batch[2] *= factor
    with pytest.raises(ValueError, match=r"scale_dtype='float16'.*row 2 of the batch.*scale_dtype='float32'"):
        index.add(batch, ids=np.arange(100, 105))
    after = _snapshot(index, probe)
    assert before[0] == after[0] and before[3] == after[3]
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[2], after[2])
    assert 100 not in index


def test_float16_scale_saves_two_bytes_per_vector():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1000, 50)).astype(np.float32)
    sizes = {}
    for dtype in ("float32", "float16"):
        index = Index(dim=50, bits=2, scale_dtype=dtype)
        index.add(x)
        sizes[dtype] = (index.bytes_per_vector(), index.memory_bytes())
    assert sizes["float32"][0] - sizes["float16"][0] == 2
    assert sizes["float32"][1] - sizes["float16"][1] == 2 * len(x)
    assert Index(dim=50, scale_dtype=np.float16).scale_dtype == Index(dim=50, scale_dtype="f2").scale_dtype == "float16"


def test_cosine_rejects_zero_vector():
    index = Index(dim=4, metric="cosine")
    with pytest.raises(ValueError, match="row 1 is zero"):
        index.add(np.array([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    assert len(index) == 0


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"k": 0}, ValueError, "k must be >= 1"),
    ({"k": -3}, ValueError, "k must be >= 1"),
    ({"k": 2.5}, TypeError, "k must be an integer"),
    ({"k": 5, "rerank": 2}, ValueError, "keep_vectors=True"),
    ({"k": 5, "rerank": -1}, ValueError, "rerank"),
    ({"k": 5, "batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_search_arguments(kwargs, exc, match):
    index = Index(dim=4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(exc, match=match):
        index.search(np.ones(4, dtype=np.float32), **kwargs)
    with pytest.raises(ValueError, match="dimension 5.*dimension 4"):
        index.search(np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(4, np.nan, dtype=np.float32))


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_search_names_the_first_query_row_that_is_not_finite(metric, bad):
    # A search checks its queries once, through their float64 norms: a row is refused exactly when
    # one of its values is NaN or infinite, and the error names the first such row.
    index = Index(dim=4, metric=metric)
    index.add(np.eye(4, dtype=np.float32) + 0.1)
    q = np.ones((5, 4), dtype=np.float32)
    q[2, 1], q[4, 0] = bad, bad
    with pytest.raises(ValueError, match=r"queries contain NaN or inf \(first at row 2\)"):
        index.search(q)
    q[2, 1] = 3e38  # finite, but its norm is too large: the other error, for that row
    with pytest.raises(ValueError, match="queries row 2 has norm"):
        index.search(q)
    q[2, 1], q[4, 0] = 1.0, 1.0
    assert index.search(q, k=2).ids.shape == (5, 2)


@pytest.mark.parametrize("kwargs,match", [
    ({"dim": 1}, "dim"), ({"dim": 8, "bits": 0}, "bits"), ({"dim": 8, "bits": 9}, "bits"),
    ({"dim": 8, "metric": "hamming"}, "metric"), ({"dim": 8, "variant": "pq"}, "variant"),
    ({"dim": 8, "rotation": "fft"}, "rotation"), ({"dim": 8, "seed": -1}, "seed"),
    ({"dim": 8, "device": "tpu"}, "device"), ({"dim": 8, "bits": 8.5}, "bits"),
    ({"dim": 8, "bits": float("nan")}, "bits"), ({"dim": 8, "bits": "4"}, "bits"), ({"dim": 8, "bits": True}, "bits"),
    ({"dim": 8, "bits": 1.5, "variant": "prod"}, "needs bits >= 2"),
    ({"dim": 8, "scale_dtype": "bfloat16"}, "scale_dtype"), ({"dim": 8, "scale_dtype": np.float64}, "scale_dtype"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Index(**kwargs)


def test_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        Index(8)  # noqa


def test_remove_upsert_compact():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    index = Index(dim=24, bits=4, keep_vectors=True)
    index.add(x)
    assert index.remove([5, 6, 7]) == 3 and len(index) == 297 and 5 not in index and 8 in index
    res = index.search(x[5:8], 300)
    assert not np.isin([5, 6, 7], res.ids).any() and np.sum(res.ids >= 0, axis=1).tolist() == [297] * 3
    with pytest.raises(KeyError, match=r"\[5\]"):
        index.remove([5])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:1], ids=[9])
    index.add(-x[9:10], ids=[9], upsert=True)
    assert len(index) == 297
    assert index.search(-x[9], 1, rerank=2).ids.tolist() == [9]
    before = index.search(x[:20], 10, rerank=3)
    index.compact()
    assert len(index._segments) == 1 and len(index) == 297
    after = index.search(x[:20], 10, rerank=3)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-6)


@pytest.mark.parametrize("partitions", [0, 4])
def test_ids_past_every_id_used_skip_the_id_lookup(partitions, monkeypatch):
    # Given ids at or past next_id (larger than any id the index ever held) cannot be in it: the add
    # builds no id lookup (a sort of every live id, O(n log n) per add). Any smaller id is looked up,
    # so a duplicate is still refused and a removed id can come back.
    from tqindex.idmap import IdMap
    rng = np.random.default_rng(9)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    index = Index(dim=16, bits=4, partitions=partitions, seed=1)
    index.add(x[:200], ids=np.arange(0, 400, 2))
    lookups = []
    positions = IdMap.positions
    monkeypatch.setattr(IdMap, "positions", lambda self, ids: lookups.append(ids.tolist()) or positions(self, ids))
    assert index.next_id == 399
    index.add(x[200:300], ids=np.arange(399, 499))
    index.add(x[300:301], ids=[10 ** 6], upsert=True)
    assert not lookups and len(index) == 301 and index.next_id == 10 ** 6 + 1
    with pytest.raises(ValueError, match=r"already in the index: \[398\]"):
        index.add(x[301:302], ids=[398])
    assert lookups == [[398]]
    index.remove([398])
    index.add(x[301:302], ids=[398])
    assert 398 in index and len(index) == 301
    assert index.search(x[250], 1).ids.tolist() == [449]


@pytest.mark.parametrize("partitions", [0, 3])
def test_a_few_ids_are_found_segment_by_segment_as_by_the_lookup(partitions):
    # Without an index-wide id lookup (after any change), up to _FEW_IDS ids (one id: in scalar steps)
    # are searched in each segment's sorted ids: the same positions as the lookup, for ids in order and
    # out of order (random ids), removed rows, an id removed and added again (its old row dead in another
    # segment), and absent ids.
    from tqindex import idmap
    rng = np.random.default_rng(10)
    x = rng.standard_normal((700, 16)).astype(np.float32)
    index = Index(dim=16, bits=2, partitions=partitions, seed=3)
    index.add(x[:300])                                                       # ids 0..299, in order
    index.add(x[300:500], ids=rng.permutation(np.arange(1000, 3000))[:200])  # out of order
    index.remove(np.r_[np.arange(0, 300, 7), index.select()[-20:]])
    index.add(x[500:501], ids=[14])                                          # removed before: back, elsewhere
    index.add(x[501:700], ids=np.arange(5000, 5199)[::-1])                   # descending
    view = index._view
    live = index.select()
    probes = np.r_[live, np.arange(0, 300, 7), [-5, 299, 300, 999, 10 ** 9]]
    found = np.concatenate([view.ids._positions_by_segment(probes[i:i + idmap._FEW_IDS])
                            for i in range(0, len(probes), idmap._FEW_IDS)])
    one_by_one = np.concatenate([view.ids._positions_by_segment(probes[i:i + 1]) for i in range(len(probes))])
    assert view.ids._lookup is None
    expected = view.ids.positions(probes)                                    # builds the lookup: len > _FEW_IDS
    assert view.ids._lookup is not None
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(one_by_one, expected)                       # the scalar steps of one id
    assert (found[:len(live)] >= 0).all() and (found[len(live):len(live) + 43] < 0).sum() == 42  # 14 is back
    np.testing.assert_array_equal(view.ids.ids()[found[:len(live)]], live)


def test_many_small_adds_do_not_fragment():
    index = Index(dim=8, bits=8, metric="l2")  # 8 bits: each row is its own nearest neighbour
    batches = [np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32) for i in range(1000)]
    for batch in batches:
        index.add(batch)
    # Binary-counter merging: as many segments as 1000 has one-bits.
    assert len(index._segments) == bin(1000).count("1") and len(index) == 1000
    np.testing.assert_array_equal(np.concatenate([s.ids for s in index._segments]), np.arange(1000))
    assert index.search(batches[777][0], 1).ids.tolist() == [777]


def test_removing_recent_rows_does_not_stop_merging():
    # An add merges unsaved predecessors by their live rows, dropping removed ones: removing the row
    # just added (a document replaced, then deleted) leaves O(log n) segments, not one per add.
    index = Index(dim=8, bits=8, metric="l2")  # 8 bits: each row is its own nearest neighbour
    rows = np.random.default_rng(11).standard_normal((300, 8)).astype(np.float32)
    for i in range(300):
        index.add(rows[i:i + 1])
        if i % 2:
            index.remove([i])
    assert len(index) == 150 and len(index._segments) <= 9
    assert sum(len(s) for s in index._segments) <= 150 + 8  # removed rows dropped as segments merge
    np.testing.assert_array_equal(index.select(), np.arange(0, 300, 2))
    assert index.search(rows[::2], 1).ids[:, 0].tolist() == list(range(0, 300, 2))


@pytest.mark.parametrize("partitions", [0, 3])
def test_the_live_count_a_change_carries_is_the_segments_count(partitions):
    # add, upsert and remove give the new snapshot its live-row count from the old one's; after every
    # step of a seeded mix it equals the count over the segments, and len() and select() agree.
    rng = np.random.default_rng(12)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    index = Index(dim=16, bits=2, partitions=partitions, seed=4)
    index.add(x[:200])
    for step in range(120):
        live = index.select()
        action = step % 3
        if action == 0:
            index.add(x[200 + step:201 + step])
        elif action == 1:
            index.add(x[step:step + 2], ids=rng.choice(live, 2, replace=False), upsert=True)
        else:
            index.remove(rng.choice(live, 3, replace=False))
        view = index._view
        assert view.live == sum(s.live_count for s in view.segments) == len(index) == len(index.select())


def test_cuda_device_without_gpu_has_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA build of torch|NVIDIA GPU"):
        Index(dim=8, device="cuda")
    index = Index(dim=8)
    with pytest.raises(RuntimeError, match="CUDA build of torch|NVIDIA GPU"):
        index.to("cuda")
    assert index.device == "cpu"


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_center_is_exact_shift(metric):
    rng = np.random.default_rng(12)
    offset = 3 * rng.standard_normal(48).astype(np.float32)
    x = (offset + rng.standard_normal((800, 48))).astype(np.float32)
    q = (offset + rng.standard_normal((9, 48))).astype(np.float32)
    c = x.mean(axis=0)
    centered = Index(dim=48, bits=3, metric=metric, center=c)
    centered.add(x)
    res = centered.search(q, 20)
    # The same as an uncentered index over the shifted data, with the score offset put back.
    if metric == "cosine":
        xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
        plain = Index(dim=48, bits=3, metric="ip")
        plain.add(xn - c)
        ref = plain.search(qn, 20)
        expected = ref.scores + (qn @ c)[:, None]
    elif metric == "ip":
        plain = Index(dim=48, bits=3, metric="ip")
        plain.add(x - c)
        ref = plain.search(q, 20)
        expected = ref.scores + (q @ c)[:, None]
    else:
        plain = Index(dim=48, bits=3, metric="l2")
        plain.add(x - c)
        ref = plain.search(q - c, 20)
        expected = ref.scores
    np.testing.assert_array_equal(res.ids, ref.ids)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(centered.reconstruct([0]), plain.reconstruct([0]) + c, rtol=1e-5, atol=1e-5)


def test_center_helps_data_with_a_common_offset():
    rng = np.random.default_rng(13)
    offset = 2 * rng.standard_normal(128)
    x = (offset + rng.standard_normal((5000, 128))).astype(np.float32)
    q = (offset + rng.standard_normal((100, 128))).astype(np.float32)
    truth = exact_topk(q, x, 10)
    plain, centered = Index(dim=128, bits=2), Index(dim=128, bits=2, center=x[:500].mean(axis=0))
    plain.add(x)
    centered.add(x)
    assert recall_at(centered.search(q, 10).ids, truth) > recall_at(plain.search(q, 10).ids, truth) + 0.05


def test_center_is_validated():
    with pytest.raises(ValueError, match="dimension 3"):
        Index(dim=4, center=np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        Index(dim=4, center=np.full(4, np.nan))


# -- fixes made during the restructure (each failed before it) ---------------------------------------
def test_open_refuses_unknown_or_changed_parameters_of_an_existing_index(tmp_path):
    center = np.arange(8, dtype=np.float32)
    Index.open(tmp_path / "ix", dim=8, metric="l2", center=center).close()
    with pytest.raises(ValueError, match="metrc"):                 # a typo is not silently ignored
        Index.open(tmp_path / "ix", dim=8, metrc="l2")
    with pytest.raises(ValueError, match="center"):                # arrays compare by value
        Index.open(tmp_path / "ix", dim=8, center=center + 1)
    same = Index.open(tmp_path / "ix", dim=8, center=center, metric="l2")
    np.testing.assert_array_equal(same.center, center)
    same.close()


def test_memory_bytes_counts_what_the_rotation_holds():
    index = Index(dim=256, bits=2)
    rotation = index._quantizer.rotation
    held = {}
    for value in vars(rotation).values():           # every array and tensor the rotation keeps
        for item in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(item, torch.Tensor):
                held[item.data_ptr()] = item.nbytes
            elif isinstance(item, np.ndarray):
                held[item.__array_interface__["data"][0]] = item.nbytes
    assert sum(held.values()) == rotation.nbytes() == 12 * 256 * 256
    assert index.memory_bytes() >= rotation.nbytes()
    index.add(np.ones((10, 256), np.float32))
    index.search(np.ones((1, 256), np.float32), 3)
    seen: set = set()
    segment_bytes = sum(s.nbytes(seen) for s in index._segments)
    cached = sum(s.cache.nbytes(seen) for s in index._scanners) + index._ids.nbytes(seen)
    assert index.memory_bytes() == index._quantizer.nbytes() + segment_bytes + cached
    # The fast scan's cache refers to the segment's blocks and scales: they are counted once, not twice.
    blocks = sum(s.encoded.blocks.nbytes + s.encoded.scale.nbytes for s in index._segments)
    alone = sum(s.nbytes() for s in index._segments) + sum(sc.cache.nbytes() for sc in index._scanners)
    shared: set = set()
    together = sum(s.nbytes(shared) for s in index._segments) + sum(sc.cache.nbytes(shared) for sc in index._scanners)
    if any(sc.cache.peek(index._segments[0], "layout") for sc in index._scanners):
        assert alone - together == blocks


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_distances_are_lower_is_better_for_every_metric(metric):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    index = Index(dim=16, bits=4, metric=metric)
    index.add(x)
    result = index.search(x[:4], 5)
    expected = result.scores if metric == "l2" else 1 - result.scores
    np.testing.assert_array_equal(result.distances, expected)
    assert (np.diff(result.distances, axis=1) >= 0).all()


def test_quantizer_and_reference_default_to_the_index_codebook():
    from tqindex import TurboQuantizer
    index = Index(dim=64, bits=2)
    assert TurboQuantizer(dim=64, bits=2).codebook == index.codebook == "vq"
    x = np.random.default_rng(2).standard_normal((20, 64))
    q = index._quantizer
    idx, _ = reference.quantize_mse(x, q.rotation.matrix(), 2)
    np.testing.assert_array_equal(idx, q.unpack(q.encode(torch.from_numpy(x.astype(np.float32))).codes))


def test_reference_prod_follows_the_codebook_version():
    """prod at 6 bits has a 5-bit mse stage: Lloyd-Max under version 1, bit-plane under version 2;
    the oracle must code it as the index does at either version."""
    from tqindex import QuantizerOptions
    x = np.random.default_rng(3).standard_normal((30, 40))
    for version in (1, 2):
        index = Index(dim=40, bits=6, options=QuantizerOptions(variant="prod", codebook_version=version))
        q = index._quantizer
        enc = q.encode(torch.from_numpy(x.astype(np.float32)))
        idx, _, _, _ = reference.quantize_prod(x, q.rotation.matrix(), 6, index.seed, "vq", version)
        assert np.mean(q.unpack(enc.codes) != idx) < 1e-3  # ties at float32 rounding aside


def test_legacy_keywords_and_options_build_the_same_index():
    from tqindex import QuantizerOptions
    a = Index(dim=32, bits=3, variant="prod", codebook="scalar")
    b = Index(dim=32, bits=3, options=QuantizerOptions(variant="prod", codebook="scalar"))
    assert a.params() == b.params() and a.options == b.options
    with pytest.raises(TypeError, match="codebook_version"):
        Index(dim=32, bits=3, codebook_version=1)   # the load path's, not a constructor knob
    with pytest.raises(ValueError, match="variant"):
        QuantizerOptions(variant="nope")


def _index_with_layout(seed):
    """A searched index, its fast scanner and the layout it holds for the index's one segment."""
    index = Index(dim=32, bits=4)
    index.add(np.random.default_rng(seed).standard_normal((500, 32)).astype(np.float32))
    index.search(np.ones(32, np.float32), 3)
    scanner = index._backend("fastscan")
    layout = scanner.cache.peek(index._segments[0], "layout")
    assert layout is not None
    return index, scanner, layout


needs_fast_scan = pytest.mark.skipif(not __import__("tqindex.backends.fastscan").backends.fastscan.available(),
                                     reason="no SIMD fast scan on this machine")


@needs_fast_scan
def test_moving_to_the_cpu_keeps_the_fast_scan_layout():
    index, scanner, layout = _index_with_layout(4)
    index.to("cpu")
    assert scanner.cache.peek(index._segments[0], "layout") is layout


@needs_fast_scan
def test_removing_rows_keeps_the_fast_scan_layout():
    index, scanner, layout = _index_with_layout(5)
    index.remove([0, 1, 2])
    assert index._segments[0].deleted is not None
    assert scanner.cache.peek(index._segments[0], "layout") is layout
    assert 0 not in index.search(np.ones(32, np.float32), 500).ids


@pytest.mark.parametrize("partitions", [0, 16])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bits", [2, 4.4])
def test_concurrent_single_queries_equal_serial_results(bits, split, partitions, monkeypatch):
    """Four Python threads issuing single queries at once (the scan releases the GIL) get exactly
    the serial answers; `split`: each query's blocks are also split between the kernel's worker
    threads (eight threads shared by four callers), so several calls' shares are in flight at once;
    `partitions`: a partitioned index's single queries (probe and list scan in one call each)."""
    import threading
    from tqindex import native
    from tqindex.backends import fastscan
    rng = np.random.default_rng(9)
    x, q = clustered(rng, 4000, 64, clusters=50, queries=80)
    index = Index(dim=64, bits=bits, partitions=partitions)
    index.add(x)
    serial = [index.search(v, 10, nprobe=4 if partitions else None) for v in q]
    if split:
        monkeypatch.setattr(fastscan, "_BYTES_PER_SHARE", 1)
        monkeypatch.setattr(native, "_THREADS", 8)  # set_num_threads(8), undone after the test
    results = [None] * len(q)
    if partitions:
        index._view.lists()[2].clear()  # the snapshot's memo: the threads make the lists' entries at once

    def worker(part):
        for i in range(part, len(q), 4):
            results[i] = index.search(q[i], 10, nprobe=4 if partitions else None)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)


_RSS_PROBE = r"""
import numpy as np
from tqindex import Index

def rss():
    try:  # hand memory the allocator keeps after frees back to the OS, so RSS shows what is held
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

x = np.random.default_rng(0).standard_normal((200_000, 128)).astype(np.float32)
warm = Index(dim=128, bits=4)          # first use of torch, the kernels and the thread pool
warm.add(x[:2000]); warm.search(x[:3], 5)
before = rss()
index = Index(dim=128, bits=4, seed=1)
for start in range(0, len(x), 50_000):
    index.add(x[start:start + 50_000])
index.search(x[:3], 5)
print(rss() - before, index.memory_bytes())
"""


def test_memory_bytes_matches_resident_growth():
    """What memory_bytes() reports is what the process's resident set grew by (generous margins:
    allocators keep some freed memory, and the index's own arrays are all it adds)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, check=True).stdout
    growth, reported = map(int, out.split())
    assert 0.8 * reported <= growth <= 1.25 * reported + (8 << 20), (growth, reported)
