"""Every op against the NumPy reference: dtypes, shapes, layouts, edge values, out= and in place."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastrelu
from helpers import DTYPES, ELEMENTWISE, assert_bitwise, assert_close_ulp, edge_array
from fastrelu import reference

PARAMS = {"relu": [None], "leaky_relu": [0.01, 0.0, -0.3, 1.0, 2.5], "elu": [1.0, 0.5, 2.0, -1.0]}


def call(fn, *args, param=None, **kw):
    return fn(*args, **kw) if param is None else fn(*args, param, **kw)


def check(name, actual, expected):
    """relu/leaky/prelu are exact; ELU goes through expm1/exp and may differ by a few ulp."""
    (assert_close_ulp if name == "elu" else assert_bitwise)(actual, expected)


def forward_and_backward(name, x, g, param):
    fwd, bwd, ref_fwd, ref_bwd, _ = ELEMENTWISE[name]
    check(name, call(fwd, x, param=param), call(ref_fwd, x, param=param))
    check(name, call(bwd, g, x, param=param), call(ref_bwd, g, x, param=param))


# ---- property tests over dtypes, shapes, values and parameters ---------------------------------

float_arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(
        dt,
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
        elements=st.floats(width=np.dtype(dt).itemsize * 8, allow_nan=True, allow_infinity=True,
                           allow_subnormal=True),
    )
)
slopes = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False) | st.sampled_from([0.0, 1.0])
settings_ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings_
@given(x=float_arrays, seed=st.integers(0, 2**32 - 1), slope=slopes)
def test_leaky_relu_matches_reference(x, seed, slope):
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    forward_and_backward("leaky_relu", x, g, slope)


@settings_
@given(x=float_arrays, seed=st.integers(0, 2**32 - 1))
def test_relu_matches_reference(x, seed):
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    forward_and_backward("relu", x, g, None)


@settings_
@given(x=float_arrays, seed=st.integers(0, 2**32 - 1),
       alpha=st.floats(min_value=-10, max_value=10, allow_nan=False))
def test_elu_matches_reference(x, seed, alpha):
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    forward_and_backward("elu", x, g, alpha)


# ---- sizes that hit every SIMD tail and the threaded path --------------------------------------

SIZES = [1, 2, 7, 15, 16, 17, 31, 33, 63, 65, 1023, 1025, 4097, 65535, 65536 * 2 + 13, 1_000_003]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_sizes(name, n, dtype):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 4).astype(dtype)
    x[::7] = edge_array(dtype)[np.arange(x[::7].size) % len(edge_array(dtype))]
    g = rng.standard_normal(n).astype(dtype)
    for param in PARAMS[name][:2]:
        forward_and_backward(name, x, g, param)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_edge_values_every_dtype(name, dtype):
    x = edge_array(dtype)
    xx, gg = np.meshgrid(x, x)  # every pairing of an edge input with an edge gradient
    for param in PARAMS[name]:
        forward_and_backward(name, xx, gg, param)


# ---- shapes and layouts ------------------------------------------------------------------------

def _layouts(dtype):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 10, 14)).astype(dtype)
    yield "C", base
    yield "F", np.asfortranarray(base)
    yield "strided", base[::2, 1::3, ::-1]
    yield "negative", base[::-1]
    yield "transposed", base.transpose(1, 2, 0)
    yield "byteswapped", base.astype(base.dtype.newbyteorder())
    yield "0-d", np.array(-1.5, dtype)
    yield "empty", np.empty((3, 0, 2), dtype)
    unaligned = np.zeros(base.size * base.itemsize + 1, np.uint8)[1:].view(dtype)
    unaligned[:] = base.ravel()
    yield "unaligned", unaligned


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_layouts(name, dtype):
    fwd, bwd, ref_fwd, ref_bwd, _ = ELEMENTWISE[name]
    param = PARAMS[name][-1]
    for label, x in _layouts(dtype):
        g = np.ones(x.shape, x.dtype)
        xn = x.astype(np.dtype(dtype))  # native, C-ordered copy for the reference
        y = call(fwd, x, param=param)
        assert y.shape == x.shape and y.dtype == np.dtype(dtype), label
        check(name, y, call(ref_fwd, xn, param=param))
        check(name, call(bwd, g, x, param=param), call(ref_bwd, g.astype(xn.dtype), xn, param=param))


def test_fortran_input_gives_fortran_output():
    x = np.asfortranarray(np.random.default_rng(1).standard_normal((50, 40)))
    y = fastrelu.relu(x)
    assert y.flags.f_contiguous
    assert_bitwise(y, reference.relu(x))


def test_zero_dim_and_empty_keep_their_shape(dtype):
    assert fastrelu.relu(np.array(-2.0, dtype)).shape == ()
    assert fastrelu.relu(np.array(-2.0, dtype))[()] == 0
    for shape in [(0,), (4, 0), (0, 3, 5)]:
        y = fastrelu.leaky_relu(np.empty(shape, dtype))
        assert y.shape == shape and y.dtype == dtype


def test_python_values_are_float64():
    y = fastrelu.relu([[-1, 2], [3, -4]])
    assert y.dtype == np.float64 and y.tolist() == [[0.0, 2.0], [3.0, 0.0]]
    assert fastrelu.leaky_relu(-2, 0.5).tolist() == -1.0
    assert fastrelu.relu_backward([1.0, 1.0], [-1.0, 1.0]).tolist() == [0.0, 1.0]


def test_python_values_take_the_array_arguments_dtype():
    x = np.array([-1.0, 2.0], np.float32)
    assert fastrelu.relu_backward([5, 5], x).dtype == np.float32
    assert fastrelu.prelu(x, 0.5).dtype == np.float32


def test_float16_is_computed_in_float32():
    x = np.array([-3.0, -1e-3, 100.0], np.float16)
    y = fastrelu.leaky_relu(x, 0.1)
    expected = (x.astype(np.float32) * np.float32(0.1)).astype(np.float16)
    assert_bitwise(y, np.where(x > 0, x, expected))


# ---- out= and in place -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_out_and_in_place(name, dtype):
    fwd, bwd, ref_fwd, ref_bwd, _ = ELEMENTWISE[name]
    param = PARAMS[name][-1]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 29)).astype(dtype)
    g = rng.standard_normal((37, 29)).astype(dtype)
    expected_y = call(ref_fwd, x, param=param)
    expected_dx = call(ref_bwd, g, x, param=param)

    out = np.empty_like(x)
    assert call(fwd, x, param=param, out=out) is out
    check(name, out, expected_y)

    out = np.empty_like(x)
    assert call(bwd, g, x, param=param, out=out) is out
    check(name, out, expected_dx)

    xi = x.copy()
    assert call(fwd, xi, param=param, out=xi) is xi
    check(name, xi, expected_y)

    gi = g.copy()
    assert call(bwd, gi, x, param=param, out=gi) is gi
    check(name, gi, expected_dx)

    xi = x.copy()
    assert call(bwd, g, xi, param=param, out=xi) is xi
    check(name, xi, expected_dx)

    # strided and Fortran-ordered outputs, and in place on a strided view
    big = np.zeros((37, 58), dtype)
    view = big[:, ::2]
    assert call(fwd, x, param=param, out=view) is view
    check(name, view, expected_y)
    assert (big[:, 1::2] == 0).all()
    fo = np.asfortranarray(np.empty_like(x))
    check(name, call(fwd, x, param=param, out=fo), expected_y)
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    call(fwd, strided, param=param, out=strided)
    check(name, strided, expected_y)


def test_out_byteswapped():
    x = np.array([-1.0, 2.0, -3.0], np.float32)
    out = np.empty(3, np.dtype(np.float32).newbyteorder())
    fastrelu.leaky_relu(x, 0.5, out=out)
    assert out.tolist() == [-0.5, 2.0, -1.5]


def test_inputs_are_not_modified(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 7)).astype(dtype)
    g = rng.standard_normal((9, 7)).astype(dtype)
    w = np.abs(rng.standard_normal(7)).astype(dtype)
    copies = x.copy(), g.copy(), w.copy()
    fastrelu.relu(x), fastrelu.leaky_relu(x), fastrelu.elu(x), fastrelu.prelu(x, w, axis=1)
    fastrelu.relu_backward(g, x), fastrelu.leaky_relu_backward(g, x), fastrelu.elu_backward(g, x)
    fastrelu.prelu_backward(g, x, w, axis=1)
    for before, after in zip(copies, (x, g, w)):
        assert_bitwise(after, before)


# ---- backward from the forward output ----------------------------------------------------------

@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2, 1.0, 3.0])
def test_backward_from_output(slope, dtype):
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(1000).astype(dtype), edge_array(dtype)])
    g = rng.standard_normal(x.size).astype(dtype)
    assert_bitwise(fastrelu.relu_backward(g, fastrelu.relu(x)), fastrelu.relu_backward(g, x))
    y = fastrelu.leaky_relu(x, slope)
    assert_bitwise(fastrelu.leaky_relu_backward(g, y, slope),
                   fastrelu.leaky_relu_backward(g, x, slope))
    x2 = x[: x.size // 4 * 4].reshape(-1, 4)
    g2 = g[: x2.size].reshape(x2.shape)
    w = np.array([slope, 0.0, 0.25, 2.0], dtype)
    # the input gradient only: the weight gradient sums x * grad, so it needs x itself
    from_y = fastrelu.prelu_backward(g2, fastrelu.prelu(x2, w), w)
    from_x = fastrelu.prelu_backward(g2, x2, w)
    assert_bitwise(from_y[0], from_x[0])


def test_backward_from_output_needs_nonnegative_slope():
    # the documented limit: with a negative slope y > 0 no longer tells x > 0
    x = np.array([-1.0])
    y = fastrelu.leaky_relu(x, -0.5)
    assert fastrelu.leaky_relu_backward(np.ones(1), y, -0.5)[0] != \
        fastrelu.leaky_relu_backward(np.ones(1), x, -0.5)[0]


# ---- finite differences ------------------------------------------------------------------------

def _away_from_kinks(n, seed):
    x = np.random.default_rng(seed).uniform(-3, 3, n)
    return np.where(np.abs(x) < 1e-2, 0.5, x)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_backward_matches_finite_differences(name):
    fwd, bwd, _, _, _ = ELEMENTWISE[name]
    x = _away_from_kinks(500, 5)
    g = np.random.default_rng(6).standard_normal(500)
    h = 1e-6
    for param in PARAMS[name]:
        numeric = g * (call(fwd, x + h, param=param) - call(fwd, x - h, param=param)) / (2 * h)
        np.testing.assert_allclose(call(bwd, g, x, param=param), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.slow
def test_outputs_written_with_streaming_stores(dtype):
    """Outputs of 64 MiB and more go through non-temporal stores from staged buffers."""
    n = (65 << 20) // np.dtype(dtype).itemsize // 100 * 100 + 300  # odd stage and row ends
    rng = np.random.default_rng(7)
    x = rng.standard_normal(n, dtype=np.float32).astype(dtype)
    g = rng.standard_normal(n, dtype=np.float32).astype(dtype)
    assert_bitwise(fastrelu.leaky_relu(x, 0.1), reference.leaky_relu(x, 0.1))
    assert_bitwise(fastrelu.relu_backward(g, x), reference.relu_backward(g, x))
    x2, g2 = x.reshape(-1, 100), g.reshape(-1, 100)
    w = np.linspace(-1, 1, 100).astype(dtype)
    y, stats = fastrelu.prelu(x2, w, stats=True)
    assert_bitwise(y, reference.prelu(x2, w))
    np.testing.assert_array_equal(stats.positive, (x2 > 0).sum(axis=0))
    dx, dw = fastrelu.prelu_backward(g2, x2, w)
    assert_bitwise(dx, reference.prelu_backward(g2, x2, w)[0])
    # staged, the weight gradient is still the float64 sum: within one rounding
    exact = np.where(x2 > 0, 0, x2.astype(np.float64) * g2.astype(np.float64)).sum(axis=0)
    tol = {np.float16: 1e-3, np.float32: 2e-7, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(dw.astype(np.float64), exact, rtol=tol)
    out = x[1:].copy()  # an output that does not start on a cache line
    fastrelu.relu(x[:-1], out=out)
    assert_bitwise(out, reference.relu(x[:-1]))
