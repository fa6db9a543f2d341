"""Thread control and a report of how fastrelu runs on this machine."""
import importlib.util
import operator
import platform
import sys

import numpy as np

from . import _cpu


_MAX_THREADS = 2**31 - 1  # OpenMP counts threads in a C int


def get_num_threads():
    """Threads a large CPU kernel uses: set_num_threads() or FASTRELU_NUM_THREADS if given, else
    OpenMP's limit (OMP_NUM_THREADS); a later threadpoolctl limit on OpenMP overrides both."""
    return _cpu.get_num_threads()


def set_num_threads(n):
    """Sets the threads that large CPU kernels use (arrays below 32K elements run on the calling
    thread)."""
    try:
        if isinstance(n, (bool, np.bool_)):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, not {type(n).__name__}") from None
    if not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"n must be between 1 and {_MAX_THREADS}, got {n}")
    _cpu.set_num_threads(n)


def _gpu_state():
    """The GPU backend's state, without importing numba unless it is loaded already."""
    loaded = sys.modules.get("fastrelu._gpu")
    if loaded is not None:
        return loaded.state()
    if importlib.util.find_spec("numba") is None:
        return {"available": False, "loaded": False,
                "reason": "numba is not installed: pip install 'fastrelu[cuda]'"}
    return {"available": None, "loaded": False,
            "reason": "not loaded yet: it loads on the first CUDA array"}


def info():
    """A dict describing this installation: version, SIMD level, threads, GPU backend."""
    from . import __version__

    return {
        "fastrelu": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "simd": _cpu.simd_level(),
        "threads": get_num_threads(),
        "parallel_min_elements": _cpu.PARALLEL_MIN_ELEMENTS,
        "gpu": _gpu_state(),
    }
