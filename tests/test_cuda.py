"""GPU search against the CPU path (the CPU path is itself tested against the reference oracle).

Run wherever an NVIDIA GPU and a CUDA build of torch exist; skipped elsewhere (conftest).
"""

import numpy as np
import pytest
import torch

from tqindex import Index

from conftest import assert_topk_matches

pytestmark = pytest.mark.cuda


def _pair(d, bits, variant, metric, n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 2, (n, 1))).astype(np.float32)
    cpu = Index(dim=d, bits=bits, variant=variant, metric=metric, seed=3, **kw)
    cpu.add(x)
    gpu = Index(dim=d, bits=bits, variant=variant, metric=metric, seed=3, device="cuda", **kw)
    gpu.add(x)
    return x, cpu, gpu


def _all_scores(index: Index, queries: np.ndarray) -> np.ndarray:
    """Every row's quantized score on the CPU path (k = n)."""
    res = index.search(queries, len(index))
    out = np.empty((len(queries), len(index)), dtype=np.float64)
    np.put_along_axis(out, res.ids, res.scores, axis=1)
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("variant", ["mse", "prod"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("d", [97, 1000, 1536])
def test_gpu_equals_cpu(bits, variant, metric, d):
    if variant == "prod" and bits == 1 and d == 1536:
        pytest.skip("covered at smaller d")
    x, cpu, gpu = _pair(d, bits, variant, metric, n=3001)
    queries = np.random.default_rng(1).standard_normal((37, d)).astype(np.float32)
    ref = _all_scores(cpu, queries)
    for k in (1, 10, 1024):
        res = gpu.search(queries, k)
        assert_topk_matches(res.ids, res.scores, ref, rtol=1e-4, higher_is_better=metric != "l2")


@pytest.mark.parametrize("variant,bits", [("mse", 2.52), ("prod", 3)])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gpu_equals_cpu_with_float16_scale(variant, bits, metric):
    x, cpu, gpu = _pair(97, bits, variant, metric, n=3001, scale_dtype="float16")
    queries = np.random.default_rng(1).standard_normal((37, 97)).astype(np.float32)
    ref = _all_scores(cpu, queries)
    res = gpu.search(queries, 10)
    assert_topk_matches(res.ids, res.scores, ref, rtol=1e-4, higher_is_better=metric != "l2")


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


def test_gpu_sees_removals_and_appends():
    x, cpu, gpu = _pair(64, 4, "mse", "ip", n=2000, keep_vectors=True)
    gpu.remove(np.arange(100))
    gpu.add(x[:5], ids=[10_000, 10_001, 10_002, 10_003, 10_004])
    res = gpu.search(x[:5], 3, rerank=4)
    assert res.ids[:, 0].tolist() == [10_000, 10_001, 10_002, 10_003, 10_004]
    assert not np.isin(np.arange(100), gpu.search(x[:50], 50).ids).any()
