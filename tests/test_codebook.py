import numpy as np
import pytest

from tqindex.codebook import block_codebook, lloyd_max_codebook, plane_codebook, vq_block

# The paper's figures (Gaussian limit, units of 1/sqrt(d)), quoted to 4 decimals.
PAPER = {1: ["0.7979"], 2: ["0.4528", "1.510"],
         4: ["0.1284", "0.3880", "0.6568", "0.9423", "1.2562", "1.6180", "2.0690", "2.7326"]}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_large_d_matches_paper_centroids(bits):
    d = 10**6
    cb = lloyd_max_codebook(d, bits)
    positive = cb.centroids[len(cb.centroids) // 2:] * np.sqrt(d)
    # Equal when rounded to the decimals each figure is quoted with (one unit of slack for the
    # paper's own rounding of values that sit on a half).
    for value, quoted in zip(positive, PAPER[bits]):
        decimals = len(quoted.split(".")[1])
        assert abs(value - float(quoted)) <= 10.0 ** -decimals, (value, quoted)


def test_exact_small_dimensions():
    # d = 3: each coordinate is uniform on [-1, 1] (Archimedes), so 1 bit gives ±1/2 and MSE 1/12.
    cb = lloyd_max_codebook(3, 1)
    np.testing.assert_allclose(cb.centroids, [-0.5, 0.5], atol=1e-6)
    assert cb.mse == pytest.approx(1 / 12, rel=1e-5)
    # uniform density: 2 bits gives the 4 cell midpoints
    np.testing.assert_allclose(lloyd_max_codebook(3, 2).centroids, [-0.75, -0.25, 0.25, 0.75], atol=1e-6)
    # d = 2: arcsine law, the 1-bit centroid is E|x| = 2/pi.
    np.testing.assert_allclose(lloyd_max_codebook(2, 1).centroids, [-2 / np.pi, 2 / np.pi], atol=1e-6)


@pytest.mark.parametrize("d", [2, 3, 97, 1536])
@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_codebook_is_a_fixed_point_and_symmetric(d, bits):
    cb = lloyd_max_codebook(d, bits)
    c = cb.centroids
    assert len(c) == 2 ** bits and np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-12)
    np.testing.assert_allclose(cb.boundaries, (c[1:] + c[:-1]) / 2)
    assert np.all(np.abs(c) <= 1)
    # Lloyd optimality: each centroid is the conditional mean of its cell. Check against exact
    # samples of one coordinate (x² ~ Beta(1/2, (d-1)/2), random sign), within 5 standard errors.
    rng = np.random.default_rng(0)
    samples = np.sqrt(rng.beta(0.5, (d - 1) / 2, 400_000)) * rng.choice([-1, 1], 400_000)
    cell = np.searchsorted(cb.boundaries, samples)
    for j in np.unique(cell):
        members = samples[cell == j]
        if len(members) < 50:
            continue
        se = members.std() / np.sqrt(len(members))
        assert abs(members.mean() - c[j]) < 5 * se + 1e-9, (j, members.mean(), c[j], se)


def test_mse_decreases_by_about_4x_per_bit():
    mses = [lloyd_max_codebook(1536, b).mse * 1536 for b in range(1, 9)]
    assert all(a > b for a, b in zip(mses, mses[1:]))
    np.testing.assert_allclose(mses[:4], [0.3634, 0.1175, 0.0345, 0.0095], rtol=0.01)


@pytest.mark.parametrize("bad", [(1, 2), (0, 2), (16, 0), (16, 9), (2.5, 2)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="dimension|bits"):
        lloyd_max_codebook(*bad)


@pytest.mark.parametrize("d", [8, 50, 384, 1536])
@pytest.mark.parametrize("bits", [1, 2])
def test_block_codebook_beats_the_scalar_one(d, bits):
    """16 codewords over 4/b coordinates: lower MSE than the product of scalar Lloyd-Max codebooks
    at the same rate (high-rate theory for 2-4 dimensions: a few tenths of a dB, 5-10%)."""
    cb = block_codebook(d, bits)
    scalar = lloyd_max_codebook(d, bits).mse
    assert cb.codewords.shape == (16, 4 // bits)
    assert 0.85 * scalar < cb.mse < 0.96 * scalar
    # Lloyd's centroid condition puts the codewords' mean at the (zero) mean of the law.
    assert np.abs(cb.codewords.mean(axis=0)).max() < 0.05 / np.sqrt(d)


def test_block_codebook_is_deterministic():
    first = block_codebook(96, 2).codewords.copy()
    block_codebook.cache_clear()
    np.testing.assert_array_equal(block_codebook(96, 2).codewords, first)


def test_block_codebook_mse_holds_on_random_unit_vectors():
    """The design sample's MSE is what encoding random directions gives: 2,000 vectors at d = 384
    average 384,000 two-coordinate blocks, so the mean has a relative error of ~0.3%."""
    import torch

    from tqindex.quantizer import TurboQuantizer

    for bits in (1, 2):
        q = TurboQuantizer(dim=384, bits=bits, codebook="vq", seed=3)
        x = torch.from_numpy(np.random.default_rng(bits).standard_normal((2000, 384)).astype(np.float32))
        enc = q.encode(x)
        unit = (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).numpy()
        err = np.sum((_unit_decode(q, enc) - unit) ** 2, axis=1).mean()
        assert err == pytest.approx(block_codebook(384, bits).mse * 384, rel=0.03)


def _unit_decode(q, enc):
    """x̃/‖x‖ for the unit vectors (the decoder's reconstruction before the norm)."""
    import torch
    y_tilde = q.rotated_reconstruction(torch.from_numpy(enc.codes))
    return q.rotation.inverse(y_tilde).numpy()


def test_vq_block_rules():
    assert vq_block(384, 2) == 2 and vq_block(384, 1) == 4
    assert vq_block(384, 3) == vq_block(384, 4) == 1
    assert vq_block(7, 2) == 1  # too few dimensions
    with pytest.raises(ValueError, match="block codebook"):
        block_codebook(384, 3)


@pytest.mark.parametrize("block", [2, 4])
def test_stored_gaussian_shapes_are_as_good_as_a_fresh_design(block):
    """The stored large-dim shapes come from `design_gaussian_shape`; a smaller fresh design (2
    starts on 2^14 draws) must not beat them on an independent sample of 2^17 draws."""
    from tqindex.codebook import _GAUSSIAN_SHAPES, _nearest, design_gaussian_shape

    fresh, _ = design_gaussian_shape(block, 1 << 14, 2, seed=7)
    test = np.random.default_rng(123).standard_normal((1 << 17, block))

    def mse(words):
        return np.mean(np.sum((test - words[_nearest(test, words)]) ** 2, axis=1)) / block

    stored = mse(_GAUSSIAN_SHAPES[block])
    assert stored <= mse(fresh) * 1.002
    scalar_gaussian = {2: 0.11748, 4: 0.36338}[block]  # Lloyd-Max for N(0, 1) at 2 and 1 bits
    assert stored < 0.95 * scalar_gaussian


@pytest.mark.parametrize("d", [2, 3, 50, 384, 1536])
def test_plane_codebook_structure_and_mse(d):
    cb = plane_codebook(d)
    c = cb.centroids
    assert len(c) == 32 and np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-12)           # symmetric, like the density
    np.testing.assert_allclose(c[0::2], cb.low, atol=0)
    np.testing.assert_allclose(c[1::2] - c[0::2], cb.step, rtol=1e-12, atol=1e-15)  # level 2n + p = low_n + p·step
    np.testing.assert_allclose(cb.boundaries, (c[1:] + c[:-1]) / 2)
    lloyd4, lloyd5 = lloyd_max_codebook(d, 4).mse, lloyd_max_codebook(d, 5).mse
    # A constrained 32-level codebook: no better than Lloyd-Max's, far better than 16 levels.
    assert lloyd5 * (1 - 1e-9) <= cb.mse < 1.2 * lloyd5 and cb.mse < lloyd4 / 3
    # Optimality of step for its cells: the mean error of the odd levels' cells, moved onto the even
    # ones, is zero (the normal equation of step), checked on exact samples within 5 standard errors.
    rng = np.random.default_rng(1)
    samples = np.sqrt(rng.beta(0.5, (d - 1) / 2, 400_000)) * rng.choice([-1, 1], 400_000)
    level = np.searchsorted(cb.boundaries, samples)
    err = samples - c[level]
    odd = level % 2 == 1
    assert abs(err[odd].mean()) < 5 * err[odd].std() / np.sqrt(odd.sum()) + 1e-12
    # ... and each pair's mean error is zero (the normal equation of low_n).
    for n in range(16):
        pair = level // 2 == n
        if pair.sum() > 100:
            assert abs(err[pair].mean()) < 5 * err[pair].std() / np.sqrt(pair.sum()) + 1e-12
    # MSE against samples (d >= 50, where the estimate is tight).
    if d >= 50:
        assert np.mean(err ** 2) == pytest.approx(cb.mse, rel=0.02)
