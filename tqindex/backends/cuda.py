"""GPU search.

Today this runs the torch scan of `backends.cpu` on the GPU (float32 decode + GEMM + top-k per
block, codes and per-vector floats uploaded once per segment and kept on the device). The CuPy
kernels of the GPU issue (a bit-packed scan with fused top-k, and an fp16 tensor-core path) are not
written yet: they need a machine with a GPU to be developed and measured on.

Imported only when a caller asks for device="cuda", so CPU use never touches CUDA.
"""

from __future__ import annotations

import torch

__all__ = ["require"]


def require() -> None:
    """Raise a RuntimeError that says what is missing for device="cuda"."""
    if not torch.backends.cuda.is_built():
        raise RuntimeError("device='cuda' needs a CUDA build of torch; this one is CPU-only "
                           f"(torch {torch.__version__})")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' needs an NVIDIA GPU and driver; torch sees none")
