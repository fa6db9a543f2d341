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


# ---- PReLU after a bias, fused --------------------------------------------------------------

def _bias_prelu_reference(g, x, b, w, axis):
    """z = x + b, and the gradients, computed in float32 for float16 data (z is never rounded
    to float16, as in the kernels)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    wide = np.float64 if x.dtype == np.float64 else np.float32
    z = x.astype(wide) + b.astype(wide).reshape(shape)
    dz, dw = reference.prelu_backward(g.astype(wide), z, w.astype(wide), axis)
    db = np.moveaxis(dz.astype(np.float64), axis, 0).sum(axis=tuple(range(1, x.ndim)))
    return z, dz.astype(x.dtype), db, dw


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((64, 100), 1), ((4, 8, 300), 1), ((5, 7), 0),
                                        ((3, 4, 5, 6), 1), ((40, 64, 4, 4), 1),
                                        ((3, 0, 4), 2), ((2, 0), 1), ((0, 3), 0)])
@pytest.mark.parametrize("shared", [False, True], ids=["per_unit", "shared"])
def test_bias_prelu_forward_and_backward(shape, axis, shared, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    b = rng.standard_normal(c).astype(dtype)
    w = np.array([0.3], dtype) if shared else rng.standard_normal(c).astype(dtype)
    z, ref_dz, ref_db, ref_dw = _bias_prelu_reference(g, x, b, w, axis)
    y = fastrelu.bias_activation(x, b, "prelu", w, axis)
    assert_bitwise(y, reference.prelu(z, w.astype(z.dtype), axis).astype(dtype))
    dz, db, dw = fastrelu.bias_prelu_backward(g, x, b, w, axis)
    assert_bitwise(dz, ref_dz)
    assert db.shape == b.shape and dw.shape == w.shape and db.dtype == dw.dtype == dtype
    tol = 2e-3 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(db, ref_db, rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, ref_dw, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,axis", [((2, 0), 1), ((0, 3), -2), ((0,), 0), ((0, 3), 1)])
@pytest.mark.parametrize("weight_shape", [(), (1,)])
def test_gradients_over_no_elements_are_zero(shape, axis, weight_shape):
    # a sum over nothing is 0 whether or not there are units to sum for
    x = np.empty(shape, np.float32)
    b = np.full(shape[axis], 5.0, np.float32)
    w = np.full(weight_shape, 0.25, np.float32)
    outs = (None, np.full_like(b, 7.0), np.full_like(w, 7.0))
    _, db, dw = fastrelu.bias_prelu_backward(x, x, b, w, axis, out=outs)
    assert db is outs[1] and dw is outs[2]
    assert db.tolist() == [0.0] * shape[axis] and dw.tolist() == np.zeros(weight_shape).tolist()
    dw = np.full_like(w, 7.0)
    assert fastrelu.prelu_backward(x, x, w, axis, out=(None, dw))[1] is dw
    assert dw.tolist() == np.zeros(weight_shape).tolist()


def test_bias_prelu_on_two_threads_and_into_outputs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((512, 300)).astype(np.float32)  # 153,600 elements: threaded
    g = rng.standard_normal(x.shape).astype(np.float32)
    b, w = rng.standard_normal(300).astype(np.float32), rng.standard_normal(300).astype(np.float32)
    z, ref_dz, ref_db, ref_dw = _bias_prelu_reference(g, x, b, w, 1)
    outs = (np.empty_like(x), np.empty_like(b), np.empty_like(w))
    result = fastrelu.bias_prelu_backward(g, x, b, w, out=outs)
    assert all(r is o for r, o in zip(result, outs))
    assert_bitwise(outs[0], ref_dz)
    np.testing.assert_allclose(outs[1], ref_db, rtol=1e-5)
    np.testing.assert_allclose(outs[2], ref_dw, rtol=1e-5)
    before = g.copy()
    dz, _, _ = fastrelu.bias_prelu_backward(g, x, b, w, out=(g, None, None))  # in place
    assert dz is g
    assert_bitwise(g, reference.prelu_backward(before, z, w)[0])


def test_bias_prelu_errors():
    x = np.ones((4, 3), np.float32)
    b, w = np.zeros(3, np.float32), np.full(3, 0.25, np.float32)
    with pytest.raises(ValueError, match="use bias_prelu_backward"):
        fastrelu.bias_activation_backward(x, x, "prelu", w)
    with pytest.raises(TypeError, match="prelu needs its weight"):
        fastrelu.bias_activation(x, b, "prelu")
    with pytest.raises(TypeError, match="weight must be an array"):
        fastrelu.bias_prelu_backward(x, x, b, None)
    with pytest.raises(TypeError, match="out must be a triple"):
        fastrelu.bias_prelu_backward(x, x, b, w, out=(None, None))
    with pytest.raises(ValueError, match="bias must have shape"):
        fastrelu.bias_prelu_backward(x, x, np.zeros(4, np.float32), w)
    with pytest.raises(ValueError, match="weight has 2 elements"):
        fastrelu.bias_prelu_backward(x, x, b, w[:2])
    shared = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match=r"out\[1\] and out\[2\] overlap"):
        fastrelu.bias_prelu_backward(x, x, b, w, out=(None, shared[:3], shared[1:4]))
    one = np.zeros(3, np.float32)  # the very same array for both sums
    with pytest.raises(ValueError, match=r"out\[1\] and out\[2\] overlap"):
        fastrelu.bias_prelu_backward(x, x, b, w, out=(None, one, one))
    assert not one.any()
    with pytest.raises(TypeError, match="weight has dtype float64"):
        fastrelu.bias_prelu_backward(x, x, b, w.astype(np.float64))


# ---- the weight gradient's accuracy: per-column sums gathered in blocks of rows ----------------

def exact_weight_grad(g, x, axis):
    """Each channel's sum of x*g over x <= 0, from float64 products (exact for float32 inputs)
    added with math.fsum: the correctly rounded sum."""
    import math
    xc, gc = np.moveaxis(x, axis, 0), np.moveaxis(g, axis, 0)
    terms = np.where(xc > 0, 0.0, xc.astype(np.float64) * gc.astype(np.float64))
    return np.array([math.fsum(t.ravel()) for t in terms])


def cancelling(shape, seed):
    """x <= 0 and g of both signs in equal measure: each channel's sum is ~1/sqrt(rows) of its
    terms' magnitude."""
    rng = np.random.default_rng(seed)
    x = -np.abs(rng.standard_normal(shape)).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    return x, g


# (N, C) with odd row lengths and tails, NCHW with short runs, one row, fewer rows than a block
@pytest.mark.parametrize("shape", [(4000, 100), (3001, 7), (517, 13), (300, 64, 7, 7), (5, 17),
                                   (2, 300), (70, 3, 5), (130, 4099)])
def test_weight_grad_of_cancelling_channels(shape):
    x, g = cancelling(shape, 3)
    w = np.linspace(-0.5, 0.5, shape[1]).astype(np.float32)
    exact = exact_weight_grad(g, x, 1)
    for out_x in (False, True):  # dx written over x: the sums are taken before it is
        xi = x.copy()
        dx, dw = fastrelu.prelu_backward(g, xi, w, 1, out=(xi if out_x else None, None))
        assert_bitwise(dx, reference.prelu_backward(g, x, w, 1)[0])
        np.testing.assert_allclose(dw.astype(np.float64), exact, rtol=2e-7, atol=0)


@pytest.mark.parametrize("big", [np.inf, -np.inf, np.nan, 3e38, 1e30])
def test_weight_grad_with_values_beyond_float32_products(big):
    """Products that overflow float32 (or infinities and NaN) are summed again in float64, as the
    contract writes the sum: finite exact sums stay finite."""
    x, g = cancelling((600, 10), 4)
    x[123, 2], g[123, 2] = -np.float32(big), 2.0
    x[500, 5], g[500, 5] = -1e20, -1e20
    w = np.full(10, 0.25, np.float32)
    for xi in (x.copy(), x.copy()[None]):
        axis = xi.ndim - 1
        dx, dw = fastrelu.prelu_backward(g.reshape(xi.shape), xi, w, axis, out=(xi, None))
        exact = exact_weight_grad(g, x, 1)
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(dw.astype(np.float64), exact.astype(np.float32), rtol=2e-7,
                                       atol=0)


SIMD_SUMS = """
import json, numpy as np, fastrelu
from test_prelu import cancelling, exact_weight_grad
worst = 0.0
for shape in [(20000, 100), (517, 13), (200, 64, 7, 7)]:
    x, g = cancelling(shape, 5)
    _, dw = fastrelu.prelu_backward(g, x, np.full(shape[1], 0.25, np.float32), 1)
    _, bf = fastrelu.prelu_backward(g.astype(np.float64), x.astype(np.float64),
                                    np.full(shape[1], 0.25), 1)
    exact = exact_weight_grad(g, x, 1)
    worst = max(worst, float(np.max(np.abs(dw / exact - 1))), float(np.max(np.abs(bf / exact - 1))))
print(json.dumps({"simd": fastrelu.info()["simd"], "worst": worst}))
"""


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_weight_grad_at_every_simd_level(level):
    import json
    import os
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", SIMD_SUMS], capture_output=True, text=True,
                         env={**os.environ, "FASTRELU_SIMD": level}, timeout=300,
                         cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["worst"] <= 2e-7


@pytest.mark.slow
def test_weight_grad_over_1e8_elements():
    """10^8 float32 elements in (10^6, 100): every channel within 1e-6 of its exact sum (the
    reference adds float64 products in float64 blocks of 10^5 rows, then math.fsum)."""
    import math
    rows, C, block = 1_000_000, 100, 100_000
    x, g = cancelling((rows, C), 6)
    _, dw = fastrelu.prelu_backward(g, x, np.full(C, 0.25, np.float32), 1)
    parts = [(x[i:i + block].astype(np.float64) * g[i:i + block]).sum(axis=0)
             for i in range(0, rows, block)]
    exact = np.array([math.fsum(p[c] for p in parts) for c in range(C)])
    assert np.max(np.abs(dw / exact - 1)) <= 1e-6


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(3001, 7), (4000, 100), (517, 13), (200, 64, 7, 7),
                                   (90, 64, 4, 4), (5, 17), (2000, 300)])
def test_half_weight_grads_round_the_exact_sum_once(dtype_name, shape):
    """16-bit data is staged in whole rows, its sums gathered in blocks of rows: the weight
    gradient is the exact sum rounded once to the dtype (half an ulp), dx the contract's."""
    dtype = np.dtype(np.float16) if dtype_name == "float16" else \
        np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    x, g = (a.astype(dtype) for a in cancelling(shape, 7))
    w = np.full(shape[1], 0.25, dtype)
    dx, dw = fastrelu.prelu_backward(g, x, w, 1)
    exact = exact_weight_grad(g.astype(np.float32), x.astype(np.float32), 1)
    half_ulp = 2.0 ** -(np.finfo(np.float16).nmant + 1 if dtype_name == "float16" else 8)
    assert np.max(np.abs(dw.astype(np.float64) / exact - 1)) <= half_ulp
    xf, gf = x.astype(np.float32), g.astype(np.float32)
    assert_bitwise(dx, np.where(xf > 0, gf, gf * np.float32(0.25)).astype(dtype))


# Columns whose terms cancel down to bits below float32's precision at their largest partial
# sum: a sum kept in float32 (even a compensated pair) loses them, the float64 sum keeps them.
# Each column of g: the terms; x = -1 turns them into products -g; want: their exact sum.
CANCELLING_COLUMNS = [
    ([-2.0 ** 25, -1, -2.0 ** -24, -2.0 ** -24, 2.0 ** 25], 1 + 2.0 ** -23),
    ([-2.0 ** 25, -1, -2.0 ** -24, 2.0 ** 25, 1], 2.0 ** -24),
]


@pytest.mark.parametrize("terms,want", CANCELLING_COLUMNS)
@pytest.mark.parametrize("width", [256, 300, 1])
def test_weight_and_bias_grads_keep_cancelled_bits(terms, want, width):
    """By hand: the weight gradient of PReLU, the bias gradient of bias_activation and both
    gradients of bias_prelu are the float64 sums of their terms, rounded once."""
    rows = len(terms)
    g = np.zeros((rows, width), np.float32)
    g[:, 0] = terms
    x = -np.ones((rows, width), np.float32)
    for layout in (lambda a: a, lambda a: np.asfortranarray(a)):
        gl, xl = layout(g), layout(x)
        _, dw = fastrelu.prelu_backward(gl, xl, np.full(width, 0.25, np.float32), 1)
        assert dw[0] == np.float32(want)
        # bias gradient = sum of g over rows where y > 0 (all of them here)
        _, db = fastrelu.bias_activation_backward(gl, -xl, "relu", axis=1)
        assert db[0] == np.float32(-want)
        _, db, dw = fastrelu.bias_prelu_backward(gl, xl, np.zeros(width, np.float32),
                                                 np.full(width, 0.25, np.float32), 1)
        assert dw[0] == np.float32(want) and db[0] == np.float32(-0.25 * want)


def test_bfloat16_weight_grad_rounds_from_float64_once():
    """1 + 2^-8 + 2^-30 is just above half way between bfloat16's 1 and 1 + 2^-7: rounded once
    it goes up; through float32 first (1 + 2^-8, a tie) it would round to even, down to 1."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    g = np.zeros((3, 2), bf16)
    g[:, 0] = [-1, -2.0 ** -8, -2.0 ** -30]
    x = -np.ones((3, 2), bf16)
    for weight in (np.full(2, 0.25, bf16), np.full(1, 0.25, bf16)):
        _, dw = fastrelu.prelu_backward(g, x, weight, 1)
        assert float(dw[0]) == 1 + 2.0 ** -7  # per channel and shared alike
    f16 = np.float16
    g16 = np.zeros((3, 2), f16)
    g16[:, 0] = [-1, -2.0 ** -11, -2.0 ** -24]
    _, dw = fastrelu.prelu_backward(g16, -np.ones((3, 2), f16), np.full(2, 0.25, f16), 1)
    assert float(dw[0]) == 1 + 2.0 ** -10
