"""Small, explicit building blocks for NumPy training loops, on fastrelu's kernels.

Every layer has ``forward(x)`` and ``backward(grad) -> grad_input``, ``train()``/``eval()``,
``parameters()`` and ``state_dict()``/``load_state_dict()``; parameters are :class:`Parameter`
objects (``value`` and ``grad``) that :class:`SGD`, :class:`Adam` or :class:`AdamW` update.

The rules, in short:

- **Arrays you pass are never modified** unless the layer (or model) was built with
  ``inplace=True``.  Inside a :class:`Sequential`, layers overwrite the arrays the model itself
  allocated (``Linear``'s product ``x @ W``, gradients between layers), so an activation after a
  ``Linear`` costs no extra array.  Arrays given to ``forward`` are kept for ``backward`` (as
  references): do not modify them in between.
- **One dtype per model** (float32 or float64): ``Sequential(..., dtype=)``, else the first
  dtype given to one of its layers, else float32; every layer takes it.  ``forward`` casts an
  input of another float or integer dtype (and lists) to it, once, at the model's entry.  A ReLU,
  LeakyReLU or ELU used on its own computes in its input's float dtype (integers, lists: float64).
- **Training and evaluation:** in ``train()`` mode (the default) ``forward`` keeps what
  ``backward`` needs and activations with ``track_stats`` record their :class:`ActivationStats`;
  after ``eval()`` nothing is kept and ``stats`` is left alone (``eval(track_stats=True)`` records
  them).
- **He/Kaiming initialization** for the activation that follows a ``Linear``: its own
  ``activation=``, or the activation layer after it in a ``Sequential``.

``Linear(..., activation=ReLU())`` adds the bias and applies a ReLU, LeakyReLU or ELU in one fused
pass, and its backward gives the bias gradient from that same pass.  With ``kernels="numpy"`` a
layer computes the same thing with the plain NumPy of ``fastrelu.reference``: the baseline for
timing what the fused kernels save inside a trainer.

>>> model = Sequential([Linear(64, 100, rng=0), ReLU(), Linear(100, 10, rng=1)])  # doctest: +SKIP
>>> loss, opt = SoftmaxCrossEntropy(), Adam(model.parameters())
>>> for xb, yb in batches(X, y, 32, seed=rng):
...     loss.forward(model.forward(xb), yb)
...     model.backward(loss.backward()); opt.step()
"""
import math
import os
from collections.abc import Mapping

import numpy as np

from . import _api, reference
from .monitor import ActivationStats

__all__ = ["Parameter", "Linear", "ReLU", "LeakyReLU", "PReLU", "ELU", "Sequential",
           "SoftmaxCrossEntropy", "SGD", "Adam", "AdamW", "batches"]

KERNELS = ("fastrelu", "numpy")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # a model's choices


# ---- argument checks ----------------------------------------------------------------------------

def _check_kernels(kernels):
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    return kernels


def _positive_int(name, value):
    value = _api._integer(name, value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _hyperparameter(name, value, valid, requirement):
    value = _api._real(name, value)
    if not valid(value):
        raise ValueError(f"{name} must be {requirement}, got {value}")
    return value


def _dtype(dtype):
    """A model dtype from a dtype argument; None stays None ("not given")."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be np.float32 or np.float64, not {dtype!r}") from None
    if dt not in DTYPES:
        raise ValueError(f"dtype must be float32 or float64, not {dt}")
    return dt


def _generator(name, seed):
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"{name} must be None, an integer or a np.random.Generator, not bool")
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name} must be None, a non-negative integer or a "
                        f"np.random.Generator: {exc}") from None


def _as_input(name, value, dtype):
    """`value` as an array of `dtype` (when None: an array's own float16/32/64 dtype, else
    float64).  Returns (array, copied): a copy is the layer's own, to overwrite."""
    _api._refuse_masked(name, value)
    if not isinstance(value, np.ndarray):  # numbers, lists, other libraries' arrays: copied
        return _api._from_python(name, value, dtype or np.float64), True
    if value.dtype.kind not in "iuf":
        raise TypeError(f"{name} has dtype {value.dtype}; fastrelu.nn takes integers or floats")
    if dtype is None:
        dtype = np.dtype(value.dtype.char if value.dtype.char in "efd" else "d")
    if value.dtype == dtype:
        return value, False
    return value.astype(dtype), True


# ---- parameters and layers ----------------------------------------------------------------------

class Parameter:
    """A trainable array `value` and its gradient `grad` (same shape and dtype): backward adds to
    `grad`, an optimizer's ``step()`` applies it to `value` and clears it."""

    def __init__(self, value):
        if not isinstance(value, np.ndarray) or value.dtype not in DTYPES:
            raise TypeError("value must be a float32 or float64 NumPy array, not "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        self.value = value
        self.grad = np.zeros_like(value)

    def __repr__(self):
        return f"Parameter(shape={self.value.shape}, dtype={self.value.dtype})"


def _model_dtype(dtype, layers):
    """(dtype, given) of a model made of `layers` [(path, layer)]: `dtype` when given, else the
    first one given to a layer, else float32.  A layer given another dtype is refused."""
    given = [(path, layer.dtype) for path, layer in layers if layer._dtype_given]
    chosen = _dtype(dtype) or (given[0][1] if given else DTYPES[0])
    for path, layer_dtype in given:
        if layer_dtype != chosen:
            raise ValueError(f"layer {path} was given dtype {layer_dtype}, but the model "
                             f"computes in {chosen}: give the dtype once (to the model or to "
                             "its first layer)")
    return chosen, dtype is not None or bool(given)


class _Layer:
    """What every layer has.  Subclasses compute in `_run_forward(x, writable) -> (y, y_free,
    saved)` and `_run_backward(grad, writable, saved) -> grad_input`, where `writable` says the
    array may be overwritten and `y_free` that nothing keeps y (so the next layer may overwrite
    it); `saved` is what backward needs, kept in training mode only."""

    def __init__(self, dtype, inplace):
        self.dtype = _dtype(dtype)
        self._dtype_given = self.dtype is not None
        self.inplace = _api._flag("inplace", inplace)
        self.training = True
        self._stats_in_eval = False
        self._cache = None  # (output shape, output dtype, saved) of the last training forward

    # -- the public calls: the model's entry, where the caller's arrays come in

    def forward(self, x):
        """The layer's output for `x`, cast to the layer's dtype first.  `x` is left unchanged
        (unless ``inplace=True``); in training mode it is kept for backward."""
        x, copied = _as_input("x", x, self.dtype)
        return self._forward(x, copied or self.inplace)[0]

    def backward(self, grad):
        """The gradient with respect to the last training forward's input, given `grad` with
        respect to its output; parameter gradients are added to each ``Parameter.grad``.  `grad`
        is left unchanged (unless ``inplace=True``).  One backward per forward."""
        dtype = self._cache[1] if self._cache is not None else self.dtype
        grad, copied = _as_input("grad", grad, dtype)
        return self._backward(grad, copied or self.inplace)

    # -- the calls between layers

    def _forward(self, x, writable):
        y, y_free, saved = self._run_forward(x, writable)
        if self.training:
            self._cache = (y.shape, y.dtype, saved)
        return y, y_free

    def _backward(self, grad, writable):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs a forward in training mode "
                               "first (model.train(); one backward per forward)")
        shape, _, saved = self._cache
        if grad.shape != shape:
            raise ValueError(f"grad has shape {grad.shape} but the forward's output had shape "
                             f"{shape}")
        self._cache = None  # frees what forward kept
        return self._run_backward(grad, writable, saved)

    # -- structure: parameters, modes, state

    def _children(self):
        """[(name, layer)] of the layers inside this one."""
        return []

    def _own_parameters(self):
        """[(name, Parameter)] of this layer itself."""
        return []

    def _initial_values(self):
        """{name: the initial value} of each own parameter, in the current dtype (None where
        no longer known)."""
        return {}

    def _walk(self, prefix=""):
        """(path, layer) for this layer and every layer inside it, in order."""
        yield prefix.rstrip("."), self
        for name, child in self._children():
            yield from child._walk(f"{prefix}{name}.")

    def _reinitialize(self, **settings):
        """Sets what the initial values depend on (dtype, init_gain).  A parameter still at its
        initial value is made again from the new settings, as if built with them; an edited
        one is cast to the dtype."""
        if all(getattr(self, name) == value for name, value in settings.items()):
            return
        before = self._initial_values()
        for name, value in settings.items():
            setattr(self, name, value)
        after = self._initial_values()
        for name, param in self._own_parameters():
            untouched = before[name] is not None and np.array_equal(param.value, before[name])
            param.value = after[name] if untouched else param.value.astype(self.dtype)
            param.grad = np.zeros_like(param.value)

    def named_parameters(self):
        """[(name, Parameter)], named by path as in PyTorch: "weight", "0.bias",
        "2.activation.weight"."""
        return [(f"{path}.{name}" if path else name, param)
                for path, layer in self._walk() for name, param in layer._own_parameters()]

    def parameters(self):
        """Every Parameter, in order: what an optimizer takes."""
        return [param for _, param in self.named_parameters()]

    def train(self, mode=True):
        """Training mode (the default): forward keeps what backward needs and activations with
        ``track_stats`` record their stats.  Returns the layer."""
        mode = _api._flag("mode", mode)
        for _, layer in self._walk():
            layer.training, layer._stats_in_eval = mode, False
        return self

    def eval(self, track_stats=False):
        """Evaluation mode: forward keeps nothing, and what the last training forward kept (for
        backward) and each activation's ``stats`` are left alone; with ``track_stats=True`` the
        activations that track stats still record them.  Returns the layer."""
        track_stats = _api._flag("track_stats", track_stats)
        self.train(False)
        for _, layer in self._walk():
            layer._stats_in_eval = track_stats
        return self

    def state_dict(self):
        """{name: a copy of the parameter's value}, names as in :meth:`named_parameters`.
        ``np.savez(path, **model.state_dict())`` saves it without pickle."""
        return {name: param.value.copy() for name, param in self.named_parameters()}

    def load_state_dict(self, state):
        """Copies parameter values in from a mapping such as :meth:`state_dict` returns, or from
        an ``.npz`` file (path or open file) saved from one.  Every name, shape and dtype must
        match; nothing is changed when one does not."""
        if isinstance(state, (str, os.PathLike)) or hasattr(state, "read"):
            archive = np.load(state, allow_pickle=False)
            if not isinstance(archive, Mapping):
                raise ValueError("state is a .npy file, not an .npz file of named arrays")
            with archive:
                state = dict(archive)
        elif not isinstance(state, Mapping):
            raise TypeError("state must be a mapping of names to arrays, or an .npz path or "
                            f"file, not {type(state).__name__}")
        params = dict(self.named_parameters())
        problems = [f"missing {name!r}" for name in params if name not in state]
        problems += [f"unexpected {name!r}" for name in state if name not in params]
        values = {name: np.asarray(state[name]) for name in params if name in state}
        for name, value in values.items():
            expected = params[name].value
            if (value.shape, value.dtype) != (expected.shape, expected.dtype):
                problems.append(f"{name!r} is {value.dtype} {value.shape}, the model's is "
                                f"{expected.dtype} {expected.shape}")
        if problems:
            raise ValueError("state does not match the model: " + "; ".join(problems))
        for name, value in values.items():
            params[name].value[...] = value


# ---- activations --------------------------------------------------------------------------------

def _numpy_stats(x):
    axis = 1 if x.ndim >= 2 else None
    if axis is None:
        return ActivationStats(np.array([(x > 0).sum()], np.int64), x.size)
    others = tuple(d for d in range(x.ndim) if d != axis)
    return ActivationStats((x > 0).sum(axis=others).astype(np.int64), x.size // x.shape[axis])


class _Activation(_Layer):
    """Shared machinery.  `stats` is the ActivationStats (units along axis 1) of the last forward
    that recorded them: in training mode with `track_stats` set, or after
    ``eval(track_stats=True)``."""

    name = ""  # the op's name for the fused kernels
    # Linear fuses it with its bias add when its backward works from the output, or from the
    # input through a fused backward of its own (PReLU: bias_prelu_backward)
    fused_backward_from_input = False

    def __init__(self, *, dtype=None, inplace=False, track_stats=False, kernels="fastrelu"):
        super().__init__(dtype, inplace)
        self.track_stats = _api._flag("track_stats", track_stats)
        self.kernels = _check_kernels(kernels)
        self.stats = None

    @property
    def from_output(self):
        """True when backward can work from the output y (kept instead of the input)."""
        return True

    @property
    def init_gain(self):
        """He/Kaiming gain for weights whose outputs feed this activation."""
        return math.sqrt(2.0)

    def _records_stats(self):
        return self.track_stats and (self.training or self._stats_in_eval)

    # one op's four forms: forward and backward, fastrelu and NumPy
    def _fast_forward(self, x, out, stats):
        raise NotImplementedError

    def _numpy_forward(self, x):
        raise NotImplementedError

    def _fast_backward(self, grad, saved, out):
        raise NotImplementedError

    def _numpy_backward(self, grad, saved):
        raise NotImplementedError

    def _run_forward(self, x, writable):
        keeps_input = self.training and not self.from_output
        out = x if writable and not keeps_input else None
        if self.kernels == "numpy":
            y = self._numpy_forward(x)
            if self._records_stats():
                self.stats = _numpy_stats(x)
        elif self._records_stats():
            y, self.stats = self._fast_forward(x, out, True)
        else:
            y = self._fast_forward(x, out, False)
        if keeps_input:
            return y, True, x
        return y, not self.training, y  # a kept y must not be overwritten by the next layer

    def _run_backward(self, grad, writable, saved):
        if self.kernels == "numpy":
            return self._numpy_backward(grad, saved)
        return self._fast_backward(grad, saved, grad if writable else None)

    def __repr__(self):
        return f"{type(self).__name__}({self._repr_args()})"

    def _repr_args(self):
        return ""


class ReLU(_Activation):
    """ReLU: ``max(x, 0)``.  Keeps its output for backward.

    Keyword arguments (every activation): `dtype` (None: the model's, or on its own the input's
    float dtype), `inplace` (may overwrite the arrays passed to forward/backward), `track_stats`
    (record :class:`ActivationStats` in ``stats``), `kernels` ("fastrelu" or "numpy")."""

    name = "relu"
    param = None

    def _fast_forward(self, x, out, stats):
        return _api.relu(x, out=out, stats=stats)

    def _numpy_forward(self, x):
        return reference.relu(x)

    def _fast_backward(self, grad, saved, out):
        return _api.relu_backward(grad, saved, out=out)

    def _numpy_backward(self, grad, saved):
        return reference.relu_backward(grad, saved)


class _ScalarActivation(_Activation):
    """An activation with one real parameter `param` (also under its own name): backward works
    from the output when it is >= 0, which then tells the input's sign."""

    def __init__(self, param_name, param, **kwargs):
        super().__init__(**kwargs)
        self.param = _api._real(param_name, param)

    @property
    def from_output(self):
        return self.param >= 0

    def _repr_args(self):
        return repr(self.param)


class LeakyReLU(_ScalarActivation):
    """Leaky ReLU: ``x > 0 ? x : negative_slope * x``.  Keeps its output for backward when
    negative_slope >= 0, else its input."""

    name = "leaky_relu"
    negative_slope = property(lambda self: self.param, doc="The slope for x <= 0 (= param).")

    def __init__(self, negative_slope=0.01, **kwargs):
        super().__init__("negative_slope", negative_slope, **kwargs)

    @property
    def init_gain(self):
        return math.sqrt(2.0 / (1.0 + self.param ** 2))

    def _fast_forward(self, x, out, stats):
        return _api.leaky_relu(x, self.param, out=out, stats=stats)

    def _numpy_forward(self, x):
        return reference.leaky_relu(x, self.param)

    def _fast_backward(self, grad, saved, out):
        return _api.leaky_relu_backward(grad, saved, self.param, out=out)

    def _numpy_backward(self, grad, saved):
        return reference.leaky_relu_backward(grad, saved, self.param)


class ELU(_ScalarActivation):
    """ELU: ``x <= 0 ? alpha * expm1(x) : x``.  Keeps its output for backward when alpha >= 0
    (the gradient is then ``grad * (y + alpha)`` where y <= 0), else its input.  Initialized
    with ReLU's gain."""

    name = "elu"
    alpha = property(lambda self: self.param, doc="The scale of expm1(x) for x <= 0 (= param).")

    def __init__(self, alpha=1.0, **kwargs):
        super().__init__("alpha", alpha, **kwargs)

    def _fast_forward(self, x, out, stats):
        return _api.elu(x, self.param, out=out, stats=stats)

    def _numpy_forward(self, x):
        return reference.elu(x, self.param)

    def _fast_backward(self, grad, saved, out):
        return _api.elu_backward(grad, saved, self.param, out=out, from_output=self.from_output)

    def _numpy_backward(self, grad, saved):
        if self.from_output:
            return np.where(saved <= 0, grad * (saved + self.param), grad)
        return reference.elu_backward(grad, saved, self.param)


class PReLU(_Activation):
    """PReLU: ``x > 0 ? x : weight[u] * x`` with learned slopes: `num_parameters` = 1 (shared,
    PyTorch's default) or the number of units along axis 1, starting at `init`.  Keeps its input:
    the weight gradient sums x * grad.  `dtype`: the model's when None (float32 on its own)."""

    name = "prelu"
    fused_backward_from_input = True

    def __init__(self, num_parameters=1, init=0.25, **kwargs):
        super().__init__(**kwargs)
        self.num_parameters = _positive_int("num_parameters", num_parameters)
        self.init = _api._real("init", init)
        self.dtype = self.dtype or DTYPES[0]
        self.weight = Parameter(self._initial_values()["weight"])

    @property
    def from_output(self):
        return False

    @property
    def init_gain(self):
        return math.sqrt(2.0 / (1.0 + self.init ** 2))

    def _own_parameters(self):
        return [("weight", self.weight)]

    def _initial_values(self):
        return {"weight": np.full(self.num_parameters, self.init, self.dtype)}

    def _fast_forward(self, x, out, stats):
        return _api.prelu(x, self.weight.value, 1, out=out, stats=stats)

    def _numpy_forward(self, x):
        return reference.prelu(x, self.weight.value, 1)

    def _fast_backward(self, grad, saved, out):
        dx, dw = _api.prelu_backward(grad, saved, self.weight.value, 1, out=(out, None))
        self.weight.grad += dw
        return dx

    def _numpy_backward(self, grad, saved):
        dx, dw = reference.prelu_backward(grad, saved, self.weight.value, 1)
        self.weight.grad += dw
        return dx

    def _repr_args(self):
        return f"{self.num_parameters}, init={self.init}, dtype={self.dtype}"


# ---- Linear and Sequential ----------------------------------------------------------------------

class Linear(_Layer):
    """``y = activation(x @ weight + bias)`` on batches x of shape (N, in_features).

    `weight` (in_features, out_features) is He/Kaiming-normal, std = gain / sqrt(in_features),
    with the gain of the activation that follows: `activation`, or in a :class:`Sequential` the
    activation layer after this one (gain 1 when none follows).  `bias` starts at `bias_init` (a
    small positive value keeps ReLUs alive; a negative one kills them).  `rng`: a seed or a
    np.random.Generator.  `dtype`: the model's when None (float32 on its own).  The activation
    is fused with the bias add (see `fused`).  ``inplace=True`` lets
    backward overwrite the `grad` passed to it (forward never modifies x: it is kept for the
    weight gradient)."""

    def __init__(self, in_features, out_features, *, activation=None, bias_init=0.0, rng=None,
                 dtype=None, kernels="fastrelu", inplace=False):
        super().__init__(dtype, inplace)
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        if activation is not None and not isinstance(activation, _Activation):
            raise TypeError("activation must be a ReLU, LeakyReLU, PReLU or ELU instance, or "
                            f"None, not {type(activation).__name__}")
        self.activation = activation
        self.bias_init = _api._real("bias_init", bias_init)
        self.kernels = _check_kernels(kernels)
        self.init_gain = 1.0 if activation is None else activation.init_gain
        # the unscaled normal draw, kept until the layer first runs so that a Sequential can
        # set the gain and dtype as if the layer had been built with them
        self._draw = _generator("rng", rng).standard_normal((self.in_features,
                                                             self.out_features))
        self.dtype, self._dtype_given = _model_dtype(dtype, list(self._walk())[1:])
        initial = self._initial_values()
        self.weight, self.bias = Parameter(initial["weight"]), Parameter(initial["bias"])
        if activation is not None:
            activation.kernels = self.kernels
            activation._reinitialize(dtype=self.dtype)

    @property
    def fused(self):
        """Bias add and activation in one pass, and their gradients (the bias's, and PReLU's
        weight's) in one pass back: for PReLU, and for ReLU, LeakyReLU and ELU whose backward
        can work from the output (a parameter >= 0), with the fastrelu kernels."""
        act = self.activation
        return (act is not None and self.kernels == "fastrelu"
                and (act.from_output or act.fused_backward_from_input))

    def _children(self):
        return [] if self.activation is None else [("activation", self.activation)]

    def _own_parameters(self):
        return [("weight", self.weight), ("bias", self.bias)]

    def _initial_values(self):
        weight = None if self._draw is None else \
            (self._draw * (self.init_gain / math.sqrt(self.in_features))).astype(self.dtype)
        return {"weight": weight, "bias": np.full(self.out_features, self.bias_init, self.dtype)}

    def _run_forward(self, x, writable):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x has shape {x.shape}, but {self!r} takes (batch, "
                             f"{self.in_features})")
        self._draw = None  # the layer has run: its initial values are history
        z = x @ self.weight.value  # the layer's own array: the bias and activation go in place
        if self.fused:
            y, kept = self._fused_forward(z)
            return y, not self.training or kept is not y, (x, kept)
        z += self.bias.value
        if self.activation is None:
            return z, True, (x, None)
        y, y_free = self.activation._forward(z, True)
        return y, y_free, (x, None)

    def _run_backward(self, grad, writable, saved):
        x, kept = saved  # what the fused forward kept for the backward: y, or PReLU's input
        if kept is not None:
            dz, db = self._fused_backward(grad, kept, writable)
        else:
            dz = grad if self.activation is None else self.activation._backward(grad, writable)
            db = dz.sum(axis=0)
        self.bias.grad += db
        self.weight.grad += x.T @ dz
        return dz @ self.weight.value.T

    # the fused kernels, called from here only
    def _fused_forward(self, z):
        """y, and what the backward needs: y itself (written over z), or for PReLU its input
        z, kept (y is then a new array)."""
        act = self.activation
        from_input = not act.from_output
        param = act.weight.value if from_input else act.param
        stats = act._records_stats()
        result = _api.bias_activation(z, self.bias.value, act.name, param,
                                      out=None if from_input else z, stats=stats)
        if stats:
            result, act.stats = result
        return result, z if from_input else result

    def _fused_backward(self, grad, kept, writable):
        act = self.activation
        out = grad if writable else None
        if act.from_output:
            return _api.bias_activation_backward(grad, kept, act.name, act.param, out=(out, None))
        dz, db, dw = _api.bias_prelu_backward(grad, kept, self.bias.value, act.weight.value,
                                              out=(out, None, None))
        act.weight.grad += dw
        return dz, db

    def __repr__(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return f"Linear({self.in_features}, {self.out_features}{act}, dtype={self.dtype})"


class Sequential(_Layer):
    """`layers` applied in order, as one model of one dtype.

    `dtype`: float32 or float64 for every layer; None takes the first one a layer was given,
    else float32.  ``inplace=True`` lets the model overwrite the arrays passed to its
    forward/backward (inside, layers work in place on the model's own arrays anyway; a layer's
    own `inplace` applies to calls made on it directly).  A Linear without an activation of its
    own that is followed by an activation layer takes that activation's He/Kaiming gain, unless
    it has run or its weights were changed."""

    def __init__(self, layers, *, dtype=None, inplace=False):
        super().__init__(dtype, inplace)
        try:
            self.layers = list(layers)
        except TypeError:
            raise TypeError(f"layers must be a list of layers, not {type(layers).__name__}") \
                from None
        if not self.layers:
            raise ValueError("layers is empty")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, _Layer):
                raise TypeError(f"layers[{i}] is a {type(layer).__name__}, not a layer such as "
                                "Linear or ReLU")
        inside = list(self._walk())[1:]
        seen = {}
        for path, layer in inside:
            if id(layer) in seen:
                raise ValueError(f"layer {path} is the same object as layer {seen[id(layer)]}: "
                                 "each place needs its own layer")
            seen[id(layer)] = path
        self.dtype, self._dtype_given = _model_dtype(dtype, inside)
        for _, layer in inside:
            layer._reinitialize(dtype=self.dtype)
        for layer, following in zip(self.layers, self.layers[1:] + [None]):
            if isinstance(layer, Linear) and layer.activation is None:
                gain = following.init_gain if isinstance(following, _Activation) else 1.0
                layer._reinitialize(init_gain=gain)

    def _children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def _run_forward(self, x, writable):
        for layer in self.layers:
            x, writable = layer._forward(x, writable)
        return x, writable, None

    def _run_backward(self, grad, writable, saved):
        for layer in reversed(self.layers):
            grad = layer._backward(grad, writable)
            writable = True  # a layer's grad_input is an array no one else holds
        return grad

    def activations(self):
        """[(name, activation)] for every activation (standalone or a Linear's), in order,
        named "hidden1", "hidden2", ...: the names to give a DeadUnitTracker."""
        found = [layer for _, layer in self._walk() if isinstance(layer, _Activation)]
        return [(f"hidden{i}", act) for i, act in enumerate(found, 1)]

    def track_stats(self, on=True):
        """Sets every activation's ``track_stats``: record :class:`ActivationStats` in its
        ``stats`` on each training forward."""
        on = _api._flag("on", on)
        for _, act in self.activations():
            act.track_stats = on

    def __repr__(self):
        inner = "".join(f"\n  {layer!r}," for layer in self.layers)
        return f"Sequential([{inner}\n], dtype={self.dtype})"


# ---- loss ---------------------------------------------------------------------------------------

class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels."""

    def __init__(self):
        self._log_probs = self._labels = None

    def forward(self, logits, labels):
        """The mean loss (a float) of `logits` (N, classes) against `labels` (N,) in
        0..classes-1.  Neither array is modified."""
        logits, _ = _as_input("logits", logits, None)
        labels = np.asarray(labels)
        if logits.ndim != 2:
            raise ValueError(f"logits must have shape (N, classes), got {logits.shape}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, not {labels.dtype}")
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must have shape ({logits.shape[0]},) to match logits, got "
                             f"{labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}")
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self._log_probs = shifted - log_z
        self._labels = labels
        return float(-self._log_probs[np.arange(labels.size), labels].mean())

    def backward(self):
        """The gradient of the last forward's loss with respect to its logits (a new array)."""
        if self._log_probs is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward needs a forward first")
        grad = np.exp(self._log_probs)
        grad[np.arange(self._labels.size), self._labels] -= 1
        return grad / self._labels.size


# ---- optimizers ---------------------------------------------------------------------------------

class _Optimizer:
    """Updates `parameters` in place; ``step()`` applies and then clears their gradients.  One
    scratch array, as large as the largest parameter, serves every step's temporaries."""

    def __init__(self, parameters, lr):
        try:
            self.parameters = list(parameters)
        except TypeError:
            raise TypeError("parameters must be an iterable of Parameter (model.parameters()), "
                            f"not {type(parameters).__name__}") from None
        if not self.parameters:
            raise ValueError("parameters is empty")
        for i, p in enumerate(self.parameters):
            if not isinstance(p, Parameter):
                raise TypeError(f"parameters[{i}] is a {type(p).__name__}, not a Parameter")
        if len({id(p) for p in self.parameters}) != len(self.parameters):
            raise ValueError("parameters lists a Parameter twice")
        self.lr = _hyperparameter("lr", lr, lambda v: v > 0, "> 0")
        largest = max(p.value.size for p in self.parameters)
        flat = {p.value.dtype: np.empty(largest, p.value.dtype) for p in self.parameters}
        self._scratch = [flat[p.value.dtype][:p.value.size].reshape(p.value.shape)
                         for p in self.parameters]

    def step(self):
        """Updates every parameter from its gradient, then sets the gradients to zero."""
        for i, (p, scratch) in enumerate(zip(self.parameters, self._scratch)):
            self._update(i, p, scratch)
            p.grad.fill(0)

    def _update(self, i, p, scratch):
        raise NotImplementedError


class SGD(_Optimizer):
    """Stochastic gradient descent as PyTorch's ``torch.optim.SGD`` (same arguments, defaults
    and update): ``g = grad + weight_decay * p``; with momentum, ``b = g`` on the first step,
    then ``b = momentum * b + (1 - dampening) * g``, and ``g = b`` (or ``g + momentum * b``
    with `nesterov`); ``p -= lr * g``."""

    def __init__(self, parameters, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        super().__init__(parameters, lr)
        self.momentum = _hyperparameter("momentum", momentum, lambda v: 0 <= v < 1, "in [0, 1)")
        self.dampening = _hyperparameter("dampening", dampening, lambda v: 0 <= v <= 1,
                                         "in [0, 1]")
        self.weight_decay = _hyperparameter("weight_decay", weight_decay, lambda v: v >= 0,
                                            ">= 0")
        self.nesterov = _api._flag("nesterov", nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        self._momentum_buffers = [None] * len(self.parameters)

    def _update(self, i, p, scratch):
        grad = p.grad  # worked on in place: step() clears it afterwards
        if self.weight_decay:
            grad += np.multiply(p.value, self.weight_decay, out=scratch)
        if self.momentum:
            buf = self._momentum_buffers[i]
            if buf is None:
                buf = self._momentum_buffers[i] = grad.copy()
            else:
                buf *= self.momentum
                buf += grad if not self.dampening else \
                    np.multiply(grad, 1 - self.dampening, out=scratch)
            if self.nesterov:
                grad += np.multiply(buf, self.momentum, out=scratch)
            else:
                grad = buf
        p.value -= np.multiply(grad, self.lr, out=scratch)


class Adam(_Optimizer):
    """Adam as PyTorch's ``torch.optim.Adam`` (same arguments, defaults and update, without
    amsgrad): ``g = grad + weight_decay * p`` (L2); ``m = b1 m + (1 - b1) g``,
    ``v = b2 v + (1 - b2) g^2``; ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``
    at step t."""

    decoupled = False  # AdamW: decay the weights themselves instead of adding to the gradient

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(parameters, lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2), not {betas!r}")
        self.betas = tuple(_hyperparameter(f"betas[{i}]", b, lambda v: 0 <= v < 1, "in [0, 1)")
                           for i, b in enumerate(betas))
        self.eps = _hyperparameter("eps", eps, lambda v: v >= 0, ">= 0")
        self.weight_decay = _hyperparameter("weight_decay", weight_decay, lambda v: v >= 0,
                                            ">= 0")
        self.step_count = 0
        self._exp_avg = [np.zeros_like(p.value) for p in self.parameters]
        self._exp_avg_sq = [np.zeros_like(p.value) for p in self.parameters]

    def step(self):
        self.step_count += 1
        super().step()

    def _update(self, i, p, scratch):
        grad, m, v = p.grad, self._exp_avg[i], self._exp_avg_sq[i]
        beta1, beta2 = self.betas
        if self.weight_decay and self.decoupled:
            p.value *= 1 - self.lr * self.weight_decay
        elif self.weight_decay:
            grad += np.multiply(p.value, self.weight_decay, out=scratch)  # grad is cleared next
        m *= beta1
        m += np.multiply(grad, 1 - beta1, out=scratch)
        v *= beta2
        np.multiply(grad, grad, out=scratch)
        scratch *= 1 - beta2
        v += scratch
        denom = np.sqrt(v, out=scratch)
        denom /= math.sqrt(1 - beta2 ** self.step_count)
        denom += self.eps
        update = np.divide(m, denom, out=scratch)
        update *= self.lr / (1 - beta1 ** self.step_count)
        p.value -= update


class AdamW(Adam):
    """Adam with decoupled weight decay, as PyTorch's ``torch.optim.AdamW``: each step first
    scales the weights by ``1 - lr * weight_decay`` (default 0.01), the gradient untouched."""

    decoupled = True

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(parameters, lr, betas, eps, weight_decay)


# ---- data ---------------------------------------------------------------------------------------

def batches(X, y, size, shuffle=True, seed=None):
    """Mini-batches ``(X[i], y[i])`` of `size` rows (the last may be smaller) covering every row
    once.  With `shuffle`, in an order drawn from `seed` (None, an int, or a np.random.Generator:
    pass one Generator for a new order each epoch); without, in order, as views.  The arrays are
    not modified or cast: cast X to the model's dtype once, before the epochs, to save a cast per
    batch."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim == 0 or y.ndim == 0:
        raise ValueError("X and y must have at least one dimension (rows)")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    size = _positive_int("size", size)
    starts = range(0, len(X), size)
    if _api._flag("shuffle", shuffle):
        order = _generator("seed", seed).permutation(len(X))
        chunks = (order[start:start + size] for start in starts)
    else:
        chunks = (slice(start, start + size) for start in starts)
    return ((X[chunk], y[chunk]) for chunk in chunks)
