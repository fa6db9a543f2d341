"""The classes of hostile input that once gave wrong answers or crashed: unaligned and overlapping
outputs, copying paths that lost 0-d shapes, None and wrong types in every argument, flags and
axes of every spelling, and argument-driven thread counts."""
import numpy as np
import pytest

import fastrelu
from fastrelu import reference
from helpers import DTYPES, assert_bitwise

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)


def unaligned(shape, dtype, fill=None):
    """A C-contiguous array at an odd byte offset (not aligned to its itemsize)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    a = np.zeros(n * dtype.itemsize + 1, np.uint8)[1:].view(dtype).reshape(shape)
    assert not a.flags.aligned and a.flags.c_contiguous
    if fill is not None:
        a[...] = fill
    return a


def sample(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2).astype(dtype)


W = np.array([0.25, -0.5, 2.0], np.float64)

# name -> (call with x and out, the reference result)
FORWARDS = {
    "relu": (lambda x, **k: fastrelu.relu(x, **k), reference.relu),
    "leaky_relu": (lambda x, **k: fastrelu.leaky_relu(x, 0.1, **k),
                   lambda x: reference.leaky_relu(x, 0.1)),
    "elu": (lambda x, **k: fastrelu.elu(x, 0.5, **k), lambda x: reference.elu(x, 0.5)),
    "prelu": (lambda x, **k: fastrelu.prelu(x, W.astype(x.dtype), **k),
              lambda x: reference.prelu(x, W.astype(x.dtype))),
    "bias_relu": (lambda x, **k: fastrelu.bias_activation(x, W.astype(x.dtype), **k),
                  lambda x: reference.relu(x + W.astype(x.dtype))),
}
BACKWARDS = {
    "relu": (lambda g, x, **k: fastrelu.relu_backward(g, x, **k), reference.relu_backward),
    "leaky_relu": (lambda g, x, **k: fastrelu.leaky_relu_backward(g, x, 0.1, **k),
                   lambda g, x: reference.leaky_relu_backward(g, x, 0.1)),
    "elu": (lambda g, x, **k: fastrelu.elu_backward(g, x, 0.5, **k),
            lambda g, x: reference.elu_backward(g, x, 0.5)),
}


# ---- out= is always the array written and returned ----------------------------------------------

@dtypes
@pytest.mark.parametrize("name", list(FORWARDS))
def test_unaligned_out_is_written(name, dtype):
    call, ref = FORWARDS[name]
    x = sample((4, 3), dtype)
    out = unaligned((4, 3), dtype)
    assert call(x, out=out) is out
    assert_bitwise(out, ref(x)) if name != "elu" else np.testing.assert_allclose(
        out, ref(x), rtol=4 * np.finfo(dtype).eps)


@dtypes
@pytest.mark.parametrize("name", list(FORWARDS))
def test_in_place_on_an_unaligned_input(name, dtype):
    call, ref = FORWARDS[name]
    x = sample((4, 3), dtype)
    xu = unaligned((4, 3), dtype, fill=x)
    assert call(xu, out=xu) is xu
    expected = ref(x)
    assert_bitwise(xu, expected) if name != "elu" else np.testing.assert_allclose(
        xu, expected, rtol=4 * np.finfo(dtype).eps)


@dtypes
@pytest.mark.parametrize("name", list(BACKWARDS))
def test_unaligned_backward_out_and_in_place(name, dtype):
    call, ref = BACKWARDS[name]
    x, g = sample((5, 7), dtype, 1), sample((5, 7), dtype, 2)
    expected = ref(g, x)
    out = unaligned(x.shape, dtype)
    assert call(g, x, out=out) is out
    np.testing.assert_allclose(out, expected, rtol=4 * np.finfo(dtype).eps)
    gu = unaligned(x.shape, dtype, fill=g)
    assert call(gu, x, out=gu) is gu
    np.testing.assert_allclose(gu, expected, rtol=4 * np.finfo(dtype).eps)


@dtypes
def test_unaligned_prelu_backward_pair(dtype):
    x, g = sample((6, 3), dtype, 3), sample((6, 3), dtype, 4)
    w = W.astype(dtype)
    dx_out, dw_out = unaligned(x.shape, dtype), unaligned((3,), dtype)
    dx, dw = fastrelu.prelu_backward(g, x, w, out=(dx_out, dw_out))
    assert dx is dx_out and dw is dw_out
    ref_dx, ref_dw = reference.prelu_backward(g, x, w)
    assert_bitwise(dx, ref_dx)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-3 if dtype == np.float16 else 1e-6)


# ---- overlap of inputs and outputs ---------------------------------------------------------------

@pytest.mark.parametrize("axis", [1, np.int64(1), np.int32(-1), -1])
@pytest.mark.parametrize("offset", [0, 3, 9])
def test_weight_inside_out_is_refused(axis, offset):
    x = sample((4, 3), np.float32)
    buf = np.full(12, 0.5, np.float32)
    out, w = buf.reshape(4, 3), buf[offset:offset + 3]
    before = buf.copy()
    with pytest.raises(ValueError, match="out partially overlaps weight"):
        fastrelu.prelu(x, w, axis, out=out)
    with pytest.raises(ValueError, match=r"out\[0\] partially overlaps weight"):
        fastrelu.prelu_backward(np.ones_like(x), x, w, axis, out=(out, None))
    with pytest.raises(ValueError, match="out partially overlaps bias"):
        fastrelu.bias_activation(x, w, "relu", None, axis, out=out)
    assert_bitwise(buf, before)  # nothing written


def test_weight_inside_an_in_place_input_is_refused():
    buf = sample(12, np.float32)
    x, w = buf.reshape(4, 3), buf[:3]
    before = buf.copy()
    with pytest.raises(ValueError, match="overlaps weight"):
        fastrelu.prelu(x, w, out=x)
    with pytest.raises(ValueError, match="overlaps weight"):
        fastrelu.prelu_backward(x.copy(), x.copy(), w, out=(x, None))
    assert_bitwise(buf, before)


def test_weight_gradient_into_the_weight_itself_is_computed_from_the_weight_read_first():
    x, g = sample((6, 3), np.float32, 5), sample((6, 3), np.float32, 6)
    w = W.astype(np.float32)
    ref_dx, ref_dw = reference.prelu_backward(g, x, w.copy())
    dx, dw = fastrelu.prelu_backward(g, x, w, out=(None, w))
    assert dw is w
    assert_bitwise(dx, ref_dx)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-6)
    # a parameter gradient may take the place of its own parameter only: not of another input
    g1, y1 = sample(7, np.float64, 7), np.abs(sample(7, np.float64, 8)) * (np.arange(7) % 2)
    before = g1.copy()
    with pytest.raises(ValueError, match=r"out\[1\] is grad"):
        fastrelu.bias_activation_backward(g1, y1, "relu", None, 0, out=(None, g1))
    x1 = np.float32([-2.0])
    with pytest.raises(ValueError, match=r"out\[1\] is x"):
        fastrelu.prelu_backward(np.float32([3.0]), x1, np.float32([0.5]), out=(None, x1))
    assert_bitwise(g1, before)
    assert x1[0] == -2.0


def test_outputs_that_are_a_weight_or_bias_or_overlap_themselves_are_refused():
    x = sample(3, np.float32)
    w, b = np.float32([0.5]), np.float32([1.0, -5.0, 2.0])
    with pytest.raises(ValueError, match="out is weight"):
        fastrelu.prelu(x[:1], w, out=w)
    with pytest.raises(ValueError, match="out is bias"):
        fastrelu.bias_activation(x, b, axis=0, out=b)
    flat = np.zeros(1, np.float32)
    for out in (np.lib.stride_tricks.as_strided(flat, (3,), (0,), writeable=True),
                np.lib.stride_tricks.as_strided(np.zeros(3, np.float32), (2, 2), (4, 4),
                                                writeable=True)):
        with pytest.raises(ValueError, match="share memory"):
            fastrelu.relu(np.ones(out.shape, np.float32), out=out)
    x0 = np.array(-2.0, np.float32)
    with pytest.raises(ValueError, match="shape"):
        fastrelu.relu(x0, out=np.full(3, 7, np.float32))
    with pytest.raises(ValueError, match="shape"):
        fastrelu.relu_backward(np.float32([1, 2, 3]), x0)
    with pytest.raises(ValueError, match="shape"):
        fastrelu.prelu_backward(x0, x0, np.array(0.5, np.float32),
                                out=(None, np.full(3, 7, np.float32)))


@pytest.mark.parametrize("offset", range(0, 9))
@pytest.mark.parametrize("step", [1, 2])
def test_overlapping_views_of_one_buffer_at_every_offset(offset, step):
    """x and out as views of one buffer: exact in place works, any other overlap is refused
    with nothing written, disjoint views compute."""
    buf = sample(40, np.float32, offset)
    x = buf[:16:step]
    out = buf[offset:offset + 16:step][:x.size]
    before = buf.copy()
    expected = reference.relu(x.copy())
    exact = offset == 0
    disjoint = not np.shares_memory(x, out)
    if exact or disjoint:
        assert fastrelu.relu(x, out=out) is out
        assert_bitwise(out, expected)
    else:
        with pytest.raises(ValueError, match="overlaps"):
            fastrelu.relu(x, out=out)
        assert_bitwise(buf, before)


# ---- shapes are kept on every path ---------------------------------------------------------------

def zero_d_inputs():
    plain = np.array(-2.5, np.float32)
    swapped = plain.astype(plain.dtype.newbyteorder())
    return {"plain": plain, "swapped": swapped,
            "unaligned": unaligned((), np.float32, fill=-2.5)}


@pytest.mark.parametrize("kind", ["plain", "swapped", "unaligned"])
def test_0d_inputs_stay_0d_on_every_path(kind):
    x = zero_d_inputs()[kind]
    w = np.array(0.25, x.dtype)
    results = [
        fastrelu.relu(x), fastrelu.leaky_relu(x), fastrelu.elu(x),
        fastrelu.relu(x, stats=True)[0], fastrelu.prelu(x, w), fastrelu.prelu(x, w, stats=True)[0],
        fastrelu.relu_backward(x, x), fastrelu.elu_backward(x, x),
        fastrelu.prelu_backward(x, x, w)[0],
    ]
    for r in results:
        assert r.shape == ()
    assert float(fastrelu.prelu(x, w)) == -0.625
    assert fastrelu.prelu_backward(x, x, w)[1].shape == ()


# ---- None and wrong types never reach C ----------------------------------------------------------

def _calls():
    x = sample((4, 3), np.float32)
    w = W.astype(np.float32)
    return {
        "relu": (fastrelu.relu, [x], {}),
        "leaky_relu": (fastrelu.leaky_relu, [x, 0.1], {}),
        "prelu": (fastrelu.prelu, [x, w, 1], {}),
        "elu": (fastrelu.elu, [x, 1.0], {}),
        "relu_backward": (fastrelu.relu_backward, [x, x], {}),
        "leaky_relu_backward": (fastrelu.leaky_relu_backward, [x, x, 0.1], {}),
        "prelu_backward": (fastrelu.prelu_backward, [x, x, w, 1], {}),
        "elu_backward": (fastrelu.elu_backward, [x, x, 1.0], {}),
        "bias_activation": (fastrelu.bias_activation, [x, w, "relu", None, 1], {}),
        "bias_activation_backward": (fastrelu.bias_activation_backward, [x, x, "relu", None, 1],
                                     {}),
    }


# arguments for which None means "the default" (parameters of bias_activation)
NONE_ALLOWED = {("bias_activation", 3), ("bias_activation_backward", 3)}


@pytest.mark.parametrize("name", list(_calls()))
@pytest.mark.parametrize("bad", [None, "text", object(), {"a": 1}, b"\x00" * 16],
                         ids=["None", "str", "object", "dict", "bytes"])
def test_bad_positional_arguments_raise_type_or_value_errors(name, bad):
    fn, args, _ = _calls()[name]
    snapshot = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    for i in range(len(args)):
        if bad is None and (name, i) in NONE_ALLOWED:
            continue
        call = list(args)
        call[i] = bad
        with pytest.raises((TypeError, ValueError)) as info:
            fn(*call)
        assert not isinstance(info.value, (AttributeError, SystemError))
        if bad is None:
            assert info.type is TypeError
    for a, b in zip(args, snapshot):
        if isinstance(a, np.ndarray):
            assert_bitwise(a, b)


@pytest.mark.parametrize("name", ["relu_backward", "leaky_relu_backward", "elu_backward",
                                  "prelu_backward", "bias_activation_backward"])
def test_none_gradient_is_named(name):
    fn, args, _ = _calls()[name]
    with pytest.raises(TypeError, match="grad must be an array"):
        fn(None, *args[1:])


def test_none_weight_and_bias_are_errors_not_defaults():
    x = sample((4, 3), np.float32)
    with pytest.raises(TypeError, match="weight must be an array"):
        fastrelu.prelu(x, None)
    with pytest.raises(TypeError, match="weight must be an array"):
        fastrelu.prelu_backward(x, x, None)
    with pytest.raises(TypeError, match="bias must be an array"):
        fastrelu.bias_activation(x, None)


@pytest.mark.parametrize("name", list(_calls()))
@pytest.mark.parametrize("keyword,bad", [("out", "text"), ("out", 3.0), ("stream", "s")])
def test_bad_keyword_arguments(name, keyword, bad):
    fn, args, _ = _calls()[name]
    with pytest.raises(TypeError):
        fn(*args, **{keyword: bad})


@pytest.mark.parametrize("activation", [["relu"], 1, None, b"relu", ("relu",)])
def test_activation_must_be_a_name(activation):
    x = sample((4, 3), np.float32)
    with pytest.raises(TypeError, match="activation must be a string"):
        fastrelu.bias_activation(x, W.astype(np.float32), activation)
    with pytest.raises(TypeError, match="activation must be a string"):
        fastrelu.bias_activation_backward(x, x, activation)


# ---- flags and axes of every spelling, on every call ---------------------------------------------

@pytest.mark.parametrize("stats", [True, 1, np.True_, np.int64(1)])
def test_stats_accepts_bools_and_integers_0_and_1(stats):
    x = sample((4, 3), np.float32)
    y, s = fastrelu.relu(x, stats=stats)
    assert_bitwise(y, reference.relu(x))
    np.testing.assert_array_equal(s.positive, (x > 0).sum(axis=0))


@pytest.mark.parametrize("stats", [False, 0, np.False_, np.int8(0)])
def test_stats_false_in_any_spelling(stats):
    x = sample((4, 3), np.float32)
    y = fastrelu.leaky_relu(x, stats=stats)
    assert isinstance(y, np.ndarray)


@pytest.mark.parametrize("stats,error", [(None, TypeError), ("yes", TypeError), (2, ValueError),
                                         (-1, ValueError), (1.0, TypeError)])
def test_bad_stats_is_refused_on_every_path(stats, error):
    for x in (sample((4, 3), np.float32), [1.0, -2.0], sample((4, 3), np.float32).T):
        with pytest.raises(error, match="stats"):
            fastrelu.relu(x, stats=stats)
        with pytest.raises(error, match="stats"):
            fastrelu.prelu(x, 0.5, stats=stats)


@pytest.mark.parametrize("axis", ["1", 1.0, None, True, np.bool_(True), [1]])
def test_axis_must_be_an_integer_even_when_unused(axis):
    x = sample((4, 3), np.float32)
    for call in (lambda: fastrelu.relu(x, axis=axis), lambda: fastrelu.elu(x, axis=axis),
                 lambda: fastrelu.relu(x, axis=axis, stats=True),
                 lambda: fastrelu.prelu(x, 0.5, axis), lambda: fastrelu.prelu(x, W[:3], axis),
                 lambda: fastrelu.prelu_backward(x, x, 0.5, axis)):
        with pytest.raises(TypeError, match="axis must be an integer"):
            call()


@pytest.mark.parametrize("axis", [1, np.int64(1), np.uint8(1), -1, np.int32(-1)])
def test_numpy_integer_axes(axis):
    x = sample((5, 3), np.float32)
    w = W.astype(np.float32)
    assert_bitwise(fastrelu.prelu(x, w, axis), reference.prelu(x, w))
    y, s = fastrelu.relu(x, stats=True, axis=axis)
    np.testing.assert_array_equal(s.positive, (x > 0).sum(axis=0))


def test_from_output_accepts_numpy_bools():
    x, g = sample(9, np.float64), sample(9, np.float64, 1)
    y = fastrelu.elu(x)
    np.testing.assert_allclose(fastrelu.elu_backward(g, y, from_output=np.True_),
                               reference.elu_backward(g, x), rtol=1e-12)
    with pytest.raises(TypeError, match="from_output"):
        fastrelu.elu_backward(g, y, from_output=None)


class CudaLike:
    """Claims to be a CUDA array (what routing looks at), on a host call."""
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}


@pytest.mark.parametrize("call, name", [
    (lambda o: fastrelu.relu([0.5, -1.0], out=o), "out"),
    (lambda o: fastrelu.leaky_relu(np.ones(2, np.float32), 0.1, out=o), "out"),
    (lambda o: fastrelu.relu_backward([1.0, 1.0], [0.5, -1.0], out=o), "out"),
    (lambda o: fastrelu.prelu_backward(np.ones(2), np.ones(2), [0.25], 0, out=(o, None)),
     r"out\[0\]"),
    (lambda o: fastrelu.prelu_backward(np.ones(2), np.ones(2), [0.25], 0, out=(None, o)),
     r"out\[1\]"),
])
def test_a_cuda_output_of_a_host_call_is_named(call, name):
    with pytest.raises(TypeError, match=name + " is a CUDA array but the arrays read are host"):
        call(CudaLike())
