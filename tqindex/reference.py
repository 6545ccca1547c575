"""Reference transcription of TurboQuant's Algorithms 1 (mse) and 2 (prod), in float64 numpy.

This is the oracle the fast paths are tested against; it favours being an obvious copy of the paper
over speed. Vectors of any norm are handled as the index does: quantize x/‖x‖ and keep ‖x‖.

Conventions shared with the fast path (they define the codes, so both must agree):

- Π is ``Rotation.matrix()``; each group of coordinates uses the codebook of the kind that
  ``tqindex.groups.choose_kind`` picks (the quantizer asks the same function): ``lloyd_max_codebook(d,
  b)``, or with ``codebook="vq"`` and b ∈ {1, 2} ``block_codebook(d, b)`` over blocks of 4/b
  consecutive coordinates (where they tile the group), whose codeword index v is stored as the
  block's codes (coordinate t gets bits t·b.. of v); with ``codebook="vq"``, codebook version ≥ 2 and
  b = 5, ``plane_codebook(d)`` (a scalar codebook too). The codebooks themselves are computed in
  float64 by ``tqindex.codebook``.
- The QJL matrix is S = G·Π with G ~ N(0, 1)^{d×d} drawn from ``seeded_rng(seed, "qjl", d)``
  (``tqindex.rotation.qjl_gaussian``).
  S is then itself i.i.d. N(0, 1) (Π is orthogonal and independent of G), as the paper requires; the
  factorisation lets the fast path apply G to the residual in the rotated domain.
- A QJL sign of exactly 0 counts as +1.
"""

from __future__ import annotations

import numpy as np

from .codebook import CODEBOOK_VERSION
from .groups import choose_kind, group_layout
from .rotation import qjl_gaussian

__all__ = ["coordinate_codebooks", "qjl_gaussian", "quantize_mse", "dequantize_mse", "quantize_prod", "dequantize_prod"]


def coordinate_codebooks(dim: int, bits, codebook: str = "vq",
                         codebook_version: int = CODEBOOK_VERSION) -> list[tuple[slice, int, np.ndarray]]:
    """(coordinates, bits, codewords (levels, block)) triples: one codebook for whole `bits`; for
    fractional `bits`, the first coordinates use the (base + 1)-bit codebook and the rest the
    base-bit one (`tqindex.groups.group_layout`), of the kind `tqindex.groups.choose_kind` picks.
    Scalar codebooks have block 1 (codewords = centroids[:, None]), in float64."""
    return [(slice(start, stop), b, choose_kind(dim, b, stop - start, codebook, codebook_version).codewords)
            for start, stop, b in group_layout(dim, bits)]


def quantize_mse(x: np.ndarray, rotation: np.ndarray, bits, codebook: str = "vq",
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
                   codebook: str = "vq", codebook_version: int = CODEBOOK_VERSION) -> np.ndarray:
    """Algorithm 1, DeQuant_mse: x̃ = ‖x‖ · Πᵀ·ỹ with ỹ_j = c_{idx_j} (a block: ỹ_block = w_v)."""
    y_tilde = np.zeros(idx.shape)
    for cols, b, words in coordinate_codebooks(idx.shape[1], bits, codebook, codebook_version):
        block = words.shape[1]
        codes = idx[:, cols].reshape(len(idx), -1, block)
        word = np.sum(codes << (b * np.arange(block)), axis=2)
        y_tilde[:, cols] = words[word].reshape(len(idx), -1)
    return (y_tilde @ rotation) * norms[:, None]


def quantize_prod(x: np.ndarray, rotation: np.ndarray, bits: int, seed: int, codebook: str = "vq",
                  codebook_version: int = CODEBOOK_VERSION):
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
        idx, _ = quantize_mse(unit, rotation, bits - 1, codebook, codebook_version)
        residual = unit - dequantize_mse(idx, np.ones(n), rotation, bits - 1, codebook, codebook_version)  # r ← x − DeQuant_mse(idx)
    else:
        idx, residual = None, unit
    s = qjl_gaussian(d, seed) @ rotation
    qjl = np.where(residual @ s.T >= 0, 1, -1).astype(np.int8)        # qjl ← sign(S·r)
    return idx, qjl, np.linalg.norm(residual, axis=1), norms


def dequantize_prod(idx, qjl, residual_norms, norms, rotation: np.ndarray, bits: int, seed: int,
                    codebook: str = "vq", codebook_version: int = CODEBOOK_VERSION) -> np.ndarray:
    """Algorithm 2, DeQuant_prod: x̃ = x̃_mse + √(π/2)/d · ‖r‖ · Sᵀ·qjl, times ‖x‖."""
    n, d = qjl.shape
    base = dequantize_mse(idx, np.ones(n), rotation, bits - 1, codebook, codebook_version) if bits > 1 else np.zeros((n, d))
    s = qjl_gaussian(d, seed) @ rotation
    correction = np.sqrt(np.pi / 2) / d * residual_norms[:, None] * (qjl.astype(np.float64) @ s)
    return (base + correction) * norms[:, None]
