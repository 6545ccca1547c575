"""Reference transcription of TurboQuant's Algorithms 1 (mse) and 2 (prod), in float64 numpy.

This is the oracle the fast paths are tested against; it favours being an obvious copy of the paper
over speed. Vectors of any norm are handled as the index does: quantize x/‖x‖ and keep ‖x‖.

Conventions shared with the fast path (they define the codes, so both must agree):

- Π is ``Rotation.matrix()``; the codebook is ``lloyd_max_codebook(d, b)``, or with
  ``codebook="vq"`` and b ∈ {1, 2} ``block_codebook(d, b)`` over blocks of 4/b consecutive
  coordinates (where they tile the group), whose codeword index v is stored as the block's codes
  (coordinate t gets bits t·b.. of v); with ``codebook="vq"``, codebook version ≥ 2 and b = 5,
  ``plane_codebook(d)`` (a scalar codebook too).
- The QJL matrix is S = G·Π with G ~ N(0, 1)^{d×d} drawn from ``seeded_rng(seed, "qjl", d)``.
  S is then itself i.i.d. N(0, 1) (Π is orthogonal and independent of G), as the paper requires; the
  factorisation lets the fast path apply G to the residual in the rotated domain.
- A QJL sign of exactly 0 counts as +1.
"""

from __future__ import annotations

import numpy as np

from .codebook import CODEBOOK_VERSION, PLANE_BITS, block_codebook, lloyd_max_codebook, plane_codebook, split_bits, \
    vq_block
from .rotation import seeded_rng

__all__ = ["coordinate_codebooks", "qjl_gaussian", "quantize_mse", "dequantize_mse", "quantize_prod", "dequantize_prod"]


def qjl_gaussian(dim: int, seed: int) -> np.ndarray:
    """G, the (d, d) i.i.d. standard normal matrix of the QJL stage (S = G Π)."""
    return seeded_rng(seed, "qjl", dim).standard_normal((dim, dim))


def coordinate_codebooks(dim: int, bits, codebook: str = "scalar",
                         codebook_version: int = CODEBOOK_VERSION) -> list[tuple[slice, int, np.ndarray]]:
    """(coordinates, bits, codewords (levels, block)) triples: one codebook for whole `bits`; for
    fractional `bits`, the first coordinates use the (base + 1)-bit codebook and the rest the
    base-bit one (`split_bits`). Scalar codebooks have block 1 (codewords = centroids[:, None])."""
    base, high = split_bits(dim, bits)
    out = []
    for s, b in [(slice(0, high), base + 1), (slice(high, dim), base)]:
        if s.stop > s.start:
            block = vq_block(dim, b) if codebook == "vq" else 1
            if block > 1 and (s.stop - s.start) % block == 0:
                out.append((s, b, block_codebook(dim, b).codewords))
            elif codebook == "vq" and b == PLANE_BITS and codebook_version >= 2:
                out.append((s, b, plane_codebook(dim, b).centroids[:, None]))
            else:
                out.append((s, b, lloyd_max_codebook(dim, b).centroids[:, None]))
    return out


def quantize_mse(x: np.ndarray, rotation: np.ndarray, bits, codebook: str = "scalar",
                 codebook_version: int = CODEBOOK_VERSION):
    """Algorithm 1, Quant_mse.

    Parameters
    ----------
    x : (n, d) float array
    rotation : (d, d) float64 Π
    bits : int, or float for fractional widths (see `coordinate_codebooks`)
    codebook : {"scalar", "vq"}

    Returns
    -------
    idx : (n, d) int64 per-coordinate codes
    norms : (n,) float64 ‖x‖
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[1]
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.where(norms > 0, norms, 1.0)[:, None]
    y = unit @ rotation.T                                            # y ← Π·x
    idx = np.zeros(y.shape, dtype=np.int64)
    for cols, b, words in coordinate_codebooks(d, bits, codebook, codebook_version):
        block = words.shape[1]
        blocks = y[:, cols].reshape(len(y), -1, 1, block)
        word = np.argmin(np.sum((blocks - words) ** 2, axis=3), axis=2)  # v ← argmin_v ‖y_block − w_v‖
        idx[:, cols] = ((word[:, :, None] >> (b * np.arange(block))) & ((1 << b) - 1)).reshape(len(y), -1)
    return idx, norms


def dequantize_mse(idx: np.ndarray, norms: np.ndarray, rotation: np.ndarray, bits,
                   codebook: str = "scalar", codebook_version: int = CODEBOOK_VERSION) -> np.ndarray:
    """Algorithm 1, DeQuant_mse: x̃ = ‖x‖ · Πᵀ·ỹ with ỹ_j = c_{idx_j} (a block: ỹ_block = w_v)."""
    y_tilde = np.zeros(idx.shape)
    for cols, b, words in coordinate_codebooks(idx.shape[1], bits, codebook, codebook_version):
        block = words.shape[1]
        codes = idx[:, cols].reshape(len(idx), -1, block)
        word = np.sum(codes << (b * np.arange(block)), axis=2)
        y_tilde[:, cols] = words[word].reshape(len(idx), -1)
    return (y_tilde @ rotation) * norms[:, None]


def quantize_prod(x: np.ndarray, rotation: np.ndarray, bits: int, seed: int, codebook: str = "scalar"):
    """Algorithm 2, Quant_prod with b−1 bits of mse and 1 bit of QJL.

    Returns
    -------
    idx : (n, d) int64, or None when bits == 1 (no mse stage)
    qjl : (n, d) int8 in {−1, +1}
    residual_norms : (n,) float64 ‖r‖ of the unit vector's residual
    norms : (n,) float64 ‖x‖
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.where(norms > 0, norms, 1.0)[:, None]
    if bits > 1:
        idx, _ = quantize_mse(unit, rotation, bits - 1, codebook)
        residual = unit - dequantize_mse(idx, np.ones(n), rotation, bits - 1, codebook)  # r ← x − DeQuant_mse(idx)
    else:
        idx, residual = None, unit
    s = qjl_gaussian(d, seed) @ rotation
    qjl = np.where(residual @ s.T >= 0, 1, -1).astype(np.int8)        # qjl ← sign(S·r)
    return idx, qjl, np.linalg.norm(residual, axis=1), norms


def dequantize_prod(idx, qjl, residual_norms, norms, rotation: np.ndarray, bits: int, seed: int,
                    codebook: str = "scalar") -> np.ndarray:
    """Algorithm 2, DeQuant_prod: x̃ = x̃_mse + √(π/2)/d · ‖r‖ · Sᵀ·qjl, times ‖x‖."""
    n, d = qjl.shape
    base = dequantize_mse(idx, np.ones(n), rotation, bits - 1, codebook) if bits > 1 else np.zeros((n, d))
    s = qjl_gaussian(d, seed) @ rotation
    correction = np.sqrt(np.pi / 2) / d * residual_norms[:, None] * (qjl.astype(np.float64) @ s)
    return (base + correction) * norms[:, None]
