"""CPU fast scan: uint8 lookup tables over 4-bit groups of codes (tqindex/_native.c), exact results.

How a search runs
-----------------
1. Each segment's mse codes are regrouped once into "nibbles" of 4 bits (one code of 3-4 bits, two
   of 2 bits or four of 1 bit) and stored in blocks of 32 vectors (the kernel's layout); the
   layout is cached by the scanner, per segment. What the nibbles hold is each codebook kind's
   rule (`tqindex.groups`, `nibble_parts`): a bit-plane 5-bit group is read as two parts (its
   codes' high 4 bits, and their lowest bits as 1-bit codes four to a nibble); a Lloyd-Max 5-bit
   group keeps its low 4 bits in a nibble and its 5th bits in mask columns ("masked": 32-entry
   tables, the kernel blends the two lookups by the mask).
2. Per query, nibble m gets a 16-entry float table L[m][v] = Σ_t (Πq)_j · c(code_t(v)), the exact
   contribution of every value the nibble can take; the tables are shifted per nibble and
   quantized to 0..127 with one step δ per query.
3. The kernel sums uint8 entries with SIMD shuffles (32 lookups per instruction on AVX2). Rounding
   moves a row's dot product by at most E = Σ_m max_v |δ·Lq[m][v] + shift_m − L[m][v]|, so a row
   whose approximate score plus scale·E is below the k-th best exact score so far cannot enter the
   top k and is skipped; every other row gets its exact score from the float tables and is
   offered to the query's heap.

So the results are the torch scan's (the same estimator, float32) up to float rounding of the
sums, and the uint8 pass only saves work. `FastScanner.supports` the mse variant on the CPU when
every group has nibble parts (codes of 1-5 bits); prod, wider codes, GPUs and an install without
the compiled extension use the torch scan. TQINDEX_NATIVE=0 turns it off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .. import native
from ..quantizer import TurboQuantizer
from ..segment import Segment
from ..topk import empty_topk, topk_padded
from .base import Queries, Scanner, SegmentCache, TopK

__all__ = ["FastScanner", "available", "supports", "scan_topk_fast", "segment_layout", "quantized_luts"]

BLOCK = 32


def available() -> bool:
    """Whether searches use this path: the kernels are built and enabled, and the CPU has a SIMD
    kernel, AVX2 (x86-64) or NEON (aarch64); the portable loop is a test oracle for them, slower than
    the torch scan."""
    return native.enabled() and native.simd() in ("avx2", "neon")


def supports(quantizer: TurboQuantizer) -> bool:
    """Whether the kernels can scan these codes: the mse variant, every group readable as nibbles,
    and a masked group (it has mask columns) only first (groups are ordered widest first)."""
    if quantizer.variant != "mse" or not quantizer.groups:
        return False
    parts = [g.kind.nibble_parts() for g in quantizer.groups]
    return all(p is not None for p in parts) and not any(q.masked for p in parts[1:] for q in p)


def _nibble_plan(quantizer: TurboQuantizer) -> list[tuple]:
    """What the kernel scans, in nibble order: (start, stop, part) per `NibblePart` of each group."""
    return [(g.start, g.stop, part) for g in quantizer.groups for part in g.kind.nibble_parts()]


def _masked_cols(quantizer: TurboQuantizer) -> int:
    """Columns of masked 5-bit codes (the first group's, its nibbles padded to a multiple of 8), or 0."""
    start, stop, part = _nibble_plan(quantizer)[0]
    return 4 * -(-(stop - start) // 8) if part.masked else 0


def _nibble_count(quantizer: TurboQuantizer) -> int:
    masked = 2 * _masked_cols(quantizer)
    return sum(masked if part.masked else -(-(stop - start) // part.per)
               for start, stop, part in _nibble_plan(quantizer))


# Slot order (see _native.c): slot 8g + j of a block holds row 2j + 16·(g & 1) + (g >> 1).
_SLOT_ROW = np.array([2 * (s % 8) + 16 * ((s // 8) & 1) + (s // 16) for s in range(BLOCK)])
_LAYOUT_CHUNK = 1 << 16  # rows regrouped at a time, bounding the temporary (rows, d) code array


def _to_slots(values: np.ndarray, nblocks: int, fill) -> np.ndarray:
    """(n,) per-row values → (nblocks·32,) in slot order, `fill` for the padding of the last block."""
    padded = np.full(nblocks * BLOCK, fill, dtype=values.dtype)
    padded[: len(values)] = values
    return np.ascontiguousarray(padded.reshape(nblocks, BLOCK)[:, _SLOT_ROW]).reshape(-1)


def _nibbles(quantizer: TurboQuantizer, codes: np.ndarray) -> np.ndarray:
    """Packed codes (n, code_bytes) → (n, ncols + wcols/4) bytes: nibble 2c in the low half of
    column c, 2c + 1 in the high; then, for 5-bit codes, mask column u with bit t = the 5th bit of
    wide nibble 8u + t."""
    plan = _nibble_plan(quantizer)
    if len(plan) == 1 and 4 % plan[0][2].bits == 0:
        # The packed bitstream (tqindex.packing) already is this: byte c holds codes in the order and
        # at the shifts the nibbles use, zero-padded at the end.
        return np.asarray(codes)
    idx = quantizer.unpack(codes)
    n = idx.shape[0]
    nibbles, masks = [], []
    masked = 2 * _masked_cols(quantizer)
    for start, stop, spec in plan:
        part = idx[:, start:stop]
        if spec.pick is not None:
            part = part >> 1 if spec.pick == "high" else part & 1
        width = masked if spec.masked else -(-(stop - start) // spec.per) * spec.per
        if width != part.shape[1]:
            part = np.concatenate([part, np.zeros((n, width - part.shape[1]), np.uint8)], axis=1)
        if spec.masked:
            high = (part >> 4).reshape(n, -1, 8)
            masks.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8), axis=2).astype(np.uint8))
            part = part & 15
        part = part.reshape(n, -1, spec.per)
        nib = part[:, :, 0].copy()
        for t in range(1, spec.per):
            nib |= part[:, :, t] << (t * spec.bits)
        nibbles.append(nib)
    nib = np.concatenate(nibbles, axis=1)
    if nib.shape[1] % 2:  # an odd nibble count: the last byte's high half is a zero nibble with a zero table
        nib = np.concatenate([nib, np.zeros((n, 1), np.uint8)], axis=1)
    return np.concatenate([nib[:, 0::2] | (nib[:, 1::2] << 4)] + masks, axis=1)


def segment_layout(quantizer: TurboQuantizer, segment: Segment, metric: str, cache: SegmentCache | None = None) -> dict:
    """The segment's codes in kernel layout, built once and kept in `cache` (a `SegmentCache`).

    Returns
    -------
    dict with blocks (nblocks, ncols + wcols/4, 32) uint8, ncols (nibble columns), wcols (of which
    5-bit), n, scale ((nblocks·32,) float32 in slot order, NaN for padding), max_scale, and for
    "l2" norm2 (‖x‖² in slot order) and max_norm2 (the maxima size the rounding room)
    """
    layout = None if cache is None else cache.peek(segment, "layout")
    if layout is None:
        codes = np.asarray(segment.encoded.codes)
        n = len(codes)
        ncols = -(-_nibble_count(quantizer) // 2)
        wcols = _masked_cols(quantizer)
        width = ncols + wcols // 4
        nblocks = -(-n // BLOCK)
        blocks = np.zeros((nblocks, width, BLOCK), np.uint8)
        for start in range(0, n, _LAYOUT_CHUNK):
            part = _nibbles(quantizer, codes[start:start + _LAYOUT_CHUNK])
            rows = len(part)
            padded = np.zeros((-(-rows // BLOCK) * BLOCK, width), np.uint8)
            padded[:rows, :part.shape[1]] = part
            first = start // BLOCK
            blocks[first:first + len(padded) // BLOCK] = padded.reshape(-1, BLOCK, width).transpose(0, 2, 1)
        scale = np.asarray(segment.encoded.scale, dtype=np.float32)
        layout = {"blocks": blocks, "ncols": ncols, "wcols": wcols, "n": n,
                  "scale": _to_slots(scale, nblocks, np.nan),
                  "max_scale": float(np.abs(scale).max()) if n else 0.0}
        if cache is not None:
            cache.get(segment, "layout", lambda: layout)
    if metric == "l2" and "norm2" not in layout:
        enc = segment.encoded
        norm2 = np.square(np.asarray(enc.norm if enc.norm is not None else enc.scale, dtype=np.float32))
        layout["norm2"] = _to_slots(norm2, len(layout["blocks"]), np.float32(0))
        layout["max_norm2"] = float(norm2.max()) if len(norm2) else 0.0
    return layout


def quantized_luts(quantizer: TurboQuantizer, rotated: torch.Tensor):
    """Per-query tables for the kernel (computed by the C extension; tests hold a torch oracle).

    Parameters
    ----------
    rotated : (nq, d) float32, Πq

    Returns
    -------
    luts : (nq, 2·(ncols + wcols), 16) uint8, quantized tables
    fluts : (nq, 2·(ncols + wcols), 16) float32, exact tables L[m][v] = Σ_t (Πq)_j · c(code_t(v)); a
        5-bit nibble m's entries for codes 16-31 are at index 2·ncols + m
    delta : (nq,) float32, the quantization step (largest per-nibble span / LUT_MAX, 127: 7-bit
        entries let the kernel add a column's two lookups in 8 bits)
    bias : (nq,) float32, Σ_m min_v L[m][v] (each table is shifted to start at 0)
    tol : (nq,) float32, E = Σ_m max_v |δ·Lq[m][v] − (L[m][v] − min_v L[m])|: the most the rounding
        can move any row's dot product
    magnitude : (nq,) float32, Σ_m max_v |L[m][v]|, a bound on any row's |dot product|
    """
    q = np.ascontiguousarray(rotated.numpy(), dtype=np.float32)
    nq = q.shape[0]
    ncols = -(-_nibble_count(quantizer) // 2)
    wcols = _masked_cols(quantizer)
    luts = np.empty((nq, 2 * (ncols + wcols), 16), np.uint8)
    fluts = np.empty((nq, 2 * (ncols + wcols), 16), np.float32)
    delta, bias, tol, magnitude = (np.empty(nq, np.float32) for _ in range(4))
    groups = [(start, stop, p.bits, p.per, p.centroids) + (() if p.codewords is None else (p.codewords,))
              for start, stop, p in _nibble_plan(quantizer)]
    native.parallel_ranges(nq, lambda a, b: native.kernels.tables(
        q[a:b], quantizer.dim, b - a, groups, ncols, luts[a:b], fluts[a:b], delta[a:b], bias[a:b], tol[a:b],
        magnitude[a:b], wcols), min_per_thread=64)
    return luts, fluts, delta, bias, tol, magnitude


@dataclass(frozen=True)
class ScanPlan:
    """Every input of the native scan, in one typed object (`_native.scan` reads these fields by
    name). Per-query arrays have nq rows; per-row arrays are in slot order (see `_to_slots`).

    codes : (nblocks, ncols + wcols/4, 32) uint8, the kernel layout
    ncols, wcols : nibble columns, of which the first wcols are masked 5-bit ones
    luts : (nq, 2·(ncols + wcols), 16) uint8; fluts : the same in float32 (`quantized_luts`)
    delta, bias, tol, eps : (nq,) float32
    row_scale : (nblocks·32,) float32, NaN for padding and removed rows
    row_norm2, query_norm2 : ‖x‖² per row and ‖q‖² per query for "l2", else None
    rowcodes, rotated, centroids, row_bits : row-major codes (n, code bytes), Πq (nq, d), the 16
        padded levels and the width, for rescoring one scalar group from the codes; else None / 0
    """

    codes: np.ndarray
    ncols: int
    wcols: int
    luts: np.ndarray
    fluts: np.ndarray
    delta: np.ndarray
    bias: np.ndarray
    tol: np.ndarray
    eps: np.ndarray
    row_scale: np.ndarray
    row_norm2: np.ndarray | None = None
    query_norm2: np.ndarray | None = None
    rowcodes: np.ndarray | None = None
    rotated: np.ndarray | None = None
    centroids: np.ndarray | None = None
    row_bits: int = 0

    _PER_QUERY = ("luts", "fluts", "delta", "bias", "tol", "eps", "query_norm2", "rotated")

    def queries(self, q0: int, q1: int) -> "ScanPlan":
        """The plan for queries [q0, q1) (views, no copies)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[q0:q1] for name in self._PER_QUERY
                                            if getattr(self, name) is not None})


def _scan_segment(quantizer, layout, segment, tables, rotated, query_norm2, metric, k, portable, threads):
    """Exact top k of one segment: (scores (nq, k) float32, positions (nq, k) int64), unsorted."""
    luts, fluts, delta, bias, tol, eps = tables
    nq = len(delta)
    nblocks = layout["blocks"].shape[0]
    # Scales in slot order, NaN for padding and deleted rows (no comparison lets NaN through). A
    # segment's mask never changes (a removal makes a new segment), so the masked scales are kept
    # with the layout, beside the mask they were made from.
    row_scale = layout["scale"]
    if segment.deleted is not None:
        mask, masked = layout.get("masked_scale", (None, None))
        if mask is not segment.deleted:
            masked = np.where(_to_slots(np.asarray(segment.deleted), nblocks, False), np.float32(np.nan), row_scale)
            layout["masked_scale"] = (segment.deleted, masked)
        row_scale = masked
    plan = ScanPlan(codes=layout["blocks"], ncols=layout["ncols"], wcols=layout["wcols"], luts=luts, fluts=fluts,
                    delta=delta, bias=bias, tol=tol, eps=eps, row_scale=row_scale,
                    row_norm2=layout["norm2"] if metric == "l2" else None, query_norm2=query_norm2)
    if len(quantizer.groups) == 1 and quantizer.groups[0].kind.rescores_from_codes:
        # One scalar code group: rows are rescored straight from the row-major codes (a SIMD
        # decode-and-dot, cheaper than summing 2·ncols float table entries). Other kinds rescore
        # from the float tables, whose entries already hold each codeword's dot product.
        g = quantizer.groups[0]
        centroids = np.zeros(16, np.float32)
        centroids[: len(g.centroids)] = g.centroids.numpy()
        plan = dataclasses.replace(plan, rowcodes=np.asarray(segment.encoded.codes), rotated=rotated,
                                   centroids=centroids, row_bits=g.bits)

    def run(q0, q1, b0, b1):
        out_s = np.full((q1 - q0, k), -np.inf, dtype=np.float32)
        out_i = np.full((q1 - q0, k), -1, dtype=np.int64)
        count = np.zeros(q1 - q0, dtype=np.int64)
        native.kernels.scan(plan.queries(q0, q1), b0, b1, out_s, out_i, count, portable=portable)
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
                   threads: int | None = None, cache: SegmentCache | None = None, stats: dict | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and results as `backends.torch_scan.scan_topk` (mse variant, CPU).

    Parameters
    ----------
    portable : bool
        Use the portable C loop even where AVX2 is available (tests compare the two).
    threads : int, optional
        Default: `tqindex.native.get_num_threads()`.
    cache : SegmentCache, optional
        Where kernel layouts are kept between calls (without it they are rebuilt per call).
    stats : dict, optional
        Filled with the work done: queries, and rows per query whose exact score was summed.
    """
    nq = rotated.shape[0]
    threads = threads or native.get_num_threads()
    q = np.ascontiguousarray(rotated.numpy(), dtype=np.float32)
    luts, fluts, delta, bias, tol, magnitude = quantized_luts(quantizer, rotated.contiguous())
    factor = 2.0 if metric == "l2" else 1.0
    qn2 = query_sq_norms.numpy().astype(np.float32) if metric == "l2" else None
    scores, positions = [], []
    exact = 0
    offset = 0
    for seg in segments:
        if len(seg):
            layout = segment_layout(quantizer, seg, metric, cache)
            # Room for float32 rounding in a score: 1e-5 of the size of the terms it is made of.
            eps = 1e-5 * (factor * layout["max_scale"] * magnitude
                          + ((layout["max_norm2"] + qn2) if metric == "l2" else 0.0))
            tables = (luts, fluts, delta, bias, tol, eps.astype(np.float32))
            s, p, count = _scan_segment(quantizer, layout, seg, tables, q, qn2, metric, k, portable, threads)
            scores.append(s)
            positions.append(np.where(p >= 0, p + offset, -1))
            exact += int(count.sum())
        offset += len(seg)
    if stats is not None:
        stats.update(queries=nq, exact_per_query=exact / max(nq, 1))
    if not scores:
        return empty_topk(nq, k)
    return topk_padded(torch.from_numpy(np.concatenate(scores, axis=1)),
                       torch.from_numpy(np.concatenate(positions, axis=1)), k)


class FastScanner(Scanner):
    """The native fast scan behind the scanner protocol (mse codes of 1-5 bits, CPU, AVX2)."""

    name = "fastscan"

    def __init__(self, quantizer: TurboQuantizer, metric: str):
        super().__init__(quantizer, metric)
        self._codes_supported = supports(quantizer)  # fixed for the quantizer; availability is not

    def supports(self, device: str) -> bool:
        return device == "cpu" and self._codes_supported and available()

    def prepare(self, segment: Segment) -> None:
        if len(segment):
            segment_layout(self.quantizer, segment, self.metric, self.cache)

    def topk(self, segments: list[Segment], queries: Queries, k: int) -> TopK:
        stats: dict = {}
        scores, positions = scan_topk_fast(self.quantizer, segments, queries.rotated, queries.sq_norms, k,
                                           self.metric, cache=self.cache, stats=stats)
        self.last_stats = stats
        return TopK(scores, positions, stats)
