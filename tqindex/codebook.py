"""Optimal scalar (Lloyd-Max) codebooks for one coordinate of a random unit vector.

After a random rotation, each coordinate of a unit vector in R^d follows the density

    f_d(x) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - x²)^((d-3)/2),   x ∈ [-1, 1]

whatever the input was (TurboQuant, Lemma 1). The codebook with 2^b centroids that minimises
E[(x - c(x))²] under f_d is found here with Lloyd-Max iterations on a fine quadrature grid.

The substitution x = sin θ turns the density into cos^(d-2) θ on [-π/2, π/2], which has no
endpoint singularity for any d ≥ 2 (d = 2 is the arcsine law). For large d the mass lies within a
few 1/√d of zero, so the grid only covers |θ| ≤ 14/√(d-2) there: the weight beyond is below e^-98.

Codebooks are deterministic, depend only on (d, b), and are cached in memory.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["CODEBOOK_VERSION", "Codebook", "lloyd_max_codebook", "split_bits", "effective_bits"]

#: Bump when the construction below changes in a way that can change codes of a saved index.
CODEBOOK_VERSION = 1

_GRID_POINTS = 200_001
_MAX_ITERATIONS = 10_000
_TOLERANCE = 1e-13


def split_bits(dim: int, bits) -> tuple[int, int]:
    """How a possibly fractional bit width is spread over the rotated coordinates.

    After the rotation every coordinate has the same law, so a fractional budget is spent by
    giving the first ``high`` coordinates ``base + 1`` bits and the others ``base`` bits (the
    paper's 2.5- and 3.5-bit settings split channels the same way). ``high = round(frac · dim)``,
    so the effective width is ``base + high / dim``.

    Parameters
    ----------
    dim : int
    bits : int or float, in [1, 8]

    Returns
    -------
    (base, high) : base in 1..8, high in [0, dim) (0 for whole bit widths)
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float, np.integer, np.floating)) \
            or not np.isfinite(bits) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be a number in [1, 8], got {bits!r}")
    base = int(np.floor(bits))
    high = int(round((float(bits) - base) * dim))
    if high >= dim:
        base, high = base + 1, 0
    return base, high


def effective_bits(dim: int, bits):
    """The width `split_bits` realises: an int for whole widths, else base + high / dim (float)."""
    base, high = split_bits(dim, bits)
    return base if high == 0 else base + high / dim


class Codebook:
    """A sorted scalar codebook.

    Attributes
    ----------
    centroids : np.ndarray, shape (2**bits,), float64
        Reconstruction levels, ascending.
    boundaries : np.ndarray, shape (2**bits - 1,), float64
        Decision thresholds (midpoints between neighbouring centroids), ascending.
    mse : float
        Expected squared error per coordinate under the exact density (unit-vector scale).
    """

    __slots__ = ("dim", "bits", "centroids", "boundaries", "mse")

    def __init__(self, dim: int, bits: int, centroids: np.ndarray, mse: float):
        self.dim = dim
        self.bits = bits
        self.centroids = np.asarray(centroids, dtype=np.float64)
        self.centroids.setflags(write=False)
        self.boundaries = (self.centroids[1:] + self.centroids[:-1]) / 2
        self.boundaries.setflags(write=False)
        self.mse = float(mse)

    def __repr__(self) -> str:
        return f"Codebook(dim={self.dim}, bits={self.bits}, mse_per_vector={self.mse * self.dim:.5f})"


def _quadrature(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid points x (ascending) and the unnormalised density in θ, g = cos^(d-2) θ, at them."""
    half_width = np.pi / 2 if dim <= 2 else min(np.pi / 2, 14.0 / np.sqrt(dim - 2))
    theta = np.linspace(-half_width, half_width, _GRID_POINTS)
    log_g = (dim - 2) * np.log(np.maximum(np.cos(theta), 1e-300))
    return np.sin(theta), np.exp(log_g - log_g.max())


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(dim: int, bits: int) -> Codebook:
    """Return the Lloyd-Max codebook for the coordinate density of a random unit vector.

    Parameters
    ----------
    dim : int
        Ambient dimension d ≥ 2 of the vectors.
    bits : int
        Bits per coordinate, 1..8 (2**bits centroids).

    Returns
    -------
    Codebook
        Centroids in unit-vector scale (multiply by √d for the N(0, 1) scale).
    """
    if not isinstance(dim, (int, np.integer)) or dim < 2:
        raise ValueError(f"codebook dimension must be an integer >= 2, got {dim!r}")
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be an integer in 1..8, got {bits!r}")
    dim, bits = int(dim), int(bits)
    x, g = _quadrature(dim)
    # Trapezoid-rule cumulative mass and first moment at the grid points, interpolated linearly in
    # between: the Lloyd map is then continuous in the cut points, so its iterations converge
    # instead of cycling between grid points.
    cum_w = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2)])
    gx = g * x
    cum_wx = np.concatenate([[0.0], np.cumsum((gx[1:] + gx[:-1]) / 2)])
    cum_wx /= cum_w[-1]
    cum_w /= cum_w[-1]
    levels = 1 << bits

    # Start from the centroids of equal-probability cells: close to optimal, so few iterations.
    centroids = _cell_means(np.interp(np.linspace(0, 1, levels + 1)[1:-1], cum_w, x), x, cum_w, cum_wx)
    for _ in range(_MAX_ITERATIONS):
        updated = _cell_means((centroids[1:] + centroids[:-1]) / 2, x, cum_w, cum_wx)
        # The density is symmetric, so is the optimum: enforce it against rounding drift.
        updated = (updated - updated[::-1]) / 2
        delta = np.max(np.abs(updated - centroids))
        centroids = updated
        if delta < _TOLERANCE:
            break
    cuts = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
    sq_err = g * (x - centroids[cuts]) ** 2
    mse = float(np.sum((sq_err[1:] + sq_err[:-1]) / 2) / np.sum((g[1:] + g[:-1]) / 2))
    return Codebook(dim, bits, centroids, mse)


def _cell_means(cuts: np.ndarray, x: np.ndarray, cum_w: np.ndarray, cum_wx: np.ndarray) -> np.ndarray:
    """Conditional means E[x | cell] of the cells split at the ascending points `cuts`."""
    mass = np.diff(np.concatenate([[0.0], np.interp(cuts, x, cum_w), [1.0]]))
    moment = np.diff(np.concatenate([[0.0], np.interp(cuts, x, cum_wx), [cum_wx[-1]]]))
    return moment / np.maximum(mass, 1e-300)
