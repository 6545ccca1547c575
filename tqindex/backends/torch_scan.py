"""The torch scan: asymmetric scores + exact top-k with torch, on the CPU or on a GPU.

It supports every quantizer (prod, any width, every codebook kind) and is the fallback where no
faster backend does (no compiled extension, codes wider than 5 bits, TQINDEX_CUDA_KERNELS=0).

The database is never dequantized as a whole: rows are decoded a block at a time into the rotated
domain (ỹ, float32), scored with one GEMM against the rotated queries, and merged into a running
top-k. Blocks are sized so that the decoded block plus the block's score matrix stay near
`_BLOCK_BYTES`, which bounds memory whatever the index size.

Scores are returned "higher is better": the inner-product estimate for "ip"/"cosine", and the
negated squared distance for "l2".
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..devcache import PerDevice
from ..packing import unpack_codes
from ..quantizer import TurboQuantizer
from ..segment import Segment
from ..topk import empty_topk, merge_topk
from .base import Queries, Scanner, TopK

__all__ = ["BlockDecoder", "TorchScanner", "as_tensor", "scan_topk"]

_BLOCK_BYTES = 48 << 20
_CONVERT_ROWS = 1 << 16


def as_tensor(array) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, memory-mapped) array. The scan only reads
    it, so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(array))


class BlockDecoder:
    """Decodes packed mse codes to rotated unit-scale centroids ỹ, fast.

    For b ∈ {1, 2, 4, 8} a 256-entry table maps each code byte straight to its 8/b centroids (for a
    block codebook, its two codewords), so a block is decoded with a single gather and no bit
    twiddling; other widths unpack then gather.
    Each code group (one, or two for fractional bits) is decoded on its own. Tables are kept per
    device.
    """

    def __init__(self, quantizer: TurboQuantizer):
        self.q = quantizer
        self.byte_tables = []  # (256, 8 // bits) float32, or None where codes straddle bytes
        for g in quantizer.groups:
            table = g.kind.byte_table()
            self.byte_tables.append(None if table is None else torch.from_numpy(np.ascontiguousarray(table)))
        self._tables = PerDevice(lambda device: {
            "byte_tables": [None if t is None else t.to(device) for t in self.byte_tables],
            "signs": _SIGN_TABLE.to(device)})

    def tables(self, device: torch.device) -> dict:
        return self._tables.get(device)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, code_bytes) uint8 → (n, d) float32, on the codes' device."""
        q = self.q
        n = codes.shape[0]
        if not q.groups:
            return torch.zeros((n, q.dim), dtype=torch.float32, device=codes.device)
        tables = self.tables(codes.device)
        parts = []
        for g, byte_table in zip(q.groups, tables["byte_tables"]):
            group_codes = codes[:, g.offset:g.offset + g.nbytes]
            width = g.stop - g.start
            if byte_table is not None:
                # embedding() is a plain row gather, about twice as fast as advanced indexing here.
                parts.append(torch.nn.functional.embedding(group_codes.int(), byte_table).view(n, -1)[:, :width])
            else:
                parts.append(g.reconstruct(unpack_codes(group_codes, g.bits, width)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _block_rows(dim: int, batch: int, device: torch.device) -> int:
    budget = _BLOCK_BYTES
    if device.type == "cuda":
        # On a GPU, large blocks amortise launches; a quarter of free memory bounds the scratch.
        budget = max(_BLOCK_BYTES, torch.cuda.mem_get_info(device)[0] // 4)
    return max(1024, budget // (4 * (dim + batch) + 16))


_FIELDS = ("codes", "scale", "norm", "qjl", "residual_norm")


def segment_tensors(quantizer: TurboQuantizer, segment: Segment, device: torch.device, cache=None) -> dict:
    """The segment's arrays as tensors on `device`: zero-copy views on the CPU (a float16 scale is
    converted to float32 per call), uploaded once to a GPU and kept in `cache` (a `SegmentCache`;
    segments are immutable but for the deletion mask, which is uploaded on every scan).

    Codes held in the block layout are converted to row-major: on a GPU once, a chunk at a time,
    for the upload; on the CPU "codes" is None and the scan converts each block of rows it reads."""
    enc = segment.encoded

    def field(name):
        if name == "codes" and enc.blocks is not None:
            if device.type == "cpu":
                return None
            codes = torch.empty((len(enc), quantizer.code_bytes), dtype=torch.uint8, device=device)
            for a in range(0, len(enc), _CONVERT_ROWS):
                b = min(len(enc), a + _CONVERT_ROWS)
                codes[a:b] = torch.from_numpy(quantizer.row_codes(enc, a, b)).to(device)
            return codes
        array = getattr(enc, name)
        if array is None:
            return None
        t = as_tensor(array).to(device)
        # float16-stored scales are exact in float32 (a no-op for float32 ones); on a GPU this runs
        # once, when the cache is filled, not per search.
        return t.float() if name == "scale" else t

    if device.type == "cpu" or cache is None:
        out = {name: field(name) for name in _FIELDS}
    else:
        out = dict(cache.get(segment, str(device), lambda: {name: field(name) for name in _FIELDS}))
    out["deleted"] = None if segment.deleted is None else as_tensor(segment.deleted).to(device)
    return out


def scan_topk(
    quantizer: TurboQuantizer,
    decoder: BlockDecoder,
    segments: list[Segment],
    rotated: torch.Tensor,
    projected: torch.Tensor | None,
    query_sq_norms: torch.Tensor,
    k: int,
    metric: str,
    device: str | torch.device = "cpu",
    cache=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the quantized scores over all live rows, computed on `device`.

    Parameters
    ----------
    rotated : (nq, d) float32, Πq
    projected : (nq, d) float32, GΠq for "prod", else None
    query_sq_norms : (nq,) float32, ‖q‖² (used by "l2")
    k : int, number of results per query
    device : where to scan ("cpu", or "cuda" for the torch GPU path; float32 throughout)
    cache : SegmentCache for GPU uploads, optional

    Returns
    -------
    scores : (nq, k) float32 on the CPU, higher is better, −inf where fewer than k rows exist
    positions : (nq, k) int64 on the CPU, row positions in the concatenation of `segments`, −1 where missing
    """
    device = torch.device(device)
    rotated = rotated.to(device)
    projected = None if projected is None else projected.to(device)
    query_sq_norms = query_sq_norms.to(device)
    tables = decoder.tables(device)
    nq = rotated.shape[0]
    best_scores, best_pos = empty_topk(nq, k, device)
    block = _block_rows(quantizer.dim, nq, device)
    offset = 0
    for segment in segments:
        arrays = segment_tensors(quantizer, segment, device, cache)
        for start in range(0, len(segment), block):
            stop = min(start + block, len(segment))
            part = {name: None if a is None else a[start:stop] for name, a in arrays.items()}
            if part["codes"] is None:  # held in blocks: this block of rows, row-major
                part["codes"] = torch.from_numpy(quantizer.row_codes(segment.encoded, start, stop))
            scores = (rotated @ decoder.decode(part["codes"]).T) * part["scale"]
            if quantizer.variant == "prod":
                signs = tables["signs"][part["qjl"].int()].view(stop - start, -1)[:, :quantizer.dim]
                scores += (projected @ signs.T) * (quantizer.qjl_scale * part["residual_norm"] * part["scale"])
            if metric == "l2":
                norm = part["norm"] if part["norm"] is not None else part["scale"]
                scores = 2 * scores - norm.square() - query_sq_norms[:, None]
            if part["deleted"] is not None:
                scores.masked_fill_(part["deleted"][None, :], -torch.inf)
            take = min(k, stop - start)
            block_scores, block_idx = torch.topk(scores, take, dim=1)
            best_scores, best_pos = merge_topk([(best_scores, best_pos),
                                                (block_scores, block_idx + (offset + start))], k)
        offset += len(segment)
    return best_scores.cpu(), best_pos.cpu()


class TorchScanner(Scanner):
    """`scan_topk` behind the scanner protocol: every quantizer, on the CPU or a GPU."""

    name = "torch"
    caches_on_device = True  # segment uploads when it runs on a GPU

    def __init__(self, quantizer: TurboQuantizer, metric: str):
        super().__init__(quantizer, metric)
        self.decoder = BlockDecoder(quantizer)

    def supports(self, device: str) -> bool:
        return True

    def topk(self, segments: list[Segment], queries: Queries, k: int) -> TopK:
        device = queries.rotated.device
        scores, positions = scan_topk(self.quantizer, self.decoder, segments, queries.rotated, queries.projected,
                                      queries.sq_norms, k, self.metric, device=device, cache=self.cache)
        self.last_stats = {"queries": len(queries)}
        return TopK(scores, positions, self.last_stats)


_SIGN_TABLE = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.float32) * 2 - 1
