"""Build the optional native fast-scan kernel (tqindex/_native.c); everything else is in pyproject.toml.

The extension is optional: where no C compiler is available the install still succeeds and
tqindex falls back to its torch scan (tqindex.backends.fastscan.available() says which).
No fused multiply-adds are contracted, so the encoder's float32 arithmetic is the torch path's
and both pick the same codes (ties in a block codebook included).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tqindex._native", ["tqindex/_native.c"], depends=["tqindex/_scan.h", "tqindex/_pool.h"],
                             extra_compile_args=["-O3", "-std=c11", "-Wall", "-ffp-contract=off", "-pthread"],
                             extra_link_args=["-pthread"], libraries=["m"],
                             optional=True)])
