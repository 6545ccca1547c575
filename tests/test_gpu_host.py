"""The GPU search's host side, run on the CPU: kernel layout, query tables, sampled thresholds,
buffer overflow reruns, the tensor-core error certificate and the GEMM path's merging.

The CUDA kernels are replaced by torch transcriptions of their contracts (kernels/tq_scan.cu):
they decode the codes from the GPU word layout the host builds, so the layout is checked too.
The kernels themselves are compared with the CPU scan in test_cuda.py, on a GPU.
"""

import numpy as np
import pytest
import torch

from tqindex import Index
from tqindex.backends import cuda as gpu_backend
from tqindex.backends.cuda import GpuScanner, kernel_source, regions
from tqindex.backends.cuda import scanner as gpu_scanner

from conftest import assert_topk_matches


def _unit_values(data: dict, region, n: int) -> torch.Tensor:
    """(n, units) unit values of a region, read back from the interleaved words."""
    words = data["words"].permute(1, 0, 2).reshape(n, -1).numpy().view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    span = bits[:, 32 * region.woff:32 * region.woff + 32 * region.chunks * region.bits].astype(np.int64)
    return torch.from_numpy((span.reshape(n, -1, region.unit) << np.arange(region.unit)).sum(-1))


def _byte_decoded(scanner: GpuScanner, data: dict, half: bool = True) -> torch.Tensor:
    """(n, 8/b · code bytes) what the fused kernel dequantizes: each code byte read back from the
    words and mapped through the byte table (fp16; or the float32 one it was rounded from)."""
    n = data["n"]
    raw = data["words"].permute(1, 0, 2).reshape(n, -1).contiguous().view(torch.uint8)
    raw = raw[:, :scanner.regions[0].src_nbytes].long()
    table = scanner._device_tables(torch.device("cpu"))["byte_table"] if half else \
        scanner._decoder.tables(torch.device("cpu"))["byte_tables"][0]
    return table[raw].reshape(n, -1).float()


def fake_launch_scan(self, prep, part, qsq, tau, use_mma, step, count, cap, dense_offset, counts, scores, pos):
    data, offset, deleted = part
    n, nq = data["n"], qsq.shape[0]
    if use_mma:  # fp16 operands, fp32 sums: the approximation the certificate has to cover
        deq = _byte_decoded(self, data)
        qh = prep["qh"][:nq, :deq.shape[1]].float()
        s = (qh @ deq.T) * prep["qmul"][:, None] * data["scale"]
    else:
        acc, accq = torch.zeros(nq, n), torch.zeros(nq, n)
        for r in self.regions:
            values = _unit_values(data, r, n)
            index = r.loff + torch.arange(values.shape[1])[None, :] * (1 << r.unit) + values
            part_sum = prep["luts"][:, index.reshape(-1)].reshape(nq, n, -1).sum(-1)
            if r.qjl:
                accq += part_sum
            else:
                acc += part_sum
        s = acc * data["scale"]
        if data["qjlmul"] is not None:
            s = s + accq * (data["qjlmul"] * data["scale"])
    if data["normsq"] is not None:
        s = 2 * s - data["normsq"] - qsq[:, None]
    rows = torch.arange(count) * step
    s = s[:, rows]
    live = torch.ones(count, dtype=torch.bool) if deleted is None else ~deleted.bool()[rows]
    if dense_offset >= 0:
        scores[:, dense_offset:dense_offset + count] = torch.where(live, s, -torch.inf)
        pos[:, dense_offset:dense_offset + count] = rows + offset
        return
    for q in range(nq):
        hit = torch.nonzero(live & (s[q] >= tau[q])).flatten()
        first = int(counts[q])
        kept = hit[:max(0, cap - first)]
        scores[q, first:first + len(kept)] = s[q, kept]
        pos[q, first:first + len(kept)] = kept + offset
        counts[q] += len(hit)


def fake_dequant(self, data, start, rows, out, inv_smax):
    """tq_dequant's contract: each code byte through the float32 byte table, times scale / S, to fp16."""
    deq = _byte_decoded(self, data, half=False)[start:start + rows]
    out[:rows, :deq.shape[1]] = (deq * (data["scale"][start:start + rows] * inv_smax)[:, None]).half()


@pytest.fixture
def fake_kernels(monkeypatch):
    monkeypatch.setattr(GpuScanner, "_launch_scan", fake_launch_scan)
    monkeypatch.setattr(GpuScanner, "_dequant", fake_dequant)
    monkeypatch.setattr(GpuScanner, "_budget_entries", staticmethod(lambda device: 10 ** 8))


def _index_and_reference(d, bits, variant, metric, nq=12, codebook="vq"):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3001, d)) * rng.uniform(0.5, 2, (3001, 1))).astype(np.float32)
    index = Index(dim=d, bits=bits, variant=variant, metric=metric, seed=3, codebook=codebook)
    index.add(x)
    index.remove(np.arange(0, 3001, 7))
    index.add(x[:40], ids=np.arange(5000, 5040))  # a second segment
    queries = rng.standard_normal((nq, d)).astype(np.float32)
    res = index.search(queries, len(index))  # the CPU scan: every row's score
    ref = np.full((nq, 5040), np.inf if metric == "l2" else -np.inf)
    np.put_along_axis(ref, res.ids, res.scores, axis=1)
    if metric == "cosine":
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return index, queries, ref


def _gpu_search(index, queries, k, path=None):
    """(ids, scores, the scanner's stats) of a GpuScanner search on the CPU, `path` forced."""
    scanner = GpuScanner(index._quantizer, index.metric)
    scanner.force = path
    q = torch.from_numpy(queries)
    rotated, projected = index._quantizer.prepare_queries(q)
    scores, positions = scanner.search(index._segments, rotated, projected, q.square().sum(1), k)
    ids = index._ids.ids_at(positions.numpy())
    sign = -1 if index.metric == "l2" else 1
    return ids, sign * scores.numpy(), scanner.last_stats


# d = 97 leaves 1- and 2-bit groups of odd length scalar under codebook="vq"; d = 96 gives them
# block codebooks (2 or 4 coordinates per codeword).
@pytest.mark.parametrize("variant,bits,metric,path,d,codebook", [
    ("mse", 4, "ip", "lut", 97, "vq"), ("mse", 3, "l2", "lut", 97, "vq"), ("mse", 2.52, "cosine", "lut", 97, "vq"),
    ("prod", 3, "ip", "lut", 97, "vq"), ("prod", 2, "l2", "lut", 97, "vq"), ("mse", 4, "ip", "mma", 97, "vq"),
    ("mse", 2, "l2", "mma", 97, "vq"), ("mse", 1, "cosine", "mma", 97, "vq"), ("mse", 4, "ip", "gemm", 97, "vq"),
    ("mse", 2, "cosine", "gemm", 97, "vq"), ("mse", 2, "ip", "lut", 96, "vq"), ("mse", 1, "cosine", "lut", 96, "vq"),
    ("prod", 3, "cosine", "lut", 96, "vq"), ("mse", 2.5, "ip", "lut", 96, "vq"), ("mse", 2, "l2", "mma", 96, "vq"),
    ("mse", 1, "ip", "mma", 96, "vq"), ("mse", 2, "ip", "gemm", 96, "vq"), ("mse", 1, "cosine", "gemm", 96, "vq"),
    ("mse", 2, "ip", "gemm", 96, "scalar")])
@pytest.mark.parametrize("sampled", [False, True])
def test_host_pipeline_equals_cpu_scan(fake_kernels, monkeypatch, variant, bits, metric, path, d, codebook, sampled):
    if sampled:  # thresholds from a row sample, tiny buffers that overflow and are rerun
        monkeypatch.setattr(GpuScanner, "_budget_entries", staticmethod(lambda device: 2000))
        monkeypatch.setattr(gpu_scanner, "_CAP_FACTOR", 1)
        monkeypatch.setattr(gpu_scanner, "_CAP_SLACK", 0)
    index, queries, ref = _index_and_reference(d, bits, variant, metric, codebook=codebook)
    assert any(g.block > 1 for g in index._quantizer.groups) == (d == 96 and codebook == "vq")
    reruns = 0
    for nq, k in ((1, 1), (12, 10), (12, 300), (3, 2700)):  # 2700: more than the live rows
        ids, scores, stats = _gpu_search(index, queries[:nq], k, path)
        assert stats["kernel"] == path
        reruns += stats["overflow_reruns"]
        live = len(index)
        assert (ids[:, min(k, live):] == -1).all()
        assert_topk_matches(ids[:, :min(k, live)], scores[:, :min(k, live)], ref[:nq],
                            higher_is_better=metric != "l2")
    if sampled and path != "gemm":
        assert stats["sampled"] and reruns > 0


def test_failed_certificates_fall_back_to_the_exact_scan(fake_kernels, monkeypatch):
    index, queries, ref = _index_and_reference(97, 4, "mse", "ip")
    real = GpuScanner._mma_error_bound
    monkeypatch.setattr(GpuScanner, "_mma_error_bound", lambda self, *a, **kw: real(self, *a, **kw) * 1e4)
    ids, scores, stats = _gpu_search(index, queries, 10, "mma")
    assert stats["uncertified"] == len(queries)
    assert_topk_matches(ids, scores, ref)


def test_error_bound_covers_fp16_rounding():
    """The bound must exceed the actual difference between fp16-operand and float32 scores."""
    rng = np.random.default_rng(1)
    for d, bits, codebook in ((97, 4, "vq"), (1536, 2, "vq"), (300, 1, "vq"), (1536, 2, "scalar"), (300, 1, "scalar")):
        index = Index(dim=d, bits=bits, seed=2, codebook=codebook)
        index.add(rng.standard_normal((500, d)).astype(np.float32) * 30)
        scanner = GpuScanner(index._quantizer, "ip")
        data = scanner.segment_data(index._segments[0], torch.device("cpu"))
        q = torch.from_numpy(rng.standard_normal((20, d)).astype(np.float32)) * rng.uniform(1e-3, 1e3)
        rotated, _ = index._quantizer.prepare_queries(q)
        prep = scanner._prepare_mma(rotated)
        exact = (rotated.double() @ _byte_decoded(scanner, data, half=False)[:, :d].double().T) \
            * data["scale"].double()
        approx = (prep["qh"][:20, :d].double() @ _byte_decoded(scanner, data)[:, :d].double().T) \
            * prep["qmul"].double()[:, None] * data["scale"].double()
        bound = scanner._mma_error_bound(rotated, [(data, 0, None)]).double()
        worst = ((approx - exact).abs().amax(dim=1) / bound).max()
        assert 0 < worst < 1, f"d={d} bits={bits}: error / bound = {worst:.3f}"


def test_layout_and_kernel_source():
    source = kernel_source()  # found through importlib.resources (package data), not a path guess
    assert all(f" {name}(" in source for name in ("tq_lut_scan", "tq_mma_scan", "tq_dequant"))
    for d, bits, variant in ((97, 3, "mse"), (1536, 4, "mse"), (1000, 2.52, "mse"), (130, 3, "prod"), (64, 1, "prod")):
        q = Index(dim=d, bits=bits, variant=variant)._quantizer
        regs = regions(q)
        assert [r.qjl for r in regs] == [False] * len(q.groups) + [True] * (variant == "prod")
        for r, nxt in zip(regs, regs[1:] + [None]):
            assert r.woff % 4 == 0 and r.words >= r.chunks * r.bits and r.chunks * 32 >= r.stop - r.start
            if nxt is not None:
                assert nxt.woff == r.woff + r.words and nxt.loff == r.loff + r.lut_floats


@pytest.mark.parametrize("path,codebook", [("lut", "vq"), ("mma", "vq"), ("lut", "scalar"), ("mma", "scalar"),
                                           ("gemm", "vq"), ("gemm", "scalar")])
def test_removed_segments_zero_vectors_and_short_indexes(fake_kernels, monkeypatch, path, codebook):
    rng = np.random.default_rng(3)
    index = Index(dim=40, bits=2, metric="ip", codebook=codebook)
    index.add(rng.standard_normal((50, 40)).astype(np.float32))
    index.remove(np.arange(50))                      # a segment with no live row
    index.add(np.zeros((3, 40), dtype=np.float32))   # scale 0: every score 0
    index.add(rng.standard_normal((4, 40)).astype(np.float32))
    queries = rng.standard_normal((9, 40)).astype(np.float32)
    ids, scores, _ = _gpu_search(index, queries, 20, path)
    ref = index.search(queries, 20)                  # the CPU scan
    np.testing.assert_array_equal(ids[:, 7:], -1)
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-4, atol=1e-6)
    for row, ref_row in zip(ids[:, :7], ref.ids[:, :7]):
        assert set(row) == set(ref_row)


def test_path_choice_by_batch_size_codebook_and_metric():
    """Large batches take the GEMM path for either codebook (tq_dequant reads byte tables); l2 and
    prod never do, and forcing a path an index cannot take raises."""
    for codebook in ("vq", "scalar"):
        scanner = GpuScanner(Index(dim=96, bits=2, codebook=codebook)._quantizer, "ip")
        assert [scanner.path_for(nq) for nq in (1, gpu_backend.MMA_MIN_BATCH, gpu_backend.GEMM_MIN_BATCH)] == \
            ["lut", "mma", "gemm"]
    l2 = GpuScanner(Index(dim=96, bits=2, metric="l2")._quantizer, "l2")
    prod = GpuScanner(Index(dim=96, bits=3, variant="prod")._quantizer, "ip")
    assert l2.path_for(4096) == "mma" and prod.path_for(4096) == "lut"
    l2.force, prod.force = "gemm", "mma"
    with pytest.raises(ValueError, match="gemm"):
        l2.path_for(4096)
    with pytest.raises(ValueError, match="mma"):
        prod.path_for(4096)
