"""TurboQuant quantizers (fast path, torch).

`TurboQuantizer` encodes float vectors into `EncodedVectors` (packed codes + per-vector floats) and
computes the pieces that asymmetric search needs. The codes equal those of `tqindex.reference`
(tests check it, up to coordinates that fall within float32 rounding of a decision boundary).

Per-vector fields
-----------------
norm : ‖x‖ (float32). Only "l2" with rescaling needs it next to `scale` (the index drops it
    otherwise: see `stores_norm`); where it is absent, `scale` stands in for it.
scale : the factor applied to ⟨Πq, ỹ⟩ for the inner product estimate (float32).
    For variant "mse" with ``rescale=True`` it is ‖x‖ / ⟨y, ỹ⟩ with y = Πx/‖x‖ and ỹ its centroid
    vector: since ỹ's component orthogonal to y is symmetric about y, ⟨Πq, ỹ⟩ / ⟨y, ỹ⟩ is an unbiased
    estimate of ⟨Πq, y⟩ (the RaBitQ argument), where the plain ⟨Πq, ỹ⟩ shrinks every score by a
    per-vector factor ≈ 1 − MSE that differs between vectors and so reorders them. Otherwise ‖x‖.
residual_norm : prod only, ‖r‖ of the unit vector's residual after the mse stage (float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .codebook import lloyd_max_codebook
from .packing import pack_codes, packed_row_bytes, unpack_codes
from .reference import qjl_gaussian
from .rotation import make_rotation

__all__ = ["VARIANTS", "EncodedVectors", "TurboQuantizer"]

VARIANTS = ("mse", "prod")

# Encode in chunks so temporary float buffers stay near 64 MiB whatever the batch size.
_ENCODE_CHUNK_BYTES = 64 << 20


@dataclass
class EncodedVectors:
    """Encoded rows. All arrays are numpy with n rows.

    codes : (n, code_bytes) uint8, packed mse codes (0 columns for prod at 1 bit)
    norm : (n,) float32, or None where the index does not store it
    scale : (n,) float32
    qjl : (n, ceil(d/8)) uint8 packed signs, or None (mse)
    residual_norm : (n,) float32, or None (mse)
    """

    codes: np.ndarray
    norm: np.ndarray | None
    scale: np.ndarray
    qjl: np.ndarray | None = None
    residual_norm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scale)


class TurboQuantizer:
    """TurboQuant_mse or TurboQuant_prod at a given total bit width.

    Parameters
    ----------
    dim : int
    bits : int
        Total bits per coordinate, 1..8. For "prod", bits−1 go to the mse stage and 1 to QJL.
    variant : {"mse", "prod"}
    seed : int
    rotation : {"dense", "hadamard"}
    rescale : bool
        mse only: store the unbiasing factor ‖x‖/⟨y, ỹ⟩ as the score scale (see module notes).
    """

    def __init__(self, *, dim: int, bits: int, variant: str = "mse", seed: int = 0,
                 rotation: str = "dense", rescale: bool = True):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
        if not isinstance(dim, (int, np.integer)) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        self.dim, self.bits, self.variant, self.seed = int(dim), int(bits), variant, int(seed)
        self.rescale = bool(rescale) and variant == "mse"
        self.rotation = make_rotation(self.dim, rotation, self.seed)
        self.mse_bits = self.bits if variant == "mse" else self.bits - 1
        if self.mse_bits > 0:
            codebook = lloyd_max_codebook(self.dim, self.mse_bits)
            self.centroids = torch.from_numpy(codebook.centroids.astype(np.float32))
            self.boundaries = torch.from_numpy(codebook.boundaries.astype(np.float32))
        else:
            self.centroids = self.boundaries = None
        if variant == "prod":
            self.qjl_matrix = torch.from_numpy(qjl_gaussian(self.dim, self.seed).astype(np.float32))  # G
            self.qjl_scale = math.sqrt(math.pi / 2) / self.dim
        else:
            self.qjl_matrix = None

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def code_bytes(self) -> int:
        return packed_row_bytes(self.dim, self.mse_bits) if self.mse_bits else 0

    @property
    def qjl_bytes(self) -> int:
        return packed_row_bytes(self.dim, 1) if self.variant == "prod" else 0

    def stores_norm(self, metric: str) -> bool:
        """Whether ‖x‖ must be kept beside `scale`: only "l2" needs ‖x‖ itself, and only
        rescaled mse has a scale that differs from it."""
        return metric == "l2" and self.rescale

    def bytes_per_vector(self, metric: str) -> int:
        """Bytes of one encoded vector: codes, signs and per-vector floats (ids not included)."""
        floats = 1 + (self.variant == "prod") + self.stores_norm(metric)
        return self.code_bytes + self.qjl_bytes + 4 * floats

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> EncodedVectors:
        """Encode rows of a float32 (n, d) tensor (already validated)."""
        chunk = max(1, _ENCODE_CHUNK_BYTES // (16 * self.dim))
        parts = [self._encode_chunk(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        if not parts:
            parts = [self._encode_chunk(x[:0])]
        fields = {}
        for name in ("codes", "norm", "scale", "qjl", "residual_norm"):
            values = [getattr(p, name) for p in parts]
            fields[name] = None if values[0] is None else np.concatenate(values)
        return EncodedVectors(**fields)

    def _encode_chunk(self, x: torch.Tensor) -> EncodedVectors:
        n = x.shape[0]
        norms = torch.linalg.vector_norm(x, dim=1)
        unit = x / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
        y = self.rotation.apply(unit)
        if self.mse_bits:
            idx = torch.bucketize(y, self.boundaries)  # first boundary ≥ y: the nearest centroid
            y_tilde = self.centroids[idx]
            codes = pack_codes(idx.to(torch.uint8), self.mse_bits).numpy()
        else:
            y_tilde = torch.zeros_like(y)
            codes = np.zeros((n, 0), dtype=np.uint8)
        scale = norms
        if self.rescale:
            alignment = (y * y_tilde).sum(dim=1)
            scale = torch.where(alignment > 0, norms / alignment.clamp_min(1e-30), norms)
        encoded = EncodedVectors(codes=codes, norm=norms.numpy().astype(np.float32),
                                 scale=scale.numpy().astype(np.float32))
        if self.variant == "prod":
            residual = y - y_tilde
            signs = (residual @ self.qjl_matrix.T) >= 0
            encoded.qjl = pack_codes(signs.to(torch.uint8), 1).numpy()
            encoded.residual_norm = torch.linalg.vector_norm(residual, dim=1).numpy().astype(np.float32)
        return encoded

    # -- decoding ------------------------------------------------------------------------------
    def rotated_reconstruction(self, codes: torch.Tensor, qjl: torch.Tensor | None = None,
                               residual_norm: torch.Tensor | None = None) -> torch.Tensor:
        """ỹ for unit vectors in the rotated domain, float32 (n, d).

        For "prod" this includes the QJL term √(π/2)/d · ‖r‖ · Gᵀ·signs.
        """
        n = codes.shape[0]
        if self.mse_bits:
            y_tilde = self.centroids[unpack_codes(codes, self.mse_bits, self.dim).long()]
        else:
            y_tilde = torch.zeros((n, self.dim), dtype=torch.float32)
        if self.variant == "prod":
            signs = unpack_codes(qjl, 1, self.dim).to(torch.float32) * 2 - 1
            y_tilde = y_tilde + self.qjl_scale * residual_norm[:, None] * (signs @ self.qjl_matrix)
        return y_tilde

    def decode(self, encoded: EncodedVectors) -> np.ndarray:
        """Reconstruct x̃ (n, d) float32 in the original space.

        Without a stored norm, `scale` multiplies instead: then x̃ is the vector whose inner
        products the index's scores estimate (for rescaled mse, ‖x‖/⟨y, ỹ⟩ · Πᵀỹ).
        """
        t = torch.from_numpy
        y_tilde = self.rotated_reconstruction(
            t(encoded.codes), None if encoded.qjl is None else t(encoded.qjl),
            None if encoded.residual_norm is None else t(encoded.residual_norm))
        norm = encoded.norm if encoded.norm is not None else encoded.scale
        return (self.rotation.inverse(y_tilde) * t(np.asarray(norm))[:, None]).numpy()

    # -- queries -------------------------------------------------------------------------------
    def prepare_queries(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotate queries once: returns (Πq, G·Πq or None), both float32 (nq, d)."""
        rotated = self.rotation.apply(q)
        projected = rotated @ self.qjl_matrix.T if self.variant == "prod" else None
        return rotated, projected
