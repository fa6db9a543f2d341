"""bfloat16 (ml_dtypes) on every op and path: computed in float32 and rounded to nearest even,
checked against ml_dtypes' own float32 -> bfloat16 conversion and hand-worked ties."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastrelu
from fastrelu import reference
from helpers import assert_bitwise

ml_dtypes = pytest.importorskip("ml_dtypes")  # part of the test extra
BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16(values):
    return np.asarray(values, np.float32).astype(BF16)


def expected(op, *arrays, **kwargs):
    """The float32 result of the reference op, rounded to bfloat16 by ml_dtypes."""
    wide = [a.astype(np.float32) if isinstance(a, np.ndarray) else a for a in arrays]
    return op(*wide, **kwargs).astype(BF16)


def sample(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    edges = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-40, 3e38, -3e38, -1.0078125]
    flat = x.reshape(-1)
    flat[: min(len(edges), flat.size)] = edges[: flat.size]
    return x.astype(BF16)


def test_rounding_to_nearest_even_by_hand():
    # -3 * (1 + 2^-7) = -3.0234375 lies half way between -3.015625 and -3.03125: the even one
    assert float(fastrelu.leaky_relu(bf16([-3.0]), 1.0078125)[0]) == -3.03125
    # -3 * (1 + 3 * 2^-8) = -3.03515625, past half way: rounds away from -3.03125's neighbour
    assert float(fastrelu.leaky_relu(bf16([-3.0]), 1.01171875)[0]) == -3.03125
    # 2 * 0.1: 0.2 in float32 is 0x3E4CCCCD, which rounds up to 0x3E4D in bfloat16
    y = fastrelu.leaky_relu(bf16([-2.0]), 0.1)
    assert y.view(np.uint16)[0] == 0xBE4D
    # NaN stays NaN; signed zeros and infinities follow the contract
    y = fastrelu.leaky_relu(bf16([np.nan, -0.0, -np.inf, np.inf]), 0.5)
    assert np.isnan(y[0].astype(np.float32))
    assert y.view(np.uint16)[1:].tolist() == [0x8000, 0xFF80, 0x7F80]


SIZES = [0, 1, 7, 8, 15, 16, 17, 31, 33, 1000, 1031, 70_001]


@pytest.mark.parametrize("n", SIZES)
def test_elementwise_ops_and_their_gradients(n):
    x, g = sample(n), sample(n, 1)
    assert_bitwise(fastrelu.relu(x), expected(reference.relu, x))
    assert_bitwise(fastrelu.leaky_relu(x, 0.01), expected(reference.leaky_relu, x, 0.01))
    assert_bitwise(fastrelu.relu_backward(g, x), expected(reference.relu_backward, g, x))
    assert_bitwise(fastrelu.leaky_relu_backward(g, x, 0.2),
                   expected(reference.leaky_relu_backward, g, x, 0.2))
    y = fastrelu.elu(x, 0.7).astype(np.float32)
    ref = expected(reference.elu, x, 0.7).astype(np.float32)
    np.testing.assert_allclose(y, ref, rtol=2 * 2.0**-8, equal_nan=True)  # 2 bfloat16 ulp
    dx = fastrelu.elu_backward(g, x, 0.7).astype(np.float32)
    ref = expected(reference.elu_backward, g, x, 0.7).astype(np.float32)
    np.testing.assert_allclose(dx, ref, rtol=2 * 2.0**-8, equal_nan=True)


@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((4, 300, 2), 1), ((2, 5, 7, 3), 1),
                                        ((64, 100), 1), ((3, 1000), 0), ((9,), 0)])
def test_prelu_forward_backward_and_weight_gradient(shape, axis):
    x, g = sample(shape), sample(shape, 1)
    c = x.shape[axis] if x.ndim >= 2 else 1
    w = bf16(np.linspace(-0.5, 1.5, c))
    assert_bitwise(fastrelu.prelu(x, w, axis), expected(reference.prelu, x, w, axis))
    dx, dw = fastrelu.prelu_backward(g, x, w, axis)
    ref_dx, ref_dw = reference.prelu_backward(g.astype(np.float32), x.astype(np.float32),
                                              w.astype(np.float32), axis)
    assert_bitwise(dx, ref_dx.astype(BF16))
    assert dw.dtype == BF16 and dw.shape == w.shape
    finite = np.isfinite(ref_dw)
    np.testing.assert_allclose(dw.astype(np.float32)[finite], ref_dw[finite], rtol=2.0**-8)


def test_weight_gradient_is_summed_in_float64_then_rounded_once():
    x = bf16(np.full(100_000, -1.0))
    g = bf16(np.full(100_000, 1.0078125))
    _, dw = fastrelu.prelu_backward(g, x, bf16([0.25]))
    assert float(dw[0]) == float(np.float32(-100_781.25).astype(BF16))


def test_statistics_bias_in_place_and_0d():
    x = sample((8, 5))
    y, stats = fastrelu.relu(x, stats=True)
    np.testing.assert_array_equal(stats.positive, (x.astype(np.float32) > 0).sum(axis=0))
    b = bf16(np.linspace(-1, 1, 5))
    assert_bitwise(fastrelu.bias_activation(x, b, "leaky_relu", 0.1),
                   (reference.leaky_relu(x.astype(np.float32) + b.astype(np.float32), 0.1))
                   .astype(BF16))
    y = x.astype(np.float32).astype(BF16)
    dx, db = fastrelu.bias_activation_backward(sample((8, 5), 2), fastrelu.relu(y))
    assert dx.dtype == BF16 and db.dtype == BF16 and db.shape == (5,)
    z = x.copy()
    assert fastrelu.leaky_relu(z, 0.3, out=z) is z
    assert_bitwise(z, expected(reference.leaky_relu, x, 0.3))
    zero_d = bf16(-2.0)
    assert fastrelu.leaky_relu(zero_d, 0.5).shape == () and float(fastrelu.prelu(zero_d, 0.25)) \
        == -0.5


def test_bfloat16_scalars_are_0d_arrays():
    # an ml_dtypes scalar is taken as NumPy's float scalars are: as a 0-d array of its dtype
    y = fastrelu.relu(BF16.type(-1.5))
    assert y.dtype == BF16 and y.shape == () and float(y) == 0.0
    assert_bitwise(fastrelu.prelu(bf16([-1.0, 2.0]), BF16.type(0.25)), bf16([-0.25, 2.0]))
    dx = fastrelu.relu_backward(BF16.type(3.0), BF16.type(2.0))
    assert dx.dtype == BF16 and float(dx) == 3.0
    with pytest.raises(TypeError, match="not a real floating-point type"):
        fastrelu.relu(np.zeros(3, "V2"))


def test_channels_last_and_python_parameters():
    x = np.ascontiguousarray(sample((2, 3, 4, 5)).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = [0.25, -0.5, 2.0]  # a Python list takes the data's dtype
    y = fastrelu.prelu(x, w)
    assert y.dtype == BF16 and y.strides == x.strides
    assert_bitwise(y, expected(reference.prelu, x, bf16(w)))


def test_dtype_mixes_and_devices_are_refused():
    with pytest.raises(TypeError, match="out has dtype float16 but the result has dtype bfloat16"):
        fastrelu.relu(sample(4), out=np.empty(4, np.float16))
    with pytest.raises(TypeError, match="weight has dtype float32 but x has dtype bfloat16"):
        fastrelu.prelu(sample((2, 3)), np.ones(3, np.float32))


@pytest.mark.slow
def test_every_simd_level_and_two_threads():
    code = """
        import numpy as np, ml_dtypes, fastrelu
        from fastrelu import reference
        bf = ml_dtypes.bfloat16
        fastrelu.set_num_threads(2)
        x = (np.random.default_rng(0).standard_normal(1 << 20) * 3).astype(np.float32)
        x[:4] = [np.nan, -0.0, -1.0078125, 1e-40]
        y = fastrelu.leaky_relu(x.astype(bf), 0.1)
        ref = reference.leaky_relu(x.astype(bf).astype(np.float32), 0.1).astype(bf)
        same = (y.view(np.uint16) == ref.view(np.uint16)) | np.isnan(ref.astype(np.float32))
        print(fastrelu.info()["simd"], bool(same.all()))
    """
    for level in ("baseline", "avx2", "avx512"):
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                             text=True, env={**os.environ, "FASTRELU_SIMD": level}, timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split()[1] == "True", (level, res.stdout)


@pytest.mark.slow
def test_streamed_outputs():
    n = (65 << 20) // 2 + 7  # past the 64 MiB streaming threshold, with an odd tail
    x = np.full(n, -3.0, BF16)
    x[-1] = 5.0
    y = fastrelu.leaky_relu(x, 1.0078125)
    assert float(y[0]) == -3.03125 and float(y[-1]) == 5.0 and float(y[n // 2]) == -3.03125


def test_agrees_with_pytorch_bfloat16_kernels():
    torch = pytest.importorskip("torch")
    x, g = sample((64, 37)), sample((64, 37), 1)
    tx = torch.from_numpy(x.astype(np.float32)).bfloat16()
    tg = torch.from_numpy(g.astype(np.float32)).bfloat16()

    def as_bf16(t):
        return t.float().numpy().astype(BF16)

    w = bf16(np.linspace(-0.5, 1.5, 37))
    tw = torch.from_numpy(w.astype(np.float32)).bfloat16()
    assert_bitwise(fastrelu.relu(x), as_bf16(torch.relu(tx)))
    assert_bitwise(fastrelu.leaky_relu(x, 0.01),
                   as_bf16(torch.nn.functional.leaky_relu(tx, 0.01)))
    assert_bitwise(fastrelu.prelu(x, w), as_bf16(torch.nn.functional.prelu(tx, tw)))
    txr = tx.clone().requires_grad_()
    torch.nn.functional.leaky_relu(txr, 0.2).backward(tg)
    assert_bitwise(fastrelu.leaky_relu_backward(g, x, 0.2), as_bf16(txr.grad))
    txr, twr = tx.clone().requires_grad_(), tw.clone().requires_grad_()
    torch.nn.functional.prelu(txr, twr).backward(tg)
    dx, dw = fastrelu.prelu_backward(g, x, w)
    assert_bitwise(dx, as_bf16(txr.grad))
    # the weight gradient: the exact sum rounded once, where PyTorch's bfloat16 sums drift (by
    # up to 14% on this data); both against the float64 sum
    xf, gf = x.astype(np.float64), g.astype(np.float64)
    terms = np.where(xf > 0, 0.0, xf * gf)
    exact = np.where(np.isfinite(terms), terms, 0.0).sum(axis=0)
    finite = np.isfinite(dw.astype(np.float32)) & (np.abs(exact) > 1e-3)
    ours = np.abs(dw.astype(np.float64)[finite] / exact[finite] - 1)
    theirs = np.abs(twr.grad.double().numpy()[finite] / exact[finite] - 1)
    assert ours.max() <= 2.0**-8
    assert ours.mean() <= theirs.mean()


def test_bfloat16_scalars_are_parameters():
    """A bfloat16 scalar (or 0-d array) is a real number like np.float16's: 0.5 exactly."""
    x = bf16([-2.0, 3.0])
    for p in (ml_dtypes.bfloat16(0.5), np.array(0.5, BF16)):
        assert_bitwise(fastrelu.leaky_relu(x, p), fastrelu.leaky_relu(x, 0.5))
        assert_bitwise(fastrelu.elu(x, p), fastrelu.elu(x, 0.5))
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        fastrelu.leaky_relu(x, np.zeros((), [("a", "f4")]))
