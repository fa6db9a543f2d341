"""The public ops: every argument is validated here, before anything is written, and the call is
routed by array kind (NumPy -> CPU kernels, CUDA arrays -> GPU kernels).  The backends trust what
they are given."""
import math
import numbers
import operator

import numpy as np

from . import _cpu
from .monitor import ActivationStats

try:
    from numpy.exceptions import AxisError
except ImportError:  # NumPy < 1.25
    from numpy import AxisError

# the kernels' op codes (_kernels.h); PReLU is LEAKY with per-channel slopes
RELU, LEAKY, ELU, ELU_FROM_Y = 0, 1, 2, 4

_FLOAT_DTYPES = {c: np.dtype(c) for c in "efd"}  # float16, float32, float64 by type character
_PYTHON_VALUES = (list, tuple, int, float)
_MAX_FLOAT = 1.7976931348623157e308  # finite floats lie in [-_MAX_FLOAT, _MAX_FLOAT]; NaN in neither


# ---- arrays -------------------------------------------------------------------------------------


def _array_dtype(name, a):
    """The (native) float dtype of an array argument, or TypeError naming it."""
    dt = a.dtype
    if dt.kind == "f" and dt.char in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[dt.char]
    if dt.kind in "biuf":
        raise TypeError(
            f"{name} has dtype {dt}; fastrelu computes in float16, float32 or float64: "
            f"cast it first, e.g. {name}.astype(np.float32)"
        )
    raise TypeError(f"{name} has dtype {dt}, which is not a real floating-point type")


def _from_python(name, value, dtype):
    """A Python number or (nested) list of numbers as an array of `dtype`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number or an array of them, not a bool")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of real numbers: {exc}") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must contain real numbers, not {arr.dtype} values")
    return arr.astype(dtype)


def _host_arrays(named):
    """Validates host array arguments [(name, value)] and returns them as ndarrays of one float
    dtype, with that dtype.  NumPy arrays (and array-likes) set the dtype and must agree; Python
    numbers and lists take it (float64 when nothing sets it)."""
    arrays = []
    dtype = first = None
    for name, value in named:
        if not isinstance(value, np.ndarray):
            if isinstance(value, _PYTHON_VALUES):
                arrays.append(None)  # converted below, once the dtype is known
                continue
            try:
                value = np.asarray(value)
            except Exception as exc:
                raise TypeError(f"{name} is not an array: {exc}") from None
        dt = _array_dtype(name, value)
        if dtype is None:
            dtype, first = dt, name
        elif dt is not dtype:
            raise TypeError(f"{name} has dtype {dt} but {first} has dtype {dtype}; they must match")
        arrays.append(value)
    if dtype is None:
        dtype = _FLOAT_DTYPES["d"]
    for i, arr in enumerate(arrays):
        if arr is None:
            arrays[i] = _from_python(named[i][0], named[i][1], dtype)
    return arrays, dtype


def _check_out(name, out, shape, dtype, inputs):
    """`out` must be a writable array of the result's shape and dtype that is either one of the
    inputs itself (in place) or shares no memory with any of them."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, not {type(out).__name__}")
    out_dtype = out.dtype
    if out_dtype.char != dtype.char or out_dtype.kind != "f":
        raise TypeError(f"{name} has dtype {out_dtype} but the result has dtype {dtype}")
    if out.shape != shape:
        raise ValueError(f"{name} has shape {out.shape} but the result has shape {shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for in_name, arr in inputs:
        if out is not arr and _cpu.memory_overlap(out, arr) == 2:
            raise ValueError(
                f"{name} partially overlaps {in_name}; pass {in_name} itself to work in place, "
                "or an array that shares no memory with it"
            )


# ---- scalars and axes ---------------------------------------------------------------------------


def _real(name, value):
    """A finite Python float from a real number (a 0-d real array is fine)."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _axis(name, axis, ndim):
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise AxisError(f"{name} {axis} is out of bounds for an array of dimension {ndim}")
    return axis % ndim


def _prelu_weight(weight, shape, axis):
    """Returns the channel axis the weight runs along, or None for a shared weight."""
    if weight.ndim == 0 or weight.shape == (1,):
        if len(shape) >= 2:
            _axis("axis", axis, len(shape))
        return None
    if weight.ndim != 1:
        raise ValueError(f"weight must have shape (), (1,) or (C,), got {weight.shape}")
    if len(shape) < 2:
        raise ValueError(
            f"x with {len(shape)} dims has one channel, so weight must have one element "
            f"(shape () or (1,)), got {weight.shape}"
        )
    axis = _axis("axis", axis, len(shape))
    if weight.shape[0] != shape[axis]:
        raise ValueError(
            f"weight has {weight.shape[0]} elements but x has {shape[axis]} channels "
            f"along axis {axis}"
        )
    return axis


# ---- the ops ------------------------------------------------------------------------------------


def _forward(op, x, out, p, weight=None, axis=1, stats=False):
    """op(x), with PReLU's `weight` along `axis`; with `stats`, also the positive counts per unit
    along `axis` (one unit when x has fewer than 2 dims)."""
    if _cpu.is_plain_call(x, out):  # the common calls: nothing to convert, nothing can fail
        if not stats:
            if weight is None:
                return _cpu.forward(op, x, out, p, None, None, False)[0]
            plain_axis = _cpu.plain_prelu_axis(x, weight, axis)
            if plain_axis is not None:
                if plain_axis < 0:
                    return _cpu.forward(op, x, out, float(weight.reshape(())), None, None,
                                        False)[0]
                return _cpu.forward(op, x, out, 0.0, weight, plain_axis, False)[0]
        elif (stats is True and weight is None and type(axis) is int and x.ndim >= 2
              and -x.ndim <= axis < x.ndim):
            y, counts = _cpu.forward(op, x, out, p, None, axis % x.ndim, True)
            return y, _activation_stats(counts, x.shape, axis % x.ndim)
    if weight is None:
        (x,), dtype = _host_arrays([("x", x)])
        weight_axis = None
    else:
        (x, weight), dtype = _host_arrays([("x", x), ("weight", weight)])
        weight_axis = _prelu_weight(weight, x.shape, axis)
    if type(stats) is not bool:
        raise TypeError(f"stats must be True or False, not {type(stats).__name__}")
    unit_axis = _axis("axis", axis, x.ndim) if stats and x.ndim >= 2 else None
    if out is not None:
        _check_out("out", out, x.shape, dtype, [("x", x)])
    if weight is not None and weight_axis is None:  # one weight shared by every element
        p, weight = float(weight.reshape(())), None
    layout_axis = weight_axis if weight_axis is not None else unit_axis
    y, counts = _cpu.forward(op, x, out, p, weight, layout_axis, stats)
    return (y, _activation_stats(counts, x.shape, layout_axis)) if stats else y


def _activation_stats(counts, shape, axis):
    per_unit = math.prod(shape[:axis] + shape[axis + 1:]) if axis is not None else math.prod(shape)
    return ActivationStats(counts, per_unit)


def _backward(op, grad, x, out, p, weight=None, axis=None, weight_out=None):
    if _cpu.is_plain_call(x, out, grad):  # the common call: nothing to convert, nothing can fail
        if weight is None:
            return _cpu.backward(op, grad, x, out, p, None, None)
        plain_axis = _cpu.plain_prelu_axis(x, weight, axis, weight_out, out, grad)
        if plain_axis is not None:
            return _backward_prelu(op, grad, x, out, weight, plain_axis, weight_out)
    named = [("grad", grad), ("x", x)] + ([] if weight is None else [("weight", weight)])
    arrays, dtype = _host_arrays(named)
    grad, x = arrays[:2]
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {grad.shape} but x has shape {x.shape}")
    if weight is not None:
        weight = arrays[2]
        axis = _prelu_weight(weight, x.shape, axis)
    inputs = list(zip(("grad", "x", "weight"), arrays))
    if out is not None:
        _check_out("out", out, x.shape, dtype, inputs)
    if weight_out is not None:
        _check_out("out[1]", weight_out, weight.shape, dtype, inputs)
        if out is not None and _cpu.memory_overlap(out, weight_out):
            raise ValueError("out[0] and out[1] overlap")
    if weight is None:
        return _cpu.backward(op, grad, x, out, p, None, None)
    return _backward_prelu(op, grad, x, out, weight, -1 if axis is None else axis, weight_out)


def _backward_prelu(op, grad, x, out, weight, axis, weight_out):
    """axis: the channel axis, or -1 for one weight shared by every element."""
    dtype = x.dtype if x.dtype.isnative else x.dtype.newbyteorder("=")
    grad_weight = np.empty(weight.shape, dtype) if weight_out is None else weight_out
    if axis < 0:
        dx = _cpu.backward(op, grad, x, out, float(weight.reshape(())), None, None, grad_weight)
    else:
        dx = _cpu.backward(op, grad, x, out, 0.0, weight, axis, grad_weight)
    return dx, grad_weight


def relu(x, *, out=None, stats=False, axis=1):
    """ReLU: ``x < 0 ? +0 : x`` elementwise (NaN and -0.0 pass through).

    With ``stats=True`` returns ``(y, ActivationStats)``: the count of positive inputs per unit
    along `axis` (one unit for inputs with fewer than 2 dims), from the same pass."""
    if stats:
        return _forward(RELU, x, out, 0.0, None, axis, stats)
    return _forward(RELU, x, out, 0.0)


def leaky_relu(x, negative_slope=0.01, *, out=None, stats=False, axis=1):
    """Leaky ReLU: ``x > 0 ? x : x * negative_slope`` elementwise.  `stats`, `axis`: see relu."""
    if not (type(negative_slope) is float and -_MAX_FLOAT <= negative_slope <= _MAX_FLOAT):
        negative_slope = _real("negative_slope", negative_slope)
    if stats:
        return _forward(LEAKY, x, out, negative_slope, None, axis, stats)
    return _forward(LEAKY, x, out, negative_slope)


def prelu(x, weight, axis=1, *, out=None, stats=False):
    """PReLU: ``x > 0 ? x : weight[c] * x`` with c the index along the channel `axis`.

    `weight` has shape (C,) with C == x.shape[axis], or one element (shape () or (1,)) shared by
    every channel.  Inputs with fewer than 2 dims have one channel.  `stats`: see relu; the units
    are the channels along `axis`."""
    return _forward(LEAKY, x, out, 0.0, weight, axis, stats)


def elu(x, alpha=1.0, *, out=None, stats=False, axis=1):
    """ELU: ``x <= 0 ? alpha * expm1(x) : x`` elementwise.  `stats`, `axis`: see relu."""
    if stats:
        return _forward(ELU, x, out, _real("alpha", alpha), None, axis, stats)
    return _forward(ELU, x, out, _real("alpha", alpha))


def relu_backward(grad, x, *, out=None):
    """Gradient of relu w.r.t. x: ``x <= 0 ? 0 : grad``.  `x` may be relu's output instead."""
    return _backward(RELU, grad, x, out, 0.0)


def leaky_relu_backward(grad, x, negative_slope=0.01, *, out=None):
    """Gradient of leaky_relu w.r.t. x: ``x > 0 ? grad : grad * negative_slope``.  With
    negative_slope >= 0, `x` may be leaky_relu's output instead."""
    if not (type(negative_slope) is float and -_MAX_FLOAT <= negative_slope <= _MAX_FLOAT):
        negative_slope = _real("negative_slope", negative_slope)
    return _backward(LEAKY, grad, x, out, negative_slope)


def prelu_backward(grad, x, weight, axis=1, *, out=None):
    """Gradients of prelu: returns ``(grad_input, grad_weight)`` from one pass over the data.

    ``grad_input = x > 0 ? grad : weight[c] * grad``; ``grad_weight[c]`` sums
    ``x > 0 ? 0 : x * grad`` over channel c (accumulated in float64), in the weight's shape.
    `out` is a pair ``(grad_input_out, grad_weight_out)``; either may be None.  With weights
    >= 0, `x` may be prelu's output instead."""
    if out is None:
        out = (None, None)
    elif not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("out must be a pair (grad_input_out, grad_weight_out); either may be None")
    return _backward(LEAKY, grad, x, out[0], 0.0, weight, axis, out[1])


def elu_backward(grad, x, alpha=1.0, *, out=None, from_output=False):
    """Gradient of elu w.r.t. x: ``x <= 0 ? grad * alpha * exp(x) : grad``.

    With ``from_output=True``, `x` is elu's output y instead, and the gradient is
    ``y <= 0 ? grad * (y + alpha) : grad`` (PyTorch's form; equal up to the rounding of y, and
    it needs alpha >= 0, for which y <= 0 exactly when x <= 0)."""
    alpha = _real("alpha", alpha)
    if not from_output:
        return _backward(ELU, grad, x, out, alpha)
    if alpha < 0:
        raise ValueError(f"from_output needs alpha >= 0, got {alpha}")
    return _backward(ELU_FROM_Y, grad, x, out, alpha)


# ---- fused bias + activation --------------------------------------------------------------------

# name -> (forward op, backward op given the output y, parameter's name and default)
_ACTIVATIONS = {
    "relu": (RELU, RELU, None, 0.0),
    "leaky_relu": (LEAKY, LEAKY, "negative_slope", 0.01),
    "elu": (ELU, ELU_FROM_Y, "alpha", 1.0),
}


def _activation(activation, param):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, "
                         f"not {activation!r}")
    fwd, bwd, name, default = _ACTIVATIONS[activation]
    if name is None:
        if param is not None:
            raise TypeError("relu takes no parameter")
        return fwd, bwd, 0.0
    return fwd, bwd, default if param is None else _real(name, param)


def _bias_axis(bias, shape, axis):
    if len(shape) == 0:
        raise ValueError("x must have at least one dimension for a per-unit bias")
    axis = _axis("axis", axis, len(shape))
    if bias.shape != (shape[axis],):
        raise ValueError(f"bias must have shape ({shape[axis]},): one value per unit along "
                         f"axis {axis}, got {bias.shape}")
    return axis


def bias_activation(x, bias, activation="relu", param=None, axis=1, *, out=None, stats=False):
    """``act(x + bias[u])`` in one pass, u the index along `axis` (the features of an (N, F)
    batch, the channels of NCHW data).  `activation` is "relu", "leaky_relu" (param:
    negative_slope, default 0.01) or "elu" (param: alpha, default 1.0).  With ``stats=True``
    returns ``(y, ActivationStats)`` counting the positive ``x + bias`` per unit."""
    op, _, p = _activation(activation, param)
    (x, bias), dtype = _host_arrays([("x", x), ("bias", bias)])
    axis = _bias_axis(bias, x.shape, axis)
    if type(stats) is not bool:
        raise TypeError(f"stats must be True or False, not {type(stats).__name__}")
    if out is not None:
        _check_out("out", out, x.shape, dtype, [("x", x), ("bias", bias)])
    y, counts = _cpu.forward(op, x, out, p, None, axis, stats, bias)
    return (y, _activation_stats(counts, x.shape, axis)) if stats else y


def bias_activation_backward(grad, y, activation="relu", param=None, axis=1, *, out=None):
    """Gradients of bias_activation from its output `y`, in one pass: returns
    ``(grad_input, grad_bias)``, grad_bias summed over all but `axis` in float64.  Needs a
    parameter >= 0, so that y tells the sign of x + bias (ELU uses ``grad * (y + alpha)``).
    `out` is a pair ``(grad_input_out, grad_bias_out)``; either may be None."""
    _, op, p = _activation(activation, param)
    if p < 0:
        raise ValueError(f"the backward from the output needs {activation}'s parameter >= 0, "
                         f"got {p}")
    if out is None:
        out = (None, None)
    elif not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("out must be a pair (grad_input_out, grad_bias_out); either may be None")
    (grad, y), dtype = _host_arrays([("grad", grad), ("y", y)])
    if grad.shape != y.shape:
        raise ValueError(f"grad has shape {grad.shape} but y has shape {y.shape}")
    if y.ndim == 0:
        raise ValueError("y must have at least one dimension for a per-unit bias")
    axis = _axis("axis", axis, y.ndim)
    inputs = [("grad", grad), ("y", y)]
    if out[0] is not None:
        _check_out("out[0]", out[0], y.shape, dtype, inputs)
    if out[1] is not None:
        _check_out("out[1]", out[1], (y.shape[axis],), dtype, inputs)
        if out[0] is not None and _cpu.memory_overlap(out[0], out[1]):
            raise ValueError("out[0] and out[1] overlap")
    grad_bias = np.empty(y.shape[axis], dtype) if out[1] is None else out[1]
    dx = _cpu.backward(op, grad, y, out[0], p, None, axis, grad_bias, _cpu.SUM_GRAD)
    return dx, grad_bias
