"""Agreement with PyTorch's CPU ops and autograd, where PyTorch is installed (it is optional: the
contract itself is tested against the reference and hand-worked values in the other files)."""
import numpy as np
import pytest

import fastrelu
from helpers import assert_bitwise, assert_close_ulp, edge_array

torch = pytest.importorskip("torch")
F = torch.nn.functional
DTYPES = [np.float16, np.float32, np.float64]  # PyTorch computes float16 in float32 too


def inputs(dtype, shape=(4, 6, 5, 7)):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    flat = x.reshape(-1)
    e = edge_array(dtype)
    flat[: e.size] = e
    g = rng.standard_normal(shape).astype(dtype)
    g.reshape(-1)[e.size: 2 * e.size] = e
    return x, g


def torch_grads(fn, x, g, *extra):
    tx = torch.from_numpy(x.copy()).requires_grad_()
    textra = [torch.from_numpy(np.array(e)).requires_grad_() for e in extra]
    y = fn(tx, *textra)
    y.backward(torch.from_numpy(g))
    return y.detach().numpy(), tx.grad.numpy(), [t.grad.numpy() for t in textra]


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu(dtype):
    x, g = inputs(dtype)
    y, dx, _ = torch_grads(F.relu, x, g)
    assert_bitwise(fastrelu.relu(x), y)
    assert_bitwise(fastrelu.relu_backward(g, x), dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.01, 0.0, 0.2, -0.5, 1.5])
def test_leaky_relu(dtype, slope):
    x, g = inputs(dtype)
    y, dx, _ = torch_grads(lambda t: F.leaky_relu(t, slope), x, g)
    assert_bitwise(fastrelu.leaky_relu(x, slope), y)
    assert_bitwise(fastrelu.leaky_relu_backward(g, x, slope), dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_prelu(dtype, channels_last):
    x, g = inputs(dtype)
    w = np.linspace(-0.5, 1.5, 6).astype(dtype)
    if channels_last:
        x, g = np.moveaxis(x, 1, -1).copy(), np.moveaxis(g, 1, -1).copy()
        fn = lambda t, tw: F.prelu(t.movedim(-1, 1), tw).movedim(1, -1)  # noqa: E731
        axis = -1
    else:
        fn, axis = F.prelu, 1
    y, dx, (dw,) = torch_grads(fn, x, g, w)
    assert_bitwise(fastrelu.prelu(x, w, axis), y)
    fdx, fdw = fastrelu.prelu_backward(g, x, w, axis)
    assert_bitwise(fdx, dx)
    finite = np.isfinite(dw)
    np.testing.assert_array_equal(np.isfinite(fdw), finite)
    rtol = {np.float16: 1e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(fdw[finite], dw[finite], rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_elu(dtype, alpha):
    x, g = inputs(dtype)
    y, dx, _ = torch_grads(lambda t: F.elu(t, alpha), x, g)
    assert_close_ulp(fastrelu.elu(x, alpha), y, 4)
    # PyTorch's vectorized CPU ELU backward gives NaN for a NaN input, where its scalar path and
    # the contract (NaN <= 0 is false) give grad; compare the rest, and the contract for NaN
    dx_fast = fastrelu.elu_backward(g, x, alpha)
    nan_x = np.isnan(x)
    assert_close_ulp(dx_fast[~nan_x], dx[~nan_x], 4)
    assert_bitwise(dx_fast[nan_x], g[nan_x])
