"""CPU fast scan: uint8 lookup tables (or int8 queries) over 4-bit groups of codes (tqindex/_native.c), exact results.

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
   quantized to 0..127 with one step δ per query. The query is rotated and its tables made in the
   call that scans (`_native.search`; `Index.search`'s direct lane also checks the queries and maps
   positions to ids there), so a single query costs one native call.
3. The kernel sums uint8 entries with SIMD shuffles (32 lookups per instruction on AVX2). Rounding
   moves a row's dot product by at most E = Σ_m max_v |δ·Lq[m][v] + shift_m − L[m][v]|, so a row
   whose approximate score plus scale·E is below the k-th best exact score so far cannot enter the
   top k and is skipped; every other row gets its exact score from the float tables and is
   offered to the query's heap. The "best so far" is the best k-th score of any heap holding other
   rows of the query (thread shares, segments), shared through a per-query floor.
4. Where the codes are one scalar group of one 3- or 4-bit code a nibble (every coordinate shares
   the same 16 levels) and the scan level has the kernel (`avx512vbmi`: AVX-512 VBMI and VNNI), the
   tables of steps 2-3 give way to an int8 copy of the query (`int8_tables`): each nibble decodes to
   a level byte once for a tile of up to 8 queries and `vpdpbusd` sums four coordinates' products at
   a time; its own bound E plays the same part, so the results are the same.

So the results are the torch scan's (the same estimator, float32) up to float rounding of the
sums, and the uint8 pass only saves work. `FastScanner.supports` the mse variant on the CPU when
every group has nibble parts (codes of 1-5 bits); prod, wider codes, GPUs and an install without
the compiled extension use the torch scan. TQINDEX_NATIVE=0 turns it off.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .. import native
from ..layout import block_count
from ..quantizer import TurboQuantizer
from ..segment import Segment
from ..validation import MAX_NORM
from ..topk import empty_topk, topk_ordered
from .base import ListScan, Queries, Scanner, SegmentCache, TopK

__all__ = ["FastScanner", "ScanPlan", "available", "supports", "scan_lists_fast", "scan_topk_fast", "search_fast",
           "segment_layout", "quantized_luts"]

#: Bytes of codes (times the queries that read them) a thread's share of a scan gets at least: a worker
#: that sleeps takes tens of microseconds to wake (more in a virtual machine), so a smaller share costs
#: more than it saves.
_BYTES_PER_SHARE = 1 << 20
#: Queries a thread's share of the table making gets at least.
_TABLE_QUERIES_PER_THREAD = 64


def available() -> bool:
    """Whether searches use this path: the kernels are built and enabled, and the CPU has a SIMD
    kernel, AVX-512 (with or without VBMI) or AVX2 (x86-64) or NEON (aarch64), within
    `native.set_simd_limit`'s limit; the portable loop is a test oracle for them, slower than the torch
    scan."""
    return native.enabled() and native.simd() not in (None, "portable")


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
    delta, bias, tol, magnitude = np.empty((4, nq), np.float32)
    groups = _constants(quantizer)["groups"]

    def tables(a, b):
        native.kernels.tables(q[a:b], quantizer.dim, b - a, groups, ncols, luts[a:b], fluts[a:b], delta[a:b],
                              bias[a:b], tol[a:b], magnitude[a:b], wcols)

    native.parallel_ranges(nq, tables, min_per_thread=_TABLE_QUERIES_PER_THREAD)
    return luts, fluts, delta, bias, tol, magnitude


_CONSTANTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _constants(quantizer: TurboQuantizer) -> dict:
    """What every search of this quantizer passes the kernels unchanged, made once: the tables'
    group tuples ("groups"), with one scalar code group the fields for rescoring rows from their
    codes ("rescore", see `_rescore_fields`; empty otherwise), and the `_native.search` consts of
    queries it rotates ("rotating") or that come rotated ("rotated")."""
    kept = _CONSTANTS.get(quantizer)
    if kept is None:
        groups = [(p.start, p.stop, p.spec.bits, p.spec.per, p.spec.centroids)
                  + (() if p.spec.codewords is None else (p.spec.codewords,)) for p in quantizer.layout.parts]
        rescore = _rescore_fields(quantizer)
        # (mt, dim, groups, ncols, wcols, row_bits, centroids, nlevels), mt the rotation or None
        common = (quantizer.dim, groups, quantizer.layout.ncols, quantizer.layout.wcols, rescore.get("row_bits", 0),
                  rescore.get("centroids"), len(quantizer.groups[0].centroids))
        mt = quantizer.rotation.native_matrix()
        kept = _CONSTANTS[quantizer] = {"groups": groups, "rescore": rescore, "rotated": (None,) + common,
                                        "rotating": None if mt is None else (mt,) + common}
    return kept


@dataclass(frozen=True)
class ScanPlan:
    """The queries' inputs of the native scan, in one typed object (`_native.scan_segments` reads these
    fields by name; each segment's come in its entry, `_segment_entry`). Arrays have nq rows.

    ncols, wcols : nibble columns, of which the first wcols are masked 5-bit ones
    luts : (nq, 2·(ncols + wcols), 16) uint8; fluts : the same in float32 (`quantized_luts`); None
        with int8 queries
    delta, bias, tol : (nq,) float32
    query_norm2 : ‖q‖² per query for "l2", else None
    rotated, centroids, row_bits : Πq (nq, d), the 16 padded levels and the bits a code takes in
        the nibble columns (1, 2 or 4), for rescoring one scalar group from its codes; else None / 0
    qint, levels : the int8 queries (nq, ceil(ncols/4), 2, 4) int8 and level bytes (64,) uint8 of the
        int8 scan (`int8_tables`), which then takes the place of luts and fluts (None), with its own
        delta, bias and tol
    """

    ncols: int
    wcols: int
    luts: np.ndarray | None
    fluts: np.ndarray | None
    delta: np.ndarray
    bias: np.ndarray
    tol: np.ndarray
    query_norm2: np.ndarray | None = None
    rotated: np.ndarray | None = None
    centroids: np.ndarray | None = None
    row_bits: int = 0
    qint: np.ndarray | None = None
    levels: np.ndarray | None = None

    _PER_QUERY = ("luts", "fluts", "delta", "bias", "tol", "query_norm2", "rotated", "qint")
    _SMALL = ("delta", "bias", "tol", "query_norm2")  # a float per query

    def queries(self, rows) -> "ScanPlan":
        """The plan for queries `rows`, a slice: views of every array."""
        if rows.start in (0, None) and rows.stop >= len(self.delta):
            return self
        return dataclasses.replace(self, **{name: getattr(self, name)[rows] for name in self._PER_QUERY
                                            if getattr(self, name) is not None})

    def picked(self, rows: np.ndarray) -> "ScanPlan":
        """The plan for queries `rows`, an index array, for `scan_segments(..., qrows=rows)`: its floats
        per query copied, its tables, int8 and rotated queries left whole (the kernel reads their rows
        `rows`: a query's tables are kilobytes, and copied for every list it probes they cost a 2-bit
        batch at 8 lists about as much as its scan)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[rows] for name in self._SMALL
                                            if getattr(self, name) is not None})


def int8_scan(quantizer: TurboQuantizer) -> bool:
    """Whether this quantizer's codes can be scanned against int8 queries: one scalar group whose
    codes fill a nibble each (3 or 4 bits; rescored from its codes), no wide columns."""
    if native.kernels is None:
        return False
    rescore = _constants(quantizer)["rescore"]
    return (rescore.get("row_bits") == 4 and quantizer.layout.wcols == 0
            and quantizer.dim <= native.kernels.INT8_SCAN_MAX_DIM)


def int8_tables(quantizer: TurboQuantizer, rotated: np.ndarray):
    """The int8 queries of the int8 scan (computed by the C extension, `_native.int8_tables`).

    Parameters
    ----------
    rotated : (nq, d) float32, Πq

    Returns
    -------
    qint : (nq, ceil(ncols/4), 2, 4) int8, round(Πq / Δ) with Δ = max |Πq| / 127, in the kernel's order
    levels : (64,) uint8, the group's levels as bytes, L = round((c − c_min) / α), α = (c_max − c_min) / 255
    delta, bias, tol, magnitude : (nq,) float32; dot ≈ delta · Σ qint·L + bias within tol for every row
    """
    nq = rotated.shape[0]
    ncols = quantizer.layout.ncols
    rescore = _constants(quantizer)["rescore"]
    qint = np.empty((nq, (ncols + 3) // 4, 2, 4), np.int8)
    delta, bias, tol, magnitude = np.empty((4, nq), np.float32)

    def tables(a, b):
        levels = np.empty(64, np.uint8)  # the same bytes from every range; each writes its own
        native.kernels.int8_tables(rotated[a:b], quantizer.dim, b - a, ncols, rescore["centroids"],
                                   len(quantizer.groups[0].centroids), qint[a:b], levels, delta[a:b], bias[a:b],
                                   tol[a:b], magnitude[a:b])
        return levels

    levels = native.parallel_ranges(max(nq, 1), tables, min_per_thread=_TABLE_QUERIES_PER_THREAD)[0]
    return qint, levels, delta, bias, tol, magnitude


def _plan_for(quantizer, rotated: torch.Tensor, query_norm2: np.ndarray | None, portable: bool,
              int8: bool | None) -> tuple[ScanPlan, np.ndarray]:
    """The queries' plan and magnitudes: int8 queries where `int8` (None: where the codes allow it
    and the CPU's scan level has an int8 kernel, `avx512vbmi`, unless `portable`), else tables."""
    q = np.ascontiguousarray(rotated.numpy(), dtype=np.float32)
    if int8 is None:
        int8 = not portable and native.simd() == "avx512vbmi" and int8_scan(quantizer)
    if int8:
        qint, levels, delta, bias, tol, magnitude = int8_tables(quantizer, q)
        tables = dict(luts=None, fluts=None, qint=qint, levels=levels)
    else:
        luts, fluts, delta, bias, tol, magnitude = quantized_luts(quantizer, rotated)
        tables = dict(luts=luts, fluts=fluts)
    # With one scalar code group, rows are rescored from their codes (`_rescore_fields`).
    rescore = _constants(quantizer)["rescore"]
    plan = ScanPlan(ncols=quantizer.layout.ncols, wcols=quantizer.layout.wcols, delta=delta, bias=bias, tol=tol,
                    query_norm2=query_norm2, **tables, **rescore, **({"rotated": q} if rescore else {}))
    return plan, magnitude


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


def _rescore_fields(quantizer) -> dict:
    """With one scalar code group, rows are rescored straight from their codes in the nibble
    columns (a SIMD decode-and-dot, cheaper than summing 2·ncols float table entries; a 3-bit code
    takes a whole nibble): the plan's 16 padded levels and bits per code (and the rotated queries,
    which `_plan_for` adds). Other kinds rescore from the float tables, whose entries already hold
    each codeword's dot product."""
    groups = quantizer.groups
    if not (len(groups) == 1 and groups[0].kind.rescores_from_codes):
        return {}
    g = groups[0]
    centroids = np.zeros(16, np.float32)
    centroids[: len(g.centroids)] = g.centroids.numpy()
    return dict(centroids=centroids, row_bits=4 if g.bits == 3 else g.bits)


def _segment_entry(quantizer, segment: Segment, metric: str, cache: SegmentCache | None, id_base: int) -> tuple:
    """A segment's entry of `_native.scan_segments`, its rows numbered from id_base: (codes, rows,
    row_scale, row_norm, deleted, block_live, id_base, max_scale, max_norm2), kept with the segment's
    layout: a partitioned search makes one entry per probed list per query, and building it anew
    each time cost more than scanning a small list."""
    # Kept beside the layout in the cache (one look-up per probed list, not one for the layout and
    # another inside it).
    kept = None if cache is None else cache.peek(segment, "entry")
    # A removal's copy shares the layout, not the mask; a segment's first position moves when earlier
    # ones are compacted.
    if kept is None or kept[0] is not segment.deleted or kept[1][6] != id_base:
        layout = segment_layout(quantizer, segment, metric, cache)
        deleted, block_live = _removed(layout, segment)
        kept = (segment.deleted,
                (layout["blocks"], layout["n"], layout["scale"], layout["norm"] if metric == "l2" else None, deleted,
                 block_live, int(id_base), layout["max_scale"], layout.get("max_norm2", 0.0)))
        if cache is not None:
            cache.put(segment, "entry", kept)
    return kept[1]


def _scan_threads(share: int, entries, nq: int, makes_queries: bool = False, read: float = 1.0) -> int:
    """Threads for one native scan over `entries` for nq queries: this call's `thread_share`, but no more
    than give each thread `_BYTES_PER_SHARE` of codes to read (counted once per query, `read` of the
    entries' bytes each) or, for a call that also makes its queries (`_native.search`),
    `_TABLE_QUERIES_PER_THREAD` queries to make. (`_native.search_probing` applies the same rule to
    its one query in C, where its lists' bytes are known.)"""
    work = int(nq * read * sum(e[0].nbytes for e in entries)) // _BYTES_PER_SHARE
    if makes_queries:
        work = max(work, nq // _TABLE_QUERIES_PER_THREAD)
    return max(1, min(share, work))


def scan_topk_fast(quantizer: TurboQuantizer, segments: list[Segment], rotated: torch.Tensor,
                   query_sq_norms: torch.Tensor, k: int, metric: str, *, portable: bool = False,
                   threads: int | None = None, cache: SegmentCache | None = None, stats: dict | None = None,
                   int8: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and results as `backends.torch_scan.scan_topk` (mse variant, CPU), for queries
    rotated already (Πq): `search_fast` with `rotated=True` and the given ‖q‖²."""
    qn2 = np.ascontiguousarray(query_sq_norms.numpy(), dtype=np.float32) if metric == "l2" else None
    return search_fast(quantizer, segments, rotated, k, metric, rotated=True, query_sq_norms=qn2, portable=portable,
                       threads=threads, cache=cache, stats=stats, int8=int8)


def search_fast(quantizer: TurboQuantizer, segments: list[Segment], queries: torch.Tensor | np.ndarray, k: int,
                metric: str, *, rotated: bool = False, query_sq_norms: np.ndarray | None = None,
                portable: bool = False, threads: int | None = None, cache: SegmentCache | None = None,
                stats: dict | None = None, int8: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of every segment's rows for float32 queries (nq, d), in one `_native.search` call: the
    queries are rotated (a dense rotation: unless `rotated`; Hadamard: in torch first), their tables or
    int8 queries made and ‖q‖² summed ("l2", unless given) in the call that scans, its heaps sorted.

    Every segment is scanned into one heap per query, the rows of segment i at positions from its start
    on. The kernel's worker threads take runs of the queries, or, with fewer queries than threads, runs
    of the blocks (each its own heaps, sharing a per-query floor; merged at the end).

    Parameters
    ----------
    portable : bool
        Use the portable C loop even where a SIMD kernel is available (tests compare them).
    int8 : bool, optional
        Score against int8 queries (`int8_tables`; the codes must allow it, `int8_scan`) or against
        tables; None: int8 where the scan level has an int8 kernel. The results are the same.
    threads : int, optional
        Default: `tqindex.native.get_num_threads()`.
    cache : SegmentCache, optional
        Where kernel layouts are kept between calls (without it they are rebuilt per call).
    stats : dict, optional
        Filled with the work done: queries, and rows per query whose exact score was summed.

    Returns
    -------
    scores (nq, k) float32 best first (−inf padding), positions (nq, k) int64 (−1 padding), ties in
    position order
    """
    nq = queries.shape[0]
    threads = threads or native.get_num_threads()
    kept = _constants(quantizer)
    consts = kept["rotated" if rotated else "rotating"]
    if consts is None:  # a rotation the kernels do not apply
        queries, consts = quantizer.rotation.apply(torch.as_tensor(queries)), kept["rotated"]
    q = np.ascontiguousarray(queries.numpy() if isinstance(queries, torch.Tensor) else queries, dtype=np.float32)
    if int8 is None:
        int8 = not portable and native.simd() == "avx512vbmi" and int8_scan(quantizer)
    entries, start = [], 0  # of each segment with rows
    for seg in segments:
        if len(seg):
            entries.append(_segment_entry(quantizer, seg, metric, cache, start))
        start += len(seg)
    if not entries:
        return empty_topk(nq, k)
    count = np.empty(nq, dtype=np.int64)  # these three are written whole by the kernel
    heap_s = np.empty((nq, k), dtype=np.float32)
    heap_i = np.empty((nq, k), dtype=np.int64)
    with native.thread_share(threads) as share:
        # Shares take runs of the queries where there are enough, else runs of the blocks (of all
        # segments in turn).
        native.kernels.search(consts, q, entries, heap_s, heap_i, count, metric == "l2", bool(int8),
                              portable=portable, threads=_scan_threads(share, entries, nq, True),
                              query_norm2=query_sq_norms)
    if stats is not None:
        stats.update(queries=nq, exact_per_query=float(count.sum()) / max(nq, 1))
    return torch.from_numpy(heap_s), torch.from_numpy(heap_i)


def list_entries(quantizer: TurboQuantizer, request: ListScan, metric: str, cache: SegmentCache | None):
    """A function of a list L: the tuple of its `scan_segments` entries in the request's snapshot
    (empty for a list without live rows), made on first use and kept in the request's memo, which
    lasts as long as the snapshot. Only probed lists are made: a filtered search has a snapshot of
    its own, and making every list's entries for it would cost more than its scan."""
    kept = request.memo.setdefault("fastscan", {})
    get = kept.get

    def entries_of(lst):
        made = get(lst)
        if made is None:
            made = kept[lst] = tuple(_segment_entry(quantizer, request.segments[i], metric, cache, request.starts[i])
                                     for i in request.members.get(lst, ()))
        return made

    return entries_of


def _list_parts(quantizer: TurboQuantizer, request: ListScan, metric: str, cache: SegmentCache | None):
    """A function of a list L: its `list_entries` and, beside each, its segment's ids (int64, as the
    direct lanes map positions to ids), both made on first use and kept in the request's memo (a
    segment's ids once, whatever lists it holds)."""
    entries_of = list_entries(quantizer, request, metric, cache)
    ids_kept = request.memo.setdefault("fastscan-ids", {})  # segment number: its ids
    kept = request.memo.setdefault("fastscan-parts", {})    # list: (entries, ids)

    def ids_of(i):
        ids = ids_kept.get(i)
        if ids is None:
            ids = ids_kept[i] = np.ascontiguousarray(request.segments[i].ids, dtype=np.int64)
        return ids

    def parts(lst):
        made = kept.get(lst)
        if made is None:
            made = kept[lst] = (entries_of(lst), [ids_of(i) for i in request.members.get(lst, ())])
        return made

    return parts


def scan_lists_fast(quantizer: TurboQuantizer, request: ListScan, rotated: torch.Tensor,
                    query_sq_norms: torch.Tensor, k: int, metric: str, *, portable: bool = False,
                    threads: int | None = None, cache: SegmentCache | None = None, stats: dict | None = None,
                    int8: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A partitioned index's top k (see `base.ListScan`) in one heap per query: tables are made
    once per query, and every probed list's segments are scanned into the same heap, each with its
    list's score offset and first position (`id_base`), so a list's rows are
    pruned against the best scores of the lists scanned before it. Threads take disjoint queries; a
    single query's blocks are split between the kernel's worker threads."""
    nq = rotated.shape[0]
    if nq > 2 and request.lists.shape[1] == 1 and (np.diff(request.lists[:, 0]) < 0).any():
        # One list a query: in order of their lists, each list's queries are one run, scanned through
        # views of the plan (no copies of their tables and heaps) and by one thread (its codes read once).
        # (With more lists a query only its first list's queries would be one run; in a probe that did not
        # pay at 4-8 lists.) The results are the same: each query's heap sees the same rows.
        order = np.argsort(request.lists[:, 0], kind="stable")
        sorted_request = dataclasses.replace(request, lists=request.lists[order], offsets=request.offsets[order])
        in_order = torch.from_numpy(order)
        scores, positions = scan_lists_fast(quantizer, sorted_request, rotated[in_order],
                                            None if query_sq_norms is None else query_sq_norms[in_order], k,
                                            metric, portable=portable, threads=threads, cache=cache, stats=stats,
                                            int8=int8)
        back = torch.from_numpy(np.argsort(order))
        return scores[back], positions[back]
    threads = threads or native.get_num_threads()
    qn2 = query_sq_norms.numpy().astype(np.float32) if metric == "l2" else None
    segments = request.segments
    heap_s = np.full((nq, k), -np.inf, dtype=np.float32)
    heap_i = np.full((nq, k), -1, dtype=np.int64)
    count = np.zeros(nq, dtype=np.int64)
    plan, magnitude = _plan_for(quantizer, rotated.contiguous(), qn2, portable, int8)

    entries_of = list_entries(quantizer, request, metric, cache)

    def scan(rows, args, offsets, threads=1):
        picked = isinstance(rows, np.ndarray)
        part = plan.picked(rows) if picked else plan.queries(rows)
        hs, hi, cnt = heap_s[rows], heap_i[rows], np.zeros(len(part.delta), dtype=np.int64)
        qrows = np.ascontiguousarray(rows, dtype=np.int64) if picked else None
        native.kernels.scan_segments(part, args, magnitude[rows], hs, hi, cnt, portable=portable, offsets=offsets,
                                     threads=threads, qrows=qrows)
        if picked:  # copies: written back
            heap_s[rows], heap_i[rows] = hs, hi
        return cnt

    def one_query(q0, share):
        # All its lists' segments, best list first, in one native call; with a share of more than one
        # thread, the kernel splits their blocks (see scan_topk_fast).
        lists = request.lists[q0].tolist()
        per_list = [entries_of(lst) for lst in lists]
        args = [e for entries in per_list for e in entries]
        offsets = request.offsets[q0, [lst for lst, entries in zip(lists, per_list) for _ in entries]]
        count[q0] += scan(slice(q0, q0 + 1), args, offsets[:, None], _scan_threads(share, args, 1))[0]

    def run(q0, q1):
        if q1 - q0 == 1:
            one_query(q0, 1)
            return
        part = ListScan(segments, request.starts, request.members, request.lists[q0:q1], request.offsets[q0:q1],
                        request.memo)
        for lst, where, qs in part.by_list():
            g = qs + q0
            # A run of consecutive queries is read and written in place; others are copied.
            rows = slice(int(g[0]), int(g[-1]) + 1) if g[-1] - g[0] + 1 == len(g) else g
            offsets = np.repeat(request.offsets[g, lst][None, :], len(where), axis=0)
            count[g] += scan(rows, list(entries_of(lst)), offsets)

    if nq == 1:
        with native.thread_share(threads) as share:
            one_query(0, share)
    else:
        native.parallel_ranges(nq, run, threads)
    if stats is not None:
        stats.update(queries=nq, exact_per_query=float(count.sum()) / max(nq, 1))
    return topk_ordered(torch.from_numpy(heap_s), torch.from_numpy(heap_i), k)


class FastScanner(Scanner):
    """The native fast scan behind the scanner protocol (mse codes of 1-5 bits, CPU: AVX-512, AVX2 or NEON)."""

    name = "fastscan"
    direct = True

    def __init__(self, quantizer: TurboQuantizer, metric: str):
        super().__init__(quantizer, metric)
        self._codes_supported = supports(quantizer)  # fixed for the quantizer; availability is not

    def supports(self, device: str) -> bool:
        return device == "cpu" and self._codes_supported and available()

    def prepare(self, segment: Segment) -> None:
        """Make what a search of this segment needs now, not on the first search: its layout, the
        quantizer's constants and, where a single query's scan of it will be split, the kernel's
        worker threads."""
        if len(segment):
            layout = segment_layout(self.quantizer, segment, self.metric, self.cache)
            _constants(self.quantizer)
            if native.kernels is not None and layout["blocks"].nbytes >= 2 * _BYTES_PER_SHARE:
                native.kernels.pool_start(native.get_num_threads() - 1)

    def topk_lists(self, request: ListScan, queries: Queries, k: int) -> TopK:
        stats: dict = {}
        scores, positions = scan_lists_fast(self.quantizer, request, queries.rotated, queries.sq_norms, k,
                                            self.metric, cache=self.cache, stats=stats)
        self.last_stats = stats
        return TopK(scores, positions, stats)

    def search_direct(self, segments: list[Segment], queries: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """`Scanner.search_direct` in one `_native.search` call: the norm checks, rotation, tables,
        scan, ordering and ids (None with a rotation the kernels do not apply). `last_stats` holds
        the queries and each one's count of exact scores ("exact_counts")."""
        entries, row_ids, start = [], [], 0  # of each segment with rows
        for seg in segments:
            if len(seg):
                entries.append(_segment_entry(self.quantizer, seg, self.metric, self.cache, start))
                row_ids.append(np.ascontiguousarray(seg.ids, dtype=np.int64))  # as held, where it is so
            start += len(seg)
        return self._direct(entries, row_ids, queries, k, checked=False)

    def probing_search(self, request: ListScan, coarse):
        """`Scanner.probing_search`: a function that searches one query in one `_native.search_probing`
        call: the norm checks, the probe, the query's rotation and tables, the scan of its lists'
        segments (each with its list's offset) and the ids (None with a rotation the kernels do not
        apply). A list's arguments are made when a query first probes it and kept by the function
        (which its caller keeps for the snapshot): a snapshot that answers one query (an index that
        adds and searches in turn) makes only that query's lists'. What may change between two
        searches is read by each: whether the kernels are on (`available`), the SIMD level and the
        thread budget; the kernel is looked up each time too (the tests watch its calls)."""
        consts = _constants(self.quantizer)["rotating"]
        if consts is None:
            return None
        parts = _list_parts(self.quantizer, request, self.metric, self.cache)

        def make(lst):
            entries, ids = parts(lst)
            return entries, tuple(ids), sum(e[0].nbytes for e in entries)

        per_list = [None] * coarse.nlist
        centroids_t, sq_norms, nlist = coarse.centroids_t, coarse.sq_norms, coarse.nlist
        l2, cosine, int8 = self.metric == "l2", self.metric == "cosine", int8_scan(self.quantizer)
        dim = self.quantizer.dim

        def search(query: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray] | None:
            """ids (1, k) int64 and scores (1, k) float32 of the query (1, d) float32, C-contiguous,
            or None (the kernels are off, or the query fails a check)."""
            if not available():
                return None
            count = np.empty(1, dtype=np.int64)  # these are written whole by the kernel
            scores = np.empty((1, k), dtype=np.float32)
            ids = np.empty((1, k), dtype=np.int64)
            share = native.enter_share()
            try:
                bad = native.kernels.search_probing(
                    consts, query, np.empty(dim, np.float32) if cosine else None, centroids_t, sq_norms,
                    np.empty(min(nprobe, nlist), np.int64), np.empty(nlist, np.float32), per_list, make, scores,
                    ids, count, l2, int8 and native.simd() == "avx512vbmi", share, _BYTES_PER_SHARE,
                    max_norm=MAX_NORM, zero_ok=not cosine, normalize=cosine)
            finally:
                native.leave_share()
            if bad >= 0:
                return None
            self.last_stats = {"queries": 1, "exact_counts": count}
            return ids, scores

        return search

    def search_direct_lists(self, request: ListScan, queries: np.ndarray,
                            k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """`Scanner.search_direct_lists` in one `_native.search` call: every list's entries in list
        order (made once per snapshot: the request's memo), the queries' probed lists and their
        offsets; the kernel groups the queries that probe a list, as `scan_lists_fast` does."""
        made = request.memo.get("fastscan-lists")
        if made is None:
            parts = _list_parts(self.quantizer, request, self.metric, self.cache)
            entries, row_ids, first = [], [], [0]
            for lst in range(request.offsets.shape[1]):
                list_made, ids = parts(lst)
                entries.extend(list_made)
                row_ids.extend(ids)
                first.append(len(entries))
            made = request.memo["fastscan-lists"] = (entries, row_ids, np.asarray(first, np.int64))
        entries, row_ids, first = made
        nlist = len(first) - 1
        probed = np.unique(request.lists)
        if 2 * len(probed) < nlist:  # a small batch: only its lists' entries (the call binds each one it is given)
            counts = np.zeros(nlist + 1, np.int64)
            counts[probed + 1] = first[probed + 1] - first[probed]
            picked = [i for lst in probed.tolist() for i in range(first[lst], first[lst + 1])]
            entries, row_ids, first = [entries[i] for i in picked], [row_ids[i] for i in picked], np.cumsum(counts)
        return self._direct(entries, row_ids, queries, k, checked=True, probes=request.lists, list_entries=first,
                            list_offsets=request.offsets)

    def _direct(self, entries: list, row_ids: list, queries: np.ndarray, k: int, checked: bool,
                probes: np.ndarray | None = None, list_entries: np.ndarray | None = None,
                list_offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The one native call of the direct lanes (`checked`: the queries' norms are checked and
        cosine queries scaled by the caller already)."""
        quantizer, metric = self.quantizer, self.metric
        consts = _constants(quantizer)["rotating"]
        if consts is None:
            return None
        nq = queries.shape[0]
        count = np.empty(nq, dtype=np.int64)  # these three are written whole by the kernel
        scores = np.empty((nq, k), dtype=np.float32)
        ids = np.empty((nq, k), dtype=np.int64)
        int8 = native.simd() == "avx512vbmi" and int8_scan(quantizer)
        # A batch over lists reads its probed share of the entries' codes.
        share_read = 1.0 if probes is None else probes.shape[1] / max(len(list_entries) - 1, 1)
        with native.thread_share() as share:
            bad = native.kernels.search(consts, queries, entries, scores, ids, count, metric == "l2", int8,
                                        threads=_scan_threads(share, entries, nq, True, share_read),
                                        row_ids=row_ids,
                                        max_norm=0.0 if checked else MAX_NORM, zero_ok=metric != "cosine",
                                        normalize=metric == "cosine" and not checked, probes=probes,
                                        list_entries=list_entries, list_offsets=list_offsets)
        if bad >= 0:
            return None
        self.last_stats = {"queries": nq, "exact_counts": count}
        return ids, scores

    def topk_queries(self, segments: list[Segment], queries: torch.Tensor, k: int) -> TopK:
        stats: dict = {}
        scores, positions = search_fast(self.quantizer, segments, queries, k, self.metric, cache=self.cache,
                                        stats=stats)
        self.last_stats = stats
        return TopK(scores, positions, stats)

    def topk(self, segments: list[Segment], queries: Queries, k: int) -> TopK:
        stats: dict = {}
        scores, positions = scan_topk_fast(self.quantizer, segments, queries.rotated, queries.sq_norms, k,
                                           self.metric, cache=self.cache, stats=stats)
        self.last_stats = stats
        return TopK(scores, positions, stats)
