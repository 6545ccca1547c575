"""Input coercion and checks at the API boundary: every error names what was wrong."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from . import native

__all__ = ["METRICS", "MAX_DIM", "MAX_ID", "MAX_NORM", "as_float_matrix", "as_id_array", "check_k", "check_norms", "array_kind",
           "to_kind"]

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)

#: Metrics an index scores by (defined here, beside the other input bounds, for index and storage).
METRICS = ("ip", "cosine", "l2")
#: Largest vector dimension (a dense rotation of this size holds 12·d² = 48 GiB; the bound keeps a
#: crafted manifest from asking for more).
MAX_DIM = 1 << 16
#: Ids are integers in [0, MAX_ID): automatic ids can always continue past the largest one given.
MAX_ID = 1 << 62
#: Largest vector or query norm: every score (≤ ‖q‖·‖x‖, or ‖q − x‖² ≤ (‖q‖ + ‖x‖)²) then stays far
#: inside float32's range, so no score overflows to ±inf.
MAX_NORM = 1e18
#: float64 elements per chunk of `check_norms` (512 KiB, in one buffer reused by every chunk).
_NORM_CHUNK_ELEMENTS = 1 << 16
#: Rows a thread's share of the compiled norm check gets at least.
_NORM_ROWS_PER_THREAD = 4096
#: ... on a GPU (512 MiB of float64 there).
_DEVICE_NORM_CHUNK_ELEMENTS = 1 << 26

# Read-only inputs (a memory map, an array from Ray's object store) are wrapped without a copy: the
# index never writes to a caller's array, so torch's warning about them is noise, and only the
# warnings raised here are silenced.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=r"tqindex\.validation")


def array_kind(x) -> str:
    """'torch', 'cupy' or 'numpy': the kind of array results are returned as."""
    if isinstance(x, torch.Tensor):
        return "torch"
    if type(x).__module__.split(".")[0] == "cupy":
        return "cupy"
    return "numpy"


def to_kind(array: np.ndarray, kind: str, like=None):
    """Return a numpy result as the caller's kind of array (on the caller's device)."""
    if kind == "torch":
        return torch.from_numpy(array).to(like.device if like is not None else "cpu")
    if kind == "cupy":
        import cupy  # only reached when the caller passed a CuPy array, so CuPy is installed
        return cupy.asarray(array)
    return array


def as_float_matrix(x, dim: int, *, name: str = "vectors", allow_empty: bool = False,
                    keep_device: bool = False, check_finite: bool = True) -> tuple[torch.Tensor, bool]:
    """Coerce to a contiguous float32 tensor of shape (n, dim), on the CPU.

    Accepts numpy arrays, torch tensors (float16/bfloat16/float32/float64), CuPy arrays and nested
    sequences. A 1-D input is one vector. Returns (tensor, was_1d). With `keep_device`, torch CUDA
    tensors and CuPy arrays stay on their GPU (CuPy through DLPack, no copy to the host).
    NaN and inf are refused unless `check_finite` is False: for a caller that passes the rows
    straight to `check_norms`, which refuses them too (a row's float64 norm is finite exactly when its
    float32 values are), so a search checks its queries once.
    """
    kind = array_kind(x)
    if kind == "cupy" and keep_device:
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must have a floating dtype (float16/32/64), got {x.dtype}")
        x, kind = torch.from_dlpack(x), "torch"
    if kind == "torch":
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must have a floating dtype (float16/32/64), got torch {x.dtype}")
        t = x.detach().to(x.device if keep_device and x.is_cuda else "cpu", torch.float32)
    else:
        if kind == "cupy":
            x = x.get()
        arr = np.asarray(x)
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or arr.ndim == 0:  # else taken as it is
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or arr.size == 0):
                raise TypeError(f"{name} must have a floating dtype (float16/32/64), got {arr.dtype}")
            if arr.dtype not in _FLOAT_DTYPES and arr.size:
                raise TypeError(f"{name} dtype {arr.dtype} is not supported; use float16, float32 or float64")
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = torch.from_numpy(arr)
    was_1d = t.ndim == 1
    if was_1d:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 1-D (one vector) or 2-D (n, {dim}); got shape {tuple(t.shape)}")
    if t.shape[1] != dim:
        raise ValueError(f"{name} have dimension {t.shape[1]}, but the index has dimension {dim}")
    if t.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is an empty batch (0 rows)")
    # min and max propagate NaN and expose ±inf; aminmax is ~50x faster than isfinite().all() here.
    if check_finite and t.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(t)):
        bad_row = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contain NaN or inf (first at row {bad_row})")
    # float16/64 inputs can overflow float32 to inf above 3.4e38; isfinite above has caught that.
    return t.contiguous(), was_1d


def as_id_array(ids, n: int | None = None) -> np.ndarray:
    """Coerce user ids to a (n,) int64 array of distinct non-negative integers.

    With n None, any number of ids in any shape is accepted and flattened (for look-ups such as
    `remove`); otherwise there must be exactly n, one per vector.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    elif array_kind(ids) == "cupy":
        ids = ids.get()
    arr = np.asarray(ids)
    if arr.ndim == 0 or n is None:
        arr = arr.reshape(-1)
        n = arr.shape[0] if n is None else n
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids must have an integer dtype, got {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"ids must be a 1-D array of length {n} (one per vector), got shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("ids must fit in int64")
    arr = arr.astype(np.int64)
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"ids must be non-negative (-1 marks a missing result); got {int(arr.min())}")
    if arr.size and int(arr.max()) >= MAX_ID:
        raise ValueError(f"ids must be below 2**62 = {MAX_ID}; got {int(arr.max())}")
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        raise ValueError(f"duplicate ids within the batch: {uniq[counts > 1][:10].tolist()}")
    return arr


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def check_norms(x: torch.Tensor, *, zero_ok: bool, metric: str, name: str = "vectors") -> torch.Tensor:
    """Row norms (n,) float32 of an (n, d) float32 tensor; raise ValueError naming the first row that
    holds NaN or inf, whose norm exceeds MAX_NORM, or that is zero where `zero_ok` is False (cosine:
    no direction)."""
    # In float64 (a float32 norm may overflow to inf), a chunk of rows at a time: a float64 copy of a
    # large batch would cost twice the batch itself; only the float32 norms are kept.
    if x.device.type != "cpu":
        return _tensor_norms(x, zero_ok=zero_ok, metric=metric, name=name)
    if native.enabled() and x.dtype == torch.float32:
        norms = _native_norms(x, zero_ok=zero_ok)
        if norms is not None:
            return norms
        # A row was flagged: the numpy check below names it (and decides a rounding tie at MAX_NORM).
    rows = max(1, _NORM_CHUNK_ELEMENTS // max(1, x.shape[1]))
    if x.shape[0] <= rows:
        # One chunk (a query batch): its float64 copy is the only one, so there is no buffer to reuse.
        rows64 = x.numpy().astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", rows64, rows64))
        _check_norm_chunk(norms, 0, zero_ok=zero_ok, metric=metric, name=name)
        return torch.from_numpy(norms.astype(np.float32))
    # On the CPU in numpy: a single query's check then costs a few microseconds, not a dozen torch calls.
    norms = np.empty(x.shape[0], dtype=np.float32)
    source = x.numpy()
    # One float64 buffer for every chunk: a fresh copy per chunk leaves freed blocks in the heap,
    # resident until the allocator trims them (megabytes for a large batch).
    buffer = np.empty((min(rows, x.shape[0]), x.shape[1]), np.float64)
    for start in range(0, x.shape[0], rows):
        rows_here = source[start:start + rows]
        part = buffer[:len(rows_here)]
        np.copyto(part, rows_here)
        chunk = np.sqrt(np.einsum("ij,ij->i", part, part))
        _check_norm_chunk(chunk, start, zero_ok=zero_ok, metric=metric, name=name)
        norms[start:start + len(chunk)] = chunk
    return torch.from_numpy(norms)


def _native_norms(x: torch.Tensor, *, zero_ok: bool) -> torch.Tensor | None:
    """`check_norms` in the compiled kernels, in one pass without a float64 copy of the rows (a query's
    check is one call): the float32 norms, or None if some row is not finite, above MAX_NORM, or zero
    where `zero_ok` is False."""
    source = np.ascontiguousarray(x.numpy())
    n, dim = source.shape
    norms = np.empty(n, dtype=np.float32)

    def check(a, b):
        return native.kernels.row_norms(source[a:b], norms[a:b], b - a, dim, MAX_NORM, zero_ok)

    firsts = native.parallel_ranges(n, check, min_per_thread=_NORM_ROWS_PER_THREAD)
    return None if any(f >= 0 for f in firsts) else torch.from_numpy(norms)


def _tensor_norms(x: torch.Tensor, *, zero_ok: bool, metric: str, name: str) -> torch.Tensor:
    """`check_norms` where x stays on its device (a GPU): float64 norms in chunks of about 512 MB,
    checked on the host once, returned as float32 (n,) on x's device. (Chunks of the CPU path's size
    would cost a synchronised copy to the host every few dozen rows of a wide batch.)"""
    rows = max(1, _DEVICE_NORM_CHUNK_ELEMENTS // max(1, x.shape[1]))
    norms = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], rows):
        norms[start:start + rows] = torch.linalg.vector_norm(x[start:start + rows].double(), dim=1)
    _check_norm_chunk(norms.cpu().numpy(), 0, zero_ok=zero_ok, metric=metric, name=name)
    return norms.float()


def _check_norm_chunk(chunk: np.ndarray, start: int, *, zero_ok: bool, metric: str, name: str) -> None:
    """`check_norms`' tests on the float64 norms of rows start, start + 1, ..."""
    big = ~(chunk <= MAX_NORM)  # NaN too
    if big.any():
        row = start + int(np.flatnonzero(big)[0])
        if not math.isfinite(float(chunk[row - start])):  # the row's float32 values are not all finite
            raise ValueError(f"{name} contain NaN or inf (first at row {row})")
        raise ValueError(f"{name} row {row} has norm {float(chunk[row - start]):.3g}, above {MAX_NORM:.0e}: its "
                         f"scores would overflow float32 (rescale the data)")
    if not zero_ok and (chunk == 0).any():
        row = start + int(np.flatnonzero(chunk == 0)[0])
        raise ValueError(f"{name} row {row} is zero and has no direction for metric {metric!r}")
