"""Thread control and a report of how fastrelu runs on this machine."""
import importlib.util
import operator
import os
import platform
import sys
import warnings

import numpy as np

from . import _cpu
from ._version import __version__


_MAX_THREADS = 2**31 - 1  # OpenMP counts threads in a C int


def get_num_threads():
    """Threads a large CPU kernel uses: set_num_threads() or FASTRELU_NUM_THREADS if given, else
    OpenMP's limit (OMP_NUM_THREADS); a later threadpoolctl limit on OpenMP overrides both.
    Never more than 4 per logical CPU (or OMP_THREAD_LIMIT, if lower)."""
    return _cpu.get_num_threads()


def set_num_threads(n):
    """Sets the threads that large CPU kernels use (arrays below 32K elements run on the calling
    thread).  It is OpenMP's limit on the calling thread (as with ``torch.set_num_threads``), so a
    later threadpoolctl limit overrides it; other threads use n unless their own OpenMP limit was
    changed.  Counts above 4 per logical CPU are capped there, with a RuntimeWarning: more only add
    switching, and thousands of threads make the OpenMP runtime fail."""
    try:
        if isinstance(n, (bool, np.bool_)):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, not {type(n).__name__}") from None
    if not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"n must be between 1 and {_MAX_THREADS}, got {n}")
    _set_capped(n, "set_num_threads")


def _warn_capped(source, n, cap, stacklevel):
    warnings.warn(f"{source} asked for {n} threads; fastrelu uses at most {cap} on this "
                  f"machine ({_cpu.THREADS_PER_CPU} per logical CPU, or OMP_THREAD_LIMIT)",
                  RuntimeWarning, stacklevel=stacklevel + 1)


def _set_capped(n, source):
    cap = _cpu.thread_cap()
    if n > cap:
        _warn_capped(source, n, cap, stacklevel=3)
        n = cap
    _cpu.set_num_threads(n)


def _threads_from_environment():
    """FASTRELU_NUM_THREADS, read once at import: a positive integer (capped like
    set_num_threads); anything else is an error naming the variable."""
    requested = os.environ.get("FASTRELU_NUM_THREADS", "").strip()
    if not requested:
        # OpenMP reads OMP_NUM_THREADS itself, and the kernels cap it: said as for the others
        omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        if omp.isascii() and omp.isdigit() and (len(omp) > 18 or int(omp) > _cpu.thread_cap()):
            _warn_capped("OMP_NUM_THREADS", omp, _cpu.thread_cap(), stacklevel=3)
        return
    if not (requested.isascii() and requested.isdigit()) or not requested.strip("0"):
        raise ValueError(f"FASTRELU_NUM_THREADS must be a positive integer, not {requested!r}")
    # more digits than any thread count has: capped without parsing a huge integer
    _set_capped(int(requested) if len(requested) <= 18 else _MAX_THREADS, "FASTRELU_NUM_THREADS")


_threads_from_environment()


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
    return {
        "fastrelu": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "simd": _cpu.simd_level(),
        "threads": get_num_threads(),
        "thread_cap": _cpu.thread_cap(),
        "parallel_min_elements": _cpu.PARALLEL_MIN_ELEMENTS,
        "gpu": _gpu_state(),
    }
