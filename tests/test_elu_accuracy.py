"""ELU's exp and expm1 are fastrelu's own vectorized ones: within 2 ulp of correctly rounded
results over the whole negative range, subnormal results included."""
import numpy as np
import pytest

import fastrelu
from helpers import ulp_distance


def negative_sweep(dtype):
    lo = -110.0 if dtype == np.float32 else -750.0
    dense = -np.linspace(0, -lo, 400_001)
    tiny = -np.logspace(-300 if dtype == np.float64 else -44, 0, 20_001)
    return np.concatenate([dense, tiny]).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_expm1_and_exp_within_two_ulp(dtype):
    x = negative_sweep(dtype)
    wide = np.float64 if dtype == np.float32 else np.longdouble
    expected_expm1 = np.expm1(x.astype(wide)).astype(dtype)
    expected_exp = np.exp(x.astype(wide)).astype(dtype)
    ones = np.ones_like(x)
    assert ulp_distance(fastrelu.elu(x, 1.0), expected_expm1).max() <= 2
    assert ulp_distance(fastrelu.elu_backward(ones, x, 1.0), expected_exp).max() <= 2


def test_float16_elu_is_correctly_rounded_from_float32():
    x = -np.linspace(0, 20, 20_001).astype(np.float16)
    expected = np.expm1(x.astype(np.float64)).astype(np.float16)
    assert ulp_distance(fastrelu.elu(x), expected).max() <= 1
