"""Dense arrays of any axis order (C, Fortran, channels-last, any transpose) run on their own
buffer and give results in their own layout; the channel axis of PReLU, biases and statistics is
mapped through the permutation; operands of other layouts follow a defined rule."""
import itertools

import numpy as np
import pytest

import fastrelu
from fastrelu import reference
from helpers import DTYPES, assert_bitwise
from test_prelu import _bias_prelu_reference


def in_layout(a, order):
    """`a`'s values in a dense array whose memory holds its axes in `order`, outermost first
    (order (0, 2, 3, 1) of an NCHW array: channels-last)."""
    buf = np.ascontiguousarray(a.transpose(order))
    return buf.transpose(np.argsort(order))


def layout(a):
    """The axis order of a dense array's memory, outermost first (size-1 axes omitted)."""
    axes = [d for d in range(a.ndim) if a.shape[d] > 1]
    return tuple(sorted(axes, key=lambda d: -a.strides[d]))


def sample(shape, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape) * 2
    x.reshape(-1)[:4] = [0.0, -0.0, np.nan, -np.inf]
    return x.astype(dtype)


LAYOUTS = [((2, 3, 4, 5), (0, 2, 3, 1)),        # channels-last NCHW
           ((2, 3, 4, 5, 6), (0, 2, 3, 4, 1)),  # channels-last NCDHW
           ((3, 4, 5), (2, 1, 0)),              # Fortran
           ((6, 7), (1, 0))]
LAYOUTS += [((3, 4, 5), order) for order in itertools.permutations(range(3))
            if order not in ((0, 1, 2), (2, 1, 0))]
ids = [f"{s}-{o}" for s, o in LAYOUTS]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)


@dtypes
@pytest.mark.parametrize("shape,order", LAYOUTS, ids=ids)
def test_elementwise_ops_keep_the_layout(shape, order, dtype):
    x = in_layout(sample(shape, dtype), order)
    g = in_layout(sample(shape, dtype, 1), order)
    for y, expected in [(fastrelu.relu(x), reference.relu(x)),
                        (fastrelu.leaky_relu(x, 0.2), reference.leaky_relu(x, 0.2)),
                        (fastrelu.relu_backward(g, x), reference.relu_backward(g, x)),
                        (fastrelu.leaky_relu_backward(g, x, 0.2),
                         reference.leaky_relu_backward(g, x, 0.2))]:
        assert layout(y) == layout(x)
        assert_bitwise(y, expected)
    y = fastrelu.elu(x)
    assert layout(y) == layout(x)
    np.testing.assert_allclose(y, reference.elu(x), rtol=4 * np.finfo(dtype).eps)


@dtypes
@pytest.mark.parametrize("shape,order", LAYOUTS, ids=ids)
def test_in_place_on_a_permuted_array(shape, order, dtype):
    x = in_layout(sample(shape, dtype), order)
    expected = reference.leaky_relu(x.copy(), 0.3)
    assert fastrelu.leaky_relu(x, 0.3, out=x) is x
    assert_bitwise(x, expected)


@dtypes
@pytest.mark.parametrize("shape,order", LAYOUTS, ids=ids)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_prelu_stats_and_bias_along_the_mapped_channel_axis(shape, order, axis, dtype):
    x = in_layout(sample(shape, dtype), order)
    g = in_layout(sample(shape, dtype, 1), order)
    c = x.shape[axis]
    w = np.linspace(-0.5, 1.5, c).astype(dtype)
    y = fastrelu.prelu(x, w, axis)
    assert layout(y) == layout(x)
    assert_bitwise(y, reference.prelu(x, w, axis))
    dx, dw = fastrelu.prelu_backward(g, x, w, axis)
    ref_dx, ref_dw = reference.prelu_backward(g, x, w, axis)
    assert layout(dx) == layout(x)
    assert_bitwise(dx, ref_dx)
    finite = np.isfinite(ref_dw)
    np.testing.assert_allclose(dw[finite], ref_dw[finite],
                               rtol=2e-3 if dtype == np.float16 else 1e-6, atol=1e-6)
    y, stats = fastrelu.relu(x, stats=True, axis=axis)
    moved = np.moveaxis(x, axis, 0).reshape(c, -1)
    np.testing.assert_array_equal(stats.positive, (moved > 0).sum(axis=1))
    b = np.linspace(-1, 1, c).astype(dtype)
    shape_b = [1] * x.ndim
    shape_b[axis] = c
    yb = fastrelu.bias_activation(x, b, "leaky_relu", 0.1, axis)
    assert layout(yb) == layout(x)
    # the sum is computed in float32 for float16 data, rounded once at the end
    wide = np.float64 if dtype == np.float64 else np.float32
    expected = reference.leaky_relu(x.astype(wide) + b.reshape(shape_b).astype(wide), 0.1)
    assert_bitwise(yb, expected.astype(dtype))


@pytest.mark.parametrize("x_order,other_order", [((0, 2, 3, 1), (0, 1, 2, 3)),
                                                 ((0, 1, 2, 3), (0, 2, 3, 1)),
                                                 ((0, 2, 3, 1), (3, 2, 1, 0)),
                                                 ((3, 2, 1, 0), (0, 3, 1, 2))])
def test_operands_of_mixed_layouts(x_order, other_order):
    """The kernel runs in x's layout: grad of another layout is read in it, out of another
    layout is filled, and a new result takes x's layout."""
    shape = (2, 3, 4, 5)
    x = in_layout(sample(shape, np.float32), x_order)
    g = in_layout(sample(shape, np.float32, 1), other_order)
    out = in_layout(np.zeros(shape, np.float32), other_order)
    w = np.array([0.1, -0.2, 0.3], np.float32)
    dx = fastrelu.prelu_backward(g, x, w)[0]
    assert layout(dx) == layout(x)
    assert_bitwise(dx, reference.prelu_backward(g, x, w)[0])
    assert fastrelu.prelu(x, w, out=out) is out
    assert layout(out) == layout(in_layout(out, other_order))
    assert_bitwise(out, reference.prelu(x, w))
    assert fastrelu.relu_backward(g, x, out=out) is out
    assert_bitwise(out, reference.relu_backward(g, x))


def test_a_strided_input_takes_the_layout_of_a_dense_out():
    base = in_layout(sample((2, 6, 4, 5), np.float32), (0, 2, 3, 1))
    x = base[:, ::2]  # gapped: copied
    out = in_layout(np.zeros(x.shape, np.float32), (0, 2, 3, 1))
    assert fastrelu.relu(x, out=out) is out
    assert_bitwise(out, reference.relu(x))
    y = fastrelu.relu(x)
    assert y.flags.c_contiguous
    assert_bitwise(y, reference.relu(x))


def test_size_one_axes_and_a_batch_of_one():
    x = in_layout(sample((1, 3, 4, 1), np.float32), (0, 2, 3, 1))
    w = np.array([0.1, -0.2, 0.3], np.float32)
    assert_bitwise(fastrelu.prelu(x, w), reference.prelu(x, w))
    y = fastrelu.relu(np.ones((1, 5), np.float32))
    assert y.flags.c_contiguous


def weight_grad_close(actual, expected, sizes, count):
    """A gradient summed in float64 and rounded once to its dtype: within a rounding of the
    reference's, plus two float64 sums' worst rounding errors over `count` terms of total size
    `sizes` (per channel)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    tol = {2: 2e-3, 4: 2e-7, 8: 0.0}[actual.dtype.itemsize]
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
    with np.errstate(invalid="ignore"):  # infinite sums: compared equal instead
        bound = tol * np.abs(e) + 2 * count * 2.0**-53 * sizes
        wrong = ~(np.isnan(e) | (a == e) | (np.abs(a - e) <= bound))
    assert not wrong.any(), f"{a[wrong][:5]} != {e[wrong][:5]}"


# Rows wider than the kernels' stripes (8192 columns): one row, a few, many; rows repeating the
# channels (5 x 8193 and 2 x 9000 are each laid out as one row of all the periods); one channel
# per element beyond the longest row of repeated parameters (2^20 + 3 channels: the channels'
# own row); and a row beyond the streamed-store threshold (64 MiB of float32)
WIDE = [((1, 20000), 1), ((3, 20000), 1), ((300, 10000), 1), ((5, 8193), 1), ((2, 9000, 1), 1),
        ((2, 1 << 20 | 3), 1), ((1, 1 << 24 | 5), 1)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,axis", WIDE, ids=[str(s) for s, _ in WIDE])
def test_wide_rows(shape, axis, threads):
    """Statistics, PReLU and biases on rows cut into stripes of columns: each column's parameter,
    count and sums, on one thread and two, with dx written over x."""
    big = np.prod(shape) > 1 << 22
    dtypes = [np.float32] if big else DTYPES
    previous = fastrelu.get_num_threads()
    fastrelu.set_num_threads(threads)
    try:
        for dtype in dtypes:
            x, g = sample(shape, dtype), sample(shape, dtype, seed=1)
            c = shape[axis]
            w = np.linspace(-0.5, 0.5, c).astype(dtype)
            b = np.linspace(-1, 1, c).astype(dtype)
            others = tuple(d for d in range(len(shape)) if d != axis)
            y, stats = fastrelu.prelu(x, w, axis, stats=True)
            assert_bitwise(y, reference.prelu(x, w, axis))
            np.testing.assert_array_equal(stats.positive, (x > 0).sum(axis=others))
            y, stats = fastrelu.leaky_relu(x, 0.1, axis=axis, stats=True)
            assert_bitwise(y, reference.leaky_relu(x, 0.1))
            np.testing.assert_array_equal(stats.positive, (x > 0).sum(axis=others))
            ref_dx, ref_dw = reference.prelu_backward(g, x, w, axis)
            count = x.size // c
            sizes = np.abs(g.astype(np.float64) * x.astype(np.float64)).sum(axis=others)
            xi = x.copy()
            dx, dw = fastrelu.prelu_backward(g, xi, w, axis, out=(xi, None))
            assert dx is xi
            assert_bitwise(dx, ref_dx)
            weight_grad_close(dw, ref_dw, sizes, count)
            if big:
                continue
            z, ref_dx, ref_db, ref_dw = _bias_prelu_reference(g, x, b, w, axis)
            dx, db, dw = fastrelu.bias_prelu_backward(g, x, b, w, axis)
            assert_bitwise(dx, ref_dx)
            sizes = np.abs(g.astype(np.float64) * z.astype(np.float64)).sum(axis=others)
            weight_grad_close(dw, ref_dw.astype(dtype), sizes, count)
            sizes = np.abs(ref_dx.astype(np.float64)).sum(axis=others)
            weight_grad_close(db, ref_db.astype(dtype), sizes, count)
    finally:
        fastrelu.set_num_threads(previous)
