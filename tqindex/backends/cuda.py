"""GPU search backend (CuPy RawModule kernels from the top-level kernels/ folder).

Imported only when a caller asks for device="cuda", so CPU use never imports CuPy.
"""

from __future__ import annotations

__all__ = ["require", "scan_topk"]


def require() -> None:
    """Raise a RuntimeError that says what is missing for device="cuda"."""
    try:
        import cupy
    except ImportError:
        raise RuntimeError("device='cuda' needs CuPy: pip install 'tqindex[gpu]' (cupy-cuda12x)") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError when no driver is present
        raise RuntimeError(f"device='cuda' needs an NVIDIA GPU and driver: {exc}") from None
    if count == 0:
        raise RuntimeError("device='cuda' needs an NVIDIA GPU; none is visible")
    raise RuntimeError("device='cuda' search is not available in this version of tqindex yet")


def scan_topk(index, rotated, projected, query_sq_norms, k):
    require()
