"""fastrelu.torch's functional ops and custom operators against PyTorch: values and gradients
(bit for bit where the contract says so), every dtype and layout, in place, gradcheck and
gradgradcheck, opcheck, what backward saves, and when PyTorch's own kernel is used instead."""
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import EDGE_VALUES

torch = pytest.importorskip("torch")
frt = pytest.importorskip("fastrelu.torch")
F = torch.nn.functional
ops = torch.ops.fastrelu

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture
def always_fastrelu(monkeypatch):
    """Every size goes to fastrelu's kernels (the tests use small tensors)."""
    for table in frt.CROSSOVER.values():
        for op in table:
            monkeypatch.setitem(table, op, 0)


def edge_tensor(dtype, shape=(4, 6, 5, 7), seed=0, channels_last=False):
    """Random values with the edge values (±0, ±inf, NaN, subnormals, extremes) up front."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    edges = torch.tensor(EDGE_VALUES, dtype=torch.float64)
    x.view(-1)[: edges.numel()] = edges
    x = x.to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def bits(t):
    return t.contiguous().view(INT_OF[t.element_size()])


def assert_same_bits(actual, expected):
    """Same dtype, shape and strides; NaN where expected is NaN, identical bits elsewhere."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride(), (actual.stride(), expected.stride())
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(bits(actual)[~nan], bits(expected)[~nan]), \
        (actual[~nan][bits(actual)[~nan] != bits(expected)[~nan]][:5])


def assert_within_ulp(actual, expected, max_ulp):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)

    def ordered(t):
        i = bits(t)[~nan].to(torch.int64)
        return torch.where(i < 0, torch.iinfo(INT_OF[t.element_size()]).min - i, i)

    distance = (ordered(actual) - ordered(expected)).abs()
    assert distance.numel() == 0 or distance.max() <= max_ulp, distance.max()


def forward_backward(fn, x, grad, *params):
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in params]
    y = fn(x, *params)
    grads = torch.autograd.grad(y, [x] + params, grad)
    return y.detach(), grads


ELEMENTWISE = [
    ("relu", frt.relu, F.relu, ()),
    ("leaky_relu", frt.leaky_relu, F.leaky_relu, (0.01,)),
    ("leaky_relu", frt.leaky_relu, F.leaky_relu, (-0.5,)),
    ("leaky_relu", frt.leaky_relu, F.leaky_relu, (0.0,)),
    ("elu", frt.elu, F.elu, (1.0,)),
    ("elu", frt.elu, F.elu, (-0.7,)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name,fast,native,params", ELEMENTWISE,
                         ids=[f"{n}{p}" for n, _, _, p in ELEMENTWISE])
def test_elementwise_matches_pytorch(always_fastrelu, dtype, channels_last, name, fast, native,
                                     params):
    x = edge_tensor(dtype, channels_last=channels_last)
    grad = edge_tensor(dtype, seed=1, channels_last=channels_last)
    y, (dx,) = forward_backward(lambda t: fast(t, *params), x, grad)
    y_ref, (dx_ref,) = forward_backward(lambda t: native(t, *params), x, grad)
    if name == "elu":
        assert_within_ulp(y, y_ref, 4)
        assert y.stride() == y_ref.stride() and dx.stride() == dx_ref.stride()
        # PyTorch's vectorized ELU backward gives NaN for a NaN input where the contract gives
        # grad (README, "The contract"); compare the rest
        finite_x = ~x.isnan()
        # from the input, as PyTorch's out-of-place ELU: g * alpha * exp(x) stays within a few
        # ulp however far below 0 x lies (g * (y + alpha), from the output, would cancel)
        assert_within_ulp(dx[finite_x], dx_ref[finite_x], 4)
    else:
        assert_same_bits(y, y_ref)
        assert_same_bits(dx, dx_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [6, 1])
def test_prelu_matches_pytorch(always_fastrelu, dtype, channels_last, channels):
    x = edge_tensor(dtype, channels_last=channels_last)
    grad = edge_tensor(dtype, seed=1, channels_last=channels_last)
    weight = torch.linspace(-0.5, 1.5, channels, dtype=dtype)
    y, (dx, dw) = forward_backward(frt.prelu, x, grad, weight)
    y_ref, (dx_ref, dw_ref) = forward_backward(F.prelu, x, grad, weight)
    assert_same_bits(y, y_ref)
    assert_same_bits(dx, dx_ref)
    # the weight gradient is summed more accurately than PyTorch does: compare with a float64
    # sum (exact products for the narrower types), and with PyTorch within its rounding
    negative = (x <= 0).double()
    wide = x.double() * grad.double() * negative
    wide = wide.sum((0, 2, 3)) if channels > 1 else wide.sum().reshape(1)
    finite = wide.isfinite()
    assert torch.equal(dw.double().isfinite(), finite)
    if dtype is torch.float64:
        torch.testing.assert_close(dw[finite], wide[finite], rtol=1e-13, atol=0)
    else:
        assert torch.equal(dw[finite], wide[finite].to(dtype))
    # PyTorch's bfloat16 sums drift by up to ~10% on this data (fastrelu's is exact, above)
    rtol = {torch.float16: 1e-2, torch.bfloat16: 2e-1, torch.float32: 1e-5,
            torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(dw[finite], dw_ref[finite], rtol=rtol, atol=0)


def test_hand_worked_values(always_fastrelu):
    x = torch.tensor([[-2.0, -0.0, 0.0, 3.0]])
    assert frt.relu(x).tolist() == [[0.0, -0.0, 0.0, 3.0]]
    assert frt.leaky_relu(x, 0.5).tolist() == [[-1.0, -0.0, 0.0, 3.0]]
    assert frt.prelu(x.reshape(1, 4, 1), torch.tensor([0.25, 1, 1, 1])).flatten().tolist() == \
        [-0.5, -0.0, 0.0, 3.0]
    y = frt.elu(torch.tensor([-1.0, 2.0], dtype=torch.float64), alpha=2.0)
    assert y.tolist() == [2.0 * np.expm1(-1.0), 2.0]
    x = torch.tensor([-2.0, 3.0], requires_grad=True)
    frt.prelu(x, torch.tensor([0.25])).backward(torch.tensor([10.0, 10.0]))
    assert x.grad.tolist() == [2.5, 10.0]


# ---- gradcheck, gradgradcheck, opcheck ----------------------------------------------------------


def away_from_zero(shape, seed=0, channels_last=False):
    """float64 values at least 0.1 from 0, where finite differences see no kink."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    x = x * sign
    return x.to(memory_format=torch.channels_last) if channels_last else x


GRADCHECK = [
    ("relu", lambda x: frt.relu(x)),
    ("leaky_relu 0.2", lambda x: frt.leaky_relu(x, 0.2)),
    ("leaky_relu -0.3", lambda x: frt.leaky_relu(x, -0.3)),
    ("elu 1.0", lambda x: frt.elu(x, 1.0)),
    ("elu -0.5", lambda x: frt.elu(x, -0.5)),
    ("ops.relu", lambda x: ops.relu(x)),
    ("ops.leaky_relu", lambda x: ops.leaky_relu(x, 0.2)),
    ("ops.elu", lambda x: ops.elu(x, 1.5)),
    ("ops.elu negative", lambda x: ops.elu(x, -0.5)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name,fn", GRADCHECK, ids=[n for n, _ in GRADCHECK])
def test_gradcheck_and_gradgradcheck(always_fastrelu, name, fn, channels_last):
    x = away_from_zero((2, 3, 4, 5), channels_last=channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("fn", [frt.prelu, ops.prelu], ids=["functional", "op"])
def test_prelu_gradcheck_and_gradgradcheck(always_fastrelu, fn, channels):
    x = away_from_zero((2, 3, 4, 5)).requires_grad_()
    weight = torch.tensor([0.25, -0.5, 1.5][:channels], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, weight))
    assert torch.autograd.gradgradcheck(fn, (x, weight))


def test_leaky_relu_gradient_penalty_matches_pytorch(always_fastrelu):
    """The double backward a gradient-penalty GAN takes through Leaky ReLU."""
    def penalty(act, x, w):
        h = act(x @ w, 0.2)
        (g,) = torch.autograd.grad(h.square().sum(), x, create_graph=True)
        return g.norm()

    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    fast = torch.autograd.grad(penalty(frt.leaky_relu, x, w), w)[0]
    native = torch.autograd.grad(penalty(F.leaky_relu, x, w), w)[0]
    torch.testing.assert_close(fast, native, rtol=1e-12, atol=0)


def opcheck_cases():
    x = away_from_zero((2, 3, 4, 5))
    w = torch.tensor([0.25, -0.5, 1.5], dtype=torch.float64)
    g = away_from_zero((2, 3, 4, 5), seed=1)
    return [
        (ops.relu, (x,)), (ops.leaky_relu, (x, 0.2)), (ops.elu, (x, 1.0)), (ops.prelu, (x, w)),
        (ops.relu_with_counts, (x,)), (ops.leaky_relu_with_counts, (x, -0.1)),
        (ops.elu_with_counts, (x, 0.5)), (ops.prelu_with_counts, (x, w)),
        (ops.relu_, (x.clone(),)), (ops.leaky_relu_, (x.clone(), 0.1)),
        (ops.elu_, (x.clone(), 1.0)),
        (ops.relu_backward, (g, torch.relu(x))), (ops.leaky_relu_backward, (g, x, -0.2)),
        (ops.elu_backward, (g, x, -1.0, False)), (ops.elu_backward, (g, F.elu(x), 1.0, True)),
        (ops.prelu_backward, (g, x, w)),
        (ops.feed_tracker, (torch.tensor([3, 0]), 4, 0)),  # no module 0: nothing fed
    ]


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)
    if not op.default._schema.is_mutable:
        torch.library.opcheck(op, tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and
                                        a.is_floating_point() else a for a in args))


def test_every_op_is_registered():
    expected = {"relu", "leaky_relu", "elu", "prelu", "relu_", "leaky_relu_", "elu_",
                "relu_with_counts", "leaky_relu_with_counts", "elu_with_counts",
                "prelu_with_counts", "relu_backward", "leaky_relu_backward", "elu_backward",
                "prelu_backward", "feed_tracker"}
    for name in expected:
        assert isinstance(getattr(ops, name).default, torch._ops.OpOverload), name


def test_elu_backward_op_refuses_the_output_with_a_negative_alpha():
    x = torch.randn(5)
    with pytest.raises(ValueError, match="alpha >= 0"):
        ops.elu_backward(x, x, -1.0, True)


# ---- in place -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fast,native,params", ELEMENTWISE,
                         ids=[f"{n}{p}" for n, _, _, p in ELEMENTWISE])
def test_inplace_without_grad_writes_the_input(always_fastrelu, name, fast, native, params):
    x = edge_tensor(torch.float32, channels_last=True)
    expected = native(x, *params)
    version = x._version
    y = fast(x, *params, inplace=True)
    assert y is x
    assert x._version > version  # autograd sees the write, as with PyTorch's in-place ops
    if name == "elu":
        assert_within_ulp(x, expected, 4)
    else:
        assert_same_bits(x, expected)


@pytest.mark.parametrize("name,fast,native,params", ELEMENTWISE,
                         ids=[f"{n}{p}" for n, _, _, p in ELEMENTWISE])
def test_inplace_with_grad_behaves_as_pytorch(always_fastrelu, name, fast, native, params):
    base = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 5, dtype=torch.float64)

    def run(fn):
        h = base * 1.5
        y = fn(h, *params, inplace=True)
        assert y is h
        try:
            y.backward(grad)
        except RuntimeError as exc:
            base.grad = None
            return str(exc)
        result, base.grad = base.grad, None
        return result

    fast_result, native_result = run(fast), run(native)
    if isinstance(native_result, str):  # a negative parameter: the input was overwritten
        assert isinstance(fast_result, str) and native_result.startswith(fast_result)
    else:
        torch.testing.assert_close(fast_result, native_result, rtol=1e-15, atol=0)


@pytest.mark.parametrize("fast", [frt.relu, frt.leaky_relu, frt.elu])
def test_inplace_on_a_leaf_that_requires_grad_is_refused_before_writing(always_fastrelu, fast):
    x = torch.randn(10, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in "
                                           "an in-place operation"):
        fast(x, inplace=True)
    assert torch.equal(x.detach(), before)
    with pytest.raises(RuntimeError, match="a view of a leaf Variable"):
        fast(x[2:5], inplace=True)
    with torch.no_grad():  # allowed, as in PyTorch
        fast(x, inplace=True)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("fast, native", [(frt.relu, torch.relu_), (frt.elu, F.elu_)])
def test_inplace_on_a_view_made_without_grad_is_refused_as_pytorch_does(always_fastrelu, mode,
                                                                         fast, native):
    base = torch.randn(2, 8, requires_grad=True) * 1.0
    with mode():
        view = base[0]
    before = base.detach().clone()
    with pytest.raises(RuntimeError) as expected:
        native(view)
    with pytest.raises(RuntimeError) as got:
        fast(view, inplace=True)
    assert str(got.value) == str(expected.value) and "inplace" in str(got.value)
    assert torch.equal(base.detach(), before)


def test_inplace_on_an_inference_tensor_follows_pytorch(always_fastrelu):
    with torch.inference_mode():
        x = torch.randn(6)
        frt.relu(x, inplace=True)  # allowed inside inference mode
        assert torch.equal(x, x.clamp_min(0))
    before = x.clone()
    with pytest.raises(RuntimeError) as native:
        torch.relu_(x)
    with pytest.raises(RuntimeError) as fast:
        frt.relu(x, inplace=True)
    assert str(fast.value) == str(native.value)
    assert torch.equal(x, before)


def test_inplace_on_a_view_propagates_to_the_base(always_fastrelu):
    base = torch.randn(4, 5, requires_grad=True)
    grads = []
    for fn in (frt.relu, F.relu):
        h = base * 2
        fn(h[1], inplace=True)
        grads.append(torch.autograd.grad((h * h).sum(), base)[0])
    assert torch.equal(grads[0], grads[1])


def test_inplace_input_saved_by_another_op_is_detected(always_fastrelu):
    x = torch.randn(6, requires_grad=True)
    h = x.exp()  # exp saves its output
    frt.relu(h, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


# ---- what backward keeps ------------------------------------------------------------------------


def saved_by(fn, x, *params):
    """The tensors autograd saved for fn(x, *params), and fn's output."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(x, *params)
    return saved, y


@pytest.mark.parametrize("fn,params,keeps", [
    (frt.relu, (), "output"), (frt.leaky_relu, (0.1,), "output"),
    (frt.leaky_relu, (0.0,), "output"), (frt.leaky_relu, (-0.1,), "input"),
    (frt.elu, (1.0,), "input"), (frt.elu, (-1.0,), "input"),
])
def test_backward_keeps_only_what_it_needs(always_fastrelu, fn, params, keeps):
    x = torch.randn(4, 5) * 1
    x.requires_grad_()
    saved, y = saved_by(fn, x, *params)
    assert len(saved) == 1
    assert saved[0] is (y if keeps == "output" else x) or \
        saved[0].data_ptr() == (y if keeps == "output" else x).data_ptr()


def test_prelu_keeps_input_and_weight(always_fastrelu):
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.full((5,), 0.25, requires_grad=True)
    saved, _ = saved_by(frt.prelu, x, w)
    assert sorted(t.data_ptr() for t in saved) == sorted([x.data_ptr(), w.data_ptr()])


# ---- memory and layout --------------------------------------------------------------------------


def test_channels_last_stays_channels_last(always_fastrelu):
    x = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(8, requires_grad=True)
    for y in (frt.relu(x), frt.leaky_relu(x), frt.elu(x), frt.prelu(x, w)):
        assert y.is_contiguous(memory_format=torch.channels_last)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert dx.is_contiguous(memory_format=torch.channels_last)


def test_cpu_tensors_reach_the_kernels_without_a_copy(always_fastrelu, monkeypatch):
    """The arrays the NumPy API receives are views of the tensors' memory, strides included."""
    seen = []
    original = frt.fastrelu.relu

    def spy(x, *, out=None, stats=False):
        seen.append((x, out))
        return original(x, out=out, stats=stats)

    monkeypatch.setattr(frt.fastrelu, "relu", spy)
    x = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)
    y = frt.relu(x)
    (xa, ya), = seen
    assert xa.ctypes.data == x.data_ptr() and ya.ctypes.data == y.data_ptr()
    assert xa.strides == tuple(s * 4 for s in x.stride())
    assert ya.strides == tuple(s * 4 for s in y.stride())


def test_bfloat16_reaches_the_kernels_as_ml_dtypes(always_fastrelu, monkeypatch):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    seen = []
    original = frt.fastrelu.leaky_relu

    def spy(x, negative_slope, *, out=None, stats=False):
        seen.append(x)
        return original(x, negative_slope, out=out, stats=stats)

    monkeypatch.setattr(frt.fastrelu, "leaky_relu", spy)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    y = frt.leaky_relu(x, 0.1)
    assert seen[0].dtype == ml_dtypes.bfloat16 and seen[0].ctypes.data == x.data_ptr()
    assert_same_bits(y, F.leaky_relu(x, 0.1))


# ---- when PyTorch's own kernel runs -------------------------------------------------------------


def count_kernel_calls(monkeypatch, name):
    calls = []
    original = getattr(frt.fastrelu, name)
    monkeypatch.setattr(frt.fastrelu, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_below_the_crossover_pytorch_runs(monkeypatch):
    calls = count_kernel_calls(monkeypatch, "relu")
    monkeypatch.setitem(frt.CROSSOVER["cpu"], "relu", 100)
    frt.relu(torch.randn(99))
    assert calls == []
    frt.relu(torch.randn(100))
    assert calls == [1]


@pytest.mark.parametrize("x", [torch.tensor([-1, 2]), torch.randn(3, dtype=torch.complex64),
                               torch.randn(4, 4).to_sparse()], ids=["int", "complex", "sparse"])
def test_what_fastrelu_cannot_take_goes_to_pytorch(always_fastrelu, monkeypatch, x):
    calls = count_kernel_calls(monkeypatch, "relu")
    try:
        expected = F.relu(x)
    except Exception as exc:  # PyTorch refuses: so must the op, with PyTorch's error
        with pytest.raises(type(exc)):
            frt.relu(x)
    else:
        assert torch.equal(frt.relu(x).to_dense(), expected.to_dense())
    assert calls == []


@pytest.mark.parametrize("weight", [torch.rand(3, dtype=torch.float64), torch.rand(3, 1),
                                    torch.rand(4), torch.tensor([1, 2, 3])],
                         ids=["dtype", "2-d", "size", "int"])
def test_prelu_refuses_what_pytorch_refuses(always_fastrelu, weight):
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError) as native:
        F.prelu(x, weight)
    with pytest.raises(RuntimeError) as fast:
        frt.prelu(x, weight)
    assert str(fast.value) == str(native.value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2])
def test_parameters_pytorch_takes_are_taken(always_fastrelu, value):
    """Non-finite parameters, which fastrelu's kernels refuse, go to PyTorch; integers are
    taken as floats."""
    x = torch.randn(20)
    assert_same_bits(frt.leaky_relu(x, value), F.leaky_relu(x, value))
    assert_within_ulp(frt.elu(x, value), F.elu(x, value), 4)


def test_zero_dim_and_empty(always_fastrelu):
    for x in (torch.tensor(-2.0), torch.empty(0, 3)):
        assert_same_bits(frt.leaky_relu(x, 0.5), F.leaky_relu(x, 0.5))
        assert_same_bits(frt.prelu(x, torch.tensor([0.5])), F.prelu(x, torch.tensor([0.5])))


def test_cuda_tensors_go_to_the_gpu_api(always_fastrelu, monkeypatch):
    """A CUDA tensor reaches fastrelu's NumPy-style API as the (detached) tensor itself, with
    out= a CUDA tensor allocated like it; the GPU kernels are tested under the simulator in
    test_gpu.py.  Here a CPU tensor posing as CUDA stands in for one."""
    seen = []

    def gpu_relu(x, *, out=None, stats=False):
        seen.append((x, out))
        out.copy_(torch.relu(x))
        return out

    monkeypatch.setattr(frt.fastrelu, "relu", gpu_relu)
    x = torch.randn(5, requires_grad=True) * 1
    monkeypatch.setattr(frt, "_on_cuda", lambda t: True)
    y = frt.relu(x)
    (xa, out), = seen
    assert isinstance(xa, torch.Tensor) and not xa.requires_grad
    assert xa.data_ptr() == x.data_ptr() and out.data_ptr() == y.data_ptr()
    assert torch.equal(y, torch.relu(x))


def test_cuda_tensors_have_their_own_crossover(monkeypatch):
    calls = []

    def gpu_relu(x, *, out=None, stats=False):  # a CPU tensor posing as CUDA: no real kernel
        calls.append(x.dtype)
        return out.copy_(torch.relu(x))

    monkeypatch.setattr(frt.fastrelu, "relu", gpu_relu)
    monkeypatch.setattr(frt, "_on_cuda", lambda t: True)
    monkeypatch.setitem(frt.CROSSOVER["cpu"], "relu", 0)
    frt.relu(torch.randn(5))  # below the CUDA crossover
    assert calls == []
    monkeypatch.setitem(frt.CROSSOVER["cuda"], "relu", 0)
    frt.relu(torch.randn(5, dtype=torch.bfloat16))  # bfloat16 CUDA tensors too
    frt.relu(torch.randn(5, dtype=torch.float64))
    assert calls == [torch.bfloat16, torch.float64]


def test_import_fastrelu_does_not_import_torch():
    code = "import sys, fastrelu; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- PyTorch's modes and transforms -------------------------------------------------------------


def test_elu_gradient_far_below_zero_is_pytorch_s(always_fastrelu):
    """By hand: d/dx ELU = alpha * exp(x) for x <= 0, accurate however small it gets."""
    for dtype, x0, alpha in [(torch.float32, -20.0, 1.0), (torch.float64, -40.0, 1.0),
                             (torch.float16, -8.0, 1.0), (torch.float16, -20.0, 1e-3),
                             (torch.bfloat16, -3.0, 1.0), (torch.float32, -4.0, 2.5)]:
        x = torch.full((64,), x0, dtype=dtype, requires_grad=True)
        frt.elu(x, alpha).sum().backward()
        expected = torch.tensor(alpha * np.exp(x0), dtype=torch.float64).to(dtype)
        assert_within_ulp(x.grad, expected.expand(64), 4)
        native = x.detach().clone().requires_grad_()
        F.elu(native, alpha).sum().backward()
        assert_within_ulp(x.grad, native.grad, 4)


def test_inplace_elu_keeps_its_output_as_pytorch_does(always_fastrelu):
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True) * 1
    saved, y = saved_by(lambda t: frt.elu(t, 1.0, inplace=True), h)
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


UNARY = [
    ("relu", lambda t: frt.relu(t), lambda t: F.relu(t)),
    ("leaky_relu", lambda t: frt.leaky_relu(t, 0.2), lambda t: F.leaky_relu(t, 0.2)),
    ("elu", lambda t: frt.elu(t, 1.5), lambda t: F.elu(t, 1.5)),
    ("prelu", lambda t: frt.prelu(t, torch.tensor([0.25, -0.5, 2.0], dtype=t.dtype)),
     lambda t: F.prelu(t, torch.tensor([0.25, -0.5, 2.0], dtype=t.dtype))),
]


@pytest.mark.parametrize("name,fast,native", UNARY, ids=[n for n, _, _ in UNARY])
def test_forward_mode_ad_carries_the_tangent(always_fastrelu, name, fast, native):
    import torch.autograd.forward_ad as fwad
    x, tangent = away_from_zero((4, 3, 5)), torch.randn(4, 3, 5, dtype=torch.float64)
    results = []
    for fn in (fast, native):
        with fwad.dual_level():
            out = fwad.unpack_dual(fn(fwad.make_dual(x, tangent)))
            results.append((out.primal, out.tangent))
    (y, t), (y_ref, t_ref) = results
    assert t is not None
    torch.testing.assert_close(y, y_ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(t, t_ref, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,fast,native", UNARY, ids=[n for n, _, _ in UNARY])
def test_torch_func_transforms(always_fastrelu, name, fast, native):
    x = away_from_zero((3, 3, 3))  # vmap's samples have their channels along dim 1 too
    for transform in (lambda f: torch.func.grad(lambda t: f(t).sum()),
                      lambda f: torch.func.vmap(f),
                      lambda f: (lambda t: torch.func.jvp(f, (t,), (torch.ones_like(t),))[1])):
        torch.testing.assert_close(transform(fast)(x), transform(native)(x), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,fast,native", UNARY, ids=[n for n, _, _ in UNARY])
def test_jit_trace_records_pytorch_s_op(always_fastrelu, name, fast, native):
    """A trace would record only the empty result fastrelu's kernel fills: it gets PyTorch's."""
    import warnings

    class Fn(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, t):
            return self.fn(t)

    x = away_from_zero((2, 3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Fn(fast), x)
    other = away_from_zero((2, 3, 5), seed=1)
    torch.testing.assert_close(traced(other), native(other), rtol=1e-15, atol=0)
    assert "empty_like" not in str(traced.graph)


def test_autocast_casts_prelu_as_pytorch_does(always_fastrelu):
    x, w = torch.randn(4, 3, 5), torch.tensor([0.25, -0.5, 2.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = frt.prelu(x, w), F.prelu(x, w)
        assert y.dtype == y_ref.dtype == torch.bfloat16
        assert torch.equal(y, y_ref)
        module = frt.convert(torch.nn.PReLU(3))
        assert module(x).dtype == torch.bfloat16
        module.track_stats = True
        with pytest.raises(RuntimeError, match="autocast"):
            module(x)


@pytest.mark.parametrize("value", [1e39, -1e39, 10 ** 39])
def test_parameters_that_overflow_the_dtype_are_refused_as_pytorch_does(always_fastrelu, value):
    x = torch.randn(8)
    for fast, native in [(frt.elu, F.elu), (frt.leaky_relu, F.leaky_relu)]:
        with pytest.raises((RuntimeError, OverflowError)) as expected:
            native(x, value)
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            fast(x, value)
    # float64 holds 1e39
    torch.testing.assert_close(frt.elu(x.double(), 1e39), F.elu(x.double(), 1e39))


def test_second_order_gradients_through_a_sign_are_zero(always_fastrelu):
    """The gradient of ReLU's/Leaky ReLU's/PReLU's input gradient w.r.t. x is zero, and x stays
    in the graph (as in PyTorch), whichever tensor the backward saved."""
    w = torch.tensor([0.25, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    cases = [(lambda t: frt.relu(t), lambda t: F.relu(t)),
             (lambda t: frt.leaky_relu(t, -0.2), lambda t: F.leaky_relu(t, -0.2)),
             (lambda t: frt.leaky_relu(t, 0.2), lambda t: F.leaky_relu(t, 0.2)),
             (lambda t: frt.prelu(t, w), lambda t: F.prelu(t, w))]
    for fast, native in cases:
        results = []
        for fn in (fast, native):
            x = away_from_zero((8, 3)).requires_grad_()
            (gx,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
            results.append(torch.autograd.grad((gx * gx).sum(), x))
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][0], torch.zeros(8, 3, dtype=torch.float64))


def test_inplace_on_elements_sharing_memory_is_refused_as_pytorch_does(always_fastrelu):
    x = torch.randn(1, 16)
    expanded = x.expand(4, 16)
    before = x.clone()
    for fn in (lambda t: F.elu(t, inplace=True), lambda t: frt.elu(t, inplace=True),
               lambda t: frt.relu(t, inplace=True)):
        with pytest.raises(RuntimeError, match="single memory location"):
            fn(expanded)
    assert torch.equal(x, before)


def test_inplace_refusals_come_in_pytorch_s_order(always_fastrelu):
    leaf = torch.randn(1, 8, requires_grad=True)
    for fn in (lambda t: F.relu(t, inplace=True), lambda t: frt.relu(t, inplace=True)):
        with pytest.raises(RuntimeError, match="a view of a leaf Variable"):
            fn(leaf.expand(4, 8))


@pytest.mark.parametrize("name,fast,native", UNARY, ids=[n for n, _, _ in UNARY])
def test_batched_gradients_and_vectorized_jacobians(always_fastrelu, name, fast, native):
    """is_grads_batched runs the backward under vmap: it gets PyTorch's formulas there."""
    x = away_from_zero((4, 3, 5)).requires_grad_()
    grads = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    results = [torch.autograd.grad(fn(x), x, grads, is_grads_batched=True)[0]
               for fn in (fast, native)]
    torch.testing.assert_close(results[0], results[1], rtol=1e-15, atol=0)
    x = away_from_zero((2, 3, 2))
    jac = [torch.autograd.functional.jacobian(fn, x, vectorize=True) for fn in (fast, native)]
    torch.testing.assert_close(jac[0], jac[1], rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,fast,native", UNARY, ids=[n for n, _, _ in UNARY])
def test_forward_over_reverse_carries_the_tangent(always_fastrelu, name, fast, native):
    """A graph built before a dual level opens, then differentiated with a dual gradient."""
    import torch.autograd.forward_ad as fwad
    x = away_from_zero((4, 3, 5)).requires_grad_()
    g, v = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    for create_graph in (False, True):
        results = []
        for fn in (fast, native):
            y = fn(x)
            with fwad.dual_level():
                gx, = torch.autograd.grad(y, x, fwad.make_dual(g, v), create_graph=create_graph)
                results.append(fwad.unpack_dual(gx))
        assert results[0].tangent is not None
        torch.testing.assert_close(results[0].primal, results[1].primal, rtol=1e-15, atol=0)
        torch.testing.assert_close(results[0].tangent, results[1].tangent, rtol=1e-15, atol=0)


def test_lazily_negated_tensors(always_fastrelu):
    """conj().imag is a view with the negative bit set: its values, not its memory's."""
    z = torch.randn(2, 3, 4, dtype=torch.complex64)
    for fast, native in [(lambda t: frt.elu(t), lambda t: F.elu(t)),
                         (lambda t: frt.PReLU(3)(t), lambda t: torch.nn.PReLU(3)(t)),
                         (lambda t: frt.relu(t, inplace=True), lambda t: F.relu(t, inplace=True))]:
        a, b = z.clone().conj().imag, z.clone().conj().imag
        assert a.is_neg()
        assert torch.equal(fast(a), native(b))
        assert torch.equal(a, b)  # in place, both wrote the negated view the same way
    x = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(3, dtype=torch.complex64).conj().imag
    g = torch.randn(2, 3, 4, dtype=torch.complex64).conj().imag
    fast = torch.autograd.grad(frt.prelu(x, w), x, g)[0]
    assert torch.equal(fast, torch.autograd.grad(F.prelu(x, w), x, g)[0])


def test_inference_mode_records_nothing_even_under_enable_grad(always_fastrelu):
    x = torch.randn(2, 3, 4, requires_grad=True)
    with torch.inference_mode(), torch.enable_grad():
        for y in (frt.elu(x), frt.PReLU(3)(torch.randn(2, 3, 4)), frt.relu(x)):
            assert not y.requires_grad and y.grad_fn is None
        leaf = torch.randn(2, 3, requires_grad=True)
        frt.relu(leaf, inplace=True)  # PyTorch allows it there, as nothing is recorded
        assert (leaf >= 0).all()


def test_double_backward_at_zero_follows_pytorch(always_fastrelu):
    """PyTorch's double backward takes x < 0 for ELU and x >= 0 as PReLU's positive side."""
    x0 = torch.tensor([[0.0, -1.0, 1.0, -0.0, float("nan")]], dtype=torch.float64).T
    results = []
    for elu, prelu in ((frt.elu, frt.prelu), (F.elu, F.prelu)):
        x = x0.clone().requires_grad_()
        w = torch.tensor([0.25], dtype=torch.float64, requires_grad=True)
        g = torch.ones_like(x, requires_grad=True)
        dx, = torch.autograd.grad(elu(x, 2.0), x, g, create_graph=True)
        second = torch.autograd.grad(dx.sum(), (x, g))
        dx, dw = torch.autograd.grad(prelu(x, w), (x, w), g, create_graph=True)
        third = torch.autograd.grad(dx.sum() + dw.sum(), (x, w, g))
        results.append(second + third)
    for fast, native in zip(*results):
        torch.testing.assert_close(fast, native, rtol=1e-15, atol=0, equal_nan=True)


def test_inplace_on_possibly_overlapping_elements_runs_as_pytorch(always_fastrelu):
    """Elements that may share memory (PyTorch cannot tell): PyTorch proceeds, so does this."""
    base = torch.randn(34)
    a, b = base.clone(), base.clone()
    frt.elu(a.as_strided((16, 4), (2, 1)), inplace=True)
    F.elu(b.as_strided((16, 4), (2, 1)), inplace=True)
    assert torch.equal(a, b)


def test_more_dimensions_than_numpy_takes(always_fastrelu):
    x = torch.randn([1] * 65 + [3])
    assert torch.equal(frt.elu(x), F.elu(x))


def test_crossover_tables_are_read_at_every_call(monkeypatch):
    calls = []
    monkeypatch.setitem(frt.CROSSOVER, "cpu", dict(frt.CROSSOVER["cpu"], elu=0))
    monkeypatch.setattr(frt._ELU, "forward",
                        lambda *args, f=frt._ELU.forward: calls.append(1) or f(*args))
    x = torch.randn(4, 3)
    frt.elu(x)
    frt.ELU()(x)
    assert len(calls) == 2  # the functional op and the module both took fastrelu's kernels


def test_export_leaves_the_statistics_of_real_batches(always_fastrelu):
    """torch.export traces with fake tensors: no batch's statistics come of it."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), frt.ReLU(track_stats=True))
    torch.export.export(m, (torch.randn(5, 4),))
    assert m[1].stats is None
    x = torch.randn(5, 4)
    m(x)
    torch.export.export(m, (torch.randn(5, 4),))
    assert m[1].stats.positive.tolist() == (m[0](x) > 0).sum(0).tolist()


def test_an_integer_beyond_float64_gets_pytorch_s_error(always_fastrelu):
    x = torch.randn(4, 3)
    for fn in (F.leaky_relu, frt.leaky_relu, F.elu, frt.elu):
        with pytest.raises(OverflowError, match="int too big to convert"):
            fn(x, 10**400)
