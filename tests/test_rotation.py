import numpy as np
import pytest
import torch

from tqindex.rotation import Rotation


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
@pytest.mark.parametrize("d", [2, 3, 97, 256, 1000])
def test_orthogonal_and_invertible(kind, d):
    rot = Rotation(dim=d, kind=kind, seed=3)
    m = rot.matrix()
    np.testing.assert_allclose(m @ m.T, np.eye(d), atol=1e-10)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, d)))
    np.testing.assert_allclose(rot.apply(x).numpy(), x.numpy() @ m.T, atol=1e-10)
    np.testing.assert_allclose(rot.inverse(rot.apply(x)).numpy(), x.numpy(), atol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_seeded(kind):
    a, b, c = (Rotation(dim=50, kind=kind, seed=s).matrix() for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_dense_is_haar_like():
    # Haar: each entry of a random orthogonal matrix has mean 0 and variance 1/d; the sign fix
    # matters for the diagonal, whose mean QR without the fix would push positive.
    d = 64
    diag = np.concatenate([np.diag(Rotation(dim=d, seed=s).matrix()) for s in range(200)])
    assert abs(diag.mean()) < 4 * np.sqrt(1 / d / diag.size)
    assert diag.var() == pytest.approx(1 / d, rel=0.1)


def test_unknown_kind():
    with pytest.raises(ValueError, match="rotation kind"):
        Rotation(dim=4, kind="fft")
