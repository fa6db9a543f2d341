"""The pytest-benchmark suite's data and timing: one module per question.

    test_vs_copy.py         each op against a memory copy of the bytes it moves (the roofline)
    test_cost_over_relu.py  each op against ReLU, on values of each kind (signs, subnormal products)
    test_peers.py           fastrelu against the NumPy recipe, np.maximum, PyTorch and numexpr

    python -m pytest bench/ --benchmark-only                        # every size, float32, float64
    python -m pytest bench/test_peers.py --benchmark-only -k "1e5 and float32"

Sizes are 1e3, 1e5, 1e6 and STREAM size, 4x this machine's last-level cache (as `fastrelu bench`
picks it).  Each group of pytest-benchmark's table is one comparison.  Between two commits:

    git checkout A && pip install -e .
    python -m pytest bench/ --benchmark-only --benchmark-autosave
    git checkout B && pip install -e .
    python -m pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

(--benchmark-compare compares with the latest saved run of this machine in .benchmarks/; the test
names do not change with the machine, STREAM size being named "stream".)  pytest-benchmark times
one implementation after another; `fastrelu bench` interleaves them, which a machine shared with
other work needs for ratios that hold from run to run.
"""
import numpy as np
import pytest

from fastrelu._report import Data
from fastrelu.bench import cpu_backend

BACKEND = cpu_backend()
SIZES = ("1e3", "1e5", "1e6", "stream")
LARGE = 10**7  # elements from which a call is timed in a few rounds of one call


@pytest.fixture(scope="module", params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(scope="module", params=SIZES)
def size(request):
    return request.param


@pytest.fixture(scope="module")
def data(dtype, size):
    """The arrays of one dtype and size, on mixed signs; module-scoped parameters, so pytest
    builds each set once and holds one STREAM-sized set at a time."""
    n = BACKEND.stream_elements(dtype.itemsize) if size == "stream" else int(float(size))
    return Data(n // 100 * 100, dtype, BACKEND)


def time_call(benchmark, fn, group, d, direction):
    """Times fn in `group` of the table, with the elements and bytes the op moves."""
    benchmark.group = group
    benchmark.extra_info.update(elements=d.n, bytes=(2 if direction == "fwd" else 3) * d.n
                                * d.dtype.itemsize)
    if d.n >= LARGE:
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    else:
        benchmark(fn)
