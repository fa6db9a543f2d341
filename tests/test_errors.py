"""Bad input: a clear TypeError/ValueError naming the argument, raised before anything is written,
with every array left as it was."""
import numpy as np
import pytest

import fastrelu
from helpers import AxisError

X = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
G = np.ones((3, 4), np.float32)
W = np.full(4, 0.25, np.float32)

FORWARD = [
    lambda x, **k: fastrelu.relu(x, **k),
    lambda x, **k: fastrelu.leaky_relu(x, 0.1, **k),
    lambda x, **k: fastrelu.elu(x, 1.0, **k),
    lambda x, **k: fastrelu.prelu(x, np.full(x.shape[1] if np.ndim(x) > 1 else 1, 0.25,
                                             np.asarray(x).dtype if np.asarray(x).dtype.kind == "f"
                                             else np.float32), 1, **k),
]
BACKWARD = [
    lambda g, x, **k: fastrelu.relu_backward(g, x, **k),
    lambda g, x, **k: fastrelu.leaky_relu_backward(g, x, 0.1, **k),
    lambda g, x, **k: fastrelu.elu_backward(g, x, 1.0, **k),
    lambda g, x, **k: fastrelu.prelu_backward(g, x, W, 1, out=(k.get("out"), None)),
]
IDS = ["relu", "leaky_relu", "elu", "prelu"]


def raises(exc, match, fn, *arrays):
    """fn raises exc matching `match`, and none of `arrays` changed."""
    before = [a.copy() for a in arrays]
    with pytest.raises(exc, match=match):
        fn()
    for b, a in zip(before, arrays):
        np.testing.assert_array_equal(a, b)


BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object, "U3",
              "S3", "datetime64[s]", np.longdouble]


@pytest.mark.parametrize("op", FORWARD, ids=IDS)
@pytest.mark.parametrize("bad", BAD_DTYPES, ids=str)
def test_forward_rejects_non_float_arrays(op, bad):
    x = np.zeros((3, 4), dtype=bad)
    with pytest.raises(TypeError, match="x"):
        op(x)


def test_integer_arrays_get_a_cast_suggestion():
    with pytest.raises(TypeError, match=r"x has dtype int64.*astype"):
        fastrelu.relu(np.arange(4))


@pytest.mark.parametrize("op", BACKWARD, ids=IDS)
@pytest.mark.parametrize("bad", [np.int64, np.bool_, np.complex128, object])
def test_backward_rejects_non_float_arrays(op, bad):
    with pytest.raises(TypeError, match="grad"):
        op(np.zeros((3, 4), bad), X)
    with pytest.raises(TypeError, match="x"):
        op(G, np.zeros((3, 4), bad))


@pytest.mark.parametrize("value", [["a", "b"], [None, 1.0], [1j, 2.0], [[1.0], [1.0, 2.0]],
                                   "text", None, {"a": 1}, True, [True, False]])
def test_non_numbers(value):
    with pytest.raises(TypeError, match="x"):
        fastrelu.relu(value)


@pytest.mark.parametrize("op", BACKWARD, ids=IDS)
def test_dtype_mismatch_between_inputs(op):
    raises(TypeError, "must match", lambda: op(G.astype(np.float64), X), G, X)


def test_weight_dtype_must_match():
    raises(TypeError, "weight.*must match", lambda: fastrelu.prelu(X, W.astype(np.float64)), X, W)


@pytest.mark.parametrize("op", BACKWARD, ids=IDS)
def test_grad_shape_mismatch(op):
    raises(ValueError, "grad has shape", lambda: op(np.ones((4, 3), np.float32), X), X)


@pytest.mark.parametrize("op", FORWARD, ids=IDS)
def test_out_wrong_shape_dtype_kind(op):
    out = np.full((3, 5), 7.0, np.float32)
    raises(ValueError, "out has shape", lambda: op(X, out=out), X, out)
    out = np.full((3, 4), 7.0, np.float64)
    raises(TypeError, "out has dtype", lambda: op(X, out=out), X, out)
    out = np.full((3, 4), 7, np.int32)
    raises(TypeError, "out has dtype", lambda: op(X, out=out), X, out)
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        op(X, out=[[0.0] * 4] * 3)


@pytest.mark.parametrize("op", FORWARD, ids=IDS)
def test_read_only_out(op):
    out = np.full((3, 4), 7.0, np.float32)
    out.flags.writeable = False
    raises(ValueError, "read-only", lambda: op(X, out=out), X, out)


@pytest.mark.parametrize("op", FORWARD, ids=IDS)
def test_partially_overlapping_out(op):
    buf = np.linspace(-3, 3, 20, dtype=np.float32)
    x, out = buf[:12].reshape(3, 4), buf[4:16].reshape(3, 4)
    raises(ValueError, "overlaps x", lambda: op(x, out=out), buf)
    xt = np.linspace(-3, 3, 16, dtype=np.float32).reshape(4, 4)
    raises(ValueError, "overlaps x", lambda: op(xt, out=xt.T), xt)
    raises(ValueError, "overlaps x", lambda: op(xt, out=xt[::-1]), xt)


@pytest.mark.parametrize("op", BACKWARD, ids=IDS)
def test_backward_out_overlapping_grad_or_x(op):
    buf = np.linspace(-3, 3, 20, dtype=np.float32)
    g, out = buf[:12].reshape(3, 4), buf[2:14].reshape(3, 4)
    raises(ValueError, "overlaps grad", lambda: op(g, X, out=out), buf, X)
    x = buf[:12].reshape(3, 4)
    raises(ValueError, "overlaps x", lambda: op(G, x, out=out), buf, G)


def test_interleaved_views_do_not_overlap():
    buf = np.linspace(-3, 3, 24, dtype=np.float32)
    x, out = buf[0::2], buf[1::2]
    fastrelu.relu(x, out=out)
    np.testing.assert_array_equal(buf[1::2], np.maximum(buf[0::2], 0))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 10**400])
def test_non_finite_parameters(value):
    raises(ValueError, "negative_slope must be finite", lambda: fastrelu.leaky_relu(X, value), X)
    raises(ValueError, "negative_slope must be finite",
           lambda: fastrelu.leaky_relu_backward(G, X, value), X, G)
    raises(ValueError, "alpha must be finite", lambda: fastrelu.elu(X, value), X)
    raises(ValueError, "alpha must be finite", lambda: fastrelu.elu_backward(G, X, value), X, G)


@pytest.mark.parametrize("value", ["0.1", None, 1j, [0.1], np.array([0.1, 0.2]), True])
def test_parameters_must_be_real_numbers(value):
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        fastrelu.leaky_relu(X, value)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        fastrelu.elu(X, value)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_parameters_beyond_float32_are_refused_for_data_computed_in_float32(dtype):
    """float16, bfloat16 and float32 data compute in float32: a finite slope beyond its range
    would become inf (NaN at zeros), so it is refused, as PyTorch refuses it."""
    dt = np.dtype(dtype) if dtype != "bfloat16" else pytest.importorskip("ml_dtypes").bfloat16
    x, g = X.astype(dt), G.astype(dt)
    for value in (1e300, -1e39, np.float64(3.5e38)):
        raises(ValueError, "negative_slope=.* beyond the range of float32",
               lambda: fastrelu.leaky_relu(x, value), x)
        raises(ValueError, "negative_slope=.* beyond the range of float32",
               lambda: fastrelu.leaky_relu_backward(g, x, value), x, g)
        raises(ValueError, "alpha=.* beyond the range of float32",
               lambda: fastrelu.elu(x, value), x)
        raises(ValueError, "alpha=.* beyond the range of float32",
               lambda: fastrelu.elu_backward(g, x, value), x, g)
        raises(ValueError, "alpha=.* beyond the range of float32",
               lambda: fastrelu.bias_activation(x, W.astype(dt), "elu", value), x)
        raises(ValueError, "negative_slope=.* beyond the range of float32",
               lambda: fastrelu.bias_activation_backward(g, x, "leaky_relu", abs(value)), x, g)
    # float32's largest finite value is fine, and float64 data takes any finite float
    big = float(np.finfo(np.float32).max)
    assert fastrelu.leaky_relu(np.float32([-1.0]), big)[0] == -big
    assert fastrelu.leaky_relu(np.float64([-1.0]), 1e300)[0] == -1e300
    assert fastrelu.elu([-1.0], 1e300)[0] == 1e300 * np.expm1(-1.0)  # a list is float64


def test_python_ranges_are_numbers_like_lists():
    np.testing.assert_array_equal(fastrelu.relu(range(-2, 3)), fastrelu.relu([-2, -1, 0, 1, 2]))
    assert fastrelu.relu(range(-2, 3)).dtype == np.float64
    w = fastrelu.prelu(X, range(4))  # a weight list takes x's dtype
    assert w.dtype == np.float32 and w[0, 0] == 0


def test_big_python_integers_among_floats_are_numbers():
    np.testing.assert_array_equal(fastrelu.relu([2**70, -1.5, 3]), [2.0**70, 0.0, 3.0])
    with pytest.raises(ValueError, match="integer beyond the float range"):
        fastrelu.relu([2**1100, 1.5])
    with pytest.raises(TypeError, match="must contain real numbers"):
        fastrelu.relu([2**70, "1"])


def test_parameters_accept_numpy_scalars():
    assert fastrelu.leaky_relu(X, np.float32(0.5))[0, 0] == np.float32(-1.0)
    assert fastrelu.elu(X, np.array(2))[1, 3] == X[1, 3]


@pytest.mark.parametrize(
    "weight,axis,exc,match",
    [
        (np.full((4, 1), 0.25, np.float32), 1, ValueError, "weight must have shape"),
        (np.full(5, 0.25, np.float32), 1, ValueError, "weight has 5 elements but x has 4"),
        (np.full(4, 0.25, np.float32), 0, ValueError, "weight has 4 elements but x has 3"),
        (np.full(4, 0.25, np.float32), 2, AxisError, "axis 2 is out of bounds"),
        (np.full(4, 0.25, np.float32), -3, ValueError, "out of bounds"),
        (np.full(4, 0.25, np.float32), 1.0, TypeError, "axis must be an integer"),
        (np.full(4, 0.25, np.float32), "1", TypeError, "axis must be an integer"),
        (np.full(4, 0.25, np.float32), True, TypeError, "axis must be an integer"),
        (np.float32(0.25), 7, ValueError, "out of bounds"),
    ],
)
def test_bad_weight_or_axis(weight, axis, exc, match):
    raises(exc, match, lambda: fastrelu.prelu(X, weight, axis), X)
    raises(exc, match, lambda: fastrelu.prelu_backward(G, X, weight, axis), X, G)


def test_one_dimensional_input_takes_only_a_shared_weight():
    x = np.ones(4, np.float32)
    raises(ValueError, "one channel", lambda: fastrelu.prelu(x, W), x)


def test_prelu_backward_out_must_be_a_pair():
    with pytest.raises(TypeError, match="pair"):
        fastrelu.prelu_backward(G, X, W, out=np.empty_like(X))
    with pytest.raises(TypeError, match="pair"):
        fastrelu.prelu_backward(G, X, W, out=(np.empty_like(X),))


def test_prelu_backward_checks_both_outs_before_writing():
    gi = np.full((3, 4), 7.0, np.float32)
    gw = np.full(5, 7.0, np.float32)  # wrong shape
    raises(ValueError, r"out\[1\] has shape", lambda: fastrelu.prelu_backward(G, X, W, out=(gi, gw)),
           gi, gw)
    gw = np.full(4, 7.0, np.float64)  # wrong dtype
    raises(TypeError, r"out\[1\] has dtype", lambda: fastrelu.prelu_backward(G, X, W, out=(gi, gw)),
           gi, gw)
    both = np.zeros(16, np.float32)
    raises(ValueError, "overlap",
           lambda: fastrelu.prelu_backward(G, X, W, out=(both[:12].reshape(3, 4), both[10:14])),
           both)


def test_out_must_be_keyword():
    with pytest.raises(TypeError):
        fastrelu.relu(X, np.empty_like(X))


def test_simd_and_thread_settings_are_validated():
    before = fastrelu.get_num_threads()
    for bad in (0, -1, 10**30):
        with pytest.raises(ValueError, match="n must be between 1 and"):
            fastrelu.set_num_threads(bad)
    for bad in (2.5, True, "2", None):
        with pytest.raises(TypeError, match="n must be an integer"):
            fastrelu.set_num_threads(bad)
    assert fastrelu.get_num_threads() == before


def test_masked_arrays_are_refused_not_unmasked():
    xm = np.ma.array(X, mask=X < 0)
    raises(TypeError, "x is a masked array", lambda: fastrelu.relu(xm), X)
    raises(TypeError, "grad is a masked array", lambda: fastrelu.relu_backward(xm, X), X)
    out = np.ma.array(np.zeros_like(X), mask=X < 0)
    raises(TypeError, "out is a masked array", lambda: fastrelu.relu(X, out=out), X, out.data)
    # other ndarray subclasses are computed on as plain arrays
    class Subclass(np.ndarray):
        pass

    np.testing.assert_array_equal(fastrelu.relu(X.view(Subclass)), np.maximum(X, 0))

    class MaskedSubclass(np.ma.MaskedArray):  # defined outside numpy.ma, still masked
        pass

    raises(TypeError, "x is a masked array", lambda: fastrelu.relu(xm.view(MaskedSubclass)), X)
