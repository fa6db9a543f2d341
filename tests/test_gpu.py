"""The GPU backend against the NumPy reference, on numba device arrays (and CuPy and PyTorch
arrays on a real GPU).

On a machine without a GPU this file runs under numba's CUDA simulator, through
tests/test_gpu_simulator.py (small arrays; the simulator runs every CUDA thread in Python).  What
the simulator cannot show: real speed, CuPy/PyTorch interop and streams (it has no real device
memory) and type checking (tests/test_gpu_simulator.py compiles every kernel to PTX for that).
"""
import os

import numpy as np
import pytest

numba = pytest.importorskip("numba")
from numba import cuda  # noqa: E402

import fastrelu  # noqa: E402
from helpers import assert_bitwise, edge_array  # noqa: E402
from fastrelu import reference  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATOR and not cuda.is_available():
    pytest.skip("no CUDA GPU: tests/test_gpu_simulator.py runs this file under numba's simulator",
                allow_module_level=True)

real_gpu = pytest.mark.skipif(SIMULATOR, reason="needs a real GPU")
DTYPES = [np.float16, np.float32, np.float64]
SHAPES = [(37,), (5, 9), (3, 4, 6)] if SIMULATOR else [(1000,), (64, 300), (8, 16, 33, 33)]


def dev(a):
    return cuda.to_device(a if a.flags.c_contiguous or a.flags.f_contiguous else a.copy())


def host(a):
    kind = type(a).__module__
    if kind.startswith("torch"):
        return a.cpu().numpy()
    if kind.startswith("cupy"):
        return a.get()
    return a.copy_to_host().reshape(a.shape)


def check(name, actual, expected):
    actual = host(actual)
    if name == "elu":  # libdevice's expm1/exp against NumPy's: a few ulp
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                                   rtol=4 * np.finfo(expected.dtype).eps, atol=0, equal_nan=True)
    else:
        assert_bitwise(actual, expected)


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    e = edge_array(dtype)
    flat = x.reshape(-1)
    flat[: min(e.size, flat.size)] = e[: flat.size]
    g = rng.standard_normal(shape).astype(dtype)
    return x, g


OPS = {
    "relu": (lambda x, **k: fastrelu.relu(x, **k), lambda g, x, **k: fastrelu.relu_backward(g, x, **k),
             reference.relu, reference.relu_backward),
    "leaky_relu": (lambda x, **k: fastrelu.leaky_relu(x, 0.2, **k),
                   lambda g, x, **k: fastrelu.leaky_relu_backward(g, x, 0.2, **k),
                   lambda x: reference.leaky_relu(x, 0.2),
                   lambda g, x: reference.leaky_relu_backward(g, x, 0.2)),
    "elu": (lambda x, **k: fastrelu.elu(x, 0.7, **k),
            lambda g, x, **k: fastrelu.elu_backward(g, x, 0.7, **k),
            lambda x: reference.elu(x, 0.7), lambda g, x: reference.elu_backward(g, x, 0.7)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_elementwise_ops(name, shape, dtype):
    fwd, bwd, ref_fwd, ref_bwd = OPS[name]
    x, g = data(shape, dtype)
    y = fwd(dev(x))
    assert type(y).__module__.startswith("numba")
    check(name, y, ref_fwd(x))
    check(name, bwd(dev(g), dev(x)), ref_bwd(g, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((6, 5), 1), ((3, 4, 5), 1), ((3, 4, 5), -1),
                                        ((2, 3, 4, 5), 1)])
def test_prelu_per_channel(shape, axis, dtype):
    x, g = data(shape, dtype, 1)
    w = np.linspace(-0.5, 1.5, shape[axis]).astype(dtype)
    check("prelu", fastrelu.prelu(dev(x), dev(w), axis), reference.prelu(x, w, axis))
    dx, dw = fastrelu.prelu_backward(dev(g), dev(x), dev(w), axis)
    ref_dx, ref_dw = reference.prelu_backward(g, x, w, axis)
    check("prelu", dx, ref_dx)
    finite = np.isfinite(ref_dw)
    got = host(dw)
    assert got.dtype == dtype and got.shape == w.shape
    np.testing.assert_array_equal(np.isfinite(got), finite)
    tol = {np.float16: 5e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(got[finite].astype(np.float64),
                               ref_dw[finite].astype(np.float64), rtol=tol, atol=tol)


def test_prelu_shared_weight_and_python_weight():
    x, g = data((4, 6), np.float32, 2)
    for w in (np.array([0.3], np.float32), np.array(0.3, np.float32)):
        check("prelu", fastrelu.prelu(dev(x), dev(w)), reference.prelu(x, w))
        dx, dw = fastrelu.prelu_backward(dev(g), dev(x), dev(w))
        assert host(dw).shape == w.shape
        np.testing.assert_allclose(host(dw), reference.prelu_backward(g, x, w)[1], rtol=1e-5)
    check("prelu", fastrelu.prelu(dev(x), 0.3), reference.prelu(x, np.float32(0.3)))


def test_stats_on_the_gpu():
    x, _ = data((8, 5, 7), np.float32, 3)
    y, stats = fastrelu.relu(dev(x), stats=True, axis=1)
    check("relu", y, reference.relu(x))
    np.testing.assert_array_equal(stats.positive, (x > 0).sum(axis=(0, 2)))
    y, stats = fastrelu.leaky_relu(dev(x), 0.1, stats=True, axis=-1)
    np.testing.assert_array_equal(stats.positive, (x > 0).sum(axis=(0, 1)))


@pytest.mark.parametrize("activation,param", [("relu", None), ("leaky_relu", 0.2), ("elu", 1.0)])
def test_bias_activation_on_the_gpu(activation, param):
    x, g = data((6, 9), np.float32, 4)
    b = np.linspace(-1, 1, 9).astype(np.float32)
    expected, e_stats = fastrelu.bias_activation(x, b, activation, param, stats=True)
    y, stats = fastrelu.bias_activation(dev(x), dev(b), activation, param, stats=True)
    check("elu" if activation == "elu" else "relu", y, expected)
    np.testing.assert_array_equal(stats.positive, e_stats.positive)
    dx, db = fastrelu.bias_activation_backward(dev(g), y, activation, param)
    e_dx, e_db = fastrelu.bias_activation_backward(g, expected, activation, param)
    np.testing.assert_allclose(host(dx), e_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(host(db), e_db, rtol=1e-5, atol=1e-6)


def test_out_and_in_place():
    x, g = data((5, 9), np.float32, 5)
    dx_ = dev(x)
    out = cuda.device_array_like(dx_)
    assert fastrelu.leaky_relu(dx_, 0.2, out=out) is out
    check("leaky_relu", out, reference.leaky_relu(x, 0.2))
    assert fastrelu.relu(dx_, out=dx_) is dx_
    check("relu", dx_, reference.relu(x))
    dg = dev(g)
    assert fastrelu.relu_backward(dg, dev(x), out=dg) is dg
    check("relu", dg, reference.relu_backward(g, x))


def test_fortran_ordered_device_arrays():
    x, g = data((6, 7), np.float64, 6)
    xf = cuda.to_device(np.asfortranarray(x))
    y = fastrelu.elu(xf)
    check("elu", y, reference.elu(x))
    w = np.linspace(0.1, 0.7, 7)
    check("prelu", fastrelu.prelu(xf, cuda.to_device(w), 1), reference.prelu(x, w, 1))


def test_explicit_stream():
    x, _ = data((40,), np.float32, 7)
    stream = cuda.stream()
    y = fastrelu.relu(cuda.to_device(x, stream=stream), stream=stream)
    stream.synchronize()
    check("relu", y, reference.relu(x))


def test_mixing_host_and_device_is_an_error():
    x, g = data((4, 5), np.float32, 8)
    with pytest.raises(TypeError, match="mixing host and device"):
        fastrelu.relu_backward(g, dev(x))
    with pytest.raises(TypeError, match="must be a CUDA array"):
        fastrelu.relu(dev(x), out=np.empty_like(x))
    with pytest.raises(TypeError, match="mixing host and device"):
        fastrelu.prelu(dev(x), np.ones(5, np.float32))
    with pytest.raises(TypeError, match="stream= applies to CUDA arrays only"):
        fastrelu.relu(x, stream=cuda.stream())


def test_device_validation():
    x, g = data((4, 5), np.float32, 9)
    with pytest.raises(TypeError, match="has dtype float.. but .* has dtype float..; they must"):
        fastrelu.relu_backward(dev(g.astype(np.float64)), dev(x))
    with pytest.raises(ValueError, match="grad has shape"):
        fastrelu.relu_backward(dev(g.T.copy()), dev(x))
    with pytest.raises(TypeError, match="has dtype int32"):
        fastrelu.relu(cuda.to_device(np.zeros(4, np.int32)))
    with pytest.raises(ValueError, match="weight has 4 elements but x has 5"):
        fastrelu.prelu(dev(x), dev(np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="out has shape"):
        fastrelu.relu(dev(x), out=cuda.device_array((5, 4), np.float32))
    with pytest.raises(TypeError, match="strided numba device array"):
        fastrelu.relu(dev(np.ones((4, 6), np.float32))[:, ::2])


def test_prelu_backward_into_out_pair():
    for dtype in DTYPES:  # float16 sums go through a float32 accumulator, the others directly
        x, g = data((6, 4, 5), dtype, 10)
        w = np.array([0.1, -0.3, 0.5, 2.0], dtype)
        dx_out, dw_out = cuda.device_array(x.shape, dtype), cuda.device_array(4, dtype)
        dx, dw = fastrelu.prelu_backward(dev(g), dev(x), dev(w), out=(dx_out, dw_out))
        assert dx is dx_out and dw is dw_out
        ref_dx, ref_dw = reference.prelu_backward(g, x, w)
        check("prelu", dx, ref_dx)
        finite = np.isfinite(ref_dw)
        np.testing.assert_allclose(host(dw)[finite].astype(np.float64),
                                   ref_dw[finite].astype(np.float64), rtol=5e-3)
        _, db = fastrelu.bias_activation_backward(dev(g), dev(x), "relu", out=(None, dw_out))
        assert db is dw_out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_parameter_gradient_into_an_input_reads_the_input_first(dtype):
    """out[1] may be the weight itself, as on the CPU: the sums must not be zeroed in it before
    the kernel has read it."""
    x, g = data((6, 4, 5), dtype, 12)
    w = np.array([0.1, -0.3, 0.5, 2.0], dtype)
    ref_dx, ref_dw = reference.prelu_backward(g, x, w)
    dw_in = dev(w)
    dx, dw = fastrelu.prelu_backward(dev(g), dev(x), dw_in, out=(None, dw_in))
    assert dw is dw_in
    check("prelu", dx, ref_dx)
    finite = np.isfinite(ref_dw)
    np.testing.assert_allclose(host(dw)[finite].astype(np.float64),
                               ref_dw[finite].astype(np.float64), rtol=5e-3)
    # a bias gradient may not take the place of the incoming gradient (not its parameter)
    g1 = np.arange(-3, 4, dtype=dtype)
    g_in = dev(g1)
    with pytest.raises(ValueError, match=r"out\[1\] is grad"):
        fastrelu.bias_activation_backward(g_in, dev(np.zeros(7, dtype)), "relu", None, 0,
                                          out=(None, g_in))
    assert_bitwise(host(g_in), g1)


def test_hostile_arguments_on_the_gpu_path():
    x = dev(np.array(-2.0, np.float32))
    w = dev(np.array(0.5, np.float32))
    assert host(fastrelu.prelu(x, w)).shape == () and float(host(fastrelu.prelu(x, w))) == -1.0
    dx, dw = fastrelu.prelu_backward(x, x, w)
    assert host(dx).shape == () and host(dw).shape == ()
    X = dev(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="weight must be an array"):
        fastrelu.prelu(X, None)
    with pytest.raises(TypeError, match="grad must be a CUDA array like the other arrays, not None"):
        fastrelu.relu_backward(None, X)
    buf = dev(np.full(12, 0.5, np.float32))
    with pytest.raises(ValueError, match="out partially overlaps weight"):
        fastrelu.prelu(X, buf[:3], out=buf.reshape(4, 3))
    empty = dev(np.zeros((0, 3), np.float32))
    y, stats = fastrelu.relu(empty, stats=True)
    assert host(y).shape == (0, 3) and stats.positive.tolist() == [0, 0, 0]
    assert not stats.dead.any()


def test_numba_arrays_of_mixed_memory_orders_are_refused():
    x, g = data((4, 6), np.float32, 11)
    xf = cuda.to_device(np.asfortranarray(x))
    with pytest.raises(TypeError, match="mix C and Fortran memory orders"):
        fastrelu.relu_backward(dev(g), xf)
    with pytest.raises(TypeError, match="mix C and Fortran memory orders"):
        fastrelu.relu(xf, out=cuda.device_array(x.shape, np.float32))
    with pytest.raises(TypeError, match="strided numba device array"):
        fastrelu.prelu_backward(dev(g), dev(x), dev(np.ones(6, np.float32)),
                                out=(None, cuda.device_array(12, np.float32)[::2]))
    y = cuda.device_array(x.shape, np.float32, order="F")
    assert fastrelu.relu(xf, out=y) is y  # one order: runs on the transposes
    check("relu", y, reference.relu(x))


def test_bad_streams_are_refused():
    x, _ = data((4, 6), np.float32, 12)
    for bad in ("0", 1.5, -1, True, object()):
        with pytest.raises(TypeError, match="stream must be a numba, CuPy or PyTorch"):
            fastrelu.relu(dev(x), stream=bad)


class ForeignArray:
    """A CUDA array from a library fastrelu does not know: it only exports
    __cuda_array_interface__ (version 3, naming the legacy default stream).  Under the simulator,
    whose numba has no as_cuda_array, it describes host memory, and the `foreign` fixture supplies
    one that wraps that memory in a simulator array, as the real function wraps device memory."""

    def __init__(self, a):
        self.inner = a if SIMULATOR else cuda.to_device(a)

    @property
    def __cuda_array_interface__(self):
        if SIMULATOR:
            interface = dict(self.inner.__array_interface__, version=3)
            interface.pop("descr", None)
        else:
            interface = dict(self.inner.__cuda_array_interface__)
        interface["stream"] = 1
        return interface


@pytest.fixture
def foreign(monkeypatch):
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        def as_cuda_array(obj, sync=True):  # the memory the interface describes, no copy
            assert obj.__cuda_array_interface__["data"][0] == obj.inner.ctypes.data
            return FakeCUDAArray(obj.inner)

        monkeypatch.setattr(cuda, "as_cuda_array", as_cuda_array, raising=False)
    return ForeignArray


@pytest.mark.parametrize("order", ["C", "F"])
def test_other_cuda_array_interface_producers(foreign, order):
    x, g = data((6, 8), np.float32, 13)
    x, g = (np.asarray(a, order=order) for a in (x, g))
    y = fastrelu.leaky_relu(foreign(x), 0.2)
    assert type(y).__module__.startswith("numba")  # results of unknown producers: numba arrays
    check("leaky_relu", y, reference.leaky_relu(x, 0.2))
    w = np.linspace(-1, 1, 8).astype(np.float32)
    dx, dw = fastrelu.prelu_backward(foreign(g), foreign(x), foreign(w))
    ref_dx, ref_dw = reference.prelu_backward(g, x, w)
    check("prelu", dx, ref_dx)
    np.testing.assert_allclose(host(dw), ref_dw, rtol=1e-5, atol=1e-6)
    xin = foreign(x.copy(order=order))
    assert fastrelu.relu(xin, out=xin) is xin  # in place
    with pytest.raises(TypeError, match="strided cai device array"):
        fastrelu.relu(foreign(x[:, ::2]))


# ---- a real GPU only: CuPy and PyTorch interop, streams, large arrays ----------------------------

@real_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_cupy_in_cupy_out(dtype):
    cupy = pytest.importorskip("cupy")
    x, g = data((64, 1000), dtype)
    cx, cg = cupy.asarray(x), cupy.asarray(g)
    y = fastrelu.leaky_relu(cx, 0.2)
    assert isinstance(y, cupy.ndarray)
    check("leaky_relu", y, reference.leaky_relu(x, 0.2))
    w = cupy.asarray(np.linspace(0, 1, 1000).astype(dtype))
    dx, dw = fastrelu.prelu_backward(cg, cx, w)
    assert isinstance(dx, cupy.ndarray) and isinstance(dw, cupy.ndarray)
    check("prelu", dx, reference.prelu_backward(g, x, w.get())[0])
    strided = cx[:, ::2]
    check("relu", fastrelu.relu(strided), reference.relu(x[:, ::2]))


@real_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_torch_in_torch_out(dtype):
    torch = pytest.importorskip("torch")
    x, _ = data((64, 1000), dtype)
    tx = torch.from_numpy(x).cuda()
    y = fastrelu.relu(tx)
    assert isinstance(y, torch.Tensor) and y.is_cuda
    check("relu", y, reference.relu(x))
    assert_bitwise(host(y), torch.relu(tx).cpu().numpy())
    assert_bitwise(host(fastrelu.leaky_relu(tx, 0.01)),
                   torch.nn.functional.leaky_relu(tx, 0.01).cpu().numpy())
    with pytest.raises(TypeError, match="detach"):
        fastrelu.relu(tx.clone().requires_grad_())
    check("relu", fastrelu.relu(tx.t()), reference.relu(x.T))


@real_gpu
def test_torch_stream_is_used():
    torch = pytest.importorskip("torch")
    x, _ = data((1 << 20,), np.float32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        tx = torch.from_numpy(x).cuda(non_blocking=False)
        y = fastrelu.relu(tx)
        expected = torch.relu(tx)
    s.synchronize()
    assert_bitwise(host(y), host(expected))


@real_gpu
def test_large_arrays():
    x, g = data((1 << 24,), np.float32)
    check("leaky_relu", fastrelu.leaky_relu(dev(x), 0.01), reference.leaky_relu(x, 0.01))
    x2 = x.reshape(4096, 4096)
    w = np.linspace(0, 1, 4096).astype(np.float32)
    dx, dw = fastrelu.prelu_backward(dev(g.reshape(x2.shape)), dev(x2), dev(w))
    ref_dx, ref_dw = reference.prelu_backward(g.reshape(x2.shape), x2, w)
    check("prelu", dx, ref_dx)
    np.testing.assert_allclose(host(dw), ref_dw, rtol=1e-4, atol=1e-3)


@real_gpu
def test_explicit_library_streams_and_strided_outputs():
    cupy = pytest.importorskip("cupy")
    x, g = data((256, 64), np.float16)
    w = np.linspace(0, 1, 64).astype(np.float16)
    ref_dx, ref_dw = reference.prelu_backward(g, x, w)
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        cx, cg, cw = cupy.asarray(x), cupy.asarray(g), cupy.asarray(w)
        dw_out = cupy.zeros(128, np.float16)[::2]
        s.synchronize()
    dx, dw = fastrelu.prelu_backward(cg, cx, cw, out=(None, dw_out), stream=s)
    s.synchronize()
    assert dw is dw_out
    check("prelu", dx, ref_dx)
    np.testing.assert_allclose(host(dw).astype(np.float64), ref_dw, rtol=5e-3, atol=5e-3)

    torch = pytest.importorskip("torch")
    ts = torch.cuda.Stream()
    with torch.cuda.stream(ts):
        tx = torch.from_numpy(x.astype(np.float32)).cuda().t()  # F-ordered
        y = fastrelu.leaky_relu(tx, 0.1, stream=ts)
        y2 = fastrelu.leaky_relu(tx, 0.1)  # the current stream, ts
    ts.synchronize()
    assert_bitwise(host(y), reference.leaky_relu(x.astype(np.float32).T, 0.1))
    assert_bitwise(host(y2), host(y))


@real_gpu
def test_arrays_on_a_second_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, _ = data((1000,), np.float32)
    t1 = torch.from_numpy(x).to("cuda:1")
    y = fastrelu.relu(t1)
    assert y.device == t1.device
    check("relu", y, reference.relu(x))
    with pytest.raises(ValueError, match="out is on CUDA device 0 but x is on device 1"):
        fastrelu.relu(t1, out=torch.empty(1000, device="cuda:0"))


def test_stream_handles_of_every_kind_of_stream():
    from fastrelu import _gpu

    class Protocol:  # the CUDA stream protocol (cuda.core, recent CuPy and numba)
        def __cuda_stream__(self):
            return (0, 1234)

    class TorchLike:
        cuda_stream = 5678

    class CupyLike:
        ptr = 91011

    assert _gpu._stream_handle(Protocol()) == 1234
    assert _gpu._stream_handle(TorchLike()) == 5678
    assert _gpu._stream_handle(CupyLike()) == 91011
    assert _gpu._stream_handle(42) == 42


def bfloat16_case(seed):
    """(x, g, w) in bfloat16, (4, 6, 5) with 6 channels: x starts with NaN, -0 and a value that
    rounds; w spans both signs."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = data((4, 6, 5), np.float32, seed)[0].astype(bf16)
    g = data((4, 6, 5), np.float32, seed + 1)[0].astype(bf16)
    x.reshape(-1)[:3] = np.array([np.nan, -0.0, 1.00390625], np.float32).astype(bf16)
    return x, g, np.linspace(-0.5, 1.5, 6).astype(bf16)


def test_bfloat16_on_the_gpu_matches_the_cpu_bit_for_bit():
    """bfloat16 CUDA arrays computed in float32 and rounded to nearest even as on the CPU (NaN
    stays NaN, with the CPU's bits): flat, per-channel and gradient-summing paths."""
    x, g, w = bfloat16_case(20)
    for gpu, cpu in ((fastrelu.leaky_relu(dev(x), 0.3), fastrelu.leaky_relu(x, 0.3)),
                     (fastrelu.prelu(dev(x), dev(w)), fastrelu.prelu(x, w)),
                     (fastrelu.relu_backward(dev(g), dev(x)), fastrelu.relu_backward(g, x))):
        got = host(gpu)
        assert got.dtype == x.dtype and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.uint16), cpu.view(np.uint16))
    # ELU: libdevice's expm1 against the CPU's, within one bfloat16 rounding
    np.testing.assert_allclose(host(fastrelu.elu(dev(x), 0.7)).astype(np.float32),
                               fastrelu.elu(x, 0.7).astype(np.float32), rtol=2 ** -8,
                               equal_nan=True)
    dx, dw = fastrelu.prelu_backward(dev(g), dev(x), dev(w))
    ref_dx, ref_dw = fastrelu.prelu_backward(g, x, w)
    np.testing.assert_array_equal(host(dx).view(np.uint16), ref_dx.view(np.uint16))
    assert host(dw).dtype == x.dtype
    np.testing.assert_allclose(host(dw).astype(np.float32), ref_dw.astype(np.float32),
                               rtol=2 ** -7, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_unaligned_views_and_tails_of_the_vector_kernels(dtype):
    """Arrays not 16-byte aligned take the kernel's one-element accesses; aligned ones of any
    length end in whole vectors, then single elements."""
    x, g = data((1 + 16 * 3 + 7,), dtype, 22)
    buf = dev(x)
    shifted = buf[1:]  # one element past a 16-byte boundary
    check("leaky_relu", fastrelu.leaky_relu(shifted, 0.2), reference.leaky_relu(x[1:], 0.2))
    check("relu", fastrelu.relu_backward(dev(g)[1:], shifted),
          reference.relu_backward(g[1:], x[1:]))
    for n in (1, 7, 8, 9, 33, x.size):
        check("relu", fastrelu.relu(dev(x[:n])), reference.relu(x[:n]))


def test_warp_reduction_across_channel_boundaries():
    """Channels that start inside a warp (inner = 3, 5, 40 columns) or span several warps: each
    channel's lanes are folded into its first lane, and only that lane adds to the total."""
    for shape in ((3, 11, 3), (2, 13, 5), (2, 3, 40), (50, 1)):
        x, g = data(shape, np.float32, 23)
        w = np.linspace(-1, 1, shape[1]).astype(np.float32)
        _, stats = fastrelu.relu(dev(x), stats=True, axis=1)
        np.testing.assert_array_equal(
            stats.positive, (x > 0).sum(axis=tuple(i for i in range(x.ndim) if i != 1)))
        _, dw = fastrelu.prelu_backward(dev(g), dev(x), dev(w))
        np.testing.assert_allclose(host(dw), reference.prelu_backward(g, x, w)[1], rtol=1e-5,
                                   atol=1e-5)


# ---- fastrelu.torch on CUDA tensors --------------------------------------------------------------

STAND_IN_STREAM = 0x5EED  # the cudaStream_t the stand-in torch.cuda.current_stream() returns


@pytest.fixture
def torch_cuda(monkeypatch):
    """PyTorch CUDA tensors for fastrelu.torch: real ones on a GPU.  Under the simulator, CPU
    tensors pose as CUDA tensors (is_cuda, hence __cuda_array_interface__ over their memory),
    torch.cuda.current_stream() returns a stream whose handle is STAND_IN_STREAM, numba's views
    of the interface wrap that memory in simulator arrays; every launch's stream and every view's
    type are recorded: (torch, {"launch_streams", "current_stream_devices", "typestrs"})."""
    torch = pytest.importorskip("torch")
    import fastrelu.torch as frt
    from fastrelu import _gpu

    for name in ("relu", "leaky_relu", "elu", "prelu"):
        monkeypatch.setitem(frt.CROSSOVER["cuda"], name, 0)
    seen = {"launch_streams": [], "current_stream_devices": [], "typestrs": []}
    if not SIMULATOR:
        return torch, seen
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    class CurrentStream:
        cuda_stream = STAND_IN_STREAM

    def current_stream(device=None):
        seen["current_stream_devices"].append(device)
        return CurrentStream()

    def external_stream(handle):  # the simulator has no external streams
        s = cuda.stream()
        s.external_handle = handle
        return s

    def from_cuda_array_interface(desc, owner=None, sync=True):  # the memory, no copy
        seen["typestrs"].append(desc["typestr"])
        dtype = np.dtype(desc["typestr"])
        count = int(np.prod(desc["shape"]))
        memory = (ctypes.c_char * (count * dtype.itemsize)).from_address(desc["data"][0])
        memory.owner = owner  # kept alive by the view, as numba's views keep theirs
        return FakeCUDAArray(np.frombuffer(memory, dtype, count).reshape(desc["shape"]))

    launch = _gpu._launch

    def recording_launch(kernel, argtypes, grid, block, s, device_id, args):
        seen["launch_streams"].append(getattr(s, "external_handle", None))
        launch(kernel, argtypes, grid, block, s, device_id, args)

    import ctypes

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(cuda, "external_stream", external_stream, raising=False)
    monkeypatch.setattr(cuda, "from_cuda_array_interface", from_cuda_array_interface,
                        raising=False)
    monkeypatch.setattr(_gpu, "_launch", recording_launch)
    _gpu._external_stream.cache_clear()
    yield torch, seen
    _gpu._external_stream.cache_clear()


def _to_cuda(torch, a):
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.kind == "V" else \
        torch.from_numpy(a)
    return t if SIMULATOR else t.cuda()


def _bits(t):
    return t.detach().cpu().view(__import__("torch").int16).numpy()


def test_bfloat16_cuda_tensors_through_fastrelu_torch(torch_cuda):
    """bfloat16 CUDA tensors take fastrelu's kernels through fastrelu.torch (forward, backward,
    PReLU weight gradient, statistics) on the tensor's current stream, with the CPU kernels'
    results bit for bit (the weight gradient: within its bfloat16 rounding, its float32 sums
    being added in another order)."""
    torch, seen = torch_cuda
    import fastrelu.torch as frt

    x, g, w = bfloat16_case(30)

    for op, cpu_forward, cpu_backward in (
            (lambda t: frt.leaky_relu(t, 0.3), lambda: fastrelu.leaky_relu(x, 0.3),
             lambda: fastrelu.leaky_relu_backward(g, x, 0.3)),
            (frt.relu, lambda: fastrelu.relu(x), lambda: fastrelu.relu_backward(g, x))):
        tx = _to_cuda(torch, x.copy()).requires_grad_()
        y = op(tx)
        y.backward(_to_cuda(torch, g.copy()))
        assert y.dtype == torch.bfloat16 and tx.grad.dtype == torch.bfloat16
        np.testing.assert_array_equal(_bits(y), cpu_forward().view(np.int16))
        np.testing.assert_array_equal(_bits(tx.grad), cpu_backward().view(np.int16))

    tx = _to_cuda(torch, x.copy()).requires_grad_()
    tw = _to_cuda(torch, w.copy()).requires_grad_()
    y = frt.prelu(tx, tw)
    y.backward(_to_cuda(torch, g.copy()))
    ref_dx, ref_dw = fastrelu.prelu_backward(g, x, w, 1)
    np.testing.assert_array_equal(_bits(y), fastrelu.prelu(x, w, 1).view(np.int16))
    np.testing.assert_array_equal(_bits(tx.grad), ref_dx.view(np.int16))
    assert tw.grad.dtype == torch.bfloat16
    np.testing.assert_allclose(tw.grad.float().cpu().numpy(), ref_dw.astype(np.float32),
                               rtol=2 ** -7)

    module = frt.ReLU(track_stats=True)
    y = module(_to_cuda(torch, x.copy()))
    np.testing.assert_array_equal(_bits(y), fastrelu.relu(x).view(np.int16))
    np.testing.assert_array_equal(module.stats.positive,
                                  (x.astype(np.float32) > 0).sum(axis=(0, 2)))

    if SIMULATOR:  # every kernel ran on the tensors' current stream; bfloat16 as 16-bit patterns
        assert len(seen["launch_streams"]) == 7  # 3 forward, 3 backward, 1 with statistics
        assert set(seen["launch_streams"]) == {STAND_IN_STREAM}
        assert seen["current_stream_devices"] and \
            {str(d) for d in seen["current_stream_devices"]} == {"cpu"}
        # the data as uint16 patterns; float32 weight-gradient sums and int64 counts
        assert set(seen["typestrs"]) == {"<u2", "<f4", "<i8"}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_float_cuda_tensors_through_fastrelu_torch(torch_cuda, dtype):
    torch, seen = torch_cuda
    import fastrelu.torch as frt

    x, g = data((3, 4, 5), dtype, 32)
    tx = _to_cuda(torch, x.copy()).requires_grad_()
    y = frt.elu(tx, 0.7)
    y.backward(_to_cuda(torch, g.copy()))
    check("elu", y.detach(), fastrelu.elu(x, 0.7))
    # from the input, g * alpha * exp(x), as on the CPU and in PyTorch
    check("elu", tx.grad, fastrelu.elu_backward(g, x, 0.7))
    if SIMULATOR:
        assert set(seen["launch_streams"]) == {STAND_IN_STREAM}
        assert set(seen["typestrs"]) == {np.dtype(dtype).newbyteorder("<").str}
