"""CUDA sources of tqindex's GPU search, installed as the package data of ``tqindex.kernels``
(found with importlib.resources by ``tqindex.backends.cuda.kernels``; compiled at run time by CuPy)."""
