"""CPU fast scan: uint8 lookup tables over 4-bit groups of codes (tqindex/_native.c), exact results.

How a search runs
-----------------
1. Each segment's mse codes are regrouped once into "nibbles" of 4 bits (one code of 3-4 bits, two
   of 2 bits or four of 1 bit) and stored in blocks of 32 vectors (the kernel's layout); the
   layout is cached on the segment.
2. Per query, nibble m gets a 16-entry float table L[m][v] = Σ_t (Πq)_j · c(code_t(v)), the exact
   contribution of every value the nibble can take; the tables are shifted per nibble and
   quantized to uint8 with one step δ per query.
3. The kernel sums uint8 entries with SIMD shuffles (32 lookups per instruction on AVX2). Rounding
   moves a row's dot product by at most E = Σ_m max_v |δ·Lq[m][v] + shift_m − L[m][v]|, so a row
   whose approximate score plus scale·E is below the k-th best exact score so far cannot enter the
   top k and is skipped; every other row gets its exact score from the float tables and is
   offered to the query's heap.

So the results are the torch scan's (the same estimator, float32) up to float rounding of the
sums, and the uint8 pass only saves work. The mse variant uses it when every code is 1-4 bits
(whole widths 1-4, fractional widths below 4); prod, wider codes, GPUs and an install without the
compiled extension use `backends.cpu.scan_topk`. TQINDEX_NATIVE=0 turns it off.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import native
from ..quantizer import TurboQuantizer
from ..segment import Segment

__all__ = ["available", "supports", "scan_topk_fast", "segment_layout", "quantized_luts", "last_stats"]

BLOCK = 32
#: Work of the last call: queries, and rows per query whose exact score was summed.
last_stats = {"queries": 0, "exact_per_query": 0.0}


def available() -> bool:
    """Whether searches use this path: the kernels are built and enabled, and the CPU has AVX2 (the
    portable loop is a test oracle for the SIMD one, slower than the torch scan)."""
    return native.enabled() and native.simd() == "avx2"


def supports(quantizer: TurboQuantizer) -> bool:
    return quantizer.variant == "mse" and bool(quantizer.groups) and all(g.bits <= 4 for g in quantizer.groups)


def _nibble_plan(quantizer: TurboQuantizer) -> list[tuple[int, int, int, int]]:
    """(start, stop, bits, codes per nibble) for each code group."""
    return [(g.start, g.stop, g.bits, 4 // g.bits if g.bits in (1, 2) else 1) for g in quantizer.groups]


def _nibble_count(quantizer: TurboQuantizer) -> int:
    return sum(-(-(stop - start) // per) for start, stop, _, per in _nibble_plan(quantizer))


def segment_layout(quantizer: TurboQuantizer, segment: Segment) -> dict:
    """The segment's codes in kernel layout, built once and cached on the segment.

    Returns
    -------
    dict with blocks (nblocks, ncols, 32) uint8, ncols, n, slot_rows / slot_valid (the row of each
    slot), scale and norm2 ((nblocks·32,) float32 scale and ‖x‖² in slot order, NaN / 0 for
    padding), and max_scale, max_norm2
    (floats, for the rounding room)
    """
    cached = segment.device_cache.get("fastscan")
    if cached is not None:
        return cached
    idx = quantizer.unpack(np.asarray(segment.encoded.codes))  # (n, d) uint8
    n = idx.shape[0]
    nibbles = []
    for start, stop, bits, per in _nibble_plan(quantizer):
        part = idx[:, start:stop]
        width = -(-(stop - start) // per) * per
        if width != part.shape[1]:
            part = np.concatenate([part, np.zeros((n, width - part.shape[1]), np.uint8)], axis=1)
        part = part.reshape(n, -1, per)
        nib = part[:, :, 0].copy()
        for t in range(1, per):
            nib |= part[:, :, t] << (t * bits)
        nibbles.append(nib)
    nib = np.concatenate(nibbles, axis=1)
    if nib.shape[1] % 2:  # an odd nibble count: the last byte's high half is a zero nibble with a zero table
        nib = np.concatenate([nib, np.zeros((n, 1), np.uint8)], axis=1)
    ncols = nib.shape[1] // 2
    nblocks = -(-n // BLOCK)
    packed = np.zeros((nblocks * BLOCK, ncols), np.uint8)
    packed[:n] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    blocks = np.ascontiguousarray(packed.reshape(nblocks, BLOCK, ncols).transpose(0, 2, 1))
    scale = np.asarray(segment.encoded.scale, dtype=np.float32)
    norm = np.asarray(segment.encoded.norm if segment.encoded.norm is not None else scale, dtype=np.float32)
    # Per-row arrays in the kernel's slot order (see _native.c): slot 8g + j of a block holds
    # row 2j + 16·(g & 1) + (g >> 1); rows past n are padding.
    g, j = np.divmod(np.arange(BLOCK), 8)
    rows = (np.arange(nblocks)[:, None] * BLOCK + (2 * j + 16 * (g & 1) + (g >> 1))[None, :]).reshape(-1)
    valid = rows < n
    norm2 = np.zeros(nblocks * BLOCK, np.float32)
    norm2[valid] = np.square(norm[rows[valid]])
    slot_scale = np.full(nblocks * BLOCK, np.nan, dtype=np.float32)
    slot_scale[valid] = scale[rows[valid]]
    layout = {"blocks": blocks, "ncols": ncols, "n": n, "slot_rows": rows, "slot_valid": valid, "norm2": norm2,
              "scale": slot_scale,
              "max_scale": float(np.abs(scale).max()) if n else 0.0,
              "max_norm2": float(norm2.max()) if n else 0.0}
    segment.device_cache["fastscan"] = layout
    return layout


def quantized_luts(quantizer: TurboQuantizer, rotated: torch.Tensor):
    """Per-query tables for the kernel (computed by the C extension; tests hold a torch oracle).

    Parameters
    ----------
    rotated : (nq, d) float32, Πq

    Returns
    -------
    luts : (nq, 2·ncols, 16) uint8, quantized tables
    fluts : (nq, 2·ncols, 16) float32, exact tables L[m][v] = Σ_t (Πq)_j · c(code_t(v))
    delta : (nq,) float32, the quantization step (largest per-nibble span / 255)
    bias : (nq,) float32, Σ_m min_v L[m][v] (each table is shifted to start at 0)
    tol : (nq,) float32, E = Σ_m max_v |δ·Lq[m][v] − (L[m][v] − min_v L[m])|: the most the rounding
        can move any row's dot product
    magnitude : (nq,) float32, Σ_m max_v |L[m][v]|, a bound on any row's |dot product|
    """
    q = np.ascontiguousarray(rotated.numpy(), dtype=np.float32)
    nq = q.shape[0]
    ncols = -(-_nibble_count(quantizer) // 2)
    luts = np.empty((nq, 2 * ncols, 16), np.uint8)
    fluts = np.empty((nq, 2 * ncols, 16), np.float32)
    delta, bias, tol, magnitude = (np.empty(nq, np.float32) for _ in range(4))
    groups = [(start, stop, bits, per, g.centroids.numpy())
              for (start, stop, bits, per), g in zip(_nibble_plan(quantizer), quantizer.groups)]
    native.parallel_ranges(nq, lambda a, b: native.kernels.tables(
        q[a:b], quantizer.dim, b - a, groups, ncols, luts[a:b], fluts[a:b], delta[a:b], bias[a:b], tol[a:b],
        magnitude[a:b]), min_per_thread=64)
    return luts, fluts, delta, bias, tol, magnitude


def _scan_segment(layout, segment, tables, query_norm2, metric, k, portable, threads):
    """Exact top k of one segment: (scores (nq, k) float32, positions (nq, k) int64), unsorted."""
    luts, fluts, delta, bias, tol, eps = tables
    nq = len(delta)
    rows, valid = layout["slot_rows"], layout["slot_valid"]
    # Scales in slot order, NaN for padding and deleted rows (no comparison lets NaN through).
    row_scale = layout["scale"]
    if segment.deleted is not None:
        gone = np.zeros(len(rows), bool)
        gone[valid] = np.asarray(segment.deleted)[rows[valid]]
        row_scale = np.where(gone, np.float32(np.nan), row_scale)
    row_norm2 = layout["norm2"] if metric == "l2" else None
    nblocks = layout["blocks"].shape[0]

    def run(q0, q1, b0, b1):
        out_s = np.full((q1 - q0, k), -np.inf, dtype=np.float32)
        out_i = np.full((q1 - q0, k), -1, dtype=np.int64)
        count = np.zeros(q1 - q0, dtype=np.int64)
        native.kernels.scan(layout["blocks"], layout["ncols"], nblocks, b0, b1, luts[q0:q1], fluts[q0:q1], delta[q0:q1],
                     bias[q0:q1], tol[q0:q1], eps[q0:q1], row_scale, row_norm2,
                     None if query_norm2 is None else query_norm2[q0:q1], out_s, out_i, count, portable=portable)
        return out_s, out_i, count

    if nq >= threads:
        # Split the queries: every thread streams all blocks with its own tables.
        parts = native.parallel_ranges(nq, lambda q0, q1: run(q0, q1, 0, nblocks), threads)
        return tuple(np.concatenate(a) for a in zip(*parts))
    # Few queries: split the blocks; each thread's heap is an exact top k of its rows.
    parts = native.parallel_ranges(nblocks, lambda b0, b1: run(0, nq, b0, b1), threads, min_per_thread=64)
    return (np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1),
            sum(p[2] for p in parts))


def scan_topk_fast(quantizer: TurboQuantizer, segments: list[Segment], rotated: torch.Tensor,
                   query_sq_norms: torch.Tensor, k: int, metric: str, *, portable: bool = False,
                   threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and results as `backends.cpu.scan_topk` (mse variant, CPU).

    Parameters
    ----------
    portable : bool
        Use the portable C loop even where AVX2 is available (tests compare the two).
    threads : int, optional
        Default: torch.get_num_threads().
    """
    nq = rotated.shape[0]
    threads = threads or torch.get_num_threads()
    luts, fluts, delta, bias, tol, magnitude = quantized_luts(quantizer, rotated.contiguous())
    factor = 2.0 if metric == "l2" else 1.0
    qn2 = query_sq_norms.numpy().astype(np.float32) if metric == "l2" else None
    scores, positions = [], []
    exact = 0
    offset = 0
    for seg in segments:
        if len(seg):
            layout = segment_layout(quantizer, seg)
            # Room for float32 rounding in a score: 1e-5 of the size of the terms it is made of.
            eps = 1e-5 * (factor * layout["max_scale"] * magnitude
                          + ((layout["max_norm2"] + qn2) if metric == "l2" else 0.0))
            s, p, count = _scan_segment(layout, seg, (luts, fluts, delta, bias, tol, eps.astype(np.float32)),
                                        qn2, metric, k, portable, threads)
            scores.append(s)
            positions.append(np.where(p >= 0, p + offset, -1))
            exact += int(count.sum())
        offset += len(seg)
    last_stats.update(queries=nq, exact_per_query=exact / max(nq, 1))
    if not scores:
        return torch.full((nq, k), -torch.inf), torch.full((nq, k), -1, dtype=torch.int64)
    scores = torch.from_numpy(np.concatenate(scores, axis=1))
    positions = torch.from_numpy(np.concatenate(positions, axis=1))
    best, order = torch.topk(scores, k, dim=1)
    best_pos = torch.gather(positions, 1, order)
    best_pos[torch.isneginf(best)] = -1
    return best, best_pos
