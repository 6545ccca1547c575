"""Loading and launching the CUDA kernels of ``kernels/tq_scan.cu`` with CuPy.

CuPy is imported only when a kernel is compiled or launched, so CPU use never imports it. The .cu
sources ship inside the package (``tqindex.kernels``, the repository's top-level ``kernels/``
folder) and are found with importlib.resources, so editable, wheel, ``--user`` and ``--target``
installs all find them.
"""

from __future__ import annotations

import importlib.resources
import os
import warnings

import numpy as np
import torch

__all__ = ["KERNEL_FILE", "enabled", "require", "kernel_source", "function", "launch", "ptr", "sm_count"]

KERNEL_FILE = "tq_scan.cu"
_FUNCTIONS: dict = {}             # compiled kernels, by name, defines and device
_STREAMS: dict = {}               # CuPy views of torch streams


def enabled() -> bool:
    return os.environ.get("TQINDEX_CUDA_KERNELS", "1") != "0"


def require() -> None:
    """Raise a RuntimeError that says what is missing for device="cuda"."""
    if not torch.backends.cuda.is_built():
        raise RuntimeError("device='cuda' needs a CUDA build of torch; this one is CPU-only "
                           f"(torch {torch.__version__})")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' needs an NVIDIA GPU and driver; torch sees none")
    if enabled():
        try:
            import cupy  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("device='cuda' needs CuPy to load the CUDA kernels: pip install the "
                               "cupy-cudaXXx wheel matching your CUDA (e.g. cupy-cuda12x), or set "
                               "TQINDEX_CUDA_KERNELS=0 for the slower torch scan") from exc
        kernel_source()


def kernel_source() -> str:
    """The CUDA source text: $TQINDEX_KERNELS/tq_scan.cu if that variable is set, else the copy
    shipped in the package."""
    env = os.environ.get("TQINDEX_KERNELS")
    try:
        if env:
            with open(os.path.join(env, KERNEL_FILE)) as f:
                return f.read()
        return importlib.resources.files("tqindex.kernels").joinpath(KERNEL_FILE).read_text()
    except (OSError, ModuleNotFoundError) as exc:
        where = env or "the tqindex.kernels package"
        raise RuntimeError(f"CUDA kernel source {KERNEL_FILE} not found in {where}: {exc}") from None


def function(name: str, defines: dict):
    """The compiled kernel `name` for these preprocessor defines (compiled once per device)."""
    key = (name, tuple(sorted(defines.items())), torch.cuda.current_device())
    if key not in _FUNCTIONS:  # shared by every index with the same layout
        import cupy
        source = kernel_source()
        options = ("-std=c++17",) + tuple(f"-D{k}={v}" for k, v in defines.items())
        try:
            fn = cupy.RawModule(code=source, options=options).get_function(name)
        except Exception as nvrtc_error:  # e.g. NVRTC without the CUDA headers: try nvcc
            try:
                fn = cupy.RawModule(code=source, options=options, backend="nvcc").get_function(name)
            except Exception:
                raise nvrtc_error
        _FUNCTIONS[key] = fn
    return _FUNCTIONS[key]


def launch(fn, grid, block, args, shared: int = 0) -> None:
    """Launch on torch's current stream, so that kernels and torch ops stay ordered."""
    import cupy
    if shared > 48 << 10 and fn.max_dynamic_shared_size_bytes < shared:
        fn.max_dynamic_shared_size_bytes = shared  # above 48 KB a kernel must opt in
    device = torch.cuda.current_device()
    handle = torch.cuda.current_stream().cuda_stream
    if (device, handle) not in _STREAMS:
        with warnings.catch_warnings():  # newer CuPy prefers Stream.from_external (same effect)
            warnings.simplefilter("ignore", DeprecationWarning)
            _STREAMS[device, handle] = cupy.cuda.ExternalStream(handle, device)
    with cupy.cuda.Device(device):
        # Launch on torch's current stream, so that kernels and torch ops stay ordered.
        fn(grid, block, args, shared_mem=shared, stream=_STREAMS[device, handle])


def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
