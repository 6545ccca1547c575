"""GPU search with the CUDA kernels of ``kernels/tq_scan.cu``, loaded by CuPy.

CuPy is imported only when a kernel is compiled or launched, so CPU use never imports it.

What lives on the GPU
---------------------
Per segment, once: the packed codes regrouped into "interleaved words" (kernel layout, see the .cu
file; the same bits, each code group padded to whole 32-code chunks), the per-vector scale, ‖x‖²
for l2 and √(π/2)/d·‖r‖ for prod. Nothing else: no float copy of the database.

How a batch of queries is searched
----------------------------------
1. The queries are rotated on the GPU (torch). Small batches (< `MMA_MIN_BATCH`) build a per-query
   table of exact float sums per 4-bit nibble (`_luts`) and run ``tq_lut_scan`` (one thread per
   row, the table in shared memory). Larger batches of whole-bit mse codes (1, 2 or 4 bits) run
   ``tq_mma_scan``: tiles of codes are dequantized to fp16 in shared memory and multiplied with
   the queries on tensor cores. From `GEMM_MIN_BATCH` queries (ip, cosine), ``tq_dequant`` writes
   fp16 row blocks (scale folded in) that cuBLAS multiplies with the queries (`_search_gemm`).
2. Neither scan kernel writes the nq × n score matrix. Both emit only rows scoring at least a
   per-query threshold τ into a small candidate buffer. τ comes from a strided sample of the rows
   scored first by the same kernel in "dense" mode (fixed slots, no threshold): the k-th best
   sample score is a lower bound of the k-th best over all rows, so every true top-k row is
   emitted. If a query emits more rows than its buffer holds, the pass is rerun with a buffer of
   the counted size. Small indexes are scored densely in one pass. The GEMM path writes one row
   block's fp16 scores at a time and keeps the best 2k + 49 per query.
3. Table scores are exact float32 (the torch scan's estimator up to summation order): the top k of
   the candidates is the answer. Tensor-core scores are approximate; their error is at most
   E = S·Σ_j |q_j|·|c_j|·ε (fp16 rounding of q and of the centroids, fp32 accumulation; see
   `_mma_error_bound`), so τ is lowered by 2E, the best 2k + 48 candidates are rescored
   exactly, and the answer is certified when the k-th exact score is at least E above every
   approximate score left out. Queries that fail the certificate (rare) are rerun exactly.

So results equal the CPU scan's up to float rounding of the sums, whichever kernel ran.
``TQINDEX_CUDA_KERNELS=0`` uses the plain torch scan (`backends.cpu.scan_topk`) on the GPU instead.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..quantizer import TurboQuantizer
from ..segment import Segment
from .cpu import BlockDecoder, _tensor

__all__ = ["require", "kernel_dir", "GpuScanner", "enabled", "last_stats"]

#: What the last batch did (for tests and benchmarks): kernel ("lut", "mma" or "gemm"), whether the rows
#: were sampled for a threshold, reruns after a buffer overflow, queries rerun after a failed certificate.
last_stats = {"kernel": None, "sampled": False, "overflow_reruns": 0, "uncertified": 0}

KERNEL_FILE = "tq_scan.cu"
#: Batches of at least this many queries use the tensor-core kernel (where the codes allow it).
MMA_MIN_BATCH = 8
#: ... and from this many on (ip/cosine), fp16 dequantized row blocks times the queries in cuBLAS.
GEMM_MIN_BATCH = 1024  # (bench/results/gpu.md: the fused kernel wins at 256 queries, the GEMM at 4096)
_UPLOAD_ROWS = 1 << 20          # rows regrouped at a time when uploading a segment
_LUT_SHARED_BYTES = 160 << 10   # per-query tables up to this size are staged in shared memory
_SM_BYTES = 227 << 10
_CAP_FACTOR, _CAP_SLACK = 4, 256  # candidate slots per query: factor·k·(sampling step) + slack
_SAMPLE_STEP = 32                 # threshold sample: every 32nd row (memory permitting)
_LUT_THREADS = 512                # threads per block of tq_lut_scan (its __launch_bounds__)
_FUNCTIONS: dict = {}             # compiled kernels, by name, layout and device
_STREAMS: dict = {}               # CuPy views of torch streams
_DENSE_ROWS = 4096                # indexes up to this size (or 8k rows) are scored densely


def enabled() -> bool:
    return os.environ.get("TQINDEX_CUDA_KERNELS", "1") != "0"


def require() -> None:
    """Raise a RuntimeError that says what is missing for device="cuda"."""
    if not torch.backends.cuda.is_built():
        raise RuntimeError("device='cuda' needs a CUDA build of torch; this one is CPU-only "
                           f"(torch {torch.__version__})")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' needs an NVIDIA GPU and driver; torch sees none")
    if enabled():
        try:
            import cupy  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("device='cuda' needs CuPy to load the CUDA kernels: pip install the "
                               "cupy-cudaXXx wheel matching your CUDA (e.g. cupy-cuda12x), or set "
                               "TQINDEX_CUDA_KERNELS=0 for the slower torch scan") from exc
        kernel_dir()


def kernel_dir() -> Path:
    """Folder holding the .cu sources: $TQINDEX_KERNELS, the checkout's kernels/ (editable install),
    or <prefix>/share/tqindex/kernels (wheel)."""
    env = os.environ.get("TQINDEX_KERNELS")
    places = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "kernels",
                                             Path(sys.prefix) / "share" / "tqindex" / "kernels"]
    for place in places:
        if (place / KERNEL_FILE).is_file():
            return place
    raise RuntimeError(f"CUDA kernel source {KERNEL_FILE} not found in " + ", ".join(map(str, places)))


@dataclass(frozen=True)
class Region:
    """One code group (or the QJL signs) in the kernel's word layout."""

    bits: int
    chunks: int        # 32-code chunks
    woff: int          # first word (a multiple of 4)
    loff: int          # first float of the region's part of a query table
    qjl: bool
    start: int         # rotated coordinates [start, stop)
    stop: int
    src_offset: int    # bytes [src_offset, src_offset + src_nbytes) of the packed row (codes or qjl)
    src_nbytes: int

    @property
    def unit(self) -> int:
        return 4 if self.bits in (1, 2, 4) else self.bits

    @property
    def words(self) -> int:
        return -(-self.chunks * self.bits // 4) * 4

    @property
    def lut_floats(self) -> int:
        return self.chunks * (32 * self.bits // self.unit) * (1 << self.unit)


def regions(quantizer: TurboQuantizer) -> list[Region]:
    out, woff, loff = [], 0, 0
    specs = [(g.bits, g.start, g.stop, False, g.offset, g.nbytes) for g in quantizer.groups]
    if quantizer.variant == "prod":
        specs.append((1, 0, quantizer.dim, True, 0, quantizer.qjl_bytes))
    for bits, start, stop, qjl, offset, nbytes in specs:
        r = Region(bits, -(-(stop - start) // 32), woff, loff, qjl, start, stop, offset, nbytes)
        out.append(r)
        woff += r.words
        loff += r.lut_floats
    return out


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


class GpuScanner:
    """The CUDA kernels for one quantizer and metric; holds compiled modules and per-device tables."""

    def __init__(self, quantizer: TurboQuantizer, metric: str):
        self.q, self.metric = quantizer, metric
        self.regions = regions(quantizer)
        self.words = sum(r.words for r in self.regions)
        self.lut_floats = sum(r.lut_floats for r in self.regions)
        self.lut_shared = self.lut_floats * 4 <= _LUT_SHARED_BYTES
        g = quantizer.groups
        self.mma_bits = g[0].bits if (quantizer.variant == "mse" and len(g) == 1 and g[0].bits in (1, 2, 4)) else 0
        # Both tensor-core paths decode through byte tables, so block codebooks take them too.
        self.gemm_ok = bool(self.mma_bits) and metric != "l2"
        # Its (256, 8/b) byte → centroids tables serve the tensor-core paths too; it decodes rescored rows.
        self._decoder = BlockDecoder(quantizer)
        self._tables: dict = {}

    # -- compilation ---------------------------------------------------------------------------
    def _defines(self) -> dict:
        d = {"NG": len(self.regions), "LUT_FLOATS": max(self.lut_floats, 1), "LUT_SHARED": int(self.lut_shared)}
        for i, r in enumerate(self.regions):
            d.update({f"G{i}_BITS": r.bits, f"G{i}_CHUNKS": r.chunks, f"G{i}_WOFF": r.woff,
                      f"G{i}_LOFF": r.loff, f"G{i}_QJL": int(r.qjl)})
        return d

    def _function(self, name: str, bn: int = 0):
        defines = self._defines()
        if bn:
            defines.update({"MMA_BITS": self.mma_bits, "MMA_CHUNKS": self.regions[0].chunks, "BN": bn})
        key = (name, tuple(sorted(defines.items())), torch.cuda.current_device())
        if key not in _FUNCTIONS:  # shared by every index with the same layout
            import cupy
            source = (kernel_dir() / KERNEL_FILE).read_text()
            options = ("-std=c++17",) + tuple(f"-D{k}={v}" for k, v in defines.items())
            try:
                fn = cupy.RawModule(code=source, options=options).get_function(name)
            except Exception as nvrtc_error:  # e.g. NVRTC without the CUDA headers: try nvcc
                try:
                    fn = cupy.RawModule(code=source, options=options, backend="nvcc").get_function(name)
                except Exception:
                    raise nvrtc_error
            _FUNCTIONS[key] = fn
        return _FUNCTIONS[key]

    def _launch(self, fn, grid, block, args, shared: int = 0):
        import cupy
        if shared > 48 << 10 and fn.max_dynamic_shared_size_bytes < shared:
            fn.max_dynamic_shared_size_bytes = shared  # above 48 KB a kernel must opt in
        device = torch.cuda.current_device()
        handle = torch.cuda.current_stream().cuda_stream
        if (device, handle) not in _STREAMS:
            with warnings.catch_warnings():  # newer CuPy prefers Stream.from_external (same effect)
                warnings.simplefilter("ignore", DeprecationWarning)
                _STREAMS[device, handle] = cupy.cuda.ExternalStream(handle, device)
        with cupy.cuda.Device(device):
            # Launch on torch's current stream, so that kernels and torch ops stay ordered.
            fn(grid, block, args, shared_mem=shared, stream=_STREAMS[device, handle])

    # -- per-device constants ------------------------------------------------------------------
    def _device_tables(self, device: torch.device) -> dict:
        key = str(device)
        if key not in self._tables:
            t = {}
            if self.mma_bits:
                decoder_tables = self._decoder.tables(device)
                byte_centroids = decoder_tables["byte_tables"][0]  # (256, 8/b) float32
                t["byte_table"] = byte_centroids.half().contiguous()       # the fused kernel's
                t["byte_table32"] = byte_centroids.contiguous()            # tq_dequant's
                t["byte_sq"] = byte_centroids.square().sum(dim=1)              # Σ c² of a code byte
                t["cmax"] = float(byte_centroids.abs().max())  # every value a coordinate can decode to
            self._tables[key] = t
        return self._tables[key]

    # -- segments ------------------------------------------------------------------------------
    def segment_data(self, segment: Segment, device: torch.device) -> dict:
        """Upload a segment in the kernel layout (cached on the segment, per device)."""
        key = "kernels:" + str(device)
        if key in segment.device_cache:
            return segment.device_cache[key]
        enc, n = segment.encoded, len(segment)
        w4 = self.words // 4
        words = torch.empty((w4, n, 4), dtype=torch.int32, device=device)
        for a in range(0, n, _UPLOAD_ROWS):
            b = min(n, a + _UPLOAD_ROWS)
            row = torch.zeros((b - a, self.words * 4), dtype=torch.uint8, device=device)
            for r in self.regions:
                src = enc.qjl if r.qjl else enc.codes
                part = _tensor(src[a:b, r.src_offset:r.src_offset + r.src_nbytes]).to(device)
                row[:, 4 * r.woff:4 * r.woff + r.src_nbytes] = part
            words[:, a:b, :] = row.view(torch.int32).view(b - a, w4, 4).permute(1, 0, 2)
        scale = _tensor(enc.scale).to(device).float()
        data = {"n": n, "words": words, "scale": scale, "scale_max": float(scale.abs().max()) if n else 0.0,
                "normsq": None, "qjlmul": None, "ynorm_max": self._ynorm_max(words, device) if self.mma_bits else 0.0}
        if self.metric == "l2":
            norm = _tensor(enc.norm).to(device) if enc.norm is not None else scale
            data["normsq"] = norm.square().contiguous()
        if self.q.variant == "prod":
            data["qjlmul"] = (self.q.qjl_scale * _tensor(enc.residual_norm).to(device)).contiguous()
        segment.device_cache[key] = data
        return data

    def _ynorm_max(self, words: torch.Tensor, device: torch.device) -> float:
        """max over rows of ‖ỹ‖ (unit-scale centroids), for the tensor-core error bound: a 256-entry
        table gives each code byte's Σ c², summed per row a block at a time."""
        byte_sq = self._device_tables(device)["byte_sq"]
        nbytes = self.regions[0].src_nbytes
        best = 0.0
        for a in range(0, words.shape[1], 1 << 17):
            w = words[:, a:a + (1 << 17), :].permute(1, 0, 2).reshape(-1, words.shape[0] * 4)
            raw = w.contiguous().view(torch.uint8)[:, :nbytes]
            best = max(best, float(byte_sq[raw.int()].sum(dim=1).max()))
        return math.sqrt(best) * (1 + 2.0 ** -20)  # float32 sums of squares: a hair of margin

    # -- search --------------------------------------------------------------------------------
    def search(self, segments: list[Segment], rotated: torch.Tensor, projected: torch.Tensor | None,
               qsq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of the quantized scores (higher is better) over the live rows.

        rotated, projected : (nq, d) float32 on the GPU; qsq : (nq,) float32, ‖q‖².
        Returns scores (nq, k) float32 (−inf padding) and positions (nq, k) int64 (−1 padding),
        on the GPU; positions index the concatenation of `segments`.
        """
        device = rotated.device
        nq = rotated.shape[0]
        parts, total = [], 0  # (uploaded data, first position, deletion mask) of each non-empty segment
        for s in segments:
            if len(s):
                deleted = None if s.deleted is None else torch.from_numpy(s.deleted).to(device).view(torch.uint8)
                parts.append((self.segment_data(s, device), total, deleted))
            total += len(s)
        best_s = torch.full((nq, k), -torch.inf, dtype=torch.float32, device=device)
        best_p = torch.full((nq, k), -1, dtype=torch.int64, device=device)
        if not parts or nq == 0:
            return best_s, best_p
        budget = self._budget_entries(device)
        last_stats.update(overflow_reruns=0, uncertified=0)
        # Query sub-batches small enough that the sample and candidate buffers fit the budget.
        # (At least MMA_MIN_BATCH queries, so that a tight budget does not forfeit the tensor cores.)
        per = nq if nq * total <= budget else max(MMA_MIN_BATCH, int(budget / math.sqrt(4.0 * k * total)))
        bounds = np.linspace(0, nq, max(1, nq // per) + 1).astype(int)  # parts of per to 2·per − 1 queries
        for a, b in zip(bounds[:-1], bounds[1:]):
            path = self.path_for(b - a)
            if path == "gemm":
                s, p = self._search_gemm(parts, rotated[a:b], qsq[a:b], k, budget)
            else:
                s, p = self._search_batch(parts, total, rotated[a:b], None if projected is None else projected[a:b],
                                          qsq[a:b], k, budget, use_mma=path == "mma")
            best_s[a:b], best_p[a:b] = s, p
        return best_s, best_p

    #: Set to "lut", "mma" or "gemm" to force a path (tests, benchmarks); None chooses by batch size.
    force: str | None = None

    def path_for(self, nq: int) -> str:
        """The kernel for a batch of nq queries: the table scan for few queries; for whole-bit mse
        codes (1, 2, 4 bits) the fused tensor-core scan from MMA_MIN_BATCH queries, and from
        GEMM_MIN_BATCH on (ip/cosine) fp16 dequantization of row blocks + a cuBLAS GEMM."""
        if self.force is not None:
            ok = {"lut": True, "mma": bool(self.mma_bits), "gemm": self.gemm_ok}
            if not ok[self.force]:
                raise ValueError(f"path {self.force!r} does not support this index")
            return self.force
        if self.gemm_ok and nq >= GEMM_MIN_BATCH:
            return "gemm"
        return "mma" if self.mma_bits and nq >= MMA_MIN_BATCH else "lut"

    @staticmethod
    def _budget_entries(device: torch.device) -> int:
        free = torch.cuda.mem_get_info(device)[0]
        return int(min(max(free // 16 // 12, 4 << 20), 128 << 20))  # (float, int64) candidate slots

    def _search_batch(self, parts, total, rotated, projected, qsq, k, budget, use_mma):
        device, nq = rotated.device, rotated.shape[0]
        prep = self._prepare_mma(rotated) if use_mma else self._prepare_lut(rotated, projected)
        err = self._mma_error_bound(rotated, parts) if use_mma else torch.zeros(nq, device=device)
        qsq = qsq.contiguous()
        no_tau = torch.full((nq,), -torch.inf, device=device)
        dense = total <= max(_DENSE_ROWS, 8 * k) and nq * total <= budget
        last_stats.update(kernel="mma" if use_mma else "lut", sampled=not dense)
        if dense:  # a small index: score every row into fixed slots
            sc, pos = self._dense_pass(prep, parts, qsq, 1, use_mma)
            tau = no_tau
        else:
            # Score every step-th row (about 1/32 of them, fewer if the buffer budget says so); the
            # k-th best sample score bounds the k-th best overall from below.
            step = max(-(-total * nq // budget), min(_SAMPLE_STEP, max(1, total // (8 * k))))
            sample, _ = self._dense_pass(prep, parts, qsq, step, use_mma)
            tau = no_tau
            if sample.shape[1] >= k:
                tau = torch.topk(sample, k, dim=1).values[:, -1] - 2 * err  # err = 0 for the table kernel
            # About k·step rows score above the sample's k-th best; room for several times that.
            cap = min(total, max(k, _CAP_FACTOR * k * step + _CAP_SLACK))
            counts, sc, pos = self._pass(prep, parts, qsq, tau, cap, use_mma)
            most = int(counts.max())
            if most > cap:  # a query emitted more than its buffer: rerun with the counted size
                cap = most
                last_stats["overflow_reruns"] += 1
                counts, sc, pos = self._pass(prep, parts, qsq, tau, cap, use_mma)
            valid = torch.arange(cap, device=device)[None, :] < counts[:, None]
            sc = sc.masked_fill(~valid, -torch.inf)
        if not use_mma:
            return _topk_padded(sc, pos, k)
        return self._rescore_certified(parts, rotated, projected, qsq, k, sc, pos, tau, err, budget)

    def _search_gemm(self, parts, rotated, qsq, k, budget):
        """Large batches: each block of rows is dequantized to fp16 (scale folded in, divided by the
        largest scale S so that nothing overflows), multiplied with the queries (fp16, divided by
        max|q_j|) by cuBLAS with fp32 accumulation, and the best 2k + 17 approximate scores are kept
        per query; the best 2k + 16 are then rescored exactly and certified as in the fused path."""
        device, (nq, d) = rotated.device, rotated.shape
        last_stats.update(kernel="gemm", sampled=False)
        kdim = self.regions[0].chunks * 32
        smax = max(data["scale_max"] for data, _, _ in parts) or 1.0
        qmax = rotated.abs().amax(dim=1)
        qmul = torch.where(qmax > 0, qmax, torch.ones_like(qmax))
        qh = torch.zeros((nq, kdim), dtype=torch.float16, device=device)
        qh[:, :d] = (rotated / qmul[:, None]).half()
        err = self._mma_error_bound(rotated, parts, extra_rel=2.0 ** -11)  # + rounding of the fp16 output
        take = _keep(k) + 1
        rows = max(1 << 14, min(1 << 20, (1 << 30) // (2 * max(nq, 1))))  # a block's fp16 scores ≤ 1 GiB
        rows = min(rows, max(data["n"] for data, _, _ in parts))
        deq = torch.empty((rows, kdim), dtype=torch.float16, device=device)
        best_v = torch.empty((nq, 0), dtype=torch.float16, device=device)
        best_p = torch.empty((nq, 0), dtype=torch.int64, device=device)
        reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # fp32 sums: the bound holds
        try:
            for data, offset, deleted in parts:
                for a in range(0, data["n"], rows):
                    m = min(rows, data["n"] - a)
                    self._dequant(data, a, m, deq, 1.0 / smax)
                    scores = qh @ deq[:m].T
                    if deleted is not None:
                        scores.masked_fill_(deleted[a:a + m].bool()[None, :], -torch.inf)
                    v, i = torch.topk(scores, min(take, m), dim=1)
                    v, j = torch.topk(torch.cat([best_v, v], 1), min(take, best_v.shape[1] + v.shape[1]), dim=1)
                    best_p = torch.gather(torch.cat([best_p, i + (offset + a)], 1), 1, j)
                    best_v = v
        finally:
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
        approx = best_v.float() * (qmul * smax)[:, None]
        tau = torch.full((nq,), -torch.inf, device=device)
        return self._rescore_certified(parts, rotated, None, qsq, k, approx, best_p, tau, err, budget)

    def _dequant(self, data, start, rows, out, inv_smax):
        """out[:rows] = fp16(decoded value · scale / S) of rows [start, start + rows) (tq_dequant; the
        float32 byte table decodes scalar and block codebooks alike)."""
        device, chunks = out.device, self.regions[0].chunks
        table = self._device_tables(device)["byte_table32"]
        args = (_ptr(data["words"]), np.int64(data["n"]), _ptr(data["scale"]), np.float32(inv_smax), _ptr(table),
                np.int64(start), np.int64(rows), _ptr(out), np.int32(out.shape[1]))
        grid = min(-(-rows * chunks // 256), 64 * _sm_count(device))
        self._launch(self._function("tq_dequant", 16), (grid,), (256,), args)

    # -- kernel passes -------------------------------------------------------------------------
    def _prepare_lut(self, rotated, projected) -> dict:
        return {"luts": _luts(self.q, self.regions, rotated, projected)}

    def _prepare_mma(self, rotated) -> dict:
        nq, d = rotated.shape
        bn = 16 if nq <= 16 else 32 if nq <= 32 else 64 if nq <= 64 else 128
        kdim = -(-self.regions[0].chunks // 2) * 64
        qmax = rotated.abs().amax(dim=1)
        qmul = torch.where(qmax > 0, qmax, torch.ones_like(qmax))
        qh = torch.zeros((-(-nq // bn) * bn, kdim), dtype=torch.float16, device=rotated.device)
        qh[:nq, :d] = (rotated / qmul[:, None]).half()   # |q_j / max|q|| ≤ 1: no fp16 overflow
        return {"qh": qh, "qmul": qmul.contiguous(), "bn": bn}

    def _dense_pass(self, prep, parts, qsq, step, use_mma):
        """Scores of rows 0, step, 2·step, … of every segment: (nq, m) scores (−inf for removed
        rows) and positions."""
        counts = [-(-data["n"] // step) for data, _, _ in parts]
        nq, m = qsq.shape[0], sum(counts)
        scores = torch.empty((nq, m), dtype=torch.float32, device=qsq.device)
        pos = torch.empty((nq, m), dtype=torch.int64, device=qsq.device)
        no_tau = torch.full((nq,), -torch.inf, device=qsq.device)  # read, but unused in dense mode
        slot = 0
        for part, count in zip(parts, counts):
            self._launch_scan(prep, part, qsq, no_tau, use_mma, step, count, m, slot, None, scores, pos)
            slot += count
        return scores, pos

    def _pass(self, prep, parts, qsq, tau, cap, use_mma):
        """Rows scoring at least tau: counts (nq,) int32, and cap slots of scores and positions."""
        nq = qsq.shape[0]
        counts = torch.zeros(nq, dtype=torch.int32, device=qsq.device)
        scores = torch.empty((nq, cap), dtype=torch.float32, device=qsq.device)
        pos = torch.empty((nq, cap), dtype=torch.int64, device=qsq.device)
        for part in parts:
            self._launch_scan(prep, part, qsq, tau, use_mma, 1, part[0]["n"], cap, -1, counts, scores, pos)
        return counts, scores, pos

    def _launch_scan(self, prep, part, qsq, tau, use_mma, step, count, cap, dense_offset, counts, scores, pos):
        data, offset, deleted = part
        device, nq = qsq.device, qsq.shape[0]
        tail = (np.int32(nq), np.int64(count), np.int64(0), np.int64(step), np.int64(offset),
                np.int32(cap), np.int64(dense_offset), _ptr(counts), _ptr(scores), _ptr(pos))
        if use_mma:
            bn = prep["bn"]
            fn = self._function("tq_mma_scan", bn)
            table = self._device_tables(device)["byte_table"]
            lda, ldc = 64 + 8, bn + 4
            shared = max((128 + bn) * lda * 2, 128 * ldc * 4) + 256 * (8 // self.mma_bits) * 2
            args = (_ptr(data["words"]), np.int64(data["n"]), _ptr(data["scale"]), _ptr(data["normsq"]),
                    _ptr(deleted), _ptr(prep["qh"]), _ptr(prep["qmul"]), _ptr(table), _ptr(qsq),
                    _ptr(tau)) + tail
            self._launch(fn, (-(-count // 128), prep["qh"].shape[0] // bn), (256,), args, shared)
        else:
            fn = self._function("tq_lut_scan")
            shared = self.lut_floats * 4 if self.lut_shared else 0
            resident = max(1, min(4, _SM_BYTES // (shared + 1024))) if shared else 4  # 512-thread blocks
            per_query = max(1, min(-(-count // _LUT_THREADS), resident * _sm_count(device) // nq))
            args = (_ptr(data["words"]), np.int64(data["n"]), _ptr(data["scale"]), _ptr(data["normsq"]),
                    _ptr(data["qjlmul"]), _ptr(deleted), _ptr(prep["luts"]), _ptr(qsq), _ptr(tau)) + tail
            self._launch(fn, (per_query * nq,), (_LUT_THREADS,), args, shared)

    # -- tensor-core path: error bound, exact rescoring ----------------------------------------
    def _mma_error_bound(self, rotated, parts, extra_rel: float = 0.0) -> torch.Tensor:
        """Per query, a bound on |approximate − exact| score of any row (see module notes).

        fp16 keeps 11 significant bits: q_j/max|q| and each centroid are each off by at most 2^-11
        relative (2^-25 absolute below the normal range), so each product by < 2^-10 + 2^-22
        relative plus the absolute terms; fp32 accumulation of d products adds < d·2^-23 of
        Σ|q_j c_j| (2^-22 here, allowing truncating adders). Σ|q_j c_j| ≤ min(‖q‖₁·max|c|,
        ‖q‖₂·max‖ỹ‖); scores are multiplied by the row's scale ≤ S (doubled for l2). A factor 2
        covers the remaining roundings.
        """
        d = self.q.dim
        cmax = self._device_tables(rotated.device)["cmax"]
        scale_max = max(data["scale_max"] for data, _, _ in parts)
        ymax = max(data["ynorm_max"] for data, _, _ in parts)
        absq = rotated.abs()
        q1, qmax = absq.sum(dim=1), absq.amax(dim=1)
        # Σ_j |q_j c_j| ≤ min(‖q‖₁ max|c|, ‖q‖₂ max‖ỹ‖) (Cauchy-Schwarz for the second).
        mass = torch.minimum(q1 * cmax, torch.linalg.vector_norm(rotated, dim=1) * ymax)
        per_row = (2.0 ** -10 + (d + 2) * 2.0 ** -22 + extra_rel) * mass + q1 * 2.0 ** -25 + d * cmax * qmax * 2.0 ** -25
        return 2.0 * (2 if self.metric == "l2" else 1) * scale_max * per_row

    def _rescore_certified(self, parts, rotated, projected, qsq, k, approx, pos, tau, err, budget):
        nq, cap = approx.shape
        keep = min(cap, _keep(k))
        top = torch.topk(approx, min(cap, keep + 1), dim=1)
        cand_s, cand_i = top.values[:, :keep], top.indices[:, :keep]
        cand_p = torch.gather(pos, 1, cand_i).masked_fill(torch.isneginf(cand_s), -1)
        # The best approximate score left out: the (keep+1)-th candidate, or τ below which nothing was emitted.
        left_out = top.values[:, keep] if top.values.shape[1] > keep else torch.full_like(tau, -torch.inf)
        left_out = torch.maximum(left_out, tau)
        exact = self.exact_scores(parts, rotated, qsq, cand_p)
        best_s, best_p = _topk_padded(exact, cand_p, k)
        ok = best_s[:, k - 1] >= left_out + err
        bad = torch.nonzero(~ok).flatten()
        if len(bad):  # the certificate failed: rescan these queries with the exact table kernel
            kernel = last_stats["kernel"]
            last_stats["uncertified"] += len(bad)
            s, p = self._search_batch(parts, sum(d["n"] for d, _, _ in parts), rotated[bad],
                                      None if projected is None else projected[bad], qsq[bad], k, budget,
                                      use_mma=False)
            best_s[bad], best_p[bad] = s, p
            last_stats["kernel"] = kernel
        return best_s, best_p

    def exact_scores(self, parts, rotated, qsq, positions) -> torch.Tensor:
        """Exact float32 scores (the torch scan's estimator) of given rows: positions (nq, m), −1 = none."""
        nq, m = positions.shape
        out = torch.full((nq, m), -torch.inf, dtype=torch.float32, device=rotated.device)
        flat = positions.reshape(-1)
        for data, offset, _ in parts:
            sel = torch.nonzero((flat >= offset) & (flat < offset + data["n"])).flatten()
            for a in range(0, len(sel), 1 << 15):
                idx = sel[a:a + (1 << 15)]
                rows = flat[idx] - offset
                w = data["words"][:, rows, :].permute(1, 0, 2).reshape(len(rows), -1).contiguous()
                raw = w.view(torch.uint8)
                codes = torch.cat([raw[:, 4 * r.woff:4 * r.woff + r.src_nbytes] for r in self.regions if not r.qjl], 1)
                y = self._decoder.decode(codes)
                qrows = idx // m
                s = (y * rotated[qrows]).sum(dim=1) * data["scale"][rows]
                if data["normsq"] is not None:
                    s = 2 * s - data["normsq"][rows] - qsq[qrows]
                out.view(-1)[idx] = s
        return out


def _keep(k: int) -> int:
    """Approximate (tensor-core) candidates rescored exactly per query: the more, the likelier the
    certificate holds (the k-th exact score must clear the best one left out by the error bound)."""
    return 2 * k + 48


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _topk_padded(scores: torch.Tensor, pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    nq, m = scores.shape
    take = min(k, m)
    s, i = torch.topk(scores, take, dim=1)
    p = torch.gather(pos, 1, i)
    if take < k:
        s = torch.cat([s, torch.full((nq, k - take), -torch.inf, device=s.device)], 1)
        p = torch.cat([p, torch.full((nq, k - take), -1, dtype=torch.int64, device=p.device)], 1)
    return s, p.masked_fill(torch.isneginf(s), -1)


def _luts(quantizer: TurboQuantizer, regs: list[Region], rotated: torch.Tensor,
          projected: torch.Tensor | None) -> torch.Tensor:
    """Per-query tables of the table kernel: (nq, Σ lut_floats) float32.

    For a nibble unit (b ∈ {1, 2, 4}: 4/b codes) and each of its 16 values v, the entry is
    Σ_t q_{j+t} · c(code_t(v)) (for a block codebook, Σ_t q_{j+t} · codeword_v[t]); for wider codes,
    q_j · c(v). Coordinates past the group's end are
    zero, so the zero-padded codes of the last chunk add nothing. Products and sums are done
    elementwise in float32 (no TF32 matmul).
    """
    nq, device = rotated.shape[0], rotated.device
    parts = []
    groups = iter(quantizer.groups)
    for r in regs:
        words = None
        if r.qjl:
            q, cent = projected, torch.tensor([-1.0, 1.0], device=device)
        else:
            g = next(groups)
            q, cent = rotated, g.centroids.to(device)
            if g.block > 1:  # a block codebook: nibble v is codeword v (its block is the unit's 4/b codes)
                words = g.codewords.to(device)
        qg = torch.zeros((nq, r.chunks * 32), dtype=torch.float32, device=device)
        qg[:, :r.stop - r.start] = q[:, r.start:r.stop]
        if r.unit == 4:
            per = 4 // r.bits
            v = torch.arange(16, device=device)[:, None] >> (torch.arange(per, device=device) * r.bits)
            table = cent[v & ((1 << r.bits) - 1)] if words is None else words  # (16, per)
            lut = (qg.view(nq, -1, 1, per) * table[None, None]).sum(dim=3)  # (nq, units, 16)
        else:
            lut = qg[:, :, None] * cent[None, None, :]
        parts.append(lut.reshape(nq, -1))
    return torch.cat(parts, dim=1).contiguous()
