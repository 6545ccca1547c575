"""CPU fast scan: uint8 lookup tables over 4-bit groups of codes (tqindex/_native.c), exact results.

How a search runs
-----------------
1. An index holds these codes in the kernel's block layout (`tqindex.layout`): "nibbles" of 4 bits
   (one code of 3-4 bits, two of 2 bits or four of 1 bit) in blocks of 32 vectors, built as rows
   are encoded and stored as such, so a search reads the held (or memory-mapped) bytes as they
   are. What the nibbles hold is each codebook kind's rule (`tqindex.groups`, `nibble_parts`): a
   bit-plane 5-bit group is read as two parts (its codes' high 4 bits, and their lowest bits as
   1-bit codes four to a nibble); a Lloyd-Max 5-bit group keeps its low 4 bits in a nibble and its
   5th bits in mask columns ("masked": 32-entry tables, the kernel blends the two lookups by the
   mask). The kernel reads the segment's own per-row floats and removal flags (row order), so a
   search derives nothing per row; the scanner caches a few numbers per segment and a byte per block.
2. Per query, nibble m gets a 16-entry float table L[m][v] = Σ_t (Πq)_j · c(code_t(v)), the exact
   contribution of every value the nibble can take; the tables are shifted per nibble and
   quantized to 0..127 with one step δ per query.
3. The kernel sums uint8 entries with SIMD shuffles (32 lookups per instruction on AVX2). Rounding
   moves a row's dot product by at most E = Σ_m max_v |δ·Lq[m][v] + shift_m − L[m][v]|, so a row
   whose approximate score plus scale·E is below the k-th best exact score so far cannot enter the
   top k and is skipped; every other row gets its exact score from the float tables and is
   offered to the query's heap. The "best so far" is the best k-th score of any heap holding other
   rows of the query (thread shares, segments), shared through a per-query floor.

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
from ..layout import block_count
from ..quantizer import TurboQuantizer
from ..segment import Segment
from ..topk import empty_topk, topk_ordered
from .base import ListScan, Queries, Scanner, SegmentCache, TopK

__all__ = ["FastScanner", "ScanPlan", "available", "supports", "scan_lists_fast", "scan_topk_fast", "segment_layout",
           "quantized_luts"]



def available() -> bool:
    """Whether searches use this path: the kernels are built and enabled, and the CPU has a SIMD
    kernel, AVX-512 or AVX2 (x86-64) or NEON (aarch64), within `native.set_simd_limit`'s limit; the
    portable loop is a test oracle for them, slower than the torch scan."""
    return native.enabled() and native.simd() in ("avx512", "avx2", "neon")


def supports(quantizer: TurboQuantizer) -> bool:
    """Whether the kernels can scan these codes: those with a block layout (`tqindex.layout`:
    the mse variant, every group readable as nibbles, a masked group only first)."""
    return quantizer.layout is not None


def segment_layout(quantizer: TurboQuantizer, segment: Segment, metric: str, cache: SegmentCache | None = None) -> dict:
    """What the kernel reads of a segment, all of it the segment's own arrays: its blocks and its
    per-row floats in row order (scales float32 or float16, as held), with the maxima that size the
    rounding room, kept in `cache` (a `SegmentCache`).

    Returns
    -------
    dict with blocks (nblocks, width, 32) uint8, ncols, wcols (`BlockLayout`), n, scale ((n,) float32
    or float16),
    max_scale, and for "l2" norm ((n,) float32, ‖x‖; the kernel squares it) and max_norm2
    """
    layout = None if cache is None else cache.peek(segment, "layout")
    if layout is None:
        enc = segment.encoded
        # Row-major codes (a segment built outside an index) are converted; an index's segments
        # hold blocks already, so nothing is built here for them.
        blocks = enc.blocks if enc.blocks is not None else quantizer.layout.from_codes(enc.codes)
        scale = np.asarray(enc.scale)
        if scale.dtype not in (np.float32, np.float16) or not scale.flags.c_contiguous:
            scale = np.ascontiguousarray(scale, dtype=np.float32)
        layout = {"blocks": blocks, "ncols": quantizer.layout.ncols, "wcols": quantizer.layout.wcols, "n": len(enc),
                  "scale": scale, "max_scale": _largest_magnitude(scale)}
        if cache is not None:
            cache.get(segment, "layout", lambda: layout)
    if metric == "l2" and "norm" not in layout:
        enc = segment.encoded
        norm = np.ascontiguousarray(enc.norm, dtype=np.float32) if enc.norm is not None else layout["scale"]
        largest = np.float32(_largest_magnitude(norm))
        layout["norm"], layout["max_norm2"] = norm, float(largest * largest)
    return layout


def _largest_magnitude(values: np.ndarray) -> float:
    """max |v| over a float array, without an n-sized temporary (0.0 when empty)."""
    return max(float(values.max()), -float(values.min())) if len(values) else 0.0


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
    ncols, wcols = quantizer.layout.ncols, quantizer.layout.wcols
    luts = np.empty((nq, 2 * (ncols + wcols), 16), np.uint8)
    fluts = np.empty((nq, 2 * (ncols + wcols), 16), np.float32)
    delta, bias, tol, magnitude = (np.empty(nq, np.float32) for _ in range(4))
    groups = [(p.start, p.stop, p.spec.bits, p.spec.per, p.spec.centroids)
              + (() if p.spec.codewords is None else (p.spec.codewords,)) for p in quantizer.layout.parts]
    native.parallel_ranges(nq, lambda a, b: native.kernels.tables(
        q[a:b], quantizer.dim, b - a, groups, ncols, luts[a:b], fluts[a:b], delta[a:b], bias[a:b], tol[a:b],
        magnitude[a:b], wcols), min_per_thread=64)
    return luts, fluts, delta, bias, tol, magnitude


@dataclass(frozen=True)
class ScanPlan:
    """Every input of the native scan, in one typed object (`_native.scan` reads these fields by
    name). Per-query arrays have nq rows; per-row arrays have `rows`, in row order.

    codes : (ceil(rows/32), ncols + wcols/4, 32) uint8, the kernel layout
    rows : rows in the blocks (the last block's rows past it are padding)
    ncols, wcols : nibble columns, of which the first wcols are masked 5-bit ones
    luts : (nq, 2·(ncols + wcols), 16) uint8; fluts : the same in float32 (`quantized_luts`)
    delta, bias, tol, eps : (nq,) float32
    row_scale : (rows,) float32 or float16
    row_norm, query_norm2 : ‖x‖ per row and ‖q‖² per query for "l2", else None
    deleted : (rows,) bool or uint8, nonzero for removed rows, or None
    block_live : (nblocks,) uint8, 0 for blocks whose rows are all removed (skipped), or None
    rotated, centroids, row_bits : Πq (nq, d), the 16 padded levels and the bits a code takes in
        the nibble columns (1, 2 or 4), for rescoring one scalar group from its codes; else None / 0
    offset : (nq,) float32 added to every exact score (a partitioned index's list term), or None
    id_base : added to every position written (so several segments can fill one heap)
    """

    codes: np.ndarray
    rows: int
    ncols: int
    wcols: int
    luts: np.ndarray
    fluts: np.ndarray
    delta: np.ndarray
    bias: np.ndarray
    tol: np.ndarray
    eps: np.ndarray
    row_scale: np.ndarray
    row_norm: np.ndarray | None = None
    query_norm2: np.ndarray | None = None
    deleted: np.ndarray | None = None
    block_live: np.ndarray | None = None
    rotated: np.ndarray | None = None
    centroids: np.ndarray | None = None
    row_bits: int = 0
    offset: np.ndarray | None = None
    id_base: int = 0

    _PER_QUERY = ("luts", "fluts", "delta", "bias", "tol", "eps", "query_norm2", "rotated", "offset")

    def queries(self, q0: int, q1: int) -> "ScanPlan":
        """The plan for queries [q0, q1) (views, no copies)."""
        if q0 == 0 and q1 == len(self.delta):
            return self
        return dataclasses.replace(self, **{name: getattr(self, name)[q0:q1] for name in self._PER_QUERY
                                            if getattr(self, name) is not None})


def _removed(layout: dict, segment: Segment) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The segment's removal flags as bytes (a view of its mask) and which blocks have a live row
    (None, None: nothing removed). A segment's mask never changes (a removal makes a new segment), so
    the block flags are kept with the layout, beside the mask they were made from."""
    if segment.deleted is None:
        return None, None
    mask, flags, block_live = layout.get("removed", (None, None, None))
    if mask is not segment.deleted:
        mask = segment.deleted
        flags = np.ascontiguousarray(mask).view(np.uint8)
        nblocks = block_count(len(mask))
        padded = np.ones(nblocks * 32, dtype=bool)
        padded[: len(mask)] = mask
        # Blocks with no row left (common under a filter) are skipped by the kernel.
        block_live = (~padded.reshape(nblocks, -1).all(axis=1)).astype(np.uint8)
        layout["removed"] = (mask, flags, block_live)
    return flags, block_live


def _segment_fields(layout: dict, segment: Segment, metric: str) -> dict:
    """A segment's fields of the plan (`ScanPlan`), all views of what the segment and layout hold."""
    deleted, block_live = _removed(layout, segment)
    return dict(codes=layout["blocks"], rows=layout["n"], row_scale=layout["scale"],
                row_norm=layout["norm"] if metric == "l2" else None, deleted=deleted, block_live=block_live)


def _segment_plan(quantizer, layout, segment, tables, rotated, query_norm2, metric, offset=None,
                  id_base: int = 0) -> ScanPlan:
    """The kernel's inputs for one segment and these queries' tables (luts, fluts, delta, bias, tol, eps)."""
    luts, fluts, delta, bias, tol, eps = tables
    return ScanPlan(ncols=layout["ncols"], wcols=layout["wcols"], luts=luts, fluts=fluts, delta=delta, bias=bias,
                    tol=tol, eps=eps, query_norm2=query_norm2, offset=offset, id_base=int(id_base),
                    **_segment_fields(layout, segment, metric), **_rescore_fields(quantizer, rotated))


def _rescore_fields(quantizer, rotated) -> dict:
    """With one scalar code group, rows are rescored straight from their codes in the nibble
    columns (a SIMD decode-and-dot, cheaper than summing 2·ncols float table entries; a 3-bit code
    takes a whole nibble): the plan's rotated queries, 16 padded levels and bits per code. Other
    kinds rescore from the float tables, whose entries already hold each codeword's dot product."""
    groups = quantizer.groups
    if not (len(groups) == 1 and groups[0].kind.rescores_from_codes):
        return {}
    g = groups[0]
    centroids = np.zeros(16, np.float32)
    centroids[: len(g.centroids)] = g.centroids.numpy()
    return dict(rotated=rotated, centroids=centroids, row_bits=4 if g.bits == 3 else g.bits)


def _list_args(quantizer, segment: Segment, metric: str, cache: SegmentCache | None) -> tuple[tuple, tuple]:
    """A segment's entry of `_native.scan_segments` but for its offset and id base (which come
    between the two parts), kept with the segment's layout: a partitioned search makes one entry per
    probed list per query, and building it anew each time cost more than scanning a small list."""
    # Kept beside the layout in the cache (one look-up per probed list, not one for the layout and
    # another inside it).
    kept = None if cache is None else cache.peek(segment, "list_args")
    if kept is None or kept[0] is not segment.deleted:  # a removal's copy shares the layout, not the mask
        layout = segment_layout(quantizer, segment, metric, cache)
        f = _segment_fields(layout, segment, metric)
        kept = (segment.deleted, (f["codes"], f["rows"], f["row_scale"], f["row_norm"], f["deleted"], f["block_live"]),
                (layout["max_scale"], layout.get("max_norm2", 0.0)))
        if cache is not None:
            cache.put(segment, "list_args", kept)
    return kept[1], kept[2]


def _scan_segment(quantizer, layout, segment, tables, rotated, query_norm2, metric, k, portable, threads, floor):
    """Exact top k of one segment: (scores (nq, k) float32, positions (nq, k) int64), unsorted.
    floor: (nq,) float32 shared by every heap of these queries (see `_native.scan`)."""
    nq = len(tables[2])
    nblocks = layout["blocks"].shape[0]
    plan = _segment_plan(quantizer, layout, segment, tables, rotated, query_norm2, metric)

    def run(q0, q1, b0, b1):
        out_s = np.full((q1 - q0, k), -np.inf, dtype=np.float32)
        out_i = np.full((q1 - q0, k), -1, dtype=np.int64)
        count = np.zeros(q1 - q0, dtype=np.int64)
        native.kernels.scan(plan.queries(q0, q1), b0, b1, out_s, out_i, count, portable=portable,
                            floor=floor[q0:q1])
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
        Use the portable C loop even where a SIMD kernel is available (tests compare them).
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
    # Every heap of a query (segments, thread shares) holds disjoint rows: they share one floor.
    floor = np.full(nq, -np.inf, dtype=np.float32)
    for seg in segments:
        if len(seg):
            layout = segment_layout(quantizer, seg, metric, cache)
            # Room for float32 rounding in a score: 1e-5 of the size of the terms it is made of.
            eps = 1e-5 * (factor * layout["max_scale"] * magnitude
                          + ((layout["max_norm2"] + qn2) if metric == "l2" else 0.0))
            tables = (luts, fluts, delta, bias, tol, eps.astype(np.float32))
            s, p, count = _scan_segment(quantizer, layout, seg, tables, q, qn2, metric, k, portable, threads, floor)
            scores.append(s)
            positions.append(np.where(p >= 0, p + offset, -1))
            exact += int(count.sum())
        offset += len(seg)
    if stats is not None:
        stats.update(queries=nq, exact_per_query=exact / max(nq, 1))
    if not scores:
        return empty_topk(nq, k)
    return topk_ordered(torch.from_numpy(np.concatenate(scores, axis=1)),
                       torch.from_numpy(np.concatenate(positions, axis=1)), k)


def scan_lists_fast(quantizer: TurboQuantizer, request: ListScan, rotated: torch.Tensor,
                    query_sq_norms: torch.Tensor, k: int, metric: str, *, portable: bool = False,
                    threads: int | None = None, cache: SegmentCache | None = None, stats: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A partitioned index's top k (see `base.ListScan`) in one heap per query: tables are made
    once per query, and every probed list's segments are scanned into the same heap, each with its
    list's score offset (`ScanPlan.offset`) and first position (`id_base`), so a list's rows are
    pruned against the best scores of the lists scanned before it. Threads take disjoint queries."""
    nq = rotated.shape[0]
    threads = threads or native.get_num_threads()
    q = np.ascontiguousarray(rotated.numpy(), dtype=np.float32)
    luts, fluts, delta, bias, tol, magnitude = quantized_luts(quantizer, rotated.contiguous())
    qn2 = query_sq_norms.numpy().astype(np.float32) if metric == "l2" else None
    segments = request.segments
    heap_s = np.full((nq, k), -np.inf, dtype=np.float32)
    heap_i = np.full((nq, k), -1, dtype=np.int64)
    count = np.zeros(nq, dtype=np.int64)
    rescore = _rescore_fields(quantizer, q)

    def segment_args(i, offset):
        head, tail = _list_args(quantizer, segments[i], metric, cache)
        return (*head, offset, int(request.starts[i]), *tail)

    def scan(rows, args):
        # The queries' fields; `scan_segments` reads no per-segment field of the plan.
        plan = ScanPlan(codes=None, rows=0, ncols=quantizer.layout.ncols, wcols=quantizer.layout.wcols, luts=luts[rows],
                        fluts=fluts[rows], delta=delta[rows], bias=bias[rows], tol=tol[rows], eps=None,
                        row_scale=None, query_norm2=None if qn2 is None else qn2[rows],
                        **({**rescore, "rotated": q[rows]} if rescore else {}))
        hs, hi, cnt = heap_s[rows], heap_i[rows], np.zeros(len(plan.delta), dtype=np.int64)
        native.kernels.scan_segments(plan, args, magnitude[rows], hs, hi, cnt, portable=portable)
        if isinstance(rows, np.ndarray):  # copies: written back
            heap_s[rows], heap_i[rows] = hs, hi
        return cnt

    def query_args(row):
        """One query's entries, its lists best first (a plain loop: at hundreds of probed lists per
        query, a generator and an array per list cost a visible share of a single query's time)."""
        members, offsets, out = request.members, request.offsets[row:row + 1], []
        for lst in request.lists[row].tolist():
            where = members.get(lst)
            if where is not None:
                offset = offsets[:, lst]
                out.extend(segment_args(i, offset) for i in where)
        return out

    def run(q0, q1):
        if q1 - q0 == 1:  # one query: all its lists' segments in one native call
            count[q0] += scan(slice(q0, q1), query_args(q0))[0]
            return
        part = ListScan(segments, request.starts, request.members, request.lists[q0:q1], request.offsets[q0:q1])
        for lst, where, qs in part.by_list():
            g = qs + q0
            # A run of consecutive queries is read and written in place; others are copied.
            rows = slice(int(g[0]), int(g[-1]) + 1) if g[-1] - g[0] + 1 == len(g) else g
            offset = np.ascontiguousarray(request.offsets[g, lst], dtype=np.float32)
            count[g] += scan(rows, [segment_args(i, offset) for i in where])

    native.parallel_ranges(nq, run, threads)
    if stats is not None:
        stats.update(queries=nq, exact_per_query=float(count.sum()) / max(nq, 1))
    return topk_ordered(torch.from_numpy(heap_s), torch.from_numpy(heap_i), k)


class FastScanner(Scanner):
    """The native fast scan behind the scanner protocol (mse codes of 1-5 bits, CPU: AVX-512, AVX2 or NEON)."""

    name = "fastscan"

    def __init__(self, quantizer: TurboQuantizer, metric: str):
        super().__init__(quantizer, metric)
        self._codes_supported = supports(quantizer)  # fixed for the quantizer; availability is not

    def supports(self, device: str) -> bool:
        return device == "cpu" and self._codes_supported and available()

    def prepare(self, segment: Segment) -> None:
        if len(segment):
            segment_layout(self.quantizer, segment, self.metric, self.cache)

    def topk_lists(self, request: ListScan, queries: Queries, k: int) -> TopK:
        stats: dict = {}
        scores, positions = scan_lists_fast(self.quantizer, request, queries.rotated, queries.sq_norms, k,
                                            self.metric, cache=self.cache, stats=stats)
        self.last_stats = stats
        return TopK(scores, positions, stats)

    def topk(self, segments: list[Segment], queries: Queries, k: int) -> TopK:
        stats: dict = {}
        scores, positions = scan_topk_fast(self.quantizer, segments, queries.rotated, queries.sq_norms, k,
                                           self.metric, cache=self.cache, stats=stats)
        self.last_stats = stats
        return TopK(scores, positions, stats)
