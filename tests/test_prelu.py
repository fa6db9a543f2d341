"""PReLU: channel axes, shared and per-channel weights, the one-pass weight gradient."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrelu
from helpers import DTYPES, assert_bitwise, edge_array
from fastrelu import reference


def assert_weight_grad(actual, expected, dtype):
    """grad_weight is summed in float64 in any order, then rounded to dtype: within one rounding
    of the float64 reference sum."""
    assert actual.dtype == np.dtype(dtype) and actual.shape == expected.shape
    tol = {np.float16: 2e-3, np.float32: 2e-7, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=tol,
                               atol=0)


def check_prelu(x, w, axis, g=None):
    g = np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype) if g is None else g
    assert_bitwise(fastrelu.prelu(x, w, axis), reference.prelu(x, w, axis))
    dx, dw = fastrelu.prelu_backward(g, x, w, axis)
    ref_dx, ref_dw = reference.prelu_backward(g, x, w, axis)
    assert_bitwise(dx, ref_dx)
    assert_weight_grad(dw, ref_dw, x.dtype.type)


# (shape, axis): NCHW, channels-last, (N, C), short runs, long runs, many channels; one row
# (the weights are the row as they are), one channel over many rows or runs, (N, C) data large
# enough for two threads' partial sums, and rows of 2 or 4 KiB (read 2 at a time, odd counts)
LAYOUTS = [
    ((5, 512), 1),
    ((7, 64, 4, 4), 1),
    ((1, 1000), 1),
    ((1000, 1), 1),
    ((6, 1, 50), 1),
    ((40000, 1), 1),
    ((40, 1000), 1),
    ((8, 3, 5, 7), 1),
    ((8, 5, 7, 3), -1),
    ((64, 10), 1),
    ((4, 6, 2), 1),
    ((2, 3, 100), 1),
    ((3, 200, 9), 1),
    ((5, 4, 3, 2), 0),
    ((5, 4, 3, 2), 2),
    ((2, 70000), 1),
    ((3, 5, 70000), 1),
    ((70000, 3), -1),
]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_per_channel(shape, axis, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(-1, 2, shape[axis]).astype(dtype)
    check_prelu(x, w, axis)


@pytest.mark.parametrize("w", [np.array(0.25), np.array([0.25]), 0.25, [0.25]])
def test_shared_weight(w, dtype):
    x = np.random.default_rng(2).standard_normal((4, 3, 5)).astype(dtype)
    w_arr = np.asarray(w, dtype=dtype)
    w = w_arr if isinstance(w, np.ndarray) else w
    y = fastrelu.prelu(x, w)
    assert_bitwise(y, reference.leaky_relu(x, float(w_arr.reshape(()))))
    dx, dw = fastrelu.prelu_backward(np.ones_like(x), x, w)
    assert dw.shape == w_arr.shape and dw.dtype == dtype
    assert_weight_grad(dw, reference.prelu_backward(np.ones_like(x), x, w_arr)[1], dtype)


def test_fewer_than_two_dims_have_one_channel():
    x = np.array([-2.0, 3.0])
    assert fastrelu.prelu(x, [0.5]).tolist() == [-1.0, 3.0]
    assert fastrelu.prelu(np.array(-2.0), 0.5).tolist() == -1.0
    with pytest.raises(ValueError, match="one channel"):
        fastrelu.prelu(x, [0.5, 0.5])


def test_default_axis_is_one_and_negative_axes_work():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4))
    w3, w4 = rng.random(3), rng.random(4)
    assert_bitwise(fastrelu.prelu(x, w3), reference.prelu(x, w3, 1))
    assert_bitwise(fastrelu.prelu(x, w3, axis=-2), reference.prelu(x, w3, 1))
    assert_bitwise(fastrelu.prelu(x, w4, axis=-1), reference.prelu(x, w4, 2))


def test_weight_gradient_by_hand():
    x = np.array([[-1.0, 2.0], [-3.0, -4.0], [5.0, -0.5]])
    g = np.array([[1.0, 1.0], [2.0, 0.5], [1.0, 4.0]])
    dx, dw = fastrelu.prelu_backward(g, x, np.array([0.1, 0.2]))
    # channel 0: -1*1 + -3*2 = -7; channel 1: -4*0.5 + -0.5*4 = -4
    assert dw.tolist() == [-7.0, -4.0]
    np.testing.assert_array_equal(dx, [[0.1, 1.0], [0.2, 0.1], [1.0, 0.8]])


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((6, 4), -1), ((3, 2, 70), 1)])
def test_gradients_match_finite_differences(shape, axis):
    rng = np.random.default_rng(4)
    x = rng.uniform(-3, 3, shape)
    x = np.where(np.abs(x) < 1e-2, 0.5, x)
    g = rng.standard_normal(shape)
    w = rng.uniform(0.05, 0.5, shape[axis])
    h = 1e-6
    dx, dw = fastrelu.prelu_backward(g, x, w, axis)
    numeric_dx = g * (fastrelu.prelu(x + h, w, axis) - fastrelu.prelu(x - h, w, axis)) / (2 * h)
    np.testing.assert_allclose(dx, numeric_dx, rtol=1e-6, atol=1e-9)
    for c in range(w.size):
        e = np.zeros_like(w)
        e[c] = h
        loss = lambda ww: (g * fastrelu.prelu(x, ww, axis)).sum()  # noqa: E731
        np.testing.assert_allclose(dw[c], (loss(w + e) - loss(w - e)) / (2 * h), rtol=1e-5)


def test_weight_gradient_is_accurate_for_float32_sums():
    # 2^24 + a bit terms of 1.0: a float32 running sum stalls at 2^24; a float64 one does not
    n = 2**24 + 4096
    x = np.full((1, n), -1.0, np.float32)
    _, dw = fastrelu.prelu_backward(np.ones_like(x), x, np.array([0.5], np.float32))
    assert dw[0] == np.float32(-n)


def test_edge_values_in_channels(dtype):
    e = edge_array(dtype)
    x = np.stack([e, e[::-1], -e]).T.copy()  # (len, 3) channels-last
    w = np.array([0.25, 0.0, -2.0], dtype)
    check_prelu(x, w, -1, g=np.ones_like(x))
    check_prelu(x.T.copy(), w, 0, g=np.ones_like(x.T))


def test_out_pair_and_in_place(dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 3)).astype(dtype)
    g = rng.standard_normal((6, 4, 3)).astype(dtype)
    w = rng.random(4).astype(dtype)
    ref_dx, ref_dw = reference.prelu_backward(g, x, w)
    gi, gw = np.empty_like(x), np.empty_like(w)
    res = fastrelu.prelu_backward(g, x, w, out=(gi, gw))
    assert res[0] is gi and res[1] is gw
    assert_bitwise(gi, ref_dx)
    assert_weight_grad(gw, ref_dw, dtype)
    g2 = g.copy()
    dx, dw = fastrelu.prelu_backward(g2, x, w, out=(g2, None))
    assert dx is g2
    assert_bitwise(g2, ref_dx)
    y = x.copy()
    assert fastrelu.prelu(y, w, out=y) is y
    assert_bitwise(y, reference.prelu(x, w))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
)
def test_prelu_property(shape, data, dtype):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if data.draw(st.booleans()):
        x = np.asfortranarray(x)
    w = rng.uniform(-2, 2, shape[axis]).astype(dtype)
    check_prelu(x, w, axis)
