"""The public ops: every argument is validated here, before anything is written, and the call is
routed by array kind (NumPy -> CPU kernels, CUDA arrays -> GPU kernels).  The backends trust what
they are given."""
import math
import numbers
import operator

import numpy as np

from . import _cpu
from ._cpu import ELU, ELU_FROM_Y, LEAKY, RELU, SUM_BIAS_WEIGHT, SUM_GRAD, SUM_WEIGHT
from ._cuda_arrays import DeviceView, check_device_arrays, is_device
from .monitor import ActivationStats

try:
    from numpy.exceptions import AxisError
except ImportError:  # NumPy < 1.25
    from numpy import AxisError

_FLOAT_DTYPES = {c: np.dtype(c) for c in "efd"}  # float16, float32, float64 by type character
_PYTHON_VALUES = (list, tuple, range, int, float)
_MAX_FLOAT32 = 3.4028234663852886e38  # float32's largest finite value


# ---- arrays -------------------------------------------------------------------------------------


def _array_dtype(name, a):
    """The (native) float dtype of an array argument, or TypeError naming it: float16, float32,
    float64, or ml_dtypes' bfloat16."""
    dt = a.dtype
    if dt.kind == "f" and dt.char in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[dt.char]
    if dt.kind == "V" and _cpu.is_bfloat16(dt):
        return dt
    if dt.kind in "biuf":
        raise TypeError(
            f"{name} has dtype {dt}; fastrelu computes in float16, bfloat16, float32 or "
            f"float64: cast it first, e.g. {name}.astype(np.float32)"
        )
    raise TypeError(f"{name} has dtype {dt}, which is not a real floating-point type")


def _refuse_masked(name, value):
    """Masked arrays would silently lose their mask (the kernels see only the data)."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask fastrelu would ignore: pass "
                        f"{name}.filled(fill_value) or {name}.data")


def _from_python(name, value, dtype):
    """A Python number or (nested) list of numbers as an array of `dtype`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number or an array of them, not a bool")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # an element's own __array__ may raise anything
        raise TypeError(f"{name} must be an array of real numbers: {exc}") from None
    if arr.dtype.kind == "O" and all(type(v) in (int, float) for v in arr.flat):
        try:  # integers beyond 64 bits, alone or among floats
            arr = arr.astype(np.float64)
        except OverflowError:
            raise ValueError(f"{name} has an integer beyond the float range") from None
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
        _refuse_masked(name, value)
        if not isinstance(value, np.ndarray):
            if isinstance(value, _PYTHON_VALUES):
                arrays.append(None)  # converted below, once the dtype is known
                continue
            original = value
            try:
                value = np.asarray(value)
            except Exception as exc:
                raise TypeError(f"{name} is not an array: {exc}") from None
            if value.dtype.kind in "OUS" or (value.dtype.kind == "V" and
                                              not _cpu.is_bfloat16(value.dtype)):
                raise TypeError(f"{name} must be an array of real numbers, "
                                f"not {type(original).__name__}")
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


def _check_out(name, out, shape, dtype, inputs, in_place=()):
    """`out` must be a writable array of the inputs' kind (NumPy, or CUDA when the inputs are
    DeviceViews), of the result's shape and dtype, with one place in memory per element, that
    is either one of the inputs named in `in_place` itself (in place) or shares no memory with
    any input.  Returns out, or its DeviceView."""
    device = any(isinstance(arr, DeviceView) for _, arr in inputs)
    if device:
        if not is_device(out):
            raise TypeError(f"{name} must be a CUDA array like the inputs, "
                            f"not {type(out).__name__}")
        view = DeviceView(name, out)
        check_device_arrays(inputs + [(name, view)])
        readonly = view.readonly
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, not {type(out).__name__}")
        _refuse_masked(name, out)
        view, readonly = out, not out.flags.writeable
    if view.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"{name} has dtype {view.dtype} but the result has dtype {dtype}")
    if view.shape != shape:
        raise ValueError(f"{name} has shape {view.shape} but the result has shape {shape}")
    if readonly:
        raise ValueError(f"{name} is read-only")
    if _overlaps_itself(view.shape, view.strides, view.dtype.itemsize):
        raise ValueError(f"{name} has elements that share memory (zero or overlapping strides): "
                         "pass an array with one place per element")
    for in_name, arr in inputs:
        overlap = _memory_overlap(view, arr)
        if overlap == 2 or (overlap == 1 and in_name not in in_place):
            how = "partially overlaps" if overlap == 2 else "is"
            fix = f"pass {in_name} itself to work in place, or an array" \
                if in_name in in_place else "pass an array"
            raise ValueError(f"{name} {how} {in_name}; {fix} that shares no memory with it")
    return view


def _overlaps_itself(shape, strides, itemsize):
    """Some two elements share memory: taking the axes by stride, each must step past all the
    memory the smaller ones span (a layout that interleaves its axes otherwise is refused too)."""
    if not math.prod(shape):
        return False
    extent = itemsize
    for stride, n in sorted((abs(st), n) for n, st in zip(shape, strides) if n > 1):
        if stride < extent:
            return True
        extent += stride * (n - 1)
    return False


def _memory_overlap(a, b):
    """0: disjoint; 1: the same elements (in place); 2: overlapping otherwise.  CUDA arrays are
    compared by address range, so interleaved views count as overlapping."""
    if a is b:
        return 1
    if isinstance(a, DeviceView):
        return 0 if not isinstance(b, DeviceView) or not a.overlaps(b) \
            else 1 if a.same_memory(b) else 2
    return _cpu.memory_overlap(a, b) if isinstance(b, np.ndarray) else 0


def _raw(a):
    """The array a validated argument stands for."""
    return a.obj if isinstance(a, DeviceView) else a


def _gpu():
    try:
        from . import _gpu
    except ImportError as exc:
        raise ImportError(
            f"fastrelu's GPU backend needs numba's CUDA target ({exc}): "
            "pip install 'fastrelu[cuda]' (numba and numba-cuda)") from None
    return _gpu


def _on_device(named, outs):
    """Whether a call runs on the GPU: a CUDA array among the arguments it reads, `named`
    [(name, value)].  Its outputs `outs` [(name, value)] do not choose the side: a CUDA output
    of a call that reads host arrays is refused, by name."""
    if any(is_device(v) for _, v in named):
        return True
    for name, value in outs:
        if is_device(value):
            raise TypeError(f"{name} is a CUDA array but the arrays read are host arrays: mixing "
                            "host and device arrays is not supported; move them to one side")
    return False


def _validated(named, device):
    """Host or device array arguments, validated: (arrays or DeviceViews, dtype)."""
    return _device_arrays(named) if device else _host_arrays(named)


def _device_arrays(named):
    """Validates CUDA array arguments [(name, value)]: all CUDA arrays (Python numbers and lists
    are allowed for parameters), of one float dtype.  Returns (views, dtype); Python values come
    back as NumPy arrays of that dtype, to be uploaded."""
    views, dtype, first = [], None, None
    for name, value in named:
        if isinstance(value, _PYTHON_VALUES):
            views.append(None)
            continue
        if value is None:
            raise TypeError(f"{name} must be a CUDA array like the other arrays, not None")
        if not is_device(value):
            raise TypeError(
                f"{name} is a host array ({type(value).__name__}) but the call has CUDA arrays: "
                "mixing host and device arrays is not supported; move them to one side")
        view = DeviceView(name, value)
        dt = _array_dtype(name, view)
        if dtype is None:
            dtype, first = dt, name
        elif dt is not dtype:
            raise TypeError(f"{name} has dtype {dt} but {first} has dtype {dtype}; they must match")
        views.append(view)
    if dtype is None:
        raise TypeError("no CUDA array among the arguments")
    check_device_arrays([(name, v) for (name, _), v in zip(named, views)])
    for i, (name, value) in enumerate(named):
        if views[i] is None:
            views[i] = _from_python(name, value, dtype)
    return views, dtype


def _check_stream(stream, device):
    if stream is None:
        return
    if not device:
        raise TypeError("stream= applies to CUDA arrays only")
    is_handle = isinstance(stream, int) and not isinstance(stream, bool) and stream >= 0
    if not (is_handle or type(stream).__module__.startswith("numba") or
            any(hasattr(stream, a) for a in ("__cuda_stream__", "cuda_stream", "ptr"))):
        raise TypeError("stream must be a numba, CuPy or PyTorch CUDA stream, or a cudaStream_t "
                        f"as an int, not {type(stream).__name__}")


# ---- scalars and axes ---------------------------------------------------------------------------


def _real(name, value):
    """A finite Python float from a real number (a 0-d real array is fine)."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iufV":
        value = value[()]
    if isinstance(value, np.generic) and value.dtype.kind == "V" and _cpu.is_bfloat16(value.dtype):
        value = float(value)  # ml_dtypes' bfloat16 scalars are real numbers NumPy does not know
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, not {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer beyond the float range") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _param(name, value):
    """An op's scalar parameter (negative_slope, alpha) as a finite float: a Python float within
    float32's range passes at once, anything else through _real (see _check_param_range)."""
    if type(value) is float and -_MAX_FLOAT32 <= value <= _MAX_FLOAT32:
        return value
    return _real(name, value)


# the name of each op's scalar parameter, for _check_param_range
_PARAM_NAMES = {LEAKY: "negative_slope", ELU: "alpha", ELU_FROM_Y: "alpha"}


def _check_param_range(op, p, dtype):
    """float16, bfloat16 and float32 data compute in float32 (as PyTorch does), so a parameter
    beyond float32's range, which would turn into an infinity (and NaN at zeros), is refused for
    them, as PyTorch refuses it: after every other check, so that a bad array is named first."""
    if not -_MAX_FLOAT32 <= p <= _MAX_FLOAT32 and np.dtype(dtype).itemsize < 8:
        raise ValueError(f"{_PARAM_NAMES[op]}={p!r} is beyond the range of float32, in which "
                         f"{np.dtype(dtype).name} data is computed: use float64 data for it")


def _flag(name, value):
    """A Python bool from a Python or NumPy bool, or the integer 0 or 1."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}") from None
    if number not in (0, 1):
        raise ValueError(f"{name} must be True or False (or 0 or 1), got {number}")
    return bool(number)


def _integer(name, value):
    """A Python int from a Python or NumPy integer (not a bool)."""
    if type(value) is int:
        return value
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def _axis(name, axis, ndim):
    """An integer axis of an array of `ndim` dims, in [0, ndim)."""
    axis = _integer(name, axis)
    if not -ndim <= axis < ndim:
        raise AxisError(f"{name} {axis} is out of bounds for an array of dimension {ndim}")
    return axis % ndim


def _required(name, value):
    if value is None:
        raise TypeError(f"{name} must be an array or a real number, not None")
    return value


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


def _forward(op, x, out, p, weight=None, axis=1, stats=False, stream=None, bias=None):
    """op(x (+ bias)), with PReLU's `weight` or the `bias` along `axis`; with `stats`, also the
    positive counts per unit along `axis` (one unit when x has fewer than 2 dims).  `axis` is
    checked to be an integer on every call, and against x's dims where it is used."""
    if stats is not False:
        stats = _flag("stats", stats)
    axis = _integer("axis", axis)
    if stream is None and bias is None and -_MAX_FLOAT32 <= p <= _MAX_FLOAT32:
        if weight is None and not stats:
            y = _cpu.plain_forward(op, x, out, p)  # the commonest call, in one step
            if y is not None:
                return y
        if _cpu.is_plain_call(x, out):
            # NumPy arrays that need no conversion: only the shapes are left to check
            if weight is None and not stats:
                return _cpu.forward(op, x, out, p, weight=None, axis=None, want_counts=False)[0]
            if weight is None and x.ndim >= 2:
                unit_axis = _axis("axis", axis, x.ndim)
                y, counts = _cpu.forward(op, x, out, p, weight=None, axis=unit_axis,
                                         want_counts=True)
                return y, _activation_stats(counts, x.shape, unit_axis)
            if weight is not None and not stats and _cpu.is_plain_param(weight, x, out):
                weight_axis = _prelu_weight(weight, x.shape, axis)
                return _cpu.forward(op, x, out, p, weight=weight, axis=weight_axis,
                                    want_counts=False)[0]
    named = [("x", x)] + [(n, v) for n, v in (("weight", weight), ("bias", bias)) if v is not None]
    device = _on_device(named, [("out", out)])
    _check_stream(stream, device)
    arrays, dtype = _validated(named, device)
    x, params = arrays[0], dict(zip([n for n, _ in named[1:]], arrays[1:]))
    weight, bias = params.get("weight"), params.get("bias")
    weight_axis = None if weight is None else _prelu_weight(weight, x.shape, axis)
    if bias is not None:
        layout_axis = _bias_axis(bias, x.shape, axis)
    elif weight_axis is not None:
        layout_axis = weight_axis
    else:
        layout_axis = _axis("axis", axis, x.ndim) if stats and x.ndim >= 2 else None
    if out is not None:
        _check_out("out", out, x.shape, dtype, list(zip([n for n, _ in named], arrays)),
                   in_place=("x",))
    _check_param_range(op, p, dtype)
    if weight is not None and weight_axis is None and layout_axis is not None and not device:
        p, weight = float(weight.reshape(())), None  # one shared weight, statistics per unit
    if device:
        y, counts = _gpu().forward(op, x.obj, out, p, weight=_raw(weight), axis=layout_axis,
                                   want_counts=stats, bias=_raw(bias), dtype=dtype,
                                   stream=stream)
    else:
        y, counts = _cpu.forward(op, x, out, p, weight=weight, axis=layout_axis,
                                 want_counts=stats, bias=bias)
    return (y, _activation_stats(counts, x.shape, layout_axis)) if stats else y


def _activation_stats(counts, shape, axis):
    per_unit = math.prod(shape[:axis] + shape[axis + 1:]) if axis is not None else math.prod(shape)
    return ActivationStats._counted(counts, per_unit)


def _backward(op, grad, x, out, p, weight=None, axis=1, param_out=None, stream=None,
              bias_grad=False, x_name="x"):
    """dx, and with PReLU's `weight` its gradient, or with `bias_grad` the gradient of a bias
    along `axis` (x is then the output y, named `x_name`): (dx, grad_param)."""
    axis = _integer("axis", axis)
    in_range = -_MAX_FLOAT32 <= p <= _MAX_FLOAT32
    if weight is None and not bias_grad and stream is None and in_range:
        dx = _cpu.plain_backward(op, grad, x, out, p)  # the commonest call, in one step
        if dx is not None:
            return dx
    if stream is None and not bias_grad and in_range and \
            _cpu.is_plain_call(x, out, grad, backward=True):
        # NumPy arrays that need no conversion: only the shapes are left to check
        if weight is None:
            return _cpu.backward(op, grad, x, out, p, weight=None, axis=None)
        if _cpu.is_plain_param(weight, x, out, param_out, grad):
            weight_axis = _prelu_weight(weight, x.shape, axis)
            grad_weight = np.empty(weight.shape, x.dtype) if param_out is None else param_out
            dx = _cpu.backward(op, grad, x, out, p, weight=weight, axis=weight_axis,
                               param_grad=grad_weight, sum=SUM_WEIGHT)
            return dx, grad_weight
    named = [("grad", grad), (x_name, x)] + ([] if weight is None else [("weight", weight)])
    out_name = "out" if weight is None and not bias_grad else "out[0]"
    device = _on_device(named, [(out_name, out), ("out[1]", param_out)])
    _check_stream(stream, device)
    arrays, dtype = _validated(named, device)
    grad, x = arrays[:2]
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {grad.shape} but {x_name} has shape {x.shape}")
    inputs = list(zip(("grad", x_name, "weight"), arrays))
    if weight is not None:
        weight = arrays[2]
        axis = _prelu_weight(weight, x.shape, axis)
        param_shape = weight.shape
    elif bias_grad:
        if x.ndim == 0:
            raise ValueError(f"{x_name} must have at least one dimension for a per-unit bias")
        axis = _axis("axis", axis, x.ndim)
        param_shape = (x.shape[axis],)
    if out is not None:
        out_view = _check_out(out_name, out, x.shape, dtype, inputs, in_place=("grad", x_name))
    if weight is None and not bias_grad:
        _check_param_range(op, p, dtype)
        if device:
            return _gpu().backward(op, grad.obj, x.obj, out, p, weight=None, axis=None,
                                   param_out=None, param_shape=None, sum_kind=0, dtype=dtype,
                                   stream=stream)[0]
        return _cpu.backward(op, grad, x, out, p, weight=None, axis=None)
    param_aliases_input = False
    if param_out is not None:
        param_view = _check_out("out[1]", param_out, param_shape, dtype, inputs,
                                in_place=("weight",))
        if out is not None and _memory_overlap(out_view, param_view):
            raise ValueError("out[0] and out[1] overlap")
        param_aliases_input = any(_memory_overlap(param_view, arr) for _, arr in inputs)
    _check_param_range(op, p, dtype)
    sum_kind = SUM_GRAD if bias_grad else SUM_WEIGHT
    if device:
        return _gpu().backward(op, grad.obj, x.obj, out, p, weight=_raw(weight), axis=axis,
                               param_out=param_out, param_shape=param_shape, sum_kind=sum_kind,
                               dtype=dtype, stream=stream,
                               param_out_aliases_input=param_aliases_input)
    grad_param = np.empty(param_shape, dtype) if param_out is None else param_out
    dx = _cpu.backward(op, grad, x, out, p, weight=weight, axis=axis, param_grad=grad_param,
                       sum=sum_kind)
    return dx, grad_param


_STREAM_DOC = """`stream` (CUDA arrays only): where to launch the kernels (a numba, CuPy or
    PyTorch stream, or a cudaStream_t); by default the stream the input's producer names."""


def relu(x, *, out=None, stats=False, axis=1, stream=None):
    """ReLU: ``x < 0 ? +0 : x`` elementwise (NaN and -0.0 pass through).

    With ``stats=True`` returns ``(y, ActivationStats)``: the count of positive inputs per unit
    along `axis` (one unit for inputs with fewer than 2 dims), from the same pass."""
    return _forward(RELU, x, out, 0.0, None, axis, stats, stream)


def leaky_relu(x, negative_slope=0.01, *, out=None, stats=False, axis=1, stream=None):
    """Leaky ReLU: ``x > 0 ? x : x * negative_slope`` elementwise.  `stats`, `axis`: see relu."""
    return _forward(LEAKY, x, out, _param("negative_slope", negative_slope), None, axis,
                    stats, stream)


def prelu(x, weight, axis=1, *, out=None, stats=False, stream=None):
    """PReLU: ``x > 0 ? x : weight[c] * x`` with c the index along the channel `axis`.

    `weight` has shape (C,) with C == x.shape[axis], or one element (shape () or (1,)) shared by
    every channel.  Inputs with fewer than 2 dims have one channel.  `stats`: see relu; the units
    are the channels along `axis`."""
    return _forward(LEAKY, x, out, 0.0, _required("weight", weight), axis, stats, stream)


def elu(x, alpha=1.0, *, out=None, stats=False, axis=1, stream=None):
    """ELU: ``x <= 0 ? alpha * expm1(x) : x`` elementwise.  `stats`, `axis`: see relu."""
    return _forward(ELU, x, out, _param("alpha", alpha), None, axis, stats, stream)


def relu_backward(grad, x, *, out=None, stream=None):
    """Gradient of relu w.r.t. x: ``x <= 0 ? 0 : grad``.  `x` may be relu's output instead."""
    return _backward(RELU, grad, x, out, 0.0, stream=stream)


def leaky_relu_backward(grad, x, negative_slope=0.01, *, out=None, stream=None):
    """Gradient of leaky_relu w.r.t. x: ``x > 0 ? grad : grad * negative_slope``.  With
    negative_slope >= 0, `x` may be leaky_relu's output instead."""
    return _backward(LEAKY, grad, x, out, _param("negative_slope", negative_slope),
                     stream=stream)


def _out_pair(out):
    if out is None:
        return None, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a pair (grad_input_out, grad_param_out); either may be None")
    return tuple(out)


def prelu_backward(grad, x, weight, axis=1, *, out=None, stream=None):
    """Gradients of prelu: returns ``(grad_input, grad_weight)`` from one pass over the data.

    ``grad_input = x > 0 ? grad : weight[c] * grad``; ``grad_weight[c]`` sums
    ``x > 0 ? 0 : x * grad`` over channel c (accumulated in float64 on the CPU; float32, or
    float64 for float64 data, on the GPU), in the weight's shape.  `out` is a pair
    ``(grad_input_out, grad_weight_out)``; either may be None.  With weights >= 0, `x` may be
    prelu's output instead for the input gradient (the weight gradient needs x)."""
    out0, out1 = _out_pair(out)
    return _backward(LEAKY, grad, x, out0, 0.0, _required("weight", weight), axis, out1, stream)


def elu_backward(grad, x, alpha=1.0, *, out=None, from_output=False, stream=None):
    """Gradient of elu w.r.t. x: ``x <= 0 ? grad * alpha * exp(x) : grad``.

    With ``from_output=True``, `x` is elu's output y instead, and the gradient is
    ``y <= 0 ? grad * (y + alpha) : grad`` (PyTorch's form; equal up to the rounding of y, and
    it needs alpha >= 0, for which y <= 0 exactly when x <= 0)."""
    alpha = _param("alpha", alpha)
    if not _flag("from_output", from_output):
        return _backward(ELU, grad, x, out, alpha, stream=stream)
    if alpha < 0:
        raise ValueError(f"from_output needs alpha >= 0, got {alpha}")
    return _backward(ELU_FROM_Y, grad, x, out, alpha, stream=stream)


for _op in (relu, leaky_relu, prelu, elu, relu_backward, leaky_relu_backward, prelu_backward,
            elu_backward):
    _op.__doc__ += "\n\n    " + _STREAM_DOC


# ---- fused bias + activation --------------------------------------------------------------------

# name -> (forward op, backward op given the output y, parameter's name and default); PReLU's
# parameter is its weight array, and its backward needs the input (bias_prelu_backward)
_ACTIVATIONS = {
    "relu": (RELU, RELU, None, 0.0),
    "leaky_relu": (LEAKY, LEAKY, "negative_slope", 0.01),
    "elu": (ELU, ELU_FROM_Y, "alpha", 1.0),
    "prelu": (LEAKY, None, "weight", None),
}


def _activation(activation, param):
    """(forward op, backward op, scalar parameter, PReLU weight or None)."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string, one of {', '.join(_ACTIVATIONS)}, "
                        f"not {type(activation).__name__}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, "
                         f"not {activation!r}")
    fwd, bwd, name, default = _ACTIVATIONS[activation]
    if name is None:
        if param is not None:
            raise TypeError("relu takes no parameter")
        return fwd, bwd, 0.0, None
    if bwd is None:
        if param is None:
            raise TypeError("prelu needs its weight as param: shape (), (1,) or (C,)")
        return fwd, bwd, 0.0, param
    return fwd, bwd, default if param is None else _param(name, param), None


def _bias_axis(bias, shape, axis):
    if len(shape) == 0:
        raise ValueError("x must have at least one dimension for a per-unit bias")
    axis = _axis("axis", axis, len(shape))
    if bias.shape != (shape[axis],):
        raise ValueError(f"bias must have shape ({shape[axis]},): one value per unit along "
                         f"axis {axis}, got {bias.shape}")
    return axis


def bias_activation(x, bias, activation="relu", param=None, axis=1, *, out=None, stats=False,
                    stream=None):
    """``act(x + bias[u])`` in one pass, u the index along `axis` (the features of an (N, F)
    batch, the channels of NCHW data).  `activation` is "relu", "leaky_relu" (param:
    negative_slope, default 0.01), "elu" (param: alpha, default 1.0) or "prelu" (param: the
    weight, one per unit along `axis` or one shared; its backward is bias_prelu_backward).  With
    ``stats=True`` returns ``(y, ActivationStats)`` counting the positive ``x + bias`` per
    unit."""
    op, _, p, weight = _activation(activation, param)
    return _forward(op, x, out, p, weight, axis, stats, stream, _required("bias", bias))


def bias_activation_backward(grad, y, activation="relu", param=None, axis=1, *, out=None,
                             stream=None):
    """Gradients of bias_activation from its output `y`, in one pass: returns
    ``(grad_input, grad_bias)``, grad_bias summed over all but `axis` (in float64 on the CPU).
    Needs a parameter >= 0, so that y tells the sign of x + bias (ELU uses
    ``grad * (y + alpha)``).  `out` is a pair ``(grad_input_out, grad_bias_out)``; either may be
    None."""
    _, op, p, _ = _activation(activation, param)
    if op is None:
        raise ValueError("PReLU's weight gradient needs its input, which the output does not "
                         "give: use bias_prelu_backward(grad, x, bias, weight, axis)")
    if p < 0:
        raise ValueError(f"the backward from the output needs {activation}'s parameter >= 0, "
                         f"got {p}")
    out0, out1 = _out_pair(out)
    return _backward(op, grad, y, out0, p, None, axis, out1, stream, bias_grad=True, x_name="y")


def _out_triple(out):
    if out is None:
        return None, None, None
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise TypeError("out must be a triple (grad_input_out, grad_bias_out, grad_weight_out); "
                        "any may be None")
    return tuple(out)


def bias_prelu_backward(grad, x, bias, weight, axis=1, *, out=None, stream=None):
    """Gradients of ``bias_activation(x, bias, "prelu", weight, axis)`` in one pass over the data:
    returns ``(grad_input, grad_bias, grad_weight)``.  With ``z = x + bias[u]``:
    ``grad_input = z > 0 ? grad : weight[u] * grad`` (also the gradient of z), ``grad_bias[u]``
    sums it over unit u, and ``grad_weight`` sums ``z > 0 ? 0 : z * grad`` per unit (or over all,
    for a shared weight), both in float64 and rounded once.  `weight` has one value per unit
    along `axis`, or one shared.  `out` is a triple of outputs; any may be None.  CPU only."""
    out0, out_bias, out_weight = _out_triple(out)
    axis = _integer("axis", axis)
    named = [("grad", grad), ("x", x), ("bias", _required("bias", bias)),
             ("weight", _required("weight", weight))]
    if any(is_device(v) for _, v, in named) or any(is_device(v) for v in (out0, out_bias,
                                                                         out_weight)):
        raise TypeError("bias_prelu_backward runs on the CPU only: pass NumPy arrays")
    if stream is not None:
        raise TypeError("stream= applies to CUDA arrays only")
    arrays, dtype = _host_arrays(named)
    grad, x, bias, weight = arrays
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {grad.shape} but x has shape {x.shape}")
    unit_axis = _bias_axis(bias, x.shape, axis)
    weight_axis = _prelu_weight(weight, x.shape, axis)
    inputs = list(zip(("grad", "x", "bias", "weight"), arrays))
    if out0 is not None:
        _check_out("out[0]", out0, x.shape, dtype, inputs, in_place=("grad", "x"))
    param_outs = [o for o in (("out[1]", out_bias, bias.shape, "bias"),
                              ("out[2]", out_weight, weight.shape, "weight"))
                  if o[1] is not None]
    for name, value, shape, own in param_outs:
        _check_out(name, value, shape, dtype, inputs, in_place=(own,))
        for other_name, other in [("out[0]", out0)] + [(n, v) for n, v, _, _ in param_outs]:
            if other is not None and other_name != name and _memory_overlap(value, other):
                raise ValueError(f"{name} and {other_name} overlap")
    grad_bias = np.empty(bias.shape, dtype) if out_bias is None else out_bias
    grad_weight = np.empty(weight.shape, dtype) if out_weight is None else out_weight
    shared = weight_axis is None
    dx = _cpu.backward(LEAKY, grad, x, out0, float(weight.reshape(-1)[0]) if shared else 0.0,
                       weight=None if shared else weight, axis=unit_axis, param_grad=grad_weight,
                       sum=SUM_BIAS_WEIGHT, bias=bias, bias_grad=grad_bias)
    return dx, grad_bias, grad_weight
