"""Seeded random rotations Π of R^d.

Two kinds:

``"dense"``
    Haar-random orthogonal matrix: QR of an i.i.d. Gaussian matrix with the signs of R's diagonal
    folded into Q, exactly as TurboQuant's analysis assumes. O(d²) per vector.
``"hadamard"``
    Randomized Hadamard: three rounds of (random signs, random permutation, normalised Walsh-Hadamard
    transform on the first m and then the last m coordinates, m = largest power of two ≤ d). Exactly
    orthogonal for every d, O(d log d) per vector.

The default is ``"dense"``, by measurement (`python bench/bench_rotation.py`; figures in
docs/design.md): on sparse (one-hot) inputs the structured rotation's distortion is well above the
dense one's, since three rounds do not spread a sparse vector into a Gaussian-like one when the two
Hadamard blocks overlap, so it is kept only as an experimental option.

Every random draw comes from ``numpy.random.Generator(PCG64(seed))`` with a purpose tag, so the
same seed gives the same rotation on every platform and numpy version that keeps PCG64's stream.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["ROTATION_KINDS", "Rotation", "make_rotation", "seeded_rng"]

ROTATION_KINDS = ("dense", "hadamard")

_ROUNDS = 3
# Rows a thread rotates at least (a query's rotation is microseconds: splitting fewer rows costs more
# in the hand-off than it saves).
_ROTATE_ROWS_PER_THREAD = 16


def seeded_rng(seed: int, purpose: str, dim: int) -> np.random.Generator:
    """A Generator whose stream depends only on (seed, purpose, dim)."""
    tag = int.from_bytes(purpose.encode("ascii"), "little") % (1 << 63)
    return np.random.Generator(np.random.PCG64([int(seed) & ((1 << 63) - 1), tag, int(dim)]))


def qjl_gaussian(dim: int, seed: int) -> np.ndarray:
    """G, the (d, d) i.i.d. standard normal matrix of TurboQuant_prod's QJL stage (S = G Π)."""
    return seeded_rng(seed, "qjl", dim).standard_normal((dim, dim))


class Rotation:
    """An orthogonal map x ↦ Π x applied to row vectors (`apply(X) = X Πᵀ`).

    Parameters
    ----------
    dim : int
    kind : {"dense", "hadamard"}
    seed : int
    """

    def __init__(self, *, dim: int, kind: str = "dense", seed: int = 0):
        if kind not in ROTATION_KINDS:
            raise ValueError(f"unknown rotation kind {kind!r}; expected one of {ROTATION_KINDS}")
        self.dim = int(dim)
        self.kind = kind
        self.seed = int(seed)
        rng = seeded_rng(seed, "rotation-" + kind, dim)
        if kind == "dense":
            gaussian = rng.standard_normal((dim, dim))
            q, r = np.linalg.qr(gaussian)
            # Sign fix: without it QR's convention biases Q away from the Haar measure.
            matrix = q * np.sign(np.diag(r))[None, :]
            # Πᵀ in float64 (exact reference use) and float32 (the fast path's dtype); Π itself is a
            # view of the float64 one, so the host holds 12·d² bytes.
            self._matrix_t = {torch.float64: torch.from_numpy(np.ascontiguousarray(matrix.T)),
                              torch.float32: torch.from_numpy(np.ascontiguousarray(matrix.T, dtype=np.float32))}
        else:
            self._block = 1 << (dim.bit_length() - 1)
            self._signs = [torch.from_numpy(rng.choice([-1.0, 1.0], size=dim).astype(np.float32)) for _ in range(_ROUNDS)]
            self._perms = [torch.from_numpy(rng.permutation(dim)) for _ in range(_ROUNDS)]
            self._inverse_perms = [torch.argsort(p) for p in self._perms]

    def __repr__(self) -> str:
        return f"Rotation(dim={self.dim}, kind={self.kind!r}, seed={self.seed})"

    def matrix(self) -> np.ndarray:
        """Π as a dense float64 (d, d) array (for the reference implementation and tests)."""
        if self.kind == "dense":
            return self._matrix_t[torch.float64].numpy().T
        eye = torch.eye(self.dim, dtype=torch.float64)
        return self.apply(eye).numpy().T.copy()

    def nbytes(self) -> int:
        """Host memory held by this rotation (its matrices, or signs and permutations)."""
        if self.kind == "dense":
            held = {t.data_ptr(): t.nbytes for t in self._matrix_t.values() if t.device.type == "cpu"}
            return sum(held.values())
        return sum(t.nbytes for t in self._signs + self._perms + self._inverse_perms)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate rows: (n, d) → (n, d), same dtype (float32 or float64). out: a tensor of that shape
        and dtype to write into (the dense kind; others return a new tensor)."""
        if self.kind == "dense":
            return torch.matmul(x, self._dense_t(x), out=out) if out is not None else x @ self._dense_t(x)
        y = x
        for signs, perm in zip(self._signs, self._perms):
            y = (y * signs.to(dtype=y.dtype, device=y.device))[:, perm.to(y.device)]
            y = self._hadamard_halves(y)
        return y

    def apply_native(self, x: torch.Tensor) -> torch.Tensor | None:
        """`apply` for float32 rows on the CPU in the native kernels (tqindex's threads, not torch's),
        or None where they do not serve (another kind, dtype or device, or no compiled extension)."""
        from . import native
        if self.kind != "dense" or x.dtype != torch.float32 or x.device.type != "cpu" or not native.enabled():
            return None
        xs = np.ascontiguousarray(x.numpy())
        outs, mt = np.empty_like(xs), self.native_matrix()
        native.parallel_ranges(len(xs), lambda a, b: native.kernels.rotate(xs[a:b], mt, outs[a:b], b - a, self.dim),
                               min_per_thread=_ROTATE_ROWS_PER_THREAD)
        return torch.from_numpy(outs)

    def native_matrix(self) -> np.ndarray | None:
        """Πᵀ as float32 (d, d), what the native kernels multiply rows by (`apply_native`, and the
        search that rotates its queries in C), or None for a kind they do not rotate (Hadamard)."""
        return self._matrix_t[torch.float32].numpy() if self.kind == "dense" else None

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo `apply` on rows: (n, d) → (n, d)."""
        if self.kind == "dense":
            return y @ self._dense_t(y).T
        x = y
        for signs, inverse_perm in zip(reversed(self._signs), reversed(self._inverse_perms)):
            x = self._hadamard_halves(x, inverse=True)
            x = x[:, inverse_perm.to(x.device)] * signs.to(dtype=x.dtype, device=x.device)
        return x

    def _dense_t(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in self._matrix_t:  # e.g. the float32 matrix on a GPU: copied there once
            self._matrix_t[key] = self._matrix_t.get(x.dtype, self._matrix_t[torch.float32]).to(
                dtype=x.dtype, device=x.device)
        return self._matrix_t[key]

    def _hadamard_halves(self, y: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        m, d = self._block, self.dim
        if m == d:
            return _fwht(y)
        y = y.clone()
        # Two overlapping blocks cover every coordinate; the normalised transform is its own
        # inverse, so the inverse applies the two blocks in the other order.
        spans = [(0, m), (d - m, d)]
        for lo, hi in reversed(spans) if inverse else spans:
            y[:, lo:hi] = _fwht(y[:, lo:hi])
        return y


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (length a power of two)."""
    n, m = x.shape
    y = x.contiguous()
    h = 1
    while h < m:
        y = y.view(n, m // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(n, m)
        h *= 2
    return y * (1.0 / math.sqrt(m))


@functools.lru_cache(maxsize=32)
def make_rotation(dim: int, kind: str, seed: int) -> Rotation:
    """Cached constructor: building a dense 1536² rotation takes ~0.5 s."""
    return Rotation(dim=dim, kind=kind, seed=seed)
