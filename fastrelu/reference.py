"""Plain NumPy definitions of every op: the test oracle and the NumPy baseline of the benchmarks.

Each is written straight from the contract (conditions evaluated exactly as written, so NaN,
signed zeros and infinities follow from them), the way people write these ops in NumPy today.
float16 and bfloat16 are computed in float32, like the kernels.  No validation: pass NumPy float
arrays.
"""
import functools

import numpy as np


def _quiet(op):
    """Overflow to inf and NaN inputs are part of the contract, not events to warn about."""

    @functools.wraps(op)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return op(*args, **kwargs)

    return quiet


def _compute_dtype(x):
    """float16 and bfloat16 (ml_dtypes) are computed in float32."""
    return np.float32 if x.dtype.itemsize == 2 else x.dtype.type


def _channel_shape(weight, x, axis):
    """`weight` shaped to broadcast along the channel axis of x (or as a scalar if shared)."""
    w = np.asarray(weight, dtype=_compute_dtype(x))
    if w.size == 1 or x.ndim < 2:
        return w.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return w.reshape(shape)


@_quiet
def relu(x):
    return np.where(x < 0, x.dtype.type(0), x)


@_quiet
def leaky_relu(x, negative_slope=0.01):
    c = _compute_dtype(x)
    xc = x.astype(c)
    return np.where(xc > 0, xc, xc * c(negative_slope)).astype(x.dtype)


@_quiet
def prelu(x, weight, axis=1):
    xc = x.astype(_compute_dtype(x))
    return np.where(xc > 0, xc, _channel_shape(weight, x, axis) * xc).astype(x.dtype)


@_quiet
def elu(x, alpha=1.0):
    c = _compute_dtype(x)
    xc = x.astype(c)
    return np.where(xc <= 0, c(alpha) * np.expm1(xc), xc).astype(x.dtype)


@_quiet
def relu_backward(grad, x):
    return np.where(x <= 0, grad.dtype.type(0), grad)


@_quiet
def leaky_relu_backward(grad, x, negative_slope=0.01):
    c = _compute_dtype(x)
    gc = grad.astype(c)
    return np.where(x > 0, gc, gc * c(negative_slope)).astype(x.dtype)


@_quiet
def prelu_backward(grad, x, weight, axis=1):
    """Returns (grad_input, grad_weight); grad_weight is summed in float64, in weight's shape."""
    c = _compute_dtype(x)
    gc = grad.astype(c)
    grad_input = np.where(x > 0, gc, _channel_shape(weight, x, axis) * gc).astype(x.dtype)
    contrib = np.where(x > 0, 0.0, x.astype(np.float64) * grad.astype(np.float64))
    weight = np.asarray(weight)
    if weight.size == 1 or x.ndim < 2:
        grad_weight = contrib.sum()
    else:
        grad_weight = contrib.sum(axis=tuple(d for d in range(x.ndim) if d != axis % x.ndim))
    return grad_input, np.asarray(grad_weight).astype(x.dtype).reshape(weight.shape)


@_quiet
def elu_backward(grad, x, alpha=1.0):
    c = _compute_dtype(x)
    gc, xc = grad.astype(c), x.astype(c)
    return np.where(xc <= 0, gc * c(alpha) * np.exp(xc), gc).astype(x.dtype)
