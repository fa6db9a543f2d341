"""pytest-benchmark suite: every op, forward and backward, against the NumPy recipe and a memory
copy of the same bytes, grouped so that each group's table compares them side by side.

    python -m pytest bench/ --benchmark-only                      # all sizes up to STREAM size
    python -m pytest bench/ --benchmark-only -k "1e5 and float32"

The report command (`fastrelu bench`) gives the same comparisons as ratios from one run.
"""
import numpy as np
import pytest

from fastrelu import _cpu
from fastrelu._report import Data, copy_impls, fastrelu_impls, maximum_impls, recipe_impls
from fastrelu.bench import cpu_backend

SIZES = {"1e3": 1_000, "1e5": 100_000, "1e6": 1_000_000, "stream": 2**26 // 1000 * 1000}
OPS = ["relu", "leaky_relu", "prelu", "elu"]


@pytest.fixture(scope="module", params=["float32", "float64"])
def datasets(request):
    cache = {}

    def get(size):
        if size not in cache:
            cache.clear()  # one STREAM-sized set at a time
            cache[size] = Data(SIZES[size], np.dtype(request.param), cpu_backend())
        return cache[size]

    return get


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["fastrelu", "numpy", "numpy-maximum", "copy"])
def test_op(benchmark, datasets, impl, op, direction, size):
    d = datasets(size)
    if impl == "copy":
        fn = copy_impls(d)[direction]
    else:
        table = {"fastrelu": fastrelu_impls, "numpy": recipe_impls,
                 "numpy-maximum": maximum_impls}[impl](d)
        if (op, direction) not in table:
            pytest.skip(f"{impl} has no {op} {direction}")
        fn = table[(op, direction)]
    benchmark.group = f"{op} {direction} {d.dtype.name} {size}"
    benchmark.extra_info.update(elements=d.n, bytes=(2 if direction == "fwd" else 3) * d.n
                                * d.dtype.itemsize)
    if size == "stream":
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    else:
        benchmark(fn)


def test_threaded_copy_is_a_copy():
    d = Data(100_000, np.float32, cpu_backend())
    _cpu.copy(d.x, d.out)
    assert (d.out == d.x).all()
