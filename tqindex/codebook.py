"""Optimal scalar (Lloyd-Max) codebooks for one coordinate of a random unit vector, and block
codebooks (16 codewords for 2 or 4 coordinates) for 1- and 2-bit codes (see `block_codebook`).

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

__all__ = ["CODEBOOK_VERSION", "CODEBOOK_VERSIONS", "PLANE_BITS", "VQ_BITS", "BlockCodebook", "Codebook",
           "PlaneCodebook", "block_codebook", "lloyd_max_codebook", "plane_codebook", "split_bits", "effective_bits",
           "vq_block"]

#: Bump when the construction below changes in a way that can change codes of a saved index.
#: 1: Lloyd-Max scalar codebooks, block codebooks at 1-2 bits under codebook="vq".
#: 2: and, under codebook="vq", the bit-plane codebook (`plane_codebook`) for 5-bit codes.
CODEBOOK_VERSION = 2
#: Versions this tqindex can still build (and so load indexes of).
CODEBOOK_VERSIONS = (1, 2)

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
    x, g, cum_w, cum_wx = _cumulative(dim)
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
    return Codebook(dim, bits, centroids, _mse(centroids, x, g))


def _cumulative(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The quadrature grid x, density g, and the normalised cumulative mass and first moment at x.

    Trapezoid-rule sums at the grid points, interpolated linearly in between by the callers: the
    Lloyd map is then continuous in the cut points, so its iterations converge instead of cycling
    between grid points."""
    x, g = _quadrature(dim)
    cum_w = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2)])
    gx = g * x
    cum_wx = np.concatenate([[0.0], np.cumsum((gx[1:] + gx[:-1]) / 2)])
    return x, g, cum_w / cum_w[-1], cum_wx / cum_w[-1]


def _mse(levels: np.ndarray, x: np.ndarray, g: np.ndarray) -> float:
    """E[(x − nearest level)²] under the density g on the grid x (trapezoid rule)."""
    cells = np.searchsorted((levels[1:] + levels[:-1]) / 2, x)
    sq_err = g * (x - levels[cells]) ** 2
    return float(np.sum((sq_err[1:] + sq_err[:-1]) / 2) / np.sum((g[1:] + g[:-1]) / 2))


def _cell_mass_moment(cuts: np.ndarray, x: np.ndarray, cum_w: np.ndarray,
                      cum_wx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probability mass and first moment of the cells split at the ascending points `cuts`."""
    mass = np.diff(np.concatenate([[0.0], np.interp(cuts, x, cum_w), [1.0]]))
    moment = np.diff(np.concatenate([[0.0], np.interp(cuts, x, cum_wx), [cum_wx[-1]]]))
    return mass, moment


def _cell_means(cuts: np.ndarray, x: np.ndarray, cum_w: np.ndarray, cum_wx: np.ndarray) -> np.ndarray:
    """Conditional means E[x | cell] of the cells split at the ascending points `cuts`."""
    mass, moment = _cell_mass_moment(cuts, x, cum_w, cum_wx)
    return moment / np.maximum(mass, 1e-300)


# -- bit-plane codebook -------------------------------------------------------------------------
#: Width of the bit-plane codebook under codebook="vq" (codebook version >= 2).
PLANE_BITS = 5


class PlaneCodebook(Codebook):
    """A sorted scalar codebook of 2**bits levels whose level 2n + p is low[n] + p · step.

    The lowest bit p of a code then adds p · step whatever the other bits are, so a coordinate's
    contribution q_j · c(code) splits into q_j · low[code >> 1] + (code & 1) · q_j · step: a table
    over the (bits − 1)-bit part and a "bit plane" whose bits, four coordinates to a nibble, are
    looked up like 1-bit codes. At 5 bits that is one 4-bit nibble per coordinate plus a quarter
    nibble, instead of 32-entry tables (`tqindex.backends.fastscan`).
    """

    __slots__ = ("low", "step")

    def __init__(self, dim: int, bits: int, low: np.ndarray, step: float, mse: float):
        super().__init__(dim, bits, _plane_levels(np.asarray(low, dtype=np.float64), step), mse)
        self.low = np.asarray(low, dtype=np.float64)
        self.low.setflags(write=False)
        self.step = float(step)


def _plane_levels(low: np.ndarray, step: float) -> np.ndarray:
    """Levels 2n + p = low[n] + p · step, ascending when step is below every gap of `low`."""
    return (low[:, None] + np.array([0.0, step])).reshape(-1)


@functools.lru_cache(maxsize=None)
def plane_codebook(dim: int, bits: int = PLANE_BITS) -> PlaneCodebook:
    """The MSE-optimal codebook of the form c[2n + p] = low[n] + p · step for the coordinate
    density of a random unit vector in R^dim (same quadrature as `lloyd_max_codebook`).

    Alternates, from the Lloyd-Max codebook: nearest-level cells, then the least-squares (low,
    step) for those cells (their normal equations, solved exactly), with the density's symmetry
    enforced. At d = 1536 and 5 bits its MSE is about 17% above Lloyd-Max's
    (0.0029 against 0.0025 per vector) and a third of the 4-bit codebook's.
    """
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"plane codebook bits must be an integer in 2..8, got {bits!r}")
    start = lloyd_max_codebook(dim, int(bits))  # also checks dim
    dim, bits = int(dim), int(bits)
    x, g, cum_w, cum_wx = _cumulative(dim)
    low, step = start.centroids[0::2].copy(), float(np.mean(np.diff(start.centroids)[0::2]))
    for _ in range(_MAX_ITERATIONS):
        levels = _plane_levels(low, step)
        mass, moment = _cell_mass_moment((levels[1:] + levels[:-1]) / 2, x, cum_w, cum_wx)
        m0, m1 = mass[0::2], mass[1::2]
        s = moment[0::2] + moment[1::2]
        # The (low, step) minimising Σ_n Σ_p ∫_cell (x − low_n − p·step)² for these cells, from the
        # normal equations: low_n = (s_n − m1_n·step) / m_n, then step in closed form.
        m = np.maximum(m0 + m1, 1e-300)
        new_step = float((np.sum(moment[1::2]) - np.sum(m1 * s / m)) / max(np.sum(m1) - np.sum(m1 * m1 / m), 1e-300))
        new_low = (s - m1 * new_step) / m
        # Symmetric density, symmetric optimum: level v mirrors level 2^bits − 1 − v.
        levels = _plane_levels(new_low, new_step)
        levels = (levels - levels[::-1]) / 2
        new_low, new_step = levels[0::2], float(np.mean(levels[1::2] - levels[0::2]))
        delta = max(np.max(np.abs(new_low - low)), abs(new_step - step))
        low, step = new_low, new_step
        if delta < _TOLERANCE:
            break
    return PlaneCodebook(dim, bits, low, step, _mse(_plane_levels(low, step), x, g))


# -- block (vector) codebooks -------------------------------------------------------------------
#: Widths that get a block codebook with codebook="vq": 16 codewords over 4 // bits coordinates,
#: so one codeword is exactly one 4-bit nibble of packed codes (the fast scan's table unit).
VQ_BITS = (1, 2)
_VQ_SAMPLES = 1 << 17
_VQ_REFINE = 10
_VQ_REFINE_BELOW = 64
_VQ_MSE_SAMPLES = 1 << 15


class BlockCodebook:
    """16 codewords for a block of `block` consecutive rotated coordinates.

    Attributes
    ----------
    codewords : np.ndarray, shape (2**(bits·block), block), float64
        Codeword v reconstructs coordinate t of the block as codewords[v, t]; packed, v's bits
        (v >> t·bits) & (2**bits − 1) are stored as coordinate t's `bits`-bit code, so the packed
        layout is the scalar one and a nibble of packed codes is one codeword index.
    mse : float
        Expected squared error per coordinate (unit-vector scale), estimated on 2^15 draws of the law.
    """

    __slots__ = ("dim", "bits", "block", "codewords", "mse")

    def __init__(self, dim: int, bits: int, block: int, codewords: np.ndarray, mse: float):
        self.dim, self.bits, self.block = dim, bits, block
        self.codewords = np.asarray(codewords, dtype=np.float64)
        self.codewords.setflags(write=False)
        self.mse = float(mse)

    def __repr__(self) -> str:
        return (f"BlockCodebook(dim={self.dim}, bits={self.bits}, block={self.block}, "
                f"mse_per_vector={self.mse * self.dim:.5f})")


def vq_block(dim: int, bits: int) -> int:
    """Coordinates per codeword of the block codebook at this width (4 // bits), or 1 where it has
    none: widths outside VQ_BITS, and dim < 8, where a block would be a large share of the sphere."""
    return 4 // bits if bits in VQ_BITS and dim >= 8 else 1


def _sphere_block_sample(dim: int, block: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` draws of `block` coordinates of a uniform point on S^(dim-1): a uniform direction in
    R^block times a radius with r² ~ Beta(block/2, (dim − block)/2), the exact law of the block's
    squared length."""
    g = rng.standard_normal((count, block))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g * np.sqrt(rng.beta(block / 2, (dim - block) / 2, count))[:, None]


@functools.lru_cache(maxsize=None)
def block_codebook(dim: int, bits: int) -> BlockCodebook:
    """The 16-codeword quantizer for blocks of 4 // bits rotated coordinates (bits 1 or 2).

    After the rotation any `block` coordinates of a unit vector have a known, rotation-invariant
    joint law (see `_sphere_block_sample`); Lloyd's algorithm on a fixed-seed sample of that law
    (not of any data), started from the large-dim optimum `_GAUSSIAN_SHAPES` (used as is from
    d = 64 on), gives codewords whose MSE is below the product of scalar Lloyd-Max codebooks
    at the same rate (at d = 384, 0.107 against 0.117 per unit vector at 2 bits, 0.341 against 0.363 at 1),
    with the same code size and the same 16-entry table per nibble at search time. Deterministic
    (fixed seeds), cached in memory.
    """
    block = vq_block(dim, bits)
    if block == 1:
        raise ValueError(f"no block codebook for bits={bits!r} at dim={dim!r} (needs bits in {VQ_BITS}, dim >= 8)")
    rng = np.random.Generator(np.random.PCG64([0x7471, dim, bits]))
    words = _gaussian_shape(block) / np.sqrt(dim)  # the large-dim limit: coordinates N(0, 1/dim)
    if dim < _VQ_REFINE_BELOW:
        # Small dims: Lloyd from that shape on a sample of the exact law (at d = 8, 2 bits, MSE
        # 0.0907 → 0.0875). From d = 64 on, refining on 2^17 draws changes the MSE by less than its
        # own sampling noise (±0.0003), so the scaled shape is used as is and costs nothing.
        words, _ = _lloyd(_sphere_block_sample(dim, block, _VQ_SAMPLES, rng), words, _VQ_REFINE)
    sample = _sphere_block_sample(dim, block, _VQ_MSE_SAMPLES, rng)
    err = float(np.mean(np.sum((sample - words[_nearest(sample, words)]) ** 2, axis=1)))
    return BlockCodebook(dim, bits, block, words, err / block)


# 16 codewords for N(0, I_block), block 2 and 4: the best of 16 k-means++-seeded Lloyd runs (≤ 400
# steps each) on 2^18 standard normal draws, rounded to 6 decimals: `design_gaussian_shape(block,
# 1 << 18, 16)` reproduces them (about 3 minutes; tests run it at a smaller size). MSE per
# coordinate 0.10701 (block 2, 4 levels per coordinate: scalar Lloyd-Max 0.11748) and 0.34113
# (block 4, 2 levels: 0.36338). Kept as constants so that building a codebook takes milliseconds.
_GAUSSIAN_SHAPES = {
    2: np.array([
    [-1.590222,  1.193861],
    [ 0.868790,  0.388424],
    [ 0.998035, -1.584717],
    [-1.859981, -0.077477],
    [-1.337993, -1.302983],
    [ 1.856063,  0.749830],
    [-0.086485, -0.957742],
    [-0.453488,  1.804672],
    [ 0.732456, -0.521644],
    [ 0.082641,  0.885997],
    [-0.807254, -0.385121],
    [ 1.795366, -0.536812],
    [ 0.005368, -0.005827],
    [-0.768591,  0.535468],
    [ 0.868232,  1.644931],
    [-0.246544, -1.993534]]),
    4: np.array([
    [-0.348152,  0.241119,  0.040845,  1.641715],
    [ 1.326832, -0.059759, -0.905229, -0.591047],
    [ 0.197192,  1.450961, -0.834299,  0.275114],
    [ 0.061773, -0.308272, -1.519078,  0.714525],
    [ 0.822396, -1.289100, -0.026380,  0.767910],
    [-0.816122,  1.231638,  0.782164,  0.258280],
    [ 1.350357,  0.533588,  0.316067,  0.850964],
    [-1.493769,  0.275343, -0.756965,  0.101445],
    [-1.012752, -0.139078,  0.858794, -1.070288],
    [ 0.154080, -0.222355,  1.624286,  0.464595],
    [-0.304870,  0.582278, -0.728331, -1.396702],
    [ 0.014973, -0.005715,  0.001343,  0.001179],
    [ 0.749448, -0.939166,  0.717514, -0.971098],
    [ 0.758677,  0.994581,  0.760225, -0.871819],
    [-0.385906, -1.249214, -0.801734, -0.760452],
    [-1.063029, -1.127765,  0.425348,  0.570184]]),
}


def _gaussian_shape(block: int) -> np.ndarray:
    return _GAUSSIAN_SHAPES[block]


def design_gaussian_shape(block: int, samples: int, starts: int, seed: int = 1) -> tuple[np.ndarray, float]:
    """How `_GAUSSIAN_SHAPES` were made: the best of `starts` k-means++-seeded Lloyd runs on
    `samples` N(0, I_block) draws. Returns (codewords (16, block), MSE per coordinate)."""
    rng = np.random.Generator(np.random.PCG64([0x7471, block, seed]))
    sample = rng.standard_normal((samples, block))
    runs = [_lloyd(sample, _kmeanspp(sample, 16, rng), 400) for _ in range(starts)]
    words, err = min(runs, key=lambda run: run[1])
    return words, err / block


def _lloyd(sample: np.ndarray, words: np.ndarray, iterations: int) -> tuple[np.ndarray, float]:
    """Lloyd's iterations from `words` until the assignment repeats (at most `iterations`);
    returns (codewords, mean squared error per sample)."""
    assign = None
    for _ in range(iterations):
        previous, assign = assign, _nearest(sample, words)
        if previous is not None and np.array_equal(previous, assign):
            break  # a fixed point of Lloyd's map
        counts = np.bincount(assign, minlength=len(words))
        sums = np.stack([np.bincount(assign, weights=sample[:, t], minlength=len(words))
                         for t in range(sample.shape[1])], axis=1)
        words = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], words)
    err = float(np.mean(np.sum((sample - words[_nearest(sample, words)]) ** 2, axis=1)))
    return words, err


def _nearest(points: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword to each point (ties: the lowest index)."""
    d2 = np.sum(words ** 2, axis=1)[None, :] - 2.0 * points @ words.T
    return np.argmin(d2, axis=1)


def _kmeanspp(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next seed drawn with probability ∝ squared distance to the chosen."""
    chosen = [points[rng.integers(len(points))]]
    d2 = np.sum((points - chosen[0]) ** 2, axis=1)
    for _ in range(count - 1):
        nxt = points[rng.choice(len(points), p=d2 / d2.sum())]
        chosen.append(nxt)
        d2 = np.minimum(d2, np.sum((points - nxt) ** 2, axis=1))
    return np.array(chosen)
