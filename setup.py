"""Builds fastrelu's one compiled extension: the Cython binding over the C kernels."""
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# -fno-trapping-math lets comparisons and selects vectorize; -ffp-contract=off keeps every
# product and sum rounded exactly as the contract writes it (no fused multiply-add).
# SIMD levels are chosen at run time (see _kernels.h), so no -march flag.
compile_args = ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
if sys.platform != "linux":
    raise SystemExit("fastrelu's CPU kernels build on Linux x86-64 with GCC or Clang")

kernels = Extension(
    "fastrelu._cpu",
    sources=["fastrelu/_cpu.pyx"],
    depends=["fastrelu/_kernels.h", "fastrelu/_loops.h", "fastrelu/_threads.h"],
    include_dirs=[np.get_include(), "fastrelu"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=["-fopenmp"],
)

# The argument checks are plain Python, compiled too: they run on every call.
api = Extension("fastrelu._api", sources=["fastrelu/_api.py"])

setup(ext_modules=cythonize([kernels, api], compiler_directives={"language_level": "3"}))
