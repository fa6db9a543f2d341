"""Small, explicit building blocks for NumPy training loops, on fastrelu's kernels.

Every layer has ``forward(x)`` and ``backward(grad) -> grad_input``; parameters are
:class:`Parameter` objects (``value`` and ``grad``) that :class:`SGD` updates.  Activations keep for
the backward pass only what it needs: the output y where the slope makes it enough (ReLU; Leaky
ReLU and ELU with a parameter >= 0), else the input; never an extra copy.  ``Linear(...,
activation=ReLU())`` adds the bias and applies the activation in one fused pass, and its backward
gives the bias gradient from that same pass.

With ``kernels="numpy"`` a layer computes the same thing with the plain NumPy of
``fastrelu.reference`` (separate bias add, ``np.where``, separate reductions): the baseline for
timing what the fused kernels save inside a trainer.

>>> model = Sequential([Linear(64, 100, activation=ReLU(), rng=rng),      # doctest: +SKIP
...                     Linear(100, 10, rng=rng)])
>>> loss = SoftmaxCrossEntropy()
>>> opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
>>> value = loss.forward(model.forward(xb), yb)
>>> model.backward(loss.backward()); opt.step()
"""
import math

import numpy as np

from . import _api, reference

__all__ = ["Parameter", "Linear", "ReLU", "LeakyReLU", "PReLU", "ELU", "Sequential",
           "SoftmaxCrossEntropy", "SGD"]

KERNELS = ("fastrelu", "numpy")


class Parameter:
    """A trainable array and its gradient (same shape and dtype)."""

    def __init__(self, value):
        self.value = value
        self.grad = np.zeros_like(value)

    def __repr__(self):
        return f"Parameter(shape={self.value.shape}, dtype={self.value.dtype})"


def _check_kernels(kernels):
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    return kernels


# ---- activations --------------------------------------------------------------------------------

class _Activation:
    """Shared machinery: `stats` is the ActivationStats of the last forward when
    `track_stats` is set (units along axis 1)."""

    name = ""
    fusable = True

    def __init__(self, kernels="fastrelu", track_stats=False):
        self.kernels = _check_kernels(kernels)
        self.track_stats = track_stats
        self.stats = None
        self._saved = None

    def parameters(self):
        return []

    # one op's four forms: forward and backward, fastrelu and NumPy
    def _fast_forward(self, x, out, stats):
        raise NotImplementedError

    def _numpy_forward(self, x):
        raise NotImplementedError

    def _from_output(self):
        """True when backward can work from the output y."""
        return True

    def forward(self, x):
        if self.kernels == "numpy":
            y = self._numpy_forward(x)
            if self.track_stats:
                self.stats = _numpy_stats(x)
        elif self.track_stats:
            y, self.stats = self._fast_forward(x, x, True)
        else:
            y = self._fast_forward(x, x, False)
        # in place: the input is the previous layer's fresh output, needed by nothing else
        self._saved = y if self._from_output() else x.copy() if y is x else x
        return y

    def backward(self, grad):
        raise NotImplementedError


def _numpy_stats(x):
    from .monitor import ActivationStats

    axis = 1 if x.ndim >= 2 else None
    if axis is None:
        return ActivationStats(np.array([(x > 0).sum()], np.int64), x.size)
    others = tuple(d for d in range(x.ndim) if d != axis)
    return ActivationStats((x > 0).sum(axis=others).astype(np.int64), x.size // x.shape[axis])


class ReLU(_Activation):
    name = "relu"
    param = None

    def _fast_forward(self, x, out, stats):
        return _api.relu(x, out=out, stats=stats)

    def _numpy_forward(self, x):
        return reference.relu(x)

    def backward(self, grad):
        if self.kernels == "numpy":
            return reference.relu_backward(grad, self._saved)
        return _api.relu_backward(grad, self._saved, out=grad)


class LeakyReLU(_Activation):
    name = "leaky_relu"

    def __init__(self, negative_slope=0.01, **kwargs):
        super().__init__(**kwargs)
        self.param = _api._real("negative_slope", negative_slope)

    def _from_output(self):
        return self.param >= 0

    def _fast_forward(self, x, out, stats):
        return _api.leaky_relu(x, self.param, out=out if self._from_output() else None,
                               stats=stats)

    def _numpy_forward(self, x):
        return reference.leaky_relu(x, self.param)

    def backward(self, grad):
        if self.kernels == "numpy":
            return reference.leaky_relu_backward(grad, self._saved, self.param)
        return _api.leaky_relu_backward(grad, self._saved, self.param, out=grad)


class ELU(_Activation):
    name = "elu"

    def __init__(self, alpha=1.0, **kwargs):
        super().__init__(**kwargs)
        self.param = _api._real("alpha", alpha)

    def _from_output(self):
        return self.param >= 0

    def _fast_forward(self, x, out, stats):
        return _api.elu(x, self.param, out=out if self._from_output() else None, stats=stats)

    def _numpy_forward(self, x):
        return reference.elu(x, self.param)

    def backward(self, grad):
        if self.kernels == "numpy":
            return reference.elu_backward(grad, self._saved, self.param) \
                if not self._from_output() else \
                np.where(self._saved <= 0, grad * (self._saved + self.param), grad)
        return _api.elu_backward(grad, self._saved, self.param, out=grad,
                                 from_output=self._from_output())


class PReLU(_Activation):
    """Learned slopes: `num_parameters` = 1 (shared, PyTorch's default) or the number of units
    along axis 1.  Keeps its input: the weight gradient sums x * grad."""

    name = "prelu"
    fusable = False

    def __init__(self, num_parameters=1, init=0.25, dtype=np.float32, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_parameters, int) or num_parameters < 1:
            raise ValueError(f"num_parameters must be a positive integer, got {num_parameters}")
        self.weight = Parameter(np.full(num_parameters, init, dtype))

    def parameters(self):
        return [self.weight]

    def _from_output(self):
        return False

    def _fast_forward(self, x, out, stats):
        return _api.prelu(x, self.weight.value, 1, stats=stats)

    def _numpy_forward(self, x):
        return reference.prelu(x, self.weight.value, 1)

    def backward(self, grad):
        if self.kernels == "numpy":
            dx, dw = reference.prelu_backward(grad, self._saved, self.weight.value, 1)
        else:
            dx, dw = _api.prelu_backward(grad, self._saved, self.weight.value, 1, out=(grad, None))
        self.weight.grad += dw
        return dx


# ---- layers -------------------------------------------------------------------------------------

def _gain(activation):
    """He/Kaiming gain for the activation that follows a layer."""
    if activation is None:
        return 1.0
    if activation.name == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + activation.param**2))
    if activation.name == "prelu":
        w = float(activation.weight.value.mean())
        return math.sqrt(2.0 / (1.0 + w * w))
    return math.sqrt(2.0)  # relu, and elu's usual choice


class Linear:
    """``y = act(x @ W + b)``.  W is He/Kaiming-normal for the activation (gain 1 without one);
    b starts at `bias_init` (a small positive value keeps ReLUs alive; a negative one kills
    them).  A ReLU, LeakyReLU or ELU activation is fused with the bias add."""

    def __init__(self, in_features, out_features, *, activation=None, bias_init=0.0, rng=None,
                 dtype=np.float32, kernels="fastrelu"):
        rng = np.random.default_rng(rng)
        std = _gain(activation) / math.sqrt(in_features)
        self.weight = Parameter((rng.standard_normal((in_features, out_features)) * std)
                                .astype(dtype))
        self.bias = Parameter(np.full(out_features, bias_init, dtype))
        self.activation = activation
        self.kernels = _check_kernels(kernels)
        if activation is not None:
            activation.kernels = self.kernels
        self.stats = None
        self._x = self._y = None

    @property
    def fused(self):
        """Bias add and activation in one pass: for ReLU, LeakyReLU and ELU whose backward can
        work from the output (a parameter >= 0)."""
        act = self.activation
        return act is not None and act.fusable and act._from_output()

    def parameters(self):
        extra = self.activation.parameters() if self.activation is not None else []
        return [self.weight, self.bias] + extra

    def forward(self, x):
        self._x = x
        z = x @ self.weight.value
        act = self.activation
        if not self.fused:
            z += self.bias.value
            return act.forward(z) if act is not None else z
        if self.kernels == "numpy":
            z += self.bias.value
            self._y = act.forward(z)
            return self._y
        if act.track_stats:
            self._y, act.stats = _api.bias_activation(z, self.bias.value, act.name, act.param,
                                                      out=z, stats=True)
        else:
            self._y = _api.bias_activation(z, self.bias.value, act.name, act.param, out=z)
        return self._y

    def backward(self, grad):
        act = self.activation
        if self.fused and self.kernels == "fastrelu":
            dz, db = _api.bias_activation_backward(grad, self._y, act.name, act.param,
                                                   out=(grad, None))
        else:
            dz = act.backward(grad) if act is not None else grad
            db = dz.sum(axis=0)
        self.bias.grad += db
        self.weight.grad += self._x.T @ dz
        return dz @ self.weight.value.T


class Sequential:
    """Layers applied in order; `activations()` names each activation for monitoring."""

    def __init__(self, layers):
        self.layers = list(layers)

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad):
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def activations(self):
        """[(name, activation)] for every activation, named hidden1, hidden2, ..."""
        found = []
        for layer in self.layers:
            act = layer.activation if isinstance(layer, Linear) else layer
            if isinstance(act, _Activation):
                found.append((f"hidden{len(found) + 1}", act))
        return found

    def track_stats(self, on=True):
        for _, act in self.activations():
            act.track_stats = on


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels."""

    def forward(self, logits, labels):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self._log_probs = shifted - log_z
        self._labels = labels
        return float(-self._log_probs[np.arange(labels.size), labels].mean())

    def backward(self):
        grad = np.exp(self._log_probs)
        grad[np.arange(self._labels.size), self._labels] -= 1
        return grad / self._labels.size


class SGD:
    """Stochastic gradient descent with momentum (and optional L2 weight decay); step() applies
    and clears the gradients."""

    def __init__(self, parameters, lr=0.01, momentum=0.9, weight_decay=0.0):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1 and weight_decay >= 0")
        self.parameters = list(parameters)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._velocity = [np.zeros_like(p.value) for p in self.parameters]

    def step(self):
        for p, v in zip(self.parameters, self._velocity):
            if self.weight_decay:
                p.grad += self.weight_decay * p.value
            v *= self.momentum
            v -= self.lr * p.grad
            p.value += v
            p.grad[...] = 0
