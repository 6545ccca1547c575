"""Asymmetric scan + exact top-k on the CPU with torch.

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

from ..quantizer import TurboQuantizer
from ..segment import Segment

__all__ = ["BlockDecoder", "scan_topk"]

_BLOCK_BYTES = 48 << 20



def _tensor(array) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, memory-mapped) array. The scan only reads
    it, so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(array))


class BlockDecoder:
    """Decodes packed mse codes to rotated unit-scale centroids ỹ, fast.

    For b ∈ {1, 2, 4, 8} a 256-entry table maps each code byte straight to its 8/b centroids, so a
    block is decoded with a single gather and no bit twiddling; other widths unpack then gather.
    """

    def __init__(self, quantizer: TurboQuantizer):
        self.q = quantizer
        b = quantizer.mse_bits
        self.byte_table = None
        if b and 8 % b == 0:
            per_byte = 8 // b
            byte_values = torch.arange(256, dtype=torch.int64)
            shifts = torch.arange(per_byte, dtype=torch.int64) * b
            codes = (byte_values[:, None] >> shifts) & ((1 << b) - 1)
            self.byte_table = quantizer.centroids[codes].contiguous()  # (256, per_byte)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, code_bytes) uint8 → (n, d) float32."""
        q = self.q
        n = codes.shape[0]
        if not q.mse_bits:
            return torch.zeros((n, q.dim), dtype=torch.float32)
        if self.byte_table is not None:
            decoded = self.byte_table[codes.long()].view(n, -1)
            return decoded[:, : q.dim]
        from ..packing import unpack_codes
        return q.centroids[unpack_codes(codes, q.mse_bits, q.dim).long()]


def _block_rows(dim: int, batch: int) -> int:
    return max(1024, _BLOCK_BYTES // (4 * (dim + batch) + 16))


def scan_topk(
    quantizer: TurboQuantizer,
    decoder: BlockDecoder,
    segments: list[Segment],
    rotated: torch.Tensor,
    projected: torch.Tensor | None,
    query_sq_norms: torch.Tensor,
    k: int,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the quantized scores over all live rows.

    Parameters
    ----------
    rotated : (nq, d) float32, Πq
    projected : (nq, d) float32, GΠq for "prod", else None
    query_sq_norms : (nq,) float32, ‖q‖² (used by "l2")
    k : int, number of results per query

    Returns
    -------
    scores : (nq, k) float32, higher is better, −inf where fewer than k rows exist
    positions : (nq, k) int64 row positions in the concatenation of `segments`, −1 where missing
    """
    nq = rotated.shape[0]
    best_scores = torch.full((nq, k), -torch.inf, dtype=torch.float32)
    best_pos = torch.full((nq, k), -1, dtype=torch.int64)
    block = _block_rows(quantizer.dim, nq)
    offset = 0
    for segment in segments:
        enc = segment.encoded
        for start in range(0, len(segment), block):
            stop = min(start + block, len(segment))
            codes = _tensor(enc.codes[start:stop])
            scale = _tensor(enc.scale[start:stop])
            y_tilde = decoder.decode(codes)
            scores = (rotated @ y_tilde.T) * scale
            if quantizer.variant == "prod":
                signs = _signs(_tensor(enc.qjl[start:stop]), quantizer.dim)
                rnorm = _tensor(enc.residual_norm[start:stop])
                scores += (projected @ signs.T) * (quantizer.qjl_scale * rnorm * scale)
            if metric == "l2":
                norm = _tensor((enc.norm if enc.norm is not None else enc.scale)[start:stop])
                scores = 2 * scores - norm.square() - query_sq_norms[:, None]
            if segment.deleted is not None:
                dead = _tensor(segment.deleted[start:stop])
                scores.masked_fill_(dead[None, :], -torch.inf)
            take = min(k, stop - start)
            block_scores, block_idx = torch.topk(scores, take, dim=1)
            merged_scores = torch.cat([best_scores, block_scores], dim=1)
            merged_pos = torch.cat([best_pos, block_idx + (offset + start)], dim=1)
            best_scores, order = torch.topk(merged_scores, k, dim=1)
            best_pos = torch.gather(merged_pos, 1, order)
        offset += len(segment)
    best_pos[torch.isneginf(best_scores)] = -1
    return best_scores, best_pos


_SIGN_TABLE = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.float32) * 2 - 1


def _signs(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, ceil(d/8)) packed QJL bits → (n, d) float32 in {−1, +1}."""
    return _SIGN_TABLE[packed.long()].view(packed.shape[0], -1)[:, :dim]
