"""The hand-worked values of the contract (float32, s = 0.01, w = 0.25, alpha = 1, g = 1)."""
import numpy as np
import pytest

import fastrelu
from helpers import assert_bitwise

f = np.float32
INF, NAN = np.inf, np.nan
S = f(0.01)

#  x,        relu y, relu dx, leaky y,        leaky dx, prelu y, prelu dx, elu y,             elu dx
TABLE = [
    (-0.0,     -0.0,   0.0,     -0.0,           S,        -0.0,    0.25,     -0.0,              1.0),
    (0.0,      0.0,    0.0,     0.0,            S,        0.0,     0.25,     0.0,               1.0),
    (NAN,      NAN,    1.0,     NAN,            S,        NAN,     0.25,     NAN,               1.0),
    (-INF,     0.0,    0.0,     -INF,           S,        -INF,    0.25,     -1.0,              0.0),
    (INF,      INF,    1.0,     INF,            1.0,      INF,     1.0,      INF,               1.0),
    (-1.0,     0.0,    0.0,     -S,             S,        -0.25,   0.25,     -0.63212055,       0.36787945),
    (1e-45,    1e-45,  1.0,     1e-45,          1.0,      1e-45,   1.0,      1e-45,             1.0),
    (-1e-45,   0.0,    0.0,     -0.0,           S,        -0.0,    0.25,     -1e-45,            1.0),
]


def column(i):
    return np.array([row[i] for row in TABLE], dtype=f)


X = column(0)
G = np.ones_like(X)


def test_hand_worked_relu():
    assert_bitwise(fastrelu.relu(X), column(1))
    assert_bitwise(fastrelu.relu_backward(G, X), column(2))


def test_hand_worked_leaky_relu():
    assert_bitwise(fastrelu.leaky_relu(X, 0.01), column(3))
    assert_bitwise(fastrelu.leaky_relu_backward(G, X, 0.01), column(4))


def test_hand_worked_prelu():
    y = fastrelu.prelu(X, np.array([0.25], f))
    dx, dw = fastrelu.prelu_backward(G, X, np.array([0.25], f))
    assert_bitwise(y, column(5))
    assert_bitwise(dx, column(6))
    assert dw.shape == (1,) and dw.dtype == f


def test_hand_worked_elu():
    # -0.63212055 and 0.36787945 are the float32 roundings of expm1(-1) and exp(-1)
    assert_bitwise(fastrelu.elu(X, 1.0), column(7))
    assert_bitwise(fastrelu.elu_backward(G, X, 1.0), column(8))


def test_signed_zero_results_are_exactly_as_written():
    # relu keeps -0.0 (-0.0 < 0 is false); leaky of -1e-45 rounds to -0.0
    assert np.signbit(fastrelu.relu(np.float32(-0.0)))
    assert not np.signbit(fastrelu.relu(np.float32(-1.0)))
    assert np.signbit(fastrelu.leaky_relu(np.float32(-1e-45)))


def test_nan_gradients_follow_the_comparisons():
    # relu: NaN <= 0 is false, so the gradient passes; leaky: NaN > 0 is false, so it is scaled
    nan = np.array([np.nan], f)
    assert fastrelu.relu_backward(np.array([3.0], f), nan)[0] == 3.0
    assert fastrelu.leaky_relu_backward(np.array([3.0], f), nan, 0.5)[0] == 1.5
    assert fastrelu.elu_backward(np.array([3.0], f), nan)[0] == 3.0


def test_prelu_weight_gradient_example():
    x = np.array([-2.0, 0.0, -0.0, 3.0], f)
    _, dw = fastrelu.prelu_backward(np.ones_like(x), x, np.array([0.25], f))
    assert dw.tolist() == [-2.0]


@pytest.mark.parametrize("slope", [0.0, -0.5, 1.0, 3.0, 1e-30])
def test_any_finite_slope(slope):
    x = np.array([-2.0, -0.0, 0.0, 2.0], np.float64)
    expected = np.array([-2.0 * slope, -0.0 * slope, 0.0 * slope, 2.0])
    assert_bitwise(fastrelu.leaky_relu(x, slope), expected)
    g = np.array([1.0, 2.0, 3.0, 4.0])
    assert_bitwise(fastrelu.leaky_relu_backward(g, x, slope), np.array([slope, 2 * slope, 3 * slope, 4.0]))


def test_elu_alpha_scales_the_negative_side():
    x = np.array([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(fastrelu.elu(x, 2.0), [2 * np.expm1(-1.0), 0.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(
        fastrelu.elu_backward(np.ones(3), x, 2.0), [2 * np.exp(-1.0), 2.0, 1.0], rtol=1e-15
    )
