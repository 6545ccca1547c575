"""Reference transcription of TurboQuant's Algorithms 1 (mse) and 2 (prod), in float64 numpy.

This is the oracle the fast paths are tested against; it favours being an obvious copy of the paper
over speed. Vectors of any norm are handled as the index does: quantize x/‖x‖ and keep ‖x‖.

Conventions shared with the fast path (they define the codes, so both must agree):

- Π is ``Rotation.matrix()``; the codebook is ``lloyd_max_codebook(d, b)``.
- The QJL matrix is S = G·Π with G ~ N(0, 1)^{d×d} drawn from ``seeded_rng(seed, "qjl", d)``.
  S is then itself i.i.d. N(0, 1) (Π is orthogonal and independent of G), as the paper requires; the
  factorisation lets the fast path apply G to the residual in the rotated domain.
- A QJL sign of exactly 0 counts as +1.
"""

from __future__ import annotations

import numpy as np

from .codebook import lloyd_max_codebook, split_bits
from .rotation import seeded_rng

__all__ = ["coordinate_codebooks", "qjl_gaussian", "quantize_mse", "dequantize_mse", "quantize_prod", "dequantize_prod"]


def qjl_gaussian(dim: int, seed: int) -> np.ndarray:
    """G, the (d, d) i.i.d. standard normal matrix of the QJL stage (S = G Π)."""
    return seeded_rng(seed, "qjl", dim).standard_normal((dim, dim))


def coordinate_codebooks(dim: int, bits) -> list[tuple[slice, np.ndarray]]:
    """(coordinates, centroids) pairs: one codebook for whole `bits`; for fractional `bits`, the
    first coordinates use the (base + 1)-bit codebook and the rest the base-bit one (`split_bits`)."""
    base, high = split_bits(dim, bits)
    pairs = [(slice(0, high), base + 1), (slice(high, dim), base)]
    return [(s, lloyd_max_codebook(dim, b).centroids) for s, b in pairs if s.stop > s.start]


def quantize_mse(x: np.ndarray, rotation: np.ndarray, bits):
    """Algorithm 1, Quant_mse.

    Parameters
    ----------
    x : (n, d) float array
    rotation : (d, d) float64 Π
    bits : int, or float for fractional widths (see `coordinate_codebooks`)

    Returns
    -------
    idx : (n, d) int64 centroid indices
    norms : (n,) float64 ‖x‖
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[1]
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.where(norms > 0, norms, 1.0)[:, None]
    y = unit @ rotation.T                                            # y ← Π·x
    idx = np.zeros(y.shape, dtype=np.int64)
    for cols, centroids in coordinate_codebooks(d, bits):
        idx[:, cols] = np.argmin(np.abs(y[:, cols, None] - centroids), axis=2)  # idx_j ← argmin_k |y_j − c_k|
    return idx, norms


def dequantize_mse(idx: np.ndarray, norms: np.ndarray, rotation: np.ndarray, bits) -> np.ndarray:
    """Algorithm 1, DeQuant_mse: x̃ = ‖x‖ · Πᵀ·ỹ with ỹ_j = c_{idx_j}."""
    y_tilde = np.zeros(idx.shape)
    for cols, centroids in coordinate_codebooks(idx.shape[1], bits):
        y_tilde[:, cols] = centroids[idx[:, cols]]
    return (y_tilde @ rotation) * norms[:, None]


def quantize_prod(x: np.ndarray, rotation: np.ndarray, bits: int, seed: int):
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
        idx, _ = quantize_mse(unit, rotation, bits - 1)
        residual = unit - dequantize_mse(idx, np.ones(n), rotation, bits - 1)  # r ← x − DeQuant_mse(idx)
    else:
        idx, residual = None, unit
    s = qjl_gaussian(d, seed) @ rotation
    qjl = np.where(residual @ s.T >= 0, 1, -1).astype(np.int8)        # qjl ← sign(S·r)
    return idx, qjl, np.linalg.norm(residual, axis=1), norms


def dequantize_prod(idx, qjl, residual_norms, norms, rotation: np.ndarray, bits: int, seed: int) -> np.ndarray:
    """Algorithm 2, DeQuant_prod: x̃ = x̃_mse + √(π/2)/d · ‖r‖ · Sᵀ·qjl, times ‖x‖."""
    n, d = qjl.shape
    base = dequantize_mse(idx, np.ones(n), rotation, bits - 1) if bits > 1 else np.zeros((n, d))
    s = qjl_gaussian(d, seed) @ rotation
    correction = np.sqrt(np.pi / 2) / d * residual_norms[:, None] * (qjl.astype(np.float64) @ s)
    return (base + correction) * norms[:, None]
