import numpy as np
import pytest
import torch

from tqindex import reference
from tqindex.packing import unpack_codes
from tqindex.quantizer import TurboQuantizer, bits_for_bytes

from conftest import unit_rows

PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_paper(bits):
    d, n = 1536, 400
    x = unit_rows(np.random.default_rng(bits), n, d).astype(np.float32)
    q = TurboQuantizer(dim=d, bits=bits, variant="mse", seed=1, codebook="scalar")
    x_hat = q.decode(q.encode(torch.from_numpy(x)))
    mse = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    # Within 2% of the paper's figure; the sampling error of the mean over 400 vectors of d = 1536
    # coordinates is about 0.1%, so 2% leaves room only for float32 rounding.
    assert mse == pytest.approx(PAPER_MSE[bits], rel=0.02)


@pytest.mark.parametrize("bits", [1.5, 2.25, 3.5])
def test_fractional_bits_distortion_interpolates(bits):
    # Coordinates are exchangeable after the rotation, so giving a fraction f of them b + 1 bits
    # must give (1 − f)·MSE(b) + f·MSE(b + 1), with the same 2% allowance as above.
    d, n = 1536, 400
    base, frac = int(bits), bits - int(bits)
    x = unit_rows(np.random.default_rng(int(bits * 4)), n, d).astype(np.float32)
    q = TurboQuantizer(dim=d, bits=bits, variant="mse", seed=1, codebook="scalar")
    assert q.bits == bits and q.code_bytes == int(d * frac) * (base + 1) // 8 + int(d * (1 - frac)) * base // 8
    x_hat = q.decode(q.encode(torch.from_numpy(x)))
    mse = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    assert mse == pytest.approx((1 - frac) * PAPER_MSE[base] + frac * PAPER_MSE[base + 1], rel=0.02)


@pytest.mark.parametrize("bits", [2, 3])
def test_prod_inner_products_unbiased_with_theoretical_variance(bits):
    d, n = 256, 12_000
    rng = np.random.default_rng(10 + bits)
    x = unit_rows(rng, n, d)
    y = unit_rows(rng, n, d)  # one query per vector: n independent pairs
    q = TurboQuantizer(dim=d, bits=bits, variant="prod", seed=5, codebook="scalar")
    enc = q.encode(torch.from_numpy(x.astype(np.float32)))
    x_hat = q.decode(enc).astype(np.float64)
    err = np.sum(y * x_hat, axis=1) - np.sum(y * x, axis=1)
    se = err.std() / np.sqrt(n)
    assert abs(err.mean()) < 3 * se
    # Given the mse stage, the QJL estimate of <y, r> has variance (π/2 ‖r‖²‖y‖² − <y, r>²)/d
    # (one row of S contributes E[<s,y>²] − (2/π)<y, r/‖r‖>², scaled by (π/2)‖r‖²/d²).
    mse_part = q.decode(type(enc)(codes=enc.codes, norm=enc.norm, scale=enc.scale, qjl=enc.qjl,
                                  residual_norm=np.zeros_like(enc.residual_norm)))
    r = x - mse_part
    theory = np.mean((np.pi / 2 * np.sum(r * r, 1) - np.sum(y * r, 1) ** 2) / d)
    assert err.var() == pytest.approx(theory, rel=0.10)


def _rotated_unit(q: TurboQuantizer, x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit @ q.rotation.matrix().T


@pytest.mark.parametrize("d", [3, 97, 1000])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 2.5, 3.3, 7.9, 5, 4.4])
@pytest.mark.parametrize("codebook", ["scalar", "vq"])
def test_mse_codes_equal_reference(d, bits, codebook):
    rng = np.random.default_rng(int(d + 10 * bits))
    x = (rng.standard_normal((64, d)) * rng.uniform(0.1, 10, (64, 1))).astype(np.float32)
    q = TurboQuantizer(dim=d, bits=bits, variant="mse", seed=2, codebook=codebook)
    enc = q.encode(torch.from_numpy(x))
    if codebook == "vq" and bits not in (1, 2, 2.5, 3.3, 5, 4.4):
        # Widths without a 1-, 2- or 5-bit group are Lloyd-Max under either codebook: same codes.
        scalar = TurboQuantizer(dim=d, bits=bits, variant="mse", seed=2, codebook="scalar")
        assert all(g.kind.name == "scalar" for g in q.groups)
        np.testing.assert_array_equal(enc.codes, scalar.encode(torch.from_numpy(x)).codes)
    ref_idx, ref_norms = reference.quantize_mse(x, q.rotation.matrix(), bits, codebook)
    fast_idx = q.unpack(enc.codes).astype(np.int64)
    # Tie-aware: codes may differ only where the coordinate (block) lies within float32 rounding of
    # a decision boundary (equidistant from two codewords), and then only to the neighbouring cell.
    differ = fast_idx != ref_idx
    y = _rotated_unit(q, x.astype(np.float64))
    for cols, b, words in reference.coordinate_codebooks(d, bits, codebook):
        block = words.shape[1]
        bad = differ[:, cols].reshape(len(x), -1, block).any(axis=2)
        if not bad.any():
            continue
        blocks = y[:, cols].reshape(len(x), -1, block)[bad]
        dist = np.sort(np.sum((blocks[:, None, :] - words[None]) ** 2, axis=2), axis=1)
        assert np.all(dist[:, 1] - dist[:, 0] < 1e-5 * np.sqrt(dist[:, 1]))
        if block == 1:
            assert np.all(np.abs(fast_idx[:, cols][differ[:, cols]] - ref_idx[:, cols][differ[:, cols]]) == 1)
    assert differ.mean() < 1e-3
    np.testing.assert_allclose(enc.norm, ref_norms, rtol=1e-5)
    # Reconstructions agree to float32 precision wherever codes agree.
    fast_hat = q.decode(enc)
    ref_hat = reference.dequantize_mse(fast_idx, ref_norms, q.rotation.matrix(), bits, codebook)
    np.testing.assert_allclose(fast_hat, ref_hat, rtol=1e-4, atol=1e-5 * np.abs(ref_hat).max())


@pytest.mark.parametrize("d", [3, 97, 1000])
@pytest.mark.parametrize("bits,codebook", [(1, "scalar"), (2, "scalar"), (4, "scalar"), (3.5, "scalar"),
                                           (2, "vq"), (3, "vq"), (3.5, "vq")])
def test_prod_codes_equal_reference(d, bits, codebook):
    rng = np.random.default_rng(int(7 * d + 10 * bits))
    x = rng.standard_normal((48, d)).astype(np.float32)
    q = TurboQuantizer(dim=d, bits=bits, variant="prod", seed=9, codebook=codebook)
    enc = q.encode(torch.from_numpy(x))
    idx, qjl, rnorm, norms = reference.quantize_prod(x, q.rotation.matrix(), bits, seed=9, codebook=codebook)
    if bits > 1:
        fast_idx = q.unpack(enc.codes).astype(np.int64)
        assert np.mean(fast_idx != idx) < 1e-3
        if (fast_idx != idx).any():
            pytest.skip("a coordinate fell on a decision boundary; the residual differs there")
    fast_signs = unpack_codes(enc.qjl, 1, d).astype(np.int8) * 2 - 1
    # Tie-aware: a sign may differ only where the projection S·r is within rounding of zero.
    s = reference.qjl_gaussian(d, 9) @ q.rotation.matrix()
    proj = (x / np.linalg.norm(x, axis=1, keepdims=True) - (0 if bits == 1 else reference.dequantize_mse(
        idx, np.ones(len(x)), q.rotation.matrix(), bits - 1, codebook))) @ s.T
    differ = fast_signs != qjl
    assert np.all(np.abs(proj[differ]) < 1e-4 * np.sqrt(d))
    np.testing.assert_allclose(enc.residual_norm, rnorm, rtol=1e-4, atol=1e-6)
    fast_hat = q.decode(enc)
    ref_hat = reference.dequantize_prod(idx, qjl, rnorm, norms, q.rotation.matrix(), bits, seed=9,
                                        codebook=codebook)
    if not differ.any():
        np.testing.assert_allclose(fast_hat, ref_hat, rtol=1e-4, atol=1e-4 * np.abs(ref_hat).max())


def test_zero_vector_encodes_to_zero():
    q = TurboQuantizer(dim=16, bits=3, variant="mse", codebook="scalar")
    enc = q.encode(torch.zeros((2, 16)))
    assert np.all(enc.norm == 0) and np.all(q.decode(enc) == 0)


def test_rescale_is_unbiased_for_unit_vectors():
    # scale = ‖x‖/<y, ỹ>: the estimate <Πq, ỹ>·scale must be unbiased over random pairs, unlike
    # the plain estimate, which shrinks by ≈ 1 − MSE.
    d, n = 128, 8000
    rng = np.random.default_rng(3)
    x = unit_rows(rng, n, d).astype(np.float32)
    y = unit_rows(rng, n, d)
    # Queries correlated with their vector, so the true inner products are far from 0.
    y = 0.8 * x + 0.6 * y
    for rescale, expect_bias in [(True, False), (False, True)]:
        q = TurboQuantizer(dim=d, bits=2, variant="mse", seed=1, rescale=rescale, codebook="scalar")
        enc = q.encode(torch.from_numpy(x))
        rotated, _ = q.prepare_queries(torch.from_numpy(y.astype(np.float32)))
        y_tilde = q.rotated_reconstruction(torch.from_numpy(enc.codes))
        est = (rotated * y_tilde).sum(1).numpy() * enc.scale
        err = est - np.sum(x * y, axis=1)
        biased = abs(err.mean()) > 5 * err.std() / np.sqrt(n)
        assert biased == expect_bias


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("dim,nbytes,metric,variant", [(384, 116, "ip", "mse"), (384, 164, "ip", "mse"),
                                                       (50, 34, "ip", "mse"), (97, 30, "l2", "mse"),
                                                       (384, 200, "ip", "prod"), (3, 5, "ip", "mse")])
def test_bits_for_bytes_is_the_widest_width_that_fits(dim, nbytes, metric, variant, scale_dtype):
    bits = bits_for_bytes(dim, nbytes, metric=metric, variant=variant, scale_dtype=scale_dtype)
    q = TurboQuantizer(dim=dim, bits=bits, variant=variant, scale_dtype=scale_dtype, codebook="scalar")
    assert q.bytes_per_vector(metric) <= nbytes
    # One more coordinate at the higher width (or one more whole bit) no longer fits.
    wider = bits + 1 / dim
    if wider <= 8:
        wide = TurboQuantizer(dim=dim, bits=wider, variant=variant, scale_dtype=scale_dtype, codebook="scalar")
        assert wide.bytes_per_vector(metric) > nbytes


def test_bits_for_bytes_known_values_and_errors():
    assert bits_for_bytes(384, 116) == 2 + 128 / 384          # 112 B of codes + 4 B of scale
    assert bits_for_bytes(384, 100) == 2
    assert bits_for_bytes(384, 116, scale_dtype="float16") == 2 + 144 / 384  # 114 B of codes + 2 B
    # d = 50 in 18 B with a float16 scale: 26 coordinates at 3 bits (10 B) + 24 at 2 bits (6 B).
    assert bits_for_bytes(50, 18, scale_dtype="float16") == 2 + 26 / 50
    with pytest.raises(ValueError, match="scale_dtype"):
        bits_for_bytes(384, 100, scale_dtype="bfloat16")
    with pytest.raises(ValueError, match="no bit width fits"):
        bits_for_bytes(384, 40)


@pytest.mark.parametrize("variant,bits", [("mse", 2), ("mse", 3.4), ("prod", 3)])
def test_float16_scale_is_the_float32_scale_rounded(variant, bits):
    # Same codes and other fields; the scale is the float32 one rounded to nearest float16, so each
    # score moves by a relative 2⁻¹¹ at most (float16 has an 11-bit significand).
    d = 97
    rng = np.random.default_rng(11)
    x = torch.from_numpy((rng.standard_normal((300, d)) * rng.uniform(0.01, 300, (300, 1))).astype(np.float32))
    wide = TurboQuantizer(dim=d, bits=bits, variant=variant, seed=2, codebook="scalar").encode(x)
    half = TurboQuantizer(dim=d, bits=bits, variant=variant, seed=2, scale_dtype="float16", codebook="scalar").encode(x)
    assert half.scale.dtype == np.float16 and wide.scale.dtype == np.float32
    np.testing.assert_array_equal(half.scale, wide.scale.astype(np.float16))
    assert np.all(np.abs(half.scale.astype(np.float64) / wide.scale - 1) <= 2.0 ** -11)
    for name in ("codes", "qjl", "residual_norm"):
        a, b = getattr(half, name), getattr(wide, name)
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("norm,ok", [(0.0, True), (6.2e-5, True), (65000.0, True), (6.0e-5, False),
                                     (1e-9, False), (70000.0, False), (1e30, False)])
def test_float16_scale_refuses_what_it_cannot_hold(norm, ok):
    d = 16
    x = np.zeros((3, d), np.float32)
    x[:, 0] = 1.0
    x[1] *= 0
    x[1, 3] = norm
    q = TurboQuantizer(dim=d, bits=4, scale_dtype="float16", rescale=False, codebook="scalar")  # the scale is ‖x‖ itself
    if ok:
        assert np.isfinite(q.encode(torch.from_numpy(x)).scale).all()
    else:
        with pytest.raises(ValueError, match=r"float16.*row 1 of the batch"):
            q.encode(torch.from_numpy(x))


@pytest.mark.parametrize("d", [3, 50, 1000])
def test_codebook_version_1_keeps_lloyd_max_for_5_bit_codes(d):
    """Indexes saved under codebook version 1 keep their codes' meaning: 5-bit groups are Lloyd-Max
    there, bit-plane from version 2 on (codebook="vq" only)."""
    from tqindex.codebook import lloyd_max_codebook, plane_codebook
    for bits in (5, 4.5):
        v1 = TurboQuantizer(dim=d, bits=bits, codebook="vq", codebook_version=1)
        v2 = TurboQuantizer(dim=d, bits=bits, codebook="vq")
        scalar = TurboQuantizer(dim=d, bits=bits, codebook="scalar")
        assert v2.codebook_version == 2 and v2.groups[0].plane and not v1.groups[0].plane
        assert not scalar.groups[0].plane
        np.testing.assert_array_equal(v1.groups[0].centroids.numpy(), lloyd_max_codebook(d, 5).centroids.astype(np.float32))
        np.testing.assert_array_equal(v2.groups[0].centroids.numpy(), plane_codebook(d).centroids.astype(np.float32))
        if len(v2.groups) > 1:  # the 4-bit group is the same under both versions
            np.testing.assert_array_equal(v1.groups[1].centroids.numpy(), v2.groups[1].centroids.numpy())
    for bad in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="codebook_version"):
            TurboQuantizer(dim=d, bits=5, codebook_version=bad)


@pytest.mark.parametrize("variant,bits", [("mse", 2), ("prod", 3)])
def test_chunked_encoding_equals_one_pass(monkeypatch, variant, bits):
    """A batch larger than the encoder's chunk is written chunk by chunk into the final arrays."""
    import tqindex.quantizer as quantizer_module
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((1000, 24)).astype(np.float32))
    q = TurboQuantizer(dim=24, bits=bits, variant=variant, seed=4)
    whole = q.encode(x)
    monkeypatch.setattr(quantizer_module, "_ENCODE_CHUNK_BYTES", 16 * 24 * 77)  # 77 rows per thread
    monkeypatch.setattr(quantizer_module, "_ENCODE_MIN_ROWS", 1)
    chunked = q.encode(x)
    for name in ("codes", "norm", "scale", "qjl", "residual_norm"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
