"""The compiled kernels (tqindex/_native.c) against the torch paths they replace.

Encoding must give the same codes bit for bit; the fast scan must give the torch scan's top k
(tie-aware, float rounding only), whatever the metric, deletions, segments and thread split.
"""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from tqindex import Index, native
from tqindex.backends import fastscan
from tqindex.layout import block_count
from tqindex.backends.torch_scan import BlockDecoder, scan_topk
from tqindex.packing import pack_codes, unpack_codes
from tqindex.quantizer import TurboQuantizer

from conftest import assert_topk_matches, clustered

needs_native = pytest.mark.skipif(native.kernels is None, reason="the C extension is not built")
needs_avx2 = pytest.mark.skipif(not fastscan.available(), reason="no AVX2 fast scan on this machine")


def test_extension_is_built_where_a_compiler_exists():
    # The extension is optional so installs without a compiler still work; where one exists (CI
    # included) a missing build is a packaging bug that would leave the kernels untested.
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.kernels is not None, "tqindex._native was not built: pip install -e . should compile it"


@pytest.fixture
def torch_only(monkeypatch):
    monkeypatch.setenv("TQINDEX_NATIVE", "0")


@needs_native
@pytest.mark.parametrize("d", [3, 97, 1000])
@pytest.mark.parametrize("bits,codebook", [(1, "scalar"), (2, "scalar"), (3, "scalar"), (4, "scalar"), (5, "scalar"),
                                           (8, "scalar"), (2.5, "scalar"), (3.3, "scalar"), (1, "vq"), (2, "vq"),
                                           (2.5, "vq"), (1.3, "vq")])
def test_native_encode_equals_torch(d, bits, codebook, monkeypatch):
    rng = np.random.default_rng(int(d * 10 + bits * 3))
    x = torch.from_numpy((rng.standard_normal((700, d)) * rng.uniform(0.1, 5, (700, 1))).astype(np.float32))
    q = TurboQuantizer(dim=d, bits=bits, seed=3, codebook=codebook)
    fast = q.encode(x)
    monkeypatch.setenv("TQINDEX_NATIVE", "0")
    slow = q.encode(x)
    np.testing.assert_array_equal(fast.codes, slow.codes)
    np.testing.assert_array_equal(fast.norm, slow.norm)
    # ⟨y, ỹ⟩ is summed in float64 by the kernel and in float32 by torch.
    np.testing.assert_allclose(fast.scale, slow.scale, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("d", [97, 1000])
@pytest.mark.parametrize("bits,codebook", [(2, "vq"), (3, "vq"), (3, "scalar"), (3.5, "vq"), (1, "vq")])
def test_native_encode_equals_torch_for_prod(d, bits, codebook, monkeypatch):
    """prod's mse stage is encoded in C too; its residual, QJL signs and ‖r‖ then follow in torch."""
    rng = np.random.default_rng(int(d + bits * 7))
    x = torch.from_numpy((rng.standard_normal((300, d)) * rng.uniform(0.1, 5, (300, 1))).astype(np.float32))
    q = TurboQuantizer(dim=d, bits=bits, variant="prod", seed=4, codebook=codebook)
    fast = q.encode(x)
    monkeypatch.setenv("TQINDEX_NATIVE", "0")
    slow = q.encode(x)
    np.testing.assert_array_equal(fast.codes, slow.codes)
    np.testing.assert_array_equal(fast.qjl, slow.qjl)
    np.testing.assert_array_equal(fast.residual_norm, slow.residual_norm)
    np.testing.assert_array_equal(fast.scale, slow.scale)


@needs_native
@pytest.mark.parametrize("bits", [1, 2])
def test_native_block_encode_on_ties(bits):
    """Exact ties: a codebook with duplicated codewords (5 = 9, 3 = 12), blocks on and near them.
    The lowest index must win, in C as in the torch encoder (a kernel returning the last minimum
    fails here)."""
    import dataclasses

    (g,) = TurboQuantizer(dim=32, bits=bits, codebook="vq").groups
    w = g.codewords.clone()
    w[9], w[12] = w[5], w[3]
    g = dataclasses.replace(g, codewords=w)
    gen = torch.Generator().manual_seed(bits)
    near = [w[5], w[3], w[5] + 1e-4, w[3] - 1e-4, w[7], torch.zeros(g.block)]
    y = torch.stack([torch.cat([near[i] for i in torch.randint(len(near), (32 // g.block,), generator=gen)])
                     for _ in range(40)])
    expected = pack_codes(g.nearest(y).to(torch.uint8), bits).numpy()
    codes = np.zeros_like(expected)
    alignment = np.zeros(40, np.float32)
    native.kernels.encode(y.numpy(), 32, 40, [(0, 32, bits, 0, g.boundaries.numpy(), g.centroids.numpy(), g.block,
                                               w.numpy())], codes, alignment)
    np.testing.assert_array_equal(codes, expected)
    words = unpack_codes(torch.from_numpy(codes), bits, 32).long().reshape(40, -1, g.block)
    index = sum(words[:, :, t] << (t * bits) for t in range(g.block))
    assert not np.isin(index.numpy(), [9, 12]).any()  # the duplicates' higher indices never win
    assert (index[(y.reshape(40, -1, g.block) == w[5]).all(dim=2)] == 5).all()
    np.testing.assert_allclose(alignment, (y * g.reconstruct(unpack_codes(torch.from_numpy(codes), bits, 32))).sum(1),
                               rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
def test_native_encode_on_boundaries(bits):
    # Values exactly on a decision boundary go to the lower cell (torch.bucketize's rule), and
    # values beyond the outer centroids to the end cells.
    q = TurboQuantizer(dim=16, bits=bits, codebook="scalar")
    (g,) = q.groups
    values = torch.cat([g.boundaries, g.centroids, torch.tensor([-1.0, 1.0, 0.0, -0.0])])
    y = values[torch.randint(len(values), (64, 16), generator=torch.Generator().manual_seed(bits))]
    expected = pack_codes(torch.bucketize(y, g.boundaries).to(torch.uint8), bits).numpy()
    codes = np.zeros_like(expected)
    alignment = np.zeros(64, np.float32)
    native.kernels.encode(y.numpy(), 16, 64, [(0, 16, bits, 0, g.boundaries.numpy(), g.centroids.numpy())],
                          codes, alignment)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_allclose(alignment, (y * g.centroids[torch.bucketize(y, g.boundaries)]).sum(1).numpy(),
                               rtol=1e-5, atol=1e-6)


@needs_native
def test_native_encode_rejects_bad_buffers():
    g = TurboQuantizer(dim=8, bits=2, codebook="scalar").groups[0]
    spec = [(0, 8, 2, 0, g.boundaries.numpy(), g.centroids.numpy())]
    y = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="y"):
        native.kernels.encode(y[:3], 8, 4, spec, np.zeros((4, 2), np.uint8), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="too small"):
        native.kernels.encode(y, 8, 4, spec, np.zeros((4, 1), np.uint8), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="boundaries"):
        native.kernels.encode(y, 8, 4, [(0, 8, 2, 0, g.centroids.numpy(), g.centroids.numpy())],
                              np.zeros((4, 2), np.uint8), np.zeros(4, np.float32))


def _oracle_tables(quantizer, q):
    """float64 tables by direct enumeration of each nibble's codes (independent of the kernel), in
    the kernel's order: one 16-entry table per nibble (a 5-bit group's padded with zero tables to a
    multiple of 8 nibbles; an even count in all), then the tables of codes 16-31 of the 5-bit
    nibbles. Returns (tables (nibbles, 16), the number of 5-bit nibbles)."""
    tables, upper = [], []
    for g in quantizer.groups:
        if g.plane:  # c[2n + p] = c[2n] + p·step: the high bits' 4-bit tables, then the low bits as 1-bit codes
            low = g.centroids.numpy()[0::2].astype(np.float64)
            tables += [[q[j] * low[v] for v in range(16)] for j in range(g.start, g.stop)]
            tables += [[sum(q[jj] * g.kind.step * ((v >> t) & 1) for t, jj in enumerate(range(j, min(j + 4, g.stop))))
                        for v in range(16)] for j in range(g.start, g.stop, 4)]
            continue
        per = 4 // g.bits if g.bits in (1, 2) else 1
        c = g.centroids.numpy().astype(np.float64)
        words = g.codewords.numpy().astype(np.float64)
        for j in range(g.start, g.stop, per):
            coords = list(range(j, min(j + per, g.stop)))
            if g.block > 1:  # nibble value v is codeword v
                tables.append([sum(q[jj] * words[v, t] for t, jj in enumerate(coords)) for v in range(16)])
            else:
                tables.append([sum(q[jj] * c[(v >> (t * g.bits)) & ((1 << g.bits) - 1)]
                                   for t, jj in enumerate(coords)) for v in range(16)])
            if g.bits == 5:
                upper.append([q[j] * c[16 + v] for v in range(16)])
        while g.bits == 5 and len(upper) % 8:
            tables.append([0.0] * 16)
            upper.append([0.0] * 16)
    if len(tables) % 2:
        tables.append([0.0] * 16)
    return np.array(tables + upper), len(upper)


@needs_native
@pytest.mark.parametrize("d,bits", [(3, 1), (3, 4), (97, 2), (97, 3), (50, 2.5), (384, 4), (200, 3.75), (13, 1.4),
                                    (97, 5), (200, 4.33), (13, 4.5), (96, 2), (200, 1), (98, 2.5)])
@pytest.mark.parametrize("codebook", ["scalar", "vq"])
def test_query_tables_match_oracle_and_bound_the_rounding(d, bits, codebook):
    quantizer = TurboQuantizer(dim=d, bits=bits, seed=1, codebook=codebook)
    rng = np.random.default_rng(d)
    q = rng.standard_normal((6, d)).astype(np.float32)
    luts, fluts, delta, bias, tol, magnitude = fastscan.quantized_luts(quantizer, torch.from_numpy(q))
    for i in range(len(q)):
        oracle, wide = _oracle_tables(quantizer, q[i].astype(np.float64))
        np.testing.assert_allclose(fluts[i], oracle, rtol=1e-5, atol=1e-6 * np.abs(oracle).max())
        # A 5-bit nibble's two tables are one table of 32 entries.
        main = len(oracle) - wide
        entries = np.concatenate([oracle[:main], np.full((main, 16), np.nan)], axis=1)
        entries[:wide, 16:] = oracle[main:]
        quantized = np.concatenate([luts[i][:main], np.zeros((main, 16), np.uint8)], axis=1).astype(np.float64)
        quantized[:wide, 16:] = luts[i][main:]
        shift = np.nanmin(entries, axis=1, keepdims=True)
        np.testing.assert_allclose(delta[i], np.nanmax(entries - shift) / native.kernels.LUT_MAX, rtol=1e-5)
        np.testing.assert_allclose(bias[i], shift.sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(magnitude[i], np.nanmax(np.abs(entries), axis=1).sum(), rtol=1e-5)
        assert np.nanmax(np.abs(quantized - np.round((entries - shift) / delta[i]))) <= 1
        # The bound: any choice of one value per nibble moves the sum by at most tol.
        worst = np.abs(quantized * np.float64(delta[i]) + shift - entries)
        assert np.nanmax(worst, axis=1).sum() <= tol[i] * (1 + 1e-4) + 1e-7


@needs_native
@pytest.mark.parametrize("d,bits", [(97, 2), (384, 4), (200, 3.75), (97, 5), (13, 1.4)])
@pytest.mark.parametrize("codebook", ["scalar", "vq"])
def test_query_tables_portable_loop_equals_the_simd_one(d, bits, codebook):
    # ARM builds quantize the tables with the portable loop; on x86 it can be asked for, and must give
    # what SSE2 gives, bit for bit (the same float operations), and so must AVX-512 where the CPU has
    # it (one register a nibble; capped to avx2, the SSE2 loop runs).
    quantizer = TurboQuantizer(dim=d, bits=bits, seed=2, codebook=codebook)
    q = np.random.default_rng(d).standard_normal((5, d)).astype(np.float32)
    rotated = quantizer.prepare_queries(torch.from_numpy(q))[0].numpy()
    ncols, wcols = quantizer.layout.ncols, quantizer.layout.wcols
    groups = [(p.start, p.stop, p.spec.bits, p.spec.per, p.spec.centroids)
              + (() if p.spec.codewords is None else (p.spec.codewords,)) for p in quantizer.layout.parts]
    outs = []
    levels = ["avx512", "avx2"] if _X86_LEVELS["avx512"] <= _cpu_flags() else [None]
    for level, portable in [(level, False) for level in levels] + [(None, True)]:
        out = (np.empty((5, 2 * (ncols + wcols), 16), np.uint8), np.empty((5, 2 * (ncols + wcols), 16), np.float32),
               *(np.empty(5, np.float32) for _ in range(4)))
        previous = native.set_simd_limit(level) if level else None
        try:
            native.kernels.tables(rotated, d, 5, groups, ncols, *out, wcols, portable)
        finally:
            if level:
                native.set_simd_limit(previous)
        outs.append(out)
    for other in outs[1:]:
        for simd, loop in zip(outs[0], other):
            np.testing.assert_array_equal(simd, loop)


def _torch_scan(index, queries, k):
    q = torch.from_numpy(queries)
    if index.metric == "cosine":
        q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    rotated, _ = index._quantizer.prepare_queries(q)
    return scan_topk(index._quantizer, BlockDecoder(index._quantizer), index._segments, rotated, None,
                     q.square().sum(1), k, index.metric)


def _all_scores(index, queries):
    """Torch-scan scores of every row (k = all rows), as an (nq, n) matrix by position."""
    n = sum(len(s) for s in index._segments)
    scores, pos = _torch_scan(index, queries, n)
    full = np.full((len(queries), n), -np.inf, dtype=np.float64)
    valid = pos.numpy() >= 0
    rows = np.nonzero(valid)[0]
    full[rows, pos.numpy()[valid]] = scores.numpy()[valid]
    return full


@needs_avx2
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 2.5, 3.75, 4.33, 5])
@pytest.mark.parametrize("d", [97, 384])
def test_fast_scan_equals_torch_scan(metric, bits, d):
    rng = np.random.default_rng(int(d + 7 * bits))
    x, near = clustered(rng, 3001, d, clusters=60, spread=0.5, queries=20)
    x *= rng.uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)   # scales vary: the bound must follow them
    x[100:110] = x[50]                                            # exact duplicates: ties
    index = Index(dim=d, bits=bits, metric=metric, seed=5)
    index.add(x[:1700])
    index.add(x[1700:])                                           # two segments
    index.remove(np.arange(0, 3001, 7))                           # deletions in both
    queries = np.concatenate([near, rng.standard_normal((5, d))]).astype(np.float32)
    ref = _all_scores(index, queries)
    rotated, _ = index._quantizer.prepare_queries(
        torch.from_numpy(queries / np.linalg.norm(queries, axis=1, keepdims=True) if metric == "cosine" else queries))
    sq = torch.from_numpy((queries ** 2).sum(1) if metric != "cosine" else np.ones(len(queries), np.float32))
    for k in (1, 10, 100):
        for threads in (1, 2, 3):
            scores, pos = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated, sq, k, metric,
                                                  threads=threads)
            assert_topk_matches(pos.numpy(), scores.numpy(), ref, rtol=2e-5)
            assert not np.isin(pos.numpy(), np.arange(0, 3001, 7)).any(), "a deleted row was returned"
    # The uint8 pass must actually prune: exact sums for a small share of the rows only.
    stats = {}
    fastscan.scan_topk_fast(index._quantizer, index._segments, rotated[:20], sq[:20], 10, metric, stats=stats)
    assert stats["queries"] == 20 and stats["exact_per_query"] < 0.25 * len(x)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_a_block_rescores_its_best_bound_first(portable, bits):
    # One block whose 32 rows all pass the test of an empty heap, in increasing order of their score:
    # scored best bound first, the first row fills the heap (k = 1) and the rows whose bound misses
    # its score are not rescored. In row order, each row would beat the heap's best so far and be
    # scored (all 32, or nearly); the result is the same either way.
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    if not portable and native.simd() == "portable":
        pytest.skip("no SIMD level on this CPU")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    query = x[:1] + 0.05 * rng.standard_normal((1, 64)).astype(np.float32)
    x = x[np.argsort(x @ query[0])]
    index = Index(dim=64, bits=bits, metric="ip", seed=1)
    index.add(x)
    ref = _all_scores(index, query)
    rotated, _ = index._quantizer.prepare_queries(torch.from_numpy(query))
    stats = {}
    scores, pos = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated,
                                          torch.from_numpy((query ** 2).sum(1)), 1, "ip", threads=1,
                                          portable=portable, stats=stats)
    assert_topk_matches(pos.numpy(), scores.numpy(), ref, rtol=2e-5)
    assert 1 <= stats["exact_per_query"] < 8


@needs_avx2
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("bits,d", [(3.5, 200), (1, 203), (2, 203), (3, 203), (4, 203), (4.5, 203), (5, 203),
                                    (1, 204), (2, 202), (2.5, 202)])
def test_avx2_and_portable_kernels_agree_exactly(metric, bits, d):
    # Whole widths 1-4 rescore from the row-major codes (SIMD decode-and-dot), the others from the
    # tables; d = 203 leaves a tail after the last full group of 8 codes (and 5-bit codes whose
    # count is not a multiple of 8).
    rng = np.random.default_rng(11)
    x, _ = clustered(rng, 2500, d, clusters=40, spread=0.6)
    index = Index(dim=d, bits=bits, metric=metric)
    index.add(x)
    index.remove([3, 4, 5, 2400])
    queries = torch.from_numpy(x[:9] + 0.01)
    rotated, _ = index._quantizer.prepare_queries(queries)
    sq = queries.square().sum(1)
    a = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated, sq, 17, metric, threads=1)
    b = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated, sq, 17, metric, threads=1,
                                portable=True)
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


_X86_LEVELS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw"}}
_X86_LEVELS["avx512vbmi"] = _X86_LEVELS["avx512"] | {"avx512vbmi"}


@pytest.fixture
def simd_level(request):
    """Run the test with the fast scan capped at request.param (skipped where this CPU lacks it)."""
    level = request.param
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    if not _X86_LEVELS[level] <= _cpu_flags():
        pytest.skip(f"this CPU has no {level} ({' '.join(sorted(_X86_LEVELS[level]))} in /proc/cpuinfo): "
                    f"that kernel runs where it does (the lent GPU machine's host CPU has it)")
    previous = native.set_simd_limit(level)
    try:
        assert native.simd() == level, f"asked for {level}, the scan runs {native.simd()}"
        yield level
    finally:
        native.set_simd_limit(previous)


@pytest.mark.parametrize("simd_level", ["avx2", "avx512", "avx512vbmi"], indirect=True)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("bits,d,codebook", [(4, 202, "vq"), (4, 602, "vq"), (2, 203, "vq"), (1, 203, "vq"),
                                             (3, 203, "vq"), (3.5, 200, "vq"), (4.5, 203, "vq"), (5, 203, "vq"),
                                             (5, 600, "vq"), (2.5, 202, "vq"), (5, 203, "scalar"),
                                             (4.5, 203, "scalar"), (5, 600, "scalar")])
def test_each_simd_level_equals_the_portable_loop(simd_level, metric, bits, d, codebook):
    # Odd column counts (202 and 602 dims at 4 bits: 101 and 301 columns), more columns than a
    # 16-bit chunk holds (602, and 600 at 5 bits), wide 5-bit columns (scalar 5-bit codebooks; the
    # bit-plane ones have none) alone, beside 4-bit ones and crossing a chunk's end, removed rows, a
    # partial last block, query tiles 1-8 (tiles of 2-8 take the VNNI table kernel at avx512vbmi).
    rng = np.random.default_rng(17)
    x, _ = clustered(rng, 1500, d, clusters=30, spread=0.6)
    index = Index(dim=d, bits=bits, metric=metric, codebook=codebook)
    assert (index._quantizer.layout.wcols > 0) == (codebook == "scalar" and bits > 4)
    index.add(x[:1499])
    index.remove([0, 31, 32, 700])
    queries = torch.from_numpy(x[:11] + 0.01)
    rotated, _ = index._quantizer.prepare_queries(queries)
    sq = queries.square().sum(1)
    for nq in (1, 2, 3, 4, 5, 6, 7, 11):
        work = {}
        a = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated[:nq], sq[:nq], 13, metric, threads=1,
                                    stats=work, int8=False)  # the table kernels (int8: test_int8_*)
        b = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated[:nq], sq[:nq], 13, metric, threads=1,
                                    portable=True)
        np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
        np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
        if simd_level != "avx2":
            # The 512-bit kernels' integer sums go through the AVX2 kernel's float test, so the same
            # rows reach exact scoring: a wrong lookup that the rescoring hides from the results still
            # changes this count. (The portable test rounds differently: its count may differ.)
            native.set_simd_limit("avx2")
            work_avx2 = {}
            try:
                fastscan.scan_topk_fast(index._quantizer, index._segments, rotated[:nq], sq[:nq], 13, metric,
                                        threads=1, stats=work_avx2)
            finally:
                native.set_simd_limit(simd_level)
            assert work == work_avx2


@pytest.mark.parametrize("simd_level", ["avx2", "avx512vbmi"], indirect=True)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("bits", [2, 4])
def test_block_skip_never_drops_a_row_that_reaches_the_heap(simd_level, metric, bits):
    # The SIMD test skips a block when its largest sum, under the block's most favourable scale (and least
    # norm for l2), cannot reach the threshold. Rows of one block with norms from 1e-3 to 1e3 (ip: a row's
    # scale is its norm; l2: its norm is subtracted) make a bound with the wrong scale or norm drop rows that
    # belong in the top k; the results must equal the portable loop's, which tests every row.
    rng = np.random.default_rng(31)
    d = 64
    x, _ = clustered(rng, 2000, d, clusters=20, spread=0.5)
    x *= np.float32(10.0) ** rng.uniform(-3, 3, size=(len(x), 1)).astype(np.float32)
    index = Index(dim=d, bits=bits, metric=metric)
    index.add(x)
    queries = torch.from_numpy(x[rng.choice(len(x), 9, replace=False)] * np.float32(0.5))
    rotated, _ = index._quantizer.prepare_queries(queries)
    sq = queries.square().sum(1)
    for nq in (1, 9):
        a = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated[:nq], sq[:nq], 10, metric, threads=1)
        b = fastscan.scan_topk_fast(index._quantizer, index._segments, rotated[:nq], sq[:nq], 10, metric, threads=1,
                                    portable=True)
        np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
        np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())


def test_simd_limit_is_checked_and_restored():
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    with pytest.raises(ValueError, match="unknown SIMD level 'sse9'"):
        native.set_simd_limit("sse9")
    before = native.simd()
    previous = native.set_simd_limit("portable")
    try:
        assert native.simd() == "portable" and not fastscan.available()
    finally:
        native.set_simd_limit(previous)
    assert native.simd() == before


def _import_with(variable: str, value: str, code: str):
    """Run `code` after importing tqindex.native in a fresh process with the environment variable set:
    (return code, stdout + stderr)."""
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    import os
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", "from tqindex import native; " + code],
                         env={**os.environ, variable: value}, capture_output=True, text=True)
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize("value,expected", [("portable", "portable"), ("avx9", "TQINDEX_SIMD: unknown SIMD level")])
def test_tqindex_simd_caps_the_level_at_import(value, expected):
    rc, out = _import_with("TQINDEX_SIMD", value, "print(native.simd())")
    assert expected in out
    assert (rc == 0) == (value == "portable")


@needs_avx2
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_fast_scan_reads_the_held_scales_and_flags_in_place(scale_dtype, metric):
    # The kernels read a segment's own scales (float32 or float16, in row order) and removal flags:
    # a search derives no per-row array, and AVX2, the portable loop and the torch scan agree. 2021
    # rows leave padding in the last block; removals fall in it too.
    rng = np.random.default_rng(31 + len(metric))
    x, near = clustered(rng, 2021, 96, clusters=30, spread=0.5, queries=10)
    x *= rng.uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    index = Index(dim=96, bits=3, metric=metric, scale_dtype=scale_dtype, seed=2)
    index.add(x)
    removed = np.r_[np.arange(0, 2021, 9), 2017, 2020]
    index.remove(removed)
    (segment,) = index._segments
    assert segment.encoded.scale.dtype == np.dtype(scale_dtype)
    before = index.memory_bytes()
    ref = _all_scores(index, near)
    rotated, _ = index._quantizer.prepare_queries(torch.from_numpy(near))
    sq = torch.from_numpy((near ** 2).sum(1))
    runs = [fastscan.scan_topk_fast(index._quantizer, index._segments, rotated, sq, k, metric, threads=t,
                                    portable=p, cache=index._backend("fastscan").cache)
            for k in (1, 25) for t in (1, 2) for p in (False, True)]
    for i, (scores, pos) in enumerate(runs):
        assert_topk_matches(pos.numpy(), scores.numpy(), ref, rtol=2e-5)
        assert not np.isin(pos.numpy(), removed).any()
        np.testing.assert_array_equal(pos.numpy(), runs[i - i % 2][1].numpy())   # AVX2 = portable, exactly
        np.testing.assert_array_equal(scores.numpy(), runs[i - i % 2][0].numpy())
    layout = index._backend("fastscan").cache.peek(segment, "layout")
    assert layout["scale"] is segment.encoded.scale
    # What the scan keeps beyond the segment's arrays: a byte per block of 32 rows, no per-row copy.
    assert index.memory_bytes() - before <= len(layout["blocks"])


def _list_request(index, q: torch.Tensor, metric: str, nprobe: int):
    """A partitioned index's ListScan for queries q: its nprobe best lists and every list's offset."""
    from tqindex.backends.base import ListScan
    view = index._view
    lists, offsets = index._coarse.probe(q, metric, nprobe)
    members: dict = {}
    for i, s in enumerate(view.segments):
        members.setdefault(s.partition, []).append(i)
    return ListScan(view.segments, np.cumsum([0] + [len(s) for s in view.segments]), members, lists.numpy(),
                    offsets.numpy())


@needs_avx2
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_list_scan_kernels_agree_and_equal_the_list_by_list_scan(metric, bits):
    # A partitioned index: every probed list's segments scanned into one heap per query, each with
    # its list's offset and first position (an entry's offset and id_base), on AVX2 and the portable loop.
    from tqindex.backends.base import ListScan
    rng = np.random.default_rng(int(bits * 10))
    x, near = clustered(rng, 3000, 48, clusters=30, spread=0.6, queries=12)
    index = Index(dim=48, bits=bits, metric=metric, partitions=12)
    index.add(x[:2000])
    index.add(x[2000:])                                            # lists of two segments
    index.remove(np.arange(0, 3000, 5))
    q = torch.from_numpy(near)
    request = _list_request(index, q, metric, 5)
    view = index._view
    rotated, _ = index._quantizer.prepare_queries(q)
    sq = q.square().sum(1)
    a = fastscan.scan_lists_fast(index._quantizer, request, rotated, sq, 10, metric, threads=1)
    b = fastscan.scan_lists_fast(index._quantizer, request, rotated, sq, 10, metric, threads=1, portable=True)
    c = fastscan.scan_lists_fast(index._quantizer, request, rotated, sq, 10, metric, threads=3)
    for other in (b, c):
        np.testing.assert_array_equal(a[1].numpy(), other[1].numpy())
        np.testing.assert_array_equal(a[0].numpy(), other[0].numpy())
    for row in (0, 5):   # one query: all its lists in one native call, their blocks split between threads
        one = ListScan(request.segments, request.starts, request.members, request.lists[row:row + 1],
                       request.offsets[row:row + 1])
        for threads, split in ((1, False), (3, False), (3, True)):
            with pytest.MonkeyPatch.context() as patch:
                if split:
                    patch.setattr(fastscan, "_BYTES_PER_SHARE", 1)
                s1 = fastscan.scan_lists_fast(index._quantizer, one, rotated[row:row + 1], sq[row:row + 1], 10,
                                              metric, threads=threads)
            np.testing.assert_array_equal(s1[1].numpy()[0], a[1].numpy()[row])
            np.testing.assert_array_equal(s1[0].numpy()[0], a[0].numpy()[row])
    from tqindex.backends.base import Queries
    generic = index._backend("torch").topk_lists(request, Queries(rotated, None, sq), 10)
    ref = np.full((len(q), len(index._ids.ids_at(np.arange(3000)))), -np.inf)
    for row in range(len(q)):       # the list-by-list answer's scores, by position, as the reference
        ref[row, generic.positions[row].numpy()] = generic.scores[row].numpy()
    assert_topk_matches(a[1].numpy(), a[0].numpy(), np.where(np.isfinite(ref), ref, -np.inf), rtol=2e-5)
    assert not np.isin(view.ids.ids_at(a[1].numpy()), np.arange(0, 3000, 5)).any()


@needs_avx2
def test_index_search_uses_fast_scan_and_matches_torch(monkeypatch):
    rng = np.random.default_rng(2)
    x, _ = clustered(rng, 5000, 64, clusters=100)
    index = Index(dim=64, bits=4, keep_vectors=True)
    index.add(x)
    scanner = index._backend("fastscan")
    fast = index.search(x[:50], 10, rerank=2)
    assert index._scanner() is scanner and scanner.last_stats["queries"] == 50
    monkeypatch.setenv("TQINDEX_NATIVE", "0")
    scanner.last_stats = {}
    slow = index.search(x[:50], 10, rerank=2)
    assert index._scanner().name == "torch" and scanner.last_stats == {}
    np.testing.assert_array_equal(fast.ids, slow.ids)
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=1e-5)


@needs_avx2
def test_fast_scan_handles_empty_and_tiny_segments():
    index = Index(dim=16, bits=2)
    index.add(np.eye(16, dtype=np.float32)[:3])
    index.remove([1])
    result = index.search(np.eye(16, dtype=np.float32)[:2], 5)
    assert result.ids[0, 0] == 0                        # e0 finds itself first
    assert [set(r[:2].tolist()) for r in result.ids] == [{0, 2}, {0, 2}]  # row 1 was removed
    assert (result.ids[:, 2:] == -1).all() and np.isinf(result.scores[:, 2:]).all()


def test_torch_only_environment_turns_kernels_off(torch_only, monkeypatch):
    assert not native.enabled() and not fastscan.available()

    class Untouchable:  # any use of the compiled kernels fails the test
        def __getattr__(self, name):
            raise AssertionError(f"native kernel {name} called with TQINDEX_NATIVE=0")

    monkeypatch.setattr(native, "kernels", Untouchable())
    index = Index(dim=32, bits=2)
    index.add(np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32))
    assert index._scanner().name == "torch"
    assert index.search(np.ones(32, np.float32), 5).ids.shape == (5,)


@needs_native
def test_fast_scan_covers_codes_up_to_5_bits():
    def quantizer(bits, variant="mse"):
        return TurboQuantizer(dim=40, bits=bits, variant=variant, codebook="scalar")  # 5 bits: the masked layout

    assert all(fastscan.supports(quantizer(b)) for b in (1, 2.5, 4, 4.33, 5))
    assert not fastscan.supports(quantizer(5.5))        # a 6-bit group
    assert not fastscan.supports(quantizer(4, "prod"))
    q = np.zeros((1, 40), np.float32)
    out = [np.zeros((1, 2 * 24, 16), np.uint8), np.zeros((1, 2 * 24, 16), np.float32)] + \
        [np.zeros(1, np.float32) for _ in range(4)]
    g = quantizer(5).groups[0]
    with pytest.raises(ValueError, match="wcols"):     # the wide columns must be a multiple of 4
        native.kernels.tables(q, 40, 1, [(0, 40, 5, 1, g.centroids.numpy())], 22, *out, 2)


@needs_native
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 17, 200])
@pytest.mark.parametrize("dim", [2, 37, 384])
def test_native_rotation_equals_torch(rows, dim):
    from tqindex.rotation import make_rotation
    rotation = make_rotation(dim, "dense", 3)
    x = torch.from_numpy(np.random.default_rng(rows + dim).standard_normal((rows, dim)).astype(np.float32))
    native_out = rotation.apply_native(x)
    assert native_out is not None and native_out.shape == (rows, dim)
    exact = (x.double() @ torch.from_numpy(rotation.matrix()).T).float()  # float64 reference
    np.testing.assert_allclose(native_out.numpy(), exact.numpy(), rtol=1e-5, atol=1e-5)
    assert make_rotation(dim, "hadamard", 3).apply_native(x) is None  # other kinds keep torch


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("dim", [5, 130, 384, 600])  # 600, one row: runs of 24, 8 and 4 registers, a masked tail
def test_rotation_is_the_same_at_every_simd_level(rows, dim):
    # Where the CPU has AVX-512, rows are rotated four (or the last one to three) at a time in runs
    # of 64 outputs held in registers, with a masked last run (130 and 5 are not multiples of 16 or
    # 64), and nine rows of a 600-d matrix (1.4 MB) in column panels of 64: every output summed in the
    # same order, so the bits equal the AVX2 loop's.
    if not _X86_LEVELS["avx512"] <= _cpu_flags():
        pytest.skip("this CPU has no avx512 (avx512f, avx512bw in /proc/cpuinfo): the loop runs where it does")
    from tqindex.rotation import make_rotation
    rotation = make_rotation(dim, "dense", 5)
    x = torch.from_numpy(np.random.default_rng(rows * dim).standard_normal((rows, dim)).astype(np.float32))
    outs = {}
    for level in ("avx512", "avx2", "portable"):
        previous = native.set_simd_limit(level)
        try:
            outs[level] = rotation.apply_native(x).numpy()
        finally:
            native.set_simd_limit(previous)
    np.testing.assert_array_equal(outs["avx512"], outs["avx2"])
    np.testing.assert_array_equal(outs["avx2"], outs["portable"])


@pytest.fixture
def split_calls(monkeypatch):
    """Every scan worth splitting (however small) and the `threads` of each kernel call, recorded:
    a test of the split must see it happen."""
    monkeypatch.setattr(fastscan, "_BYTES_PER_SHARE", 1)
    seen = []
    for name in ("scan_segments", "search"):  # a partitioned index's entry point, and a flat one's
        kernel = getattr(native.kernels, name)

        def recording(*args, kernel=kernel, **kwargs):
            seen.append(kwargs.get("threads", 1))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(native.kernels, name, recording)
    return seen


@needs_avx2
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_fast_scan_results_do_not_depend_on_the_thread_split(metric, split_calls):
    # Exact ties across the k-th place (rows repeated 40 times): among equal scores the lowest
    # position wins, in every heap and every merge, so one thread, several threads (shares of the
    # queries, or of the blocks for fewer queries than threads) and the portable loop give the same
    # ids in the same order.
    rng = np.random.default_rng(5)
    base, near = clustered(rng, 50, 64, clusters=5, spread=0.3, queries=6)
    x = np.repeat(base, 40, axis=0)[rng.permutation(2000)]
    index = Index(dim=64, bits=2, metric=metric)
    index.add(x[:1300])
    index.add(x[1300:])
    rotated, _ = index._quantizer.prepare_queries(torch.from_numpy(near))
    sq = torch.from_numpy((near ** 2).sum(1))
    for nq in (1, 2, 6):
        for k in (5, 57):
            runs = [fastscan.scan_topk_fast(index._quantizer, index._segments, rotated[:nq], sq[:nq], k, metric,
                                            threads=t, portable=p) for t in (1, 2, 3, 7) for p in (False, True)]
            scores, pos = runs[0]
            s, p = scores.numpy(), pos.numpy()
            # The order is total: score descending, then position ascending.
            assert ((s[:, :-1] > s[:, 1:]) | ((s[:, :-1] == s[:, 1:]) & (p[:, :-1] < p[:, 1:]))).all()
            for other_s, other_p in runs[1:]:
                np.testing.assert_array_equal(other_p.numpy(), p)
                np.testing.assert_array_equal(other_s.numpy(), s)
    assert set(split_calls) == {1, 2, 3, 7}


def _plan_of(quantizer, rotated, qn2):
    """The kernel's plan of these rotated queries (qn2: their squared norms for "l2", else None), and
    their magnitudes."""
    return fastscan._plan_for(quantizer, rotated, qn2, False, False)  # the table kernels


def _kernel_inputs(metric, nq, seed=3):
    """A two-segment index with removals and exact ties, and the kernel's inputs for nq queries."""
    rng = np.random.default_rng(seed)
    base, near = clustered(rng, 300, 48, clusters=9, spread=0.4, queries=nq)
    x = np.repeat(base, 10, axis=0)[rng.permutation(3000)]
    index = Index(dim=48, bits=4, metric=metric)
    index.add(x[:1700])
    index.add(x[1700:])
    index.remove(np.arange(0, 3000, 11))
    quantizer = index._quantizer
    rotated, _ = quantizer.prepare_queries(torch.from_numpy(near))
    qn2 = (near ** 2).sum(1).astype(np.float32) if metric == "l2" else None
    plan, magnitude = _plan_of(quantizer, rotated, qn2)
    starts = np.cumsum([0] + [len(s) for s in index._segments])
    entries = [fastscan._segment_entry(quantizer, seg, metric, None, int(start))
               for seg, start in zip(index._segments, starts)]
    offsets = rng.standard_normal((len(entries), nq)).astype(np.float32)   # a partitioned index's list terms
    return plan, entries, magnitude, offsets


@needs_avx2
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_kernel_shares_of_queries_or_blocks_equal_one_thread(metric):
    # scan_segments(threads=t) splits the queries (nq >= t) or else the blocks of all segments in
    # turn, heaps merged at the end: the same heaps as one thread, offsets, removals and ties included,
    # into heaps that already hold rows (a caller's earlier scan), with and without a caller's floor.
    # Shares of queries do each query's work in the same order, so they count the same evaluations.
    from tqindex.topk import topk_ordered
    for nq in (1, 3, 8):
        plan, entries, magnitude, offsets = _kernel_inputs(metric, nq)

        def scan(threads, k, floor=None, portable=False):
            s, i = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
            count = np.zeros(nq, np.int64)
            # The first segment's rows first, then the second's over those heaps.
            for e, o in zip(entries, offsets):
                native.kernels.scan_segments(plan, [e], magnitude, s, i, count, portable=portable, offsets=o[None, :],
                                             threads=threads, floor=floor)
            return (*(t.numpy() for t in topk_ordered(torch.from_numpy(s), torch.from_numpy(i), k)), count)

        for k in (1, 10, 40):
            one_s, one_i, one_count = scan(1, k)
            assert (one_i >= 0).all()
            for threads in (2, 3, 5, 8):
                for floor in (None, np.full(nq, -np.inf, np.float32)):
                    s, i, count = scan(threads, k, floor)
                    np.testing.assert_array_equal(i, one_i)
                    np.testing.assert_array_equal(s, one_s)
                    if nq >= threads:
                        np.testing.assert_array_equal(count, one_count)
            portable = scan(3, k, portable=True)
            np.testing.assert_array_equal(portable[0], one_s)
            np.testing.assert_array_equal(portable[1], one_i)
    none = plan.queries(slice(0, 0))   # no queries: nothing to split, nothing written
    native.kernels.scan_segments(none, entries, magnitude[:0], np.full((0, 3), -np.inf, np.float32),
                                 np.full((0, 3), -1, np.int64), np.zeros(0, np.int64), threads=4)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        native.kernels.scan_segments(plan, entries, magnitude, np.full((nq, 3), -np.inf, np.float32),
                                     np.full((nq, 3), -1, np.int64), np.zeros(nq, np.int64), threads=0)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("int8", [False, True])
def test_scanning_picked_rows_of_a_plan_equals_scanning_their_copies(metric, int8):
    # qrows: the kernel reads the tables (or int8 queries) and rotated queries of rows qrows of the whole
    # plan, the other per-query inputs being the picked queries' own: the same heaps and counts as a plan
    # made of copies of those rows, on one thread and split by queries.
    if int8 and native.simd() != "avx512vbmi":
        pytest.skip("int8 queries are scanned at the avx512vbmi level only (this CPU runs " + native.simd() + ")")
    nq = 9
    plan, entries, magnitude, offsets = _kernel_inputs(metric, nq)
    rows = np.array([7, 2, 5, 0, 8], np.int64)
    if int8:
        rng = np.random.default_rng(5)
        base, near = clustered(rng, 300, 48, clusters=9, spread=0.4, queries=nq)
        index = Index(dim=48, bits=4, metric=metric)
        index.add(np.repeat(base, 10, axis=0))
        rotated, _ = index._quantizer.prepare_queries(torch.from_numpy(near))
        qn2 = (near ** 2).sum(1).astype(np.float32) if metric == "l2" else None
        plan, magnitude = fastscan._plan_for(index._quantizer, rotated, qn2, False, True)
        entries = [fastscan._segment_entry(index._quantizer, seg, metric, None, 0) for seg in index._segments]
        offsets = np.zeros((len(entries), nq), np.float32)
        assert plan.qint is not None
    copies = dataclasses.replace(plan, **{name: getattr(plan, name)[rows] for name in plan._PER_QUERY
                                         if getattr(plan, name) is not None})
    for threads in (1, 2):
        out = []
        for part, qrows in ((copies, None), (plan.picked(rows), rows)):
            s, i = np.full((len(rows), 10), -np.inf, np.float32), np.full((len(rows), 10), -1, np.int64)
            count = np.zeros(len(rows), np.int64)
            native.kernels.scan_segments(part, entries, magnitude[rows], s, i, count,
                                         offsets=offsets[:, rows].copy(), threads=threads, qrows=qrows)
            out.append((s, i, count))
        for a, b in zip(*out):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="qrows"):
        native.kernels.scan_segments(plan.picked(rows), entries, magnitude[rows],
                                     np.full((5, 3), -np.inf, np.float32), np.full((5, 3), -1, np.int64),
                                     np.zeros(5, np.int64), offsets=offsets[:, rows].copy(),
                                     qrows=np.array([7, 2, 5, 0, nq], np.int64))


_FORKED_SCAN = r"""
import multiprocessing as mp, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_native import _kernel_inputs
from tqindex import native

# Made before the fork: torch's own thread pool is not safe to use in a forked child.
PLAN, ENTRIES, MAGNITUDE, _ = _kernel_inputs("ip", 2)

def scan(threads):
    s, i = np.full((2, 10), -np.inf, np.float32), np.full((2, 10), -1, np.int64)
    native.kernels.scan_segments(PLAN, ENTRIES, MAGNITUDE, s, i, np.zeros(2, np.int64), threads=threads)
    return s, i

def child(conn):
    workers = native.kernels.pool_workers()
    s, i = scan(4)
    conn.send((workers, native.kernels.pool_workers(), s, i))

if __name__ == "__main__":
    parent_s, parent_i = scan(4)
    assert native.kernels.pool_workers() >= 1
    here, there = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=child, args=(there,))
    proc.start()
    workers_before, workers_after, s, i = here.recv()
    proc.join()
    assert proc.exitcode == 0, proc.exitcode
    assert workers_before == 0 and workers_after >= 1, (workers_before, workers_after)
    # The same rows (a heap's order of equal-ranked entries depends on the split, so compare sorted).
    assert (np.sort(s, 1) == np.sort(parent_s, 1)).all() and (np.sort(i, 1) == np.sort(parent_i, 1)).all()
    assert (i >= 0).all()
    print("ok")
"""


@needs_avx2
def test_a_forked_child_starts_its_own_workers(tmp_path):
    # fork copies only the calling thread: the child must not wait on the parent's workers (a hang)
    # nor on a lock one of them held; it starts workers of its own and scans as the parent does.
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "forked.py"
    script.write_text(_FORKED_SCAN.format(tests=str(Path(__file__).parent)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


_PRESTART = """
import numpy as np
from tqindex import Index, native, set_num_threads
from tqindex.backends import fastscan
set_num_threads(3)
assert native.kernels.pool_workers() == 0
small = Index(dim=384, bits=4)
small.add(np.ones((100, 384), np.float32))                   # a scan too small to split: no workers
assert native.kernels.pool_workers() == 0, native.kernels.pool_workers()
rows = 2 * fastscan._BYTES_PER_SHARE // 192 + 64             # codes of two shares: a split scan
index = Index(dim=384, bits=4)
index.add(np.random.default_rng(0).standard_normal((rows, 384)).astype(np.float32))
assert native.kernels.pool_workers() == 2, native.kernels.pool_workers()
print("ok")
"""


@needs_native
def test_add_starts_the_scan_workers_a_split_search_will_use():
    # An index whose single queries will be split starts the kernel's workers when its rows are
    # added, so its first search does not wait for thread creation (a fresh process: none yet).
    import subprocess
    import sys
    if not fastscan.available():
        pytest.skip("no SIMD fast scan on this machine: the torch scan has no workers")
    out = subprocess.run([sys.executable, "-c", _PRESTART], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@needs_native
def test_select_kernel_equals_the_numpy_order(monkeypatch):
    # Merging partial answers: the kernel's k best, ties by position, equal numpy's lexsort oracle,
    # with many ties, -inf entries (no row) and k above and below the candidates.
    from tqindex import topk
    rng = np.random.default_rng(0)
    for _ in range(200):
        nq, m, k = int(rng.integers(1, 5)), int(rng.integers(0, 60)), int(rng.integers(1, 40))
        s = rng.integers(0, 6, (nq, m)).astype(np.float32)
        s[rng.random((nq, m)) < 0.2] = -np.inf
        p = rng.permutation(1000)[:nq * m].reshape(nq, m).astype(np.int64)
        fast = topk.topk_ordered(torch.from_numpy(s), torch.from_numpy(p), k)
        with monkeypatch.context() as patch:
            patch.setattr(native, "kernels", None)
            oracle = topk.topk_ordered(torch.from_numpy(s), torch.from_numpy(p), k)
        np.testing.assert_array_equal(fast[0].numpy(), oracle[0].numpy())
        np.testing.assert_array_equal(fast[1].numpy(), oracle[1].numpy())
        assert (fast[1].numpy()[np.isneginf(fast[0].numpy())] == -1).all()


@needs_avx2
@pytest.mark.parametrize("portable", [False, True])
def test_a_shared_floor_prunes_disjoint_heaps_without_changing_the_answer(portable):
    # Two heaps over the two halves of one segment's blocks: sharing the floor (the best k-th score
    # either has) lets the second skip rows the first already beats, and the merged answer is the
    # answer without it. A floor above every score offers nothing, so the kernel does read it.
    from tqindex.topk import topk_ordered
    rng = np.random.default_rng(11)
    x, near = clustered(rng, 6000, 64, clusters=20, spread=0.5, queries=4)
    index = Index(dim=64, bits=4)
    index.add(x)
    quantizer, segment = index._quantizer, index._segments[0]
    rotated, _ = quantizer.prepare_queries(torch.from_numpy(near))
    plan, magnitude = _plan_of(quantizer, rotated, None)
    entry = fastscan._segment_entry(quantizer, segment, "ip", None, 0)
    nq, k, nblocks = len(near), 10, block_count(len(segment))

    def halves(floor):
        out, counts = [], []
        for b0, b1 in ((0, nblocks // 2), (nblocks // 2, nblocks)):
            s, i = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
            count = np.zeros(nq, np.int64)
            native.kernels.scan_segments(plan, [(*entry, b0, b1)], magnitude, s, i, count,
                                         portable=portable, floor=floor)
            out.append((s, i))
            counts.append(count)
        merged = topk_ordered(torch.from_numpy(np.concatenate([o[0] for o in out], 1)),
                              torch.from_numpy(np.concatenate([o[1] for o in out], 1)), k)
        return merged, counts

    (alone_s, alone_i), alone_counts = halves(None)
    (shared_s, shared_i), shared_counts = halves(np.full(nq, -np.inf, np.float32))
    np.testing.assert_array_equal(shared_i.numpy(), alone_i.numpy())
    np.testing.assert_array_equal(shared_s.numpy(), alone_s.numpy())
    assert (shared_counts[0] == alone_counts[0]).all()        # the first half had no floor yet
    assert (shared_counts[1] <= alone_counts[1]).all() and shared_counts[1].sum() < alone_counts[1].sum()
    (_, none_i), none_counts = halves(np.full(nq, np.inf, np.float32))
    assert (none_i.numpy() == -1).all() and sum(c.sum() for c in none_counts) == 0


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_compiled_norm_check_equals_the_numpy_one(monkeypatch, metric):
    # check_norms in the kernels (one pass, summed in double) against the numpy path it replaces:
    # the same float32 norms, and for each kind of bad row the same error, naming the same row.
    from tqindex.validation import check_norms
    rng = np.random.default_rng(5)
    x = torch.from_numpy((rng.standard_normal((9000, 37)) * rng.uniform(1e-3, 1e3, (9000, 1))).astype(np.float32))

    def both(rows):
        out = []
        for native_on in ("1", "0"):
            monkeypatch.setenv("TQINDEX_NATIVE", native_on)
            try:
                out.append(check_norms(rows, zero_ok=metric != "cosine", metric=metric).numpy())
            except ValueError as exc:
                out.append(str(exc))
        monkeypatch.delenv("TQINDEX_NATIVE")
        return out

    fast, slow = both(x)                      # 9,000 rows: the compiled check runs in thread shares
    np.testing.assert_allclose(fast, slow, rtol=1e-7)
    assert np.array_equal(fast, np.linalg.norm(x.numpy().astype(np.float64), axis=1).astype(np.float32))
    for value, row in ((np.nan, 6001), (np.inf, 17), (3e38, 8999), (0.0, 4500)):
        bad = x.clone()
        bad[row] = value
        fast, slow = both(bad)
        if value == 0.0 and metric != "cosine":
            assert not isinstance(fast, str) and fast[row] == 0
            continue
        assert isinstance(fast, str) and fast == slow and f"row {row}" in fast


def _needs_int8_kernel():
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    if not _X86_LEVELS["avx512vbmi"] | {"avx512_vnni"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX-512 VBMI and VNNI (avx512vbmi, avx512_vnni in /proc/cpuinfo): the int8 "
                    "scan's SIMD kernel runs where it does (Intel Ice Lake and later, AMD Zen 4 and later)")


@needs_native
@pytest.mark.parametrize("bits,d", [(4, 384), (4, 202), (3, 203), (4, 38), (3, 9)])
def test_int8_sums_and_bound(bits, d):
    # The int8 scan's integer sums, from the SIMD kernel and the portable loop, equal a numpy sum over
    # the unpacked codes (column counts of every remainder mod 4: the last group's masked loads), and
    # delta * sum + bias is within tol (plus the scan's float room, 1e-5 * magnitude) of the exact dot
    # product for every row.
    rng = np.random.default_rng(bits * 100 + d)
    x, near = clustered(rng, 700, d, clusters=20, spread=0.6, queries=9)
    index = Index(dim=d, bits=bits)
    index.add(x)
    quant = index._quantizer
    assert fastscan.int8_scan(quant)
    rotated, _ = quant.prepare_queries(torch.from_numpy(near))
    q = np.ascontiguousarray(rotated.numpy(), dtype=np.float32)
    qint, levels, delta, bias, tol, magnitude = fastscan.int8_tables(quant, q)
    layout = fastscan.segment_layout(quant, index._segments[0], "ip")
    blocks, ncols = layout["blocks"], quant.layout.ncols
    nblocks = blocks.shape[0]
    row_bytes = blocks[:, :ncols].transpose(0, 2, 1).reshape(nblocks * 32, ncols)
    codes = np.empty((len(row_bytes), 2 * ncols), np.int64)
    codes[:, 0::2], codes[:, 1::2] = row_bytes & 15, row_bytes >> 4
    qi = qint.astype(np.int64).transpose(0, 1, 3, 2).reshape(len(q), -1)[:, : 2 * ncols]  # coordinate order
    assert not qi[:, d:].any() and np.abs(qi).max() == 127
    expected = qi @ levels[:16].astype(np.int64)[codes].T                                 # (nq, rows)
    portable = np.empty((len(q), nblocks, 32), np.int32)
    native.kernels.int8_block_sums(qint, levels, blocks, ncols, len(q), nblocks, portable, True)
    np.testing.assert_array_equal(portable.reshape(len(q), -1), expected)
    if _X86_LEVELS["avx512vbmi"] | {"avx512_vnni"} <= _cpu_flags():
        simd = np.empty_like(portable)
        native.kernels.int8_block_sums(qint, levels, blocks, ncols, len(q), nblocks, simd, False)
        np.testing.assert_array_equal(simd, portable)
    centroids = quant.groups[0].centroids.double().numpy()
    n = len(x)
    exact = q.astype(np.float64) @ centroids[codes[:n, :d]].T                             # (nq, n)
    approx = delta[:, None].astype(np.float64) * expected[:, :n] + bias[:, None]
    room = tol[:, None] + 1e-5 * magnitude[:, None]
    assert (np.abs(exact - approx) <= room).all()
    # No looser than the 7-bit tables' bound for the same queries (so no more rows are rescored).
    assert (tol <= fastscan.quantized_luts(quant, rotated)[4]).all()


@needs_native
def test_int8_tables_split_between_threads_equal_one_query_at_a_time(monkeypatch):
    # A batch's int8 queries are made in ranges on several threads: the same bytes and bounds as
    # made one query at a time.
    monkeypatch.setattr(native, "_THREADS", 3)
    index = Index(dim=96, bits=4)
    index.add(np.random.default_rng(1).standard_normal((50, 96)).astype(np.float32))
    q = np.random.default_rng(2).standard_normal((3 * fastscan._TABLE_QUERIES_PER_THREAD + 5, 96)).astype(np.float32)
    batch = fastscan.int8_tables(index._quantizer, q)
    for i in (0, 1, len(q) // 2, len(q) - 1):
        one = fastscan.int8_tables(index._quantizer, q[i:i + 1])
        np.testing.assert_array_equal(one[1], batch[1])
        for got, part in zip(one[:1] + one[2:], batch[:1] + batch[2:]):
            np.testing.assert_array_equal(got[0], part[i])


@needs_native
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("bits,d", [(4, 202), (3, 203), (4, 38)])
def test_int8_scan_equals_the_table_scan(metric, bits, d):
    # Exact results either way: int8 queries (SIMD kernel where the CPU has it, and the portable loop)
    # return the table scan's ids and scores, ties included, on one and two threads, query tiles 1-8
    # and past, removed rows, a partial last block; and a partitioned index's list scan likewise.
    rng = np.random.default_rng(int(bits * 7 + d))
    x, near = clustered(rng, 1500, d, clusters=30, spread=0.6, queries=11)
    index = Index(dim=d, bits=bits, metric=metric)
    index.add(x[:1499])
    index.remove([0, 31, 32, 700])
    quant = index._quantizer
    queries = torch.from_numpy(near)
    rotated, _ = quant.prepare_queries(queries)
    sq = queries.square().sum(1)
    simd = _X86_LEVELS["avx512vbmi"] | {"avx512_vnni"} <= _cpu_flags() and native.simd() == "avx512vbmi"
    for nq in (1, 3, 9, 11):
        ref = fastscan.scan_topk_fast(quant, index._segments, rotated[:nq], sq[:nq], 13, metric, threads=1,
                                      portable=True, int8=False)
        for portable in (True, False) if simd else (True,):
            for threads in (1, 2):
                got = fastscan.scan_topk_fast(quant, index._segments, rotated[:nq], sq[:nq], 13, metric,
                                              threads=threads, portable=portable, int8=True)
                np.testing.assert_array_equal(got[1].numpy(), ref[1].numpy())
                np.testing.assert_array_equal(got[0].numpy(), ref[0].numpy())
    part = Index(dim=d, bits=bits, metric=metric, partitions=8)
    part.add(x)
    request = _list_request(part, queries, metric, 3)
    prot, _ = part._quantizer.prepare_queries(queries)
    runs = [fastscan.scan_lists_fast(part._quantizer, request, prot, sq, 7, metric, threads=t, portable=p, int8=i8)
            for i8 in (False, True) for p in ((True, False) if simd else (True,)) for t in (1, 2)]
    for got in runs[1:]:
        np.testing.assert_array_equal(got[1].numpy(), runs[0][1].numpy())
        np.testing.assert_array_equal(got[0].numpy(), runs[0][0].numpy())


@needs_native
def test_int8_queries_need_nibble_codes():
    # A plan with int8 queries is refused for codes that are not one 4-bit (or 3-bit) code a nibble.
    index = Index(dim=64, bits=2, codebook="scalar")
    index.add(np.random.default_rng(0).standard_normal((100, 64)).astype(np.float32))
    assert not fastscan.int8_scan(index._quantizer)
    rotated, _ = index._quantizer.prepare_queries(torch.ones(1, 64))
    plan, magnitude = fastscan._plan_for(index._quantizer, rotated, None, True, False)
    bad = dataclasses.replace(plan, qint=np.zeros((1, (plan.ncols + 3) // 4, 2, 4), np.int8),
                              levels=np.zeros(64, np.uint8))
    entry = fastscan._segment_entry(index._quantizer, index._segments[0], "ip", None, 0)
    with pytest.raises(ValueError, match="int8 queries need codes of 4 bits a nibble"):
        native.kernels.scan_segments(bad, [entry], magnitude, np.full((1, 3), -np.inf, np.float32),
                                     np.full((1, 3), -1, np.int64), np.zeros(1, np.int64))


def _search_calls(monkeypatch):
    """Every `_native.search` call's keyword arguments, recorded."""
    seen = []
    kernel = native.kernels.search

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(native.kernels, "search", recording)
    return seen


@needs_avx2
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("bits", [2, 3, 4, 4.5])
def test_one_call_search_equals_the_general_path(metric, bits, monkeypatch):
    # A numpy query (one, or a batch) takes Index.search's direct lane: the norm checks, the cosine
    # scaling, the rotation, tables, scan, ordering and ids in one native call. A torch query of the
    # same values takes the general path (Python validation, rotation in its own call, positions to
    # ids in numpy). Ids and scores are the same, bit for bit, with removals, two segments, exact ties
    # across the k-th place, 1-D and 2-D queries, one thread and a split scan.
    rng = np.random.default_rng(int(bits * 10))
    base, near = clustered(rng, 120, 40, clusters=8, spread=0.4, queries=6)
    x = np.repeat(base, 12, axis=0)[rng.permutation(1440)]
    index = Index(dim=40, bits=bits, metric=metric)
    index.add(x[:1000], ids=np.arange(1000) * 3 + 7)
    index.add(x[1000:], ids=np.arange(440) * 5 + 10 ** 6)
    index.remove(np.arange(7, 3000, 33))
    calls = _search_calls(monkeypatch)
    monkeypatch.setattr(fastscan, "_BYTES_PER_SHARE", 1)  # every scan worth splitting
    for threads in (1, 2):
        native.set_num_threads(threads)
        try:
            for k in (1, 15, 50):
                for q in (near, near[:1], near[2]):
                    calls.clear()
                    direct = index.search(q, k=k)
                    assert len(calls) == 1 and calls[0]["row_ids"] is not None  # the direct lane ran
                    calls.clear()
                    general = index.search(torch.from_numpy(q), k=k)
                    assert len(calls) == 1 and calls[0].get("row_ids") is None
                    np.testing.assert_array_equal(direct.ids, general.ids.numpy())
                    np.testing.assert_array_equal(direct.scores, general.scores.numpy())
                    assert direct.ids.shape == q.shape[:-1] + (k,) and (direct.ids >= 0).all()
        finally:
            native.set_num_threads(None)


@needs_avx2
def test_direct_lane_leaves_bad_queries_to_the_general_path_and_its_errors():
    # A query the direct lane's checks refuse is scanned by nobody: the general path raises its error,
    # naming the row. Inputs the lane does not take (float64, a strided view, k past the live rows)
    # get the general path's results.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    index = Index(dim=32, bits=4, metric="cosine")
    index.add(x)
    q = rng.standard_normal((3, 32)).astype(np.float32)
    bad = q.copy()
    bad[1] = 0.0
    with pytest.raises(ValueError, match="row 1 is zero and has no direction"):
        index.search(bad, k=5)
    bad[1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(bad, k=5)
    bad[1] = 1e19
    with pytest.raises(ValueError, match="row 1 has norm"):
        index.search(bad, k=5)
    reference = index.search(torch.from_numpy(q), k=5)
    for variant in (q.astype(np.float64), np.asfortranarray(q), q):
        got = index.search(variant, k=5)
        np.testing.assert_array_equal(got.ids, reference.ids.numpy())
        np.testing.assert_allclose(got.scores, reference.scores.numpy(), rtol=1e-6)
    past = index.search(q, k=400)
    assert (past.ids[:, 300:] == -1).all() and (past.ids[:, :300] >= 0).all()


@needs_native
def test_search_kernel_refuses_inconsistent_inputs():
    index = Index(dim=64, bits=4)
    index.add(np.random.default_rng(0).standard_normal((100, 64)).astype(np.float32))
    quant = index._quantizer
    consts = fastscan._constants(quant)["rotating"]
    entry = fastscan._segment_entry(quant, index._segments[0], "ip", None, 0)
    q = np.ones((2, 64), np.float32)

    def run(consts=consts, queries=q, l2=False, int8=False, **kwargs):
        return native.kernels.search(consts, queries, [entry], np.empty((len(queries), 3), np.float32),
                                     np.empty((len(queries), 3), np.int64), np.empty(len(queries), np.int64),
                                     l2, int8, **kwargs)

    assert run() == -1 and run(max_norm=1e18) == -1
    assert run(queries=np.concatenate([q, np.zeros((1, 64), np.float32)]), max_norm=1e18, zero_ok=False) == 2
    with pytest.raises(ValueError, match="queries must be float32"):
        run(queries=np.ones((2, 63), np.float32))
    with pytest.raises(ValueError, match="queries must be float32"):  # the same bytes, read as float32
        run(queries=np.ones((1, 64), np.float64))
    with pytest.raises(TypeError, match="consts are"):
        run(consts=consts[:3])
    with pytest.raises(ValueError, match="inconsistent dim"):
        run(consts=consts[:5] + (3,) + consts[6:])  # row_bits 3
    with pytest.raises(ValueError, match="query_norm2 is for l2 only"):
        run(query_norm2=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="row_ids must be a list"):
        run(row_ids=[])
    with pytest.raises(ValueError, match="threads must be at least 1"):
        run(threads=0)
    scalar2 = Index(dim=64, bits=2, codebook="scalar")
    with pytest.raises(ValueError, match="int8 queries need codes of 4 bits a nibble"):
        run(consts=fastscan._constants(scalar2._quantizer)["rotating"], int8=True)


@needs_native
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("bits", [2, 4])
def test_search_kernel_makes_the_plans_queries(metric, bits):
    # The queries made inside `_native.search` (rotation, tables or int8 queries, ||q||^2) are the ones
    # `rotate`, `_plan_for` and `row_norms` make for `scan_segments`: the two entry points return the
    # same heaps, bit for bit, with two segments and removals, portable loop and SIMD level alike.
    from tqindex.topk import topk_ordered
    rng = np.random.default_rng(bits)
    x, near = clustered(rng, 900, 48, clusters=9, spread=0.4, queries=5)
    index = Index(dim=48, bits=bits, metric=metric)
    index.add(x[:500])
    index.add(x[500:])
    index.remove(np.arange(0, 900, 7))
    quant = index._quantizer
    entries = [fastscan._segment_entry(quant, seg, metric, None, start)
               for seg, start in zip(index._segments, (0, 500))]
    rotated = quant.rotation.apply_native(torch.from_numpy(near))
    qn2 = None
    if metric == "l2":  # ||q||^2 as the kernel sums it: in double, rounded once
        qn2 = (near.astype(np.float64) ** 2).sum(1).astype(np.float32)
    consts = fastscan._constants(quant)["rotating"]
    for int8 in (False, True) if fastscan.int8_scan(quant) else (False,):
        for portable in (True, False) if fastscan.available() else (True,):
            plan, magnitude = fastscan._plan_for(quant, rotated, qn2, portable, int8)
            s, i = np.full((5, 10), -np.inf, np.float32), np.full((5, 10), -1, np.int64)
            native.kernels.scan_segments(plan, entries, magnitude, s, i, np.zeros(5, np.int64), portable=portable)
            want_s, want_i = (t.numpy() for t in topk_ordered(torch.from_numpy(s), torch.from_numpy(i), 10))
            got_s, got_i = np.empty((5, 10), np.float32), np.empty((5, 10), np.int64)
            native.kernels.search(consts, near, entries, got_s, got_i, np.empty(5, np.int64), metric == "l2", int8,
                                  portable=portable)
            np.testing.assert_array_equal(got_i, want_i)
            np.testing.assert_array_equal(got_s, want_s)


@pytest.mark.parametrize("value,expected", [("37", "37"), ("-1", "TQINDEX_SPIN_US: set_worker_spin: microseconds"),
                                            ("soon", "TQINDEX_SPIN_US: invalid literal")])
def test_tqindex_spin_us_sets_the_watch_at_import(value, expected):
    rc, out = _import_with("TQINDEX_SPIN_US", value, "print(native.set_worker_spin(0))")
    assert expected in out
    assert (rc == 0) == (value == "37")


def test_worker_spin_is_checked_and_restored():
    if native.kernels is None:
        pytest.skip("the C extension is not built")
    previous = native.set_worker_spin(0)
    try:
        assert native.set_worker_spin(50) == 0 and native.set_worker_spin(previous) == 50
        for bad in (-1, 10 ** 7):
            with pytest.raises(ValueError, match="microseconds must be in"):
                native.set_worker_spin(bad)
        with pytest.raises(TypeError, match="must be an integer"):
            native.set_worker_spin(True)
    finally:
        native.set_worker_spin(previous)


@needs_native
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_kernel_takes_many_segments_with_ids_and_removals(metric):
    # Each segment brings up to six buffers (codes, scales, norms, removal flags, live blocks, ids): a
    # query over 40 of them (a partitioned query over many lists of several segments) scans them all,
    # each row once, and maps every position to its segment's ids.
    rng = np.random.default_rng(9)
    index = Index(dim=32, bits=2, metric=metric)
    index.add(rng.standard_normal((64, 32)).astype(np.float32))
    index.remove([5, 40])
    quant, seg = index._quantizer, index._segments[0]
    entries = [fastscan._segment_entry(quant, seg, metric, None, 64 * i) for i in range(40)]
    row_ids = [np.asarray(seg.ids) + 1000 * i for i in range(40)]
    consts = fastscan._constants(quant)["rotating"]
    q = rng.standard_normal((1, 32)).astype(np.float32)
    k = 40 * 62
    s, i = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
    assert native.kernels.search(consts, q, entries, s, i, np.empty(1, np.int64), metric == "l2", False,
                                 row_ids=row_ids) == -1
    want = sorted(int(r) + 1000 * j for j in range(40) for r in np.asarray(seg.ids) if r not in (5, 40))
    assert sorted(i[0].tolist()) == want
