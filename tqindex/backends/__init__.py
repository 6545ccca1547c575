"""Search backends behind one protocol (`base.Scanner`).

In order of preference: `fastscan.FastScanner` (native kernels, CPU, mse codes of 1-5 bits),
`cuda.GpuScanner` (CUDA kernels via CuPy, imported lazily) and `torch_scan.TorchScanner` (torch, CPU
or GPU, every quantizer). `Index` runs the first that supports its request.
"""

from __future__ import annotations

from .base import ListScan, Queries, Scanner, TopK

__all__ = ["ListScan", "Queries", "Scanner", "TopK", "make_scanners"]


def make_scanners(quantizer, metric: str) -> list[Scanner]:
    """One scanner of each backend for this quantizer and metric, in order of preference."""
    from .cuda import GpuScanner
    from .fastscan import FastScanner
    from .torch_scan import TorchScanner
    return [FastScanner(quantizer, metric), GpuScanner(quantizer, metric), TorchScanner(quantizer, metric)]
