"""Search backends: `cpu` (torch, always available) and `cuda` (CuPy kernels, loaded lazily)."""
