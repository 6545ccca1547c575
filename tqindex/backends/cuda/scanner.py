"""The GPU scanner: three search paths over the CUDA kernels (table scan, fused tensor-core scan,
dequantize + cuBLAS), with the certificate of `certify` for the approximate ones.

What lives on the GPU
---------------------
Per segment, once: the packed codes regrouped into "interleaved words" (kernel layout, see the .cu
file; the same bits, each code group padded to whole 32-code chunks), the per-vector scale, ‖x‖²
for l2 and √(π/2)/d·‖r‖ for prod. Nothing else: no float copy of the database.

How a batch of queries is searched
----------------------------------
1. The queries are rotated on the GPU (torch). Small batches (< `MMA_MIN_BATCH`) build a per-query
   table of exact float sums per 4-bit nibble (`layout.query_tables`) and run ``tq_lut_scan`` (one thread per
   row, the table in shared memory). Larger batches of whole-bit mse codes (1, 2 or 4 bits) run
   ``tq_mma_scan``: tiles of codes are dequantized to fp16 in shared memory and multiplied with
   the queries on tensor cores. From `GEMM_MIN_BATCH` queries (ip, cosine), ``tq_dequant`` writes
   fp16 row blocks (scale folded in) that cuBLAS multiplies with the queries into float32 scores
   (`_search_gemm`).
2. Neither scan kernel writes the nq × n score matrix. Both emit only rows scoring at least a
   per-query threshold τ into a small candidate buffer. τ comes from a strided sample of the rows
   scored first by the same kernel in "dense" mode (fixed slots, no threshold): the k-th best
   sample score is a lower bound of the k-th best over all rows, so every true top-k row is
   emitted. If a query emits more rows than its buffer holds, the pass is rerun with a buffer of
   the counted size. Small indexes are scored densely in one pass. The GEMM path writes one row
   block's scores at a time and keeps the best 2k + 49 per query.
3. Table scores are exact float32 (the torch scan's estimator up to summation order): the top k of
   the candidates is the answer. Tensor-core scores are approximate; their error is at most
   E = S·Σ_j |q_j|·|c_j|·ε (fp16 rounding of q and of the centroids, fp32 accumulation; see
   `certify.error_bound`), so τ is lowered by 2E, the best 2k + 48 candidates are rescored
   exactly, and the answer is certified when the k-th exact score is at least E above every
   approximate score left out. Queries that fail the certificate (rare) are rerun exactly.

So results equal the CPU scan's up to float rounding of the sums, whichever kernel ran.
``TQINDEX_CUDA_KERNELS=0`` uses the plain torch scan (`backends.torch_scan`) on the GPU instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...devcache import PerDevice
from ...quantizer import TurboQuantizer
from ...segment import Segment
from ...topk import empty_topk, topk_padded
from ..base import Queries, Scanner, TopK
from ..torch_scan import BlockDecoder, as_tensor
from . import certify
from .kernels import enabled, function, launch, ptr, sm_count
from .layout import query_tables, regions

__all__ = ["GpuScanner", "MMA_MIN_BATCH", "GEMM_MIN_BATCH"]

#: Batches of at least this many queries use the tensor-core kernel (where the codes allow it).
MMA_MIN_BATCH = 8
#: ... and from this many on (ip/cosine), fp16 dequantized row blocks times the queries in cuBLAS
#: (bench/results/gpu.md: the fused kernel wins at 256 queries, the GEMM at 4096).
GEMM_MIN_BATCH = 1024
_UPLOAD_ROWS = 1 << 20          # rows regrouped at a time when uploading a segment
_LUT_SHARED_BYTES = 160 << 10   # per-query tables up to this size are staged in shared memory
_SM_BYTES = 227 << 10
_CAP_FACTOR, _CAP_SLACK = 4, 256  # candidate slots per query: factor·k·(sampling step) + slack
_SAMPLE_STEP = 32                 # threshold sample: every 32nd row (memory permitting)
_LUT_THREADS = 512                # threads per block of tq_lut_scan (its __launch_bounds__)
_DENSE_ROWS = 4096                # indexes up to this size (or 8k rows) are scored densely


class GpuScanner(Scanner):
    """The CUDA kernels for one quantizer and metric, behind the scanner protocol; holds per-device
    tables and, per segment, its upload in the kernel layout.

    `force` ("lut", "mma" or "gemm") pins a path for tests and benchmarks; None chooses by batch
    size (`path_for`). `last_stats` says what the last call did: kernel, whether rows were sampled
    for a threshold, reruns after a buffer overflow, queries rerun after a failed certificate.
    """

    name = "cuda"
    caches_on_device = True

    def __init__(self, quantizer: TurboQuantizer, metric: str):
        super().__init__(quantizer, metric)
        self.q = quantizer
        self.force: str | None = None
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
        self._tables = PerDevice(self._make_device_tables)

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
        return function(name, defines)

    def _launch(self, fn, grid, block, args, shared: int = 0):
        launch(fn, grid, block, args, shared)

    # -- per-device constants ------------------------------------------------------------------
    def _device_tables(self, device: torch.device) -> dict:
        return self._tables.get(device)

    def _make_device_tables(self, device: torch.device) -> dict:
        t = {}
        if self.mma_bits:
            byte_centroids = self._decoder.tables(device)["byte_tables"][0]  # (256, 8/b) float32
            t["byte_table"] = byte_centroids.half().contiguous()       # the fused kernel's
            t["byte_table32"] = byte_centroids.contiguous()            # tq_dequant's
            t["byte_sq"] = byte_centroids.square().sum(dim=1)          # Σ c² of a code byte
            t["cmax"] = float(byte_centroids.abs().max())  # every value a coordinate can decode to
        return t

    # -- segments ------------------------------------------------------------------------------
    def segment_data(self, segment: Segment, device: torch.device) -> dict:
        """Upload a segment in the kernel layout (cached on the segment, per device)."""
        return self.cache.get(segment, str(device), lambda: self._upload(segment, device))

    def _upload(self, segment: Segment, device: torch.device) -> dict:
        enc, n = segment.encoded, len(segment)
        w4 = self.words // 4
        words = torch.empty((w4, n, 4), dtype=torch.int32, device=device)
        for a in range(0, n, _UPLOAD_ROWS):
            b = min(n, a + _UPLOAD_ROWS)
            row = torch.zeros((b - a, self.words * 4), dtype=torch.uint8, device=device)
            codes = self._device_codes(enc, a, b, device)
            for r in self.regions:
                src = as_tensor(enc.qjl[a:b]).to(device) if r.qjl else codes
                row[:, 4 * r.woff:4 * r.woff + r.src_nbytes] = src[:, r.src_offset:r.src_offset + r.src_nbytes]
            words[:, a:b, :] = row.view(torch.int32).view(b - a, w4, 4).permute(1, 0, 2)
        scale = as_tensor(enc.scale).to(device).float()
        data = {"n": n, "words": words, "scale": scale, "scale_max": float(scale.abs().max()) if n else 0.0,
                "normsq": None, "qjlmul": None, "ynorm_max": self._ynorm_max(words, device) if self.mma_bits else 0.0}
        if self.metric == "l2":
            norm = as_tensor(enc.norm).to(device) if enc.norm is not None else scale
            data["normsq"] = norm.square().contiguous()
        if self.q.variant == "prod":
            data["qjlmul"] = (self.q.qjl_scale * as_tensor(enc.residual_norm).to(device)).contiguous()
        return data

    def _device_codes(self, enc, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Row-major packed mse codes (stop − start, code_bytes) of rows [start, stop) on `device`.
        Blocks of a layout whose nibble rows are the codes go up as they are held (one contiguous
        copy, from the page cache where memory-mapped) and are regrouped on the GPU."""
        if enc.blocks is not None:
            return self.q.layout.device_rows(enc.blocks, start, stop, device)
        return as_tensor(enc.codes[start:stop]).to(device)

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

    # -- the scanner protocol ------------------------------------------------------------------
    def supports(self, device: str) -> bool:
        return device == "cuda" and enabled()

    def topk(self, segments: list[Segment], queries: Queries, k: int) -> TopK:
        scores, positions = self.search(segments, queries.rotated, queries.projected, queries.sq_norms, k)
        return TopK(scores, positions, self.last_stats)

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
        best_s, best_p = empty_topk(nq, k, device)
        if not parts or nq == 0:
            return best_s, best_p
        budget = self._budget_entries(device)
        self.last_stats = {"kernel": None, "sampled": False, "overflow_reruns": 0, "uncertified": 0}
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
        self.last_stats.update(kernel="mma" if use_mma else "lut", sampled=not dense)
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
                self.last_stats["overflow_reruns"] += 1
                counts, sc, pos = self._pass(prep, parts, qsq, tau, cap, use_mma)
            valid = torch.arange(cap, device=device)[None, :] < counts[:, None]
            sc = sc.masked_fill(~valid, -torch.inf)
        if not use_mma:
            return topk_padded(sc, pos, k)
        return self._rescore_certified(parts, rotated, projected, qsq, k, sc, pos, tau, err, budget)

    def _search_gemm(self, parts, rotated, qsq, k, budget):
        """Large batches: each block of rows is dequantized to fp16 (scale folded in, divided by the
        largest scale S so that nothing overflows), multiplied with the queries (fp16, divided by
        max|q_j|) by cuBLAS with fp32 accumulation, and the best 2k + 17 approximate scores are kept
        per query; the best 2k + 16 are then rescored exactly and certified as in the fused path."""
        device, (nq, d) = rotated.device, rotated.shape
        self.last_stats.update(kernel="gemm", sampled=False)
        kdim = self.regions[0].chunks * 32
        smax = max(data["scale_max"] for data, _, _ in parts) or 1.0
        qmax = rotated.abs().amax(dim=1)
        qmul = torch.where(qmax > 0, qmax, torch.ones_like(qmax))
        qh = torch.zeros((nq, kdim), dtype=torch.float16, device=device)
        qh[:, :d] = (rotated / qmul[:, None]).half()
        err = self._mma_error_bound(rotated, parts, extra_rel=2.0 ** -11)  # + rounding of the fp16 output
        take = certify.keep(k) + 1
        rows = max(1 << 14, min(1 << 20, (1 << 30) // (4 * max(nq, 1))))  # a block's scores ≤ 1 GiB
        rows = min(rows, max(data["n"] for data, _, _ in parts))
        deq = torch.empty((rows, kdim), dtype=torch.float16, device=device)
        best_v = torch.empty((nq, 0), dtype=torch.float32, device=device)
        best_p = torch.empty((nq, 0), dtype=torch.int64, device=device)
        for data, offset, deleted in parts:
            for a in range(0, data["n"], rows):
                m = min(rows, data["n"] - a)
                self._dequant(data, a, m, deq, 1.0 / smax)
                scores = _mm_fp32(qh, deq[:m].T)
                if deleted is not None:
                    scores.masked_fill_(deleted[a:a + m].bool()[None, :], -torch.inf)
                v, i = torch.topk(scores, min(take, m), dim=1)
                v, j = torch.topk(torch.cat([best_v, v], 1), min(take, best_v.shape[1] + v.shape[1]), dim=1)
                best_p = torch.gather(torch.cat([best_p, i + (offset + a)], 1), 1, j)
                best_v = v
        approx = best_v * (qmul * smax)[:, None]
        tau = torch.full((nq,), -torch.inf, device=device)
        return self._rescore_certified(parts, rotated, None, qsq, k, approx, best_p, tau, err, budget)

    def _dequant(self, data, start, rows, out, inv_smax):
        """out[:rows] = fp16(decoded value · scale / S) of rows [start, start + rows) (tq_dequant; the
        float32 byte table decodes scalar and block codebooks alike)."""
        device, chunks = out.device, self.regions[0].chunks
        table = self._device_tables(device)["byte_table32"]
        args = (ptr(data["words"]), np.int64(data["n"]), ptr(data["scale"]), np.float32(inv_smax), ptr(table),
                np.int64(start), np.int64(rows), ptr(out), np.int32(out.shape[1]))
        grid = min(-(-rows * chunks // 256), 64 * sm_count(device))
        self._launch(self._function("tq_dequant", 16), (grid,), (256,), args)

    # -- kernel passes -------------------------------------------------------------------------
    def _prepare_lut(self, rotated, projected) -> dict:
        return {"luts": query_tables(self.q, self.regions, rotated, projected)}

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
                np.int32(cap), np.int64(dense_offset), ptr(counts), ptr(scores), ptr(pos))
        if use_mma:
            bn = prep["bn"]
            fn = self._function("tq_mma_scan", bn)
            table = self._device_tables(device)["byte_table"]
            lda, ldc = 64 + 8, bn + 4
            shared = max((128 + bn) * lda * 2, 128 * ldc * 4) + 256 * (8 // self.mma_bits) * 2
            args = (ptr(data["words"]), np.int64(data["n"]), ptr(data["scale"]), ptr(data["normsq"]),
                    ptr(deleted), ptr(prep["qh"]), ptr(prep["qmul"]), ptr(table), ptr(qsq),
                    ptr(tau)) + tail
            self._launch(fn, (-(-count // 128), prep["qh"].shape[0] // bn), (256,), args, shared)
        else:
            fn = self._function("tq_lut_scan")
            shared = self.lut_floats * 4 if self.lut_shared else 0
            resident = max(1, min(4, _SM_BYTES // (shared + 1024))) if shared else 4  # 512-thread blocks
            per_query = max(1, min(-(-count // _LUT_THREADS), resident * sm_count(device) // nq))
            args = (ptr(data["words"]), np.int64(data["n"]), ptr(data["scale"]), ptr(data["normsq"]),
                    ptr(data["qjlmul"]), ptr(deleted), ptr(prep["luts"]), ptr(qsq), ptr(tau)) + tail
            self._launch(fn, (per_query * nq,), (_LUT_THREADS,), args, shared)

    # -- tensor-core path: error bound, exact rescoring ----------------------------------------
    def _mma_error_bound(self, rotated, parts, extra_rel: float = 0.0) -> torch.Tensor:
        """Per query, a bound on |approximate − exact| score of any row (`certify.error_bound`)."""
        return certify.error_bound(rotated, cmax=self._device_tables(rotated.device)["cmax"],
                                   scale_max=max(data["scale_max"] for data, _, _ in parts),
                                   ynorm_max=max(data["ynorm_max"] for data, _, _ in parts),
                                   l2=self.metric == "l2", extra_rel=extra_rel)

    def _rescore_certified(self, parts, rotated, projected, qsq, k, approx, pos, tau, err, budget):
        cand_p, left_out = certify.candidates(approx, pos, tau, k)
        exact = self.exact_scores(parts, rotated, qsq, cand_p)
        best_s, best_p = topk_padded(exact, cand_p, k)
        ok = certify.certified(best_s, left_out, err)
        bad = torch.nonzero(~ok).flatten()
        if len(bad):  # the certificate failed: rescan these queries with the exact table kernel
            kernel = self.last_stats["kernel"]
            self.last_stats["uncertified"] += len(bad)
            s, p = self._search_batch(parts, sum(d["n"] for d, _, _ in parts), rotated[bad],
                                      None if projected is None else projected[bad], qsq[bad], k, budget,
                                      use_mma=False)
            best_s[bad], best_p[bad] = s, p
            self.last_stats["kernel"] = kernel
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



def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp16 a @ b with fp32 accumulation and a float32 result, whatever torch's process-wide
    reduced-precision setting says (the error bound assumes fp32 sums)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # torch before out_dtype: the same sums in float32 (slower)
        return a.float() @ b.float()
