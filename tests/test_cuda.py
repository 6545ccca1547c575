"""GPU search against the CPU path (the CPU path is itself tested against the reference oracle).

Run wherever an NVIDIA GPU, a CUDA build of torch and CuPy exist; skipped elsewhere (conftest).
"""

import numpy as np
import pytest
import torch

from tqindex import Index, QuantizerOptions
from tqindex.backends import cuda as gpu_backend
from tqindex.backends.cuda import scanner as gpu_scanner

from conftest import assert_topk_matches

pytestmark = pytest.mark.cuda


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.uniform(0.5, 2, (n, 1))).astype(np.float32)


def _pair(d, bits, variant, metric, n, seed=0, **kw):
    """The same codes searched on the CPU and on the GPU: both indexes are encoded on the CPU (the
    GPU encoder, whose rotation rounds differently, is compared with it by the `gpu_add` tests)."""
    x = _data(n, d, seed)
    cpu = Index(dim=d, bits=bits, variant=variant, metric=metric, seed=3, **kw)
    cpu.add(x)
    gpu = Index(dim=d, bits=bits, variant=variant, metric=metric, seed=3, **kw)
    gpu.add(x)
    return x, cpu, gpu.to("cuda")


def _all_scores(index: Index, queries: np.ndarray) -> np.ndarray:
    """Every row's quantized score on the CPU path (k = n)."""
    res = index.search(queries, len(index))
    out = np.empty((len(queries), len(index)), dtype=np.float64)
    np.put_along_axis(out, res.ids, res.scores, axis=1)
    return out


def _expected_kernel(index: Index, nq: int) -> str:
    q = index._quantizer
    whole = q.variant == "mse" and len(q.groups) == 1 and q.groups[0].bits in (1, 2, 4)
    if whole and nq >= gpu_backend.GEMM_MIN_BATCH and index.metric != "l2":
        return "gemm"
    return "mma" if whole and nq >= gpu_backend.MMA_MIN_BATCH else "lut"


@pytest.fixture(params=["dense", "sampled"])
def budget(request, monkeypatch):
    """'sampled' shrinks the candidate budget so that thresholds come from a row sample and the
    buffers overflow and are rerun; 'dense' lets every row be emitted."""
    if request.param == "sampled":
        monkeypatch.setattr(gpu_backend.GpuScanner, "_budget_entries", staticmethod(lambda device: 2000))
        monkeypatch.setattr(gpu_scanner, "_CAP_FACTOR", 1)
        monkeypatch.setattr(gpu_scanner, "_CAP_SLACK", 0)
    return request.param


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("variant", ["mse", "prod"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("d", [97, 1000, 1536])
def test_gpu_equals_cpu(bits, variant, metric, d, budget):
    if variant == "prod" and bits == 1 and d == 1536:
        pytest.skip("covered at smaller d")
    x, cpu, gpu = _pair(d, bits, variant, metric, n=3001)
    queries = np.random.default_rng(1).standard_normal((37, d)).astype(np.float32)
    ref = _all_scores(cpu, queries)
    reruns = 0
    for nq in (1, 5, 37):
        for k in (1, 10, 1024):
            res = gpu.search(queries[:nq], k)
            stats = gpu._backend("cuda").last_stats
            assert stats["kernel"] == _expected_kernel(gpu, nq)
            assert stats["sampled"] == (budget == "sampled")
            reruns += stats["overflow_reruns"]
            assert_topk_matches(res.ids, res.scores, ref[:nq], rtol=1e-4, higher_is_better=metric != "l2")
    if budget == "sampled":
        assert reruns > 0  # buffers of ~k·step slots overflow: the rerun path was taken


@pytest.mark.parametrize("bits", [5, 4.48])
@pytest.mark.parametrize("codebook,version", [("vq", 2), ("vq", 1), ("scalar", 2)])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gpu_equals_cpu_for_5_bit_codebooks(bits, codebook, version, metric):
    """Bit-plane (vq, version 2) and Lloyd-Max 5-bit codes: the table kernel reads either codebook."""
    x, cpu, gpu = _pair(97, bits, "mse", metric, n=3001,
                        options=QuantizerOptions(codebook=codebook, codebook_version=version))
    assert gpu._quantizer.groups[0].plane == (codebook == "vq" and version == 2)
    queries = np.random.default_rng(2).standard_normal((37, 97)).astype(np.float32)
    ref = _all_scores(cpu, queries)
    for nq, k in ((1, 10), (37, 100)):
        res = gpu.search(queries[:nq], k)
        assert_topk_matches(res.ids, res.scores, ref[:nq], rtol=1e-4, higher_is_better=metric != "l2")


@pytest.mark.parametrize("variant,bits", [("mse", 2.52), ("prod", 3)])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gpu_equals_cpu_with_float16_scale(variant, bits, metric):
    x, cpu, gpu = _pair(97, bits, variant, metric, n=3001, scale_dtype="float16")
    queries = np.random.default_rng(1).standard_normal((37, 97)).astype(np.float32)
    ref = _all_scores(cpu, queries)
    res = gpu.search(queries, 10)
    assert_topk_matches(res.ids, res.scores, ref, rtol=1e-4, higher_is_better=metric != "l2")


@pytest.mark.parametrize("path", ["lut", "mma", "gemm"])
@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("d", [97, 1536])
@pytest.mark.parametrize("codebook", ["vq", "scalar"])
def test_each_path_equals_cpu(path, bits, metric, d, codebook, budget, monkeypatch):
    if path == "gemm" and metric == "l2":
        pytest.skip("the GEMM path serves ip and cosine")
    if codebook == "scalar" and (bits == 4 or d == 97):
        pytest.skip("the same codes as codebook='vq' (no block codebook at this width or odd group)")
    x, cpu, gpu = _pair(d, bits, "mse", metric, n=5003, codebook=codebook)
    gpu._backend("cuda").force = path
    queries = np.random.default_rng(7).standard_normal((150, d)).astype(np.float32)
    ref = _all_scores(cpu, queries)
    for nq, k in ((1, 10), (9, 1), (150, 10), (150, 700)):
        res = gpu.search(queries[:nq], k)
        assert gpu._backend("cuda").last_stats["kernel"] == path
        assert_topk_matches(res.ids, res.scores, ref[:nq], rtol=1e-4, higher_is_better=metric != "l2")


@pytest.mark.parametrize("path", ["mma", "gemm"])
def test_tensor_core_certificate_mostly_holds_and_its_fallback_is_exact(path, monkeypatch):
    x, cpu, gpu = _pair(384, 4, "mse", "ip", n=20_011)
    scanner = gpu._backend("cuda")
    scanner.force = path
    queries = np.random.default_rng(5).standard_normal((300, 384)).astype(np.float32)
    ref = _all_scores(cpu, queries[:40])
    res = gpu.search(queries, 10)
    assert scanner.last_stats["kernel"] == path
    assert scanner.last_stats["uncertified"] <= 3  # the bound is ~1e-3 of a score: rarely binding
    assert_topk_matches(res.ids[:40], res.scores[:40], ref, rtol=1e-4)
    # An error bound so large that no answer can be certified: every query must take the exact rerun.
    real = gpu_backend.GpuScanner._mma_error_bound
    monkeypatch.setattr(gpu_backend.GpuScanner, "_mma_error_bound",
                        lambda self, rotated, parts, **kw: real(self, rotated, parts, **kw) * 1e4)
    res = gpu.search(queries[:40], 10)
    assert scanner.last_stats["uncertified"] == 40
    assert_topk_matches(res.ids, res.scores, ref, rtol=1e-4)


def test_zero_and_huge_queries():
    x, cpu, gpu = _pair(128, 4, "mse", "ip", n=1000)
    queries = np.random.default_rng(4).standard_normal((16, 128)).astype(np.float32)
    queries[0] = 0
    queries[1] *= 1e30  # beyond float16: the kernel's queries are scaled to max |q_j| = 1 first
    ref = _all_scores(cpu, queries)
    res = gpu.search(queries, 5)
    assert np.isfinite(res.scores).all()
    assert_topk_matches(res.ids[1:], res.scores[1:], ref[1:], rtol=1e-4)
    np.testing.assert_array_equal(res.scores[0], 0)


@pytest.mark.parametrize("nq", [1, 16, 256, 4096, 10_000])
def test_many_queries_and_device_arrays(nq):
    x, cpu, gpu = _pair(384, 4, "mse", "ip", n=20_011)
    queries = np.random.default_rng(2).standard_normal((nq, 384)).astype(np.float32)
    ref = cpu.search(queries, 10)
    res = gpu.search(torch.from_numpy(queries).cuda(), 10)
    assert res.ids.device.type == "cuda"  # results come back as the caller's kind of array
    np.testing.assert_allclose(res.scores.cpu().numpy(), ref.scores, rtol=1e-4, atol=1e-5)
    agree = np.mean(res.ids.cpu().numpy() == ref.ids)
    assert agree > 0.99  # the rest are near-ties within float rounding


def test_cupy_queries_stay_on_the_device():
    cupy = pytest.importorskip("cupy")
    x, cpu, gpu = _pair(97, 2, "mse", "cosine", n=2000)
    queries = np.random.default_rng(3).standard_normal((20, 97)).astype(np.float32)
    res = gpu.search(cupy.asarray(queries), 7)
    assert isinstance(res.ids, cupy.ndarray)
    assert_topk_matches(cupy.asnumpy(res.ids), cupy.asnumpy(res.scores), _all_scores(cpu, queries))


def test_torch_scan_on_the_gpu_still_matches(monkeypatch):
    monkeypatch.setenv("TQINDEX_CUDA_KERNELS", "0")
    x, cpu, gpu = _pair(97, 3, "prod", "l2", n=3001)
    queries = np.random.default_rng(1).standard_normal((9, 97)).astype(np.float32)
    res = gpu.search(queries, 10)
    assert_topk_matches(res.ids, res.scores, _all_scores(cpu, queries), higher_is_better=False)


def test_gpu_sees_removals_and_appends(budget):
    # l2: each appended copy of a removed row is its own query's nearest row (distance 0).
    x, cpu, gpu = _pair(64, 4, "mse", "l2", n=2000, keep_vectors=True)
    gpu.remove(np.arange(100))
    gpu.add(x[:5], ids=[10_000, 10_001, 10_002, 10_003, 10_004])
    res = gpu.search(x[:5], 3, rerank=4)
    assert res.ids[:, 0].tolist() == [10_000, 10_001, 10_002, 10_003, 10_004]
    for nq in (3, 50):
        assert not np.isin(np.arange(100), gpu.search(x[:nq], 50).ids).any()
    cpu.remove(np.arange(100))
    cpu.add(x[:5], ids=[10_000, 10_001, 10_002, 10_003, 10_004])
    queries = np.random.default_rng(6).standard_normal((12, 64)).astype(np.float32)
    ref = cpu.search(queries, 1950)
    res = gpu.search(queries, 1950)  # more than the 1905 live rows: padded with -1 / inf
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-4, atol=1e-4)
    assert (res.ids[:, 1905:] == -1).all() and (res.ids[:, :1905] >= 0).all()


def test_error_without_cupy_names_it(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("no cupy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="CuPy"):
        Index(dim=8, bits=4, device="cuda")


# -- indexing on the GPU ------------------------------------------------------------------------

def _segment(index: Index):
    (segment,) = index._view.segments
    return segment


def _unit_rotated64(index: Index, x: np.ndarray) -> np.ndarray:
    """Πx/‖x‖ in float64 (the reference the two encoders round differently)."""
    x64 = x.astype(np.float64)
    x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    return index._quantizer.rotation.apply(torch.from_numpy(x64)).numpy()


@pytest.mark.parametrize("bits,variant,codebook", [(1, "mse", "vq"), (2, "mse", "vq"), (2, "mse", "scalar"),
                                                   (3, "mse", "vq"), (4, "mse", "vq"), (5, "mse", "vq"),
                                                   (5, "mse", "scalar"), (2.5, "mse", "vq"), (3, "prod", "vq")])
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_gpu_add_codes_equal_cpu_add(bits, variant, codebook, metric, monkeypatch):
    """`add` on a CUDA index rotates and codes on the GPU: the codes are the CPU encoder's except
    where a coordinate sits within rounding of a decision boundary (then both choices are equally
    near), and the per-vector floats agree to float rounding."""
    from tqindex import quantizer as quantizer_module
    monkeypatch.setattr(quantizer_module, "_DEVICE_CHUNK_BYTES", 4 * 384 * 96)  # 96-row chunks, the last partial
    d, n = 384, 3001
    x = _data(n, d, seed=11)
    kw = dict(dim=d, bits=bits, variant=variant, metric=metric, seed=3, codebook=codebook)
    cpu = Index(**kw)
    cpu.add(x)
    gpu = Index(**kw, device="cuda")
    gpu.add(x)
    q = cpu._quantizer
    a, b = _segment(cpu).encoded, _segment(gpu).encoded
    assert (a.blocks is None) == (b.blocks is None) == (variant == "prod")
    idx_a, idx_b = q.unpack(q.row_codes(a)), q.unpack(q.row_codes(b))
    rows = np.flatnonzero((idx_a != idx_b).any(axis=1))
    assert len(rows) <= n // 500, f"{len(rows)} rows coded differently"
    if len(rows):  # both choices equally near the float64 point, within rounding
        y = _unit_rotated64(cpu, x[rows])
        err = [((y - q.rotated_reconstruction(torch.from_numpy(_pack(q, codes))).numpy()) ** 2).sum(axis=1)
               for codes in (idx_a[rows], idx_b[rows])]
        np.testing.assert_allclose(err[1], err[0], rtol=0, atol=1e-7)
    same = np.setdiff1d(np.arange(n), rows)
    for name in ("norm", "scale", "residual_norm"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            np.testing.assert_allclose(vb[same], va[same], rtol=1e-4 if name == "residual_norm" else 1e-5,
                                       err_msg=name)
    if variant == "prod":
        assert np.mean(a.qjl[same] != b.qjl[same]) < 1e-2


def _pack(q, idx: np.ndarray) -> np.ndarray:
    """Per-coordinate codes (n, d) → packed rows (n, code_bytes)."""
    from tqindex.packing import pack_codes
    out = np.zeros((len(idx), q.code_bytes), np.uint8)
    for g in q.groups:
        out[:, g.offset:g.offset + g.nbytes] = pack_codes(idx[:, g.start:g.stop], g.bits)
    return out


@pytest.mark.parametrize("bits", [2, 4, 3.5])
def test_gpu_added_index_searches_saves_and_loads_as_one(bits, tmp_path):
    """What the GPU encoder wrote is what every path reads: the GPU search, the CPU search of the
    same index, and the index saved and loaded."""
    x = _data(5003, 384, seed=12)
    gpu = Index(dim=384, bits=bits, seed=3, device="cuda")
    gpu.add(torch.from_numpy(x).cuda())  # a CUDA tensor: no copy to the host on the way in
    gpu.add(x[:777])  # numpy: copied up, coded there (ids 5003.., positions as `_all_scores` reads them)
    queries = np.random.default_rng(8).standard_normal((40, 384)).astype(np.float32)
    on_gpu = gpu.search(queries, 10)
    ref = _all_scores(gpu.to("cpu"), queries)  # the very same codes, scanned on the CPU
    assert_topk_matches(on_gpu.ids, on_gpu.scores, ref, rtol=1e-4)
    gpu.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx", device="cuda")
    again = loaded.search(queries, 10)
    assert_topk_matches(again.ids, again.scores, ref, rtol=1e-4)
    for s_a, s_b in zip(gpu._view.segments, loaded._view.segments):
        np.testing.assert_array_equal(np.asarray(s_b.encoded.blocks), s_a.encoded.blocks)
