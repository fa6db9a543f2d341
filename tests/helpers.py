"""Helpers the tests share: the dtypes, the elementwise ops with their references, bitwise and
ulp comparisons, the edge values, and what a command's refusal looks like."""
import numpy as np
import pytest

import fastrelu
from fastrelu import reference

try:
    from numpy.exceptions import AxisError
except ImportError:  # NumPy < 1.25
    from numpy import AxisError

DTYPES = [np.float16, np.float32, np.float64]

# name -> (forward, backward, reference forward, reference backward, parameter name)
ELEMENTWISE = {
    "relu": (fastrelu.relu, fastrelu.relu_backward, reference.relu, reference.relu_backward, None),
    "leaky_relu": (
        fastrelu.leaky_relu,
        fastrelu.leaky_relu_backward,
        reference.leaky_relu,
        reference.leaky_relu_backward,
        "negative_slope",
    ),
    "elu": (fastrelu.elu, fastrelu.elu_backward, reference.elu, reference.elu_backward, "alpha"),
}


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bitwise(actual, expected):
    """Same dtype and shape, NaN where expected is NaN, and identical bits everywhere else (so
    +0.0 and -0.0 are told apart)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    ok = _bits(actual)[~nan] == _bits(expected)[~nan]
    if not ok.all():
        bad = np.flatnonzero(~ok)[:5]
        raise AssertionError(
            f"{(~ok).sum()} elements differ, e.g. {actual[~nan][bad]} vs {expected[~nan][bad]}"
        )


def ulp_distance(a, b):
    """Distance in units in the last place between finite or infinite values of one dtype."""
    a, b = np.asarray(a), np.asarray(b)
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]

    def ordered(v):
        i = np.ascontiguousarray(v).view(ints).astype(np.int64)
        return np.where(i < 0, np.iinfo(ints).min - i, i)

    return np.abs(ordered(a) - ordered(b))


def assert_close_ulp(actual, expected, max_ulp=4):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    d = ulp_distance(actual[~nan], expected[~nan])
    assert d.size == 0 or d.max() <= max_ulp, f"max ulp distance {d.max()}"


EDGE_VALUES = [
    0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0, 1e-45, -1e-45, 1e-310, -1e-310, 5e-8, -5e-8,
    3.0e38, -3.0e38, 65504.0, -65504.0, 1e308, -1e308, 0.5, -0.5, 88.0, -88.0, -104.0, 710.0,
]


def edge_array(dtype):
    """Every edge value representable in dtype's range (overflowing ones become ±inf)."""
    with np.errstate(over="ignore"):
        return np.array(EDGE_VALUES, dtype=np.float64).astype(dtype)


# ---- the commands --------------------------------------------------------------------------

def forbid(monkeypatch, *targets):
    """Makes a call of any (module, name) of `targets` fail the test."""
    def started(*args, **kwargs):
        raise AssertionError("work started")

    for module, name in targets:
        monkeypatch.setattr(module, name, started, raising=False)


def refused(capsys, argv):
    """main(argv)'s error line, after checking that it exited with status 2 and printed nothing
    else: no traceback, no report."""
    from fastrelu.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(("fastrelu: error: ", f"fastrelu {argv[0]}: error: ")), err
    return err
