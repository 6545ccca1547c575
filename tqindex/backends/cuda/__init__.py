"""GPU search with the CUDA kernels of ``kernels/tq_scan.cu``, loaded by CuPy.

Modules, one concern each: `kernels` (finding, compiling and launching the .cu source), `layout`
(code regions in the kernels' word layout, per-query tables), `certify` (the error bound and
certificate of the tensor-core paths), `scanner` (the three search paths behind the scanner
protocol). CuPy is imported only when a kernel is compiled or launched.
"""

from .kernels import KERNEL_FILE, enabled, kernel_source, require
from .layout import Region, regions
from .scanner import GEMM_MIN_BATCH, MMA_MIN_BATCH, GpuScanner

__all__ = ["GEMM_MIN_BATCH", "KERNEL_FILE", "MMA_MIN_BATCH", "GpuScanner", "Region", "enabled", "kernel_source",
           "regions", "require"]
