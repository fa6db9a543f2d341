"""fastrelu in PyTorch models: functional ops, ``torch.nn`` modules, ``convert(model)`` and
dead-unit statistics, on fastrelu's kernels with autograd.

    import fastrelu.torch as frt
    model = frt.convert(model)          # every nn.ReLU/LeakyReLU/PReLU/ELU, in place

The activations are registered as custom operators (``torch.ops.fastrelu.*``) with fake kernels
and autograd formulas, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see opaque ops.
Eager calls skip the dispatcher: an ``autograd.Function`` calls the kernels directly, which costs
a fraction of a dispatcher round trip, and tensors smaller than a measured crossover go to
PyTorch's own kernel (the semantics are the same).  CPU tensors reach the kernels as zero-copy
NumPy views of their memory with their real strides; CUDA tensors go to fastrelu's numba.cuda
kernels on the current stream.

``import fastrelu`` never imports this module (nor torch).
"""
import copy
import functools
import math
import weakref

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

import fastrelu
from .monitor import ActivationStats, DeadUnitTracker

__all__ = [
    "relu", "leaky_relu", "prelu", "elu",
    "ReLU", "LeakyReLU", "PReLU", "ELU",
    "convert", "track", "CROSSOVER",
]

# Tensors with fewer elements than this go to PyTorch's own kernel: below it the Python call path
# (about 50 us a forward + backward through autograd, 1 element, on a loaded 2-core EPYC VM)
# costs more than fastrelu's kernels save.  Measured with `python -m fastrelu._torch_bench
# --crossover` (forward + backward, 1 and 2 threads): PReLU wins from 2^15-2^16 elements on, ELU
# from 2^16-2^17; ReLU and Leaky ReLU, whose kernels move the same bytes as PyTorch's, never won
# by more than the noise (10^0 to 6.7e7 elements), so they stay PyTorch's unless statistics are
# asked for.  torch.compile and torch.export apply these to the traced sizes.  Statistics
# (track_stats) need fastrelu's kernels at every size.
CROSSOVER = {
    "cpu": {"relu": math.inf, "leaky_relu": math.inf, "elu": 1 << 17, "prelu": 1 << 15},
    # not measured (no GPU run yet): an estimate from numba's launch path, tens of microseconds a
    # kernel, against PyTorch's own CUDA kernels, which move the same bytes
    "cuda": dict.fromkeys(("relu", "leaky_relu", "elu", "prelu"), 1 << 22),
}

_NEVER = math.inf  # a crossover no size reaches
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- tensors as kernel arguments -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16 tensors reach fastrelu's kernels as ml_dtypes.bfloat16 "
                          "arrays: pip install ml_dtypes (or 'fastrelu[torch]')") from None
    return ml_dtypes.bfloat16


def _on_cuda(t):
    return t.is_cuda


def _array(t):
    """What fastrelu's NumPy-style API takes for tensor `t`, sharing its memory: a NumPy view with
    the tensor's strides for a CPU tensor (bfloat16 as ml_dtypes.bfloat16), the detached tensor
    itself for a CUDA one."""
    if t.requires_grad:
        t = t.detach()
    if t.is_neg():  # a lazily negated view (as of conj().imag): its values, resolved
        t = t.resolve_neg()
    if _on_cuda(t):
        return t
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bfloat16())
    return t.numpy()


def _units(x):
    """Statistics units: the channels along dim 1, or one unit below 2 dims."""
    return x.shape[1] if x.dim() >= 2 else 1


# ---- the activations ----------------------------------------------------------------------------


class _Kind:
    """One activation: its kernels in fastrelu's API and which tensor its backward reads."""

    def __init__(self, name, forward, backward, saves_output, inplace_ok, native_inplace=None,
                 native_backward=None):
        self.name = name
        self.forward = forward  # (x, param or weight, out, stats) on arrays
        # (grad, saved, param, from_output, out) on arrays; None for PReLU's two
        self.backward = backward
        # param -> whether an out-of-place backward reads the output (exactly as from the input)
        self.saves_output = saves_output
        # param -> whether a backward can read the output at all: what an in-place forward leaves
        self.inplace_ok = inplace_ok
        # PyTorch's own in-place forward (x, param) and backward (grad, saved, param,
        # from_output), for the tensors its kernels must serve (see _activate, _pytorch_grad)
        self.native_inplace = native_inplace
        self.native_backward = native_backward

    def run(self, x, param, weight, out=None, want_counts=False):
        """Forward on tensors: (y, ActivationStats or None); y is `out` when given."""
        y = torch.empty_like(x) if out is None else out
        xa = _array(x)
        ya = xa if y is x else _array(y)
        result = self.forward(xa, param if weight is None else _array(weight), ya, want_counts)
        return y, (result[1] if want_counts else None)

    def run_backward(self, grad, saved, param, from_output):
        """dL/dx on tensors, from the tensor the forward saved (x, or y with from_output)."""
        dx = torch.empty_like(saved)
        self.backward(_array(grad), _array(saved), param, from_output, _array(dx))
        return dx


def _prelu_backward_kernel(grad, x, weight):
    dx, dw = torch.empty_like(x), torch.empty_like(weight)
    fastrelu.prelu_backward(_array(grad), _array(x), _array(weight), 1,
                            out=(_array(dx), _array(dw)))
    return dx, dw


_RELU = _Kind(
    "relu",
    lambda x, p, out, stats: fastrelu.relu(x, out=out, stats=stats),
    lambda g, t, p, from_output, out: fastrelu.relu_backward(g, t, out=out),
    lambda p: True, lambda p: True,
    lambda x, p: F.relu(x, inplace=True),
    lambda g, t, p, from_output: torch.ops.aten.threshold_backward(g, t, 0))
_LEAKY = _Kind(
    "leaky_relu",
    lambda x, p, out, stats: fastrelu.leaky_relu(x, p, out=out, stats=stats),
    lambda g, t, p, from_output, out: fastrelu.leaky_relu_backward(g, t, p, out=out),
    lambda p: p >= 0, lambda p: p >= 0,
    lambda x, p: F.leaky_relu(x, p, inplace=True),
    lambda g, t, p, from_output: torch.ops.aten.leaky_relu_backward(g, t, p, from_output))
_ELU = _Kind(
    "elu",
    lambda x, p, out, stats: fastrelu.elu(x, p, out=out, stats=stats),
    lambda g, t, p, from_output, out: fastrelu.elu_backward(g, t, p, out=out,
                                                            from_output=from_output),
    # as in PyTorch, the gradient comes from the input (alpha * exp(x): accurate), and from the
    # output (y + alpha, which cancels for x well below 0) only after an in-place forward with
    # alpha >= 0, where the output still tells the sign of x
    lambda p: False, lambda p: p >= 0,
    lambda x, p: F.elu(x, p, inplace=True),
    lambda g, t, p, from_output: torch.ops.aten.elu_backward(g, p, 1, 1, from_output, t))
_PRELU = _Kind(
    "prelu",
    lambda x, w, out, stats: fastrelu.prelu(x, w, 1, out=out, stats=stats),
    None, lambda p: False, lambda p: False)

# PyTorch's words where an in-place forward overwrote the input its backward would need
_INPLACE_REFUSAL = {
    "leaky_relu": "In-place leakyReLu backward calculation is triggered with a negative slope "
                  "which is not supported. This is caused by calling in-place forward function "
                  "with a negative slope, please call out-of-place version instead.",
    "elu": "In-place elu backward calculation is triggered with a negative slope which is not "
           "supported. This is caused by calling in-place forward function with a negative "
           "slope, please call out-of-place version instead.",
}


# ---- custom operators (torch.compile, torch.export, double backward) ----------------------------


def _define(name, schema, impl, fake, mutates=()):
    op = torch.library.custom_op(f"fastrelu::{name}", impl, mutates_args=mutates, schema=schema)
    op.register_fake(fake)
    return op


def _like_x(x, *args):
    return torch.empty_like(x)


def _like_x_with_counts(x, *args):
    return torch.empty_like(x), torch.empty(_units(x), dtype=torch.int64)


def _counts_tensor(stats):
    return torch.from_numpy(stats.positive)


# backward ops: linear in the incoming gradient, so their own gradient w.r.t. it is the same op
# applied to the gradient of their output; the saved tensor's gradient is zero except for ELU


def _relu_backward_impl(grad, output):
    return _RELU.run_backward(grad, output, 0.0, True)


def _leaky_backward_impl(grad, saved, negative_slope):
    return _LEAKY.run_backward(grad, saved, negative_slope, negative_slope >= 0)


def _elu_backward_impl(grad, saved, alpha, is_result):
    if is_result and alpha < 0:
        raise ValueError("elu_backward reads the output only when alpha >= 0")
    return _ELU.run_backward(grad, saved, alpha, is_result)


_relu_backward_op = _define("relu_backward", "(Tensor grad, Tensor output) -> Tensor",
                            _relu_backward_impl, lambda g, t: torch.empty_like(t))
_leaky_backward_op = _define(
    "leaky_relu_backward", "(Tensor grad, Tensor saved, float negative_slope) -> Tensor",
    _leaky_backward_impl, lambda g, t, s: torch.empty_like(t))
_elu_backward_op = _define(
    "elu_backward", "(Tensor grad, Tensor saved, float alpha, bool is_result) -> Tensor",
    _elu_backward_impl, lambda g, t, a, r: torch.empty_like(t))
_prelu_backward_op = _define(
    "prelu_backward", "(Tensor grad, Tensor input, Tensor weight) -> (Tensor, Tensor)",
    _prelu_backward_kernel, lambda g, x, w: (torch.empty_like(x), torch.empty_like(w)))


def _save_inputs_and_params(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.params = inputs[2:]


def _zero_grad(ctx, tensor, index):
    """The gradient of a backward w.r.t. a saved tensor it reads only for a sign: zero, as
    PyTorch's formulas give it (None would leave that tensor out of the graph)."""
    return torch.zeros_like(tensor) if ctx.needs_input_grad[index] else None


def _relu_backward_grad(ctx, gg):
    _, output = ctx.saved_tensors
    return _relu_backward_op(gg, output), _zero_grad(ctx, output, 1)


def _leaky_backward_grad(ctx, gg):
    _, saved = ctx.saved_tensors
    return _leaky_backward_op(gg, saved, *ctx.params), _zero_grad(ctx, saved, 1), None


def _elu_backward_grad(ctx, gg):
    grad, saved = ctx.saved_tensors
    alpha, is_result = ctx.params
    # d(dx)/d(saved) on the negative side: g for dx = g * (y + alpha), g * alpha * exp(x) for
    # dx = g * alpha * exp(x); zero on the positive side
    slope = 1.0 if is_result else alpha * torch.exp(saved)
    # strictly negative, as PyTorch's elu_double_backward (its first derivative takes x <= 0)
    d_saved = torch.where(saved < 0, gg * grad * slope, torch.zeros((), dtype=gg.dtype,
                                                                    device=gg.device))
    return _elu_backward_op(gg, saved, alpha, is_result), d_saved, None, None


_relu_backward_op.register_autograd(_relu_backward_grad, setup_context=_save_inputs_and_params)
_leaky_backward_op.register_autograd(_leaky_backward_grad, setup_context=_save_inputs_and_params)
_elu_backward_op.register_autograd(_elu_backward_grad, setup_context=_save_inputs_and_params)


def _channel_view(w, x):
    """PReLU weight `w` shaped to broadcast against `x` along dim 1."""
    if w.numel() == 1 or x.dim() < 2:
        return w.reshape(())
    return w.reshape((-1,) + (1,) * (x.dim() - 2))


def _prelu_backward_grad(ctx, ggx, ggw):
    grad, x, weight = ctx.saved_tensors
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # PyTorch's double backward of PReLU takes x >= 0 as the positive side (zeros there, NaN on
    # the negative side), though its first derivative takes x > 0
    negative = ~(x >= 0)
    d_grad = d_x = d_weight = None
    if ggx is not None:
        d_grad = torch.where(negative, ggx * _channel_view(weight, x), ggx)
        per_element = torch.where(negative, grad * ggx, zero)
        d_weight = _sum_to_weight(per_element, weight)
    if ggw is not None:
        ggw_b = _channel_view(ggw, x)
        from_ggw = torch.where(negative, x * ggw_b, zero)
        d_grad = from_ggw if d_grad is None else d_grad + from_ggw
        d_x = torch.where(negative, grad * ggw_b, zero)
    if d_x is None:
        d_x = _zero_grad(ctx, x, 1)
    return d_grad, d_x, d_weight


def _sum_to_weight(per_element, weight):
    if weight.numel() == 1 or per_element.dim() < 2:
        return per_element.sum().reshape(weight.shape)
    dims = [0] + list(range(2, per_element.dim()))
    return per_element.sum(dims).reshape(weight.shape)


def _save_prelu_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_prelu_backward_op.register_autograd(_prelu_backward_grad, setup_context=_save_prelu_backward)


def _elementwise_backward(kind, grad, saved, param, from_output):
    """The gradient op for `kind`, differentiable (the custom op)."""
    if kind is _RELU:
        return _relu_backward_op(grad, saved)
    if kind is _LEAKY:
        return _leaky_backward_op(grad, saved, param)
    return _elu_backward_op(grad, saved, param, from_output)


# forward ops, with and without the positive counts of the statistics


def _define_forward(kind, params):
    """The op, its in-place variant (elementwise kinds) and its counting variant for `kind`."""
    param_schema = "".join(f", float {p}" for p in params)
    tensors = "Tensor x, Tensor weight" if kind is _PRELU else "Tensor x"

    def split(args):  # (x, param, weight) from an op's arguments
        if kind is _PRELU:
            return args[0], 0.0, args[1]
        return args[0], (args[1] if args[1:] else 0.0), None

    def impl(*args):
        x, p, w = split(args)
        return kind.run(x, p, w)[0]

    def counting_impl(*args):
        x, p, w = split(args)
        y, stats = kind.run(x, p, w, want_counts=True)
        return y, _counts_tensor(stats)

    def inplace_impl(*args):
        x, p, w = split(args)
        kind.run(x, p, w, out=x)

    op = _define(kind.name, f"({tensors}{param_schema}) -> Tensor", impl, _like_x)
    counting = _define(f"{kind.name}_with_counts", f"({tensors}{param_schema}) -> (Tensor, Tensor)",
                       counting_impl, _like_x_with_counts)
    inplace = None
    if kind is not _PRELU:
        inplace = _define(f"{kind.name}_", f"(Tensor(a!) x{param_schema}) -> ()", inplace_impl,
                          lambda *args: None, mutates=("x",))

    def setup_context(ctx, inputs, output):
        y = output[0] if isinstance(output, tuple) else output
        if kind is _PRELU:
            ctx.save_for_backward(*inputs)
            return
        ctx.param = inputs[1] if len(inputs) > 1 else 0.0
        ctx.from_output = kind.saves_output(ctx.param)
        ctx.save_for_backward(y if ctx.from_output else inputs[0])

    def backward(ctx, grad, *counts_grad):
        if kind is _PRELU:
            x, w = ctx.saved_tensors
            return _prelu_backward_op(grad, x, w)
        (saved,) = ctx.saved_tensors
        dx = _elementwise_backward(kind, grad, saved, ctx.param, ctx.from_output)
        return (dx,) + (None,) * len(params)

    op.register_autograd(backward, setup_context=setup_context)
    counting.register_autograd(backward, setup_context=setup_context)
    return op, inplace, counting


_OPS = {
    _RELU: _define_forward(_RELU, ()),
    _LEAKY: _define_forward(_LEAKY, ("negative_slope",)),
    _ELU: _define_forward(_ELU, ("alpha",)),
    _PRELU: _define_forward(_PRELU, ()),
}


def _traced(kind, x, param, weight, inplace, want_counts):
    """The custom-op path, for torch.compile and torch.export (and any tensor subclass or
    dispatch mode): (y, positive counts tensor or None)."""
    op, inplace_op, counting = _OPS[kind]
    args = (x, weight) if kind is _PRELU else (x,) if kind is _RELU else (x, param)
    counts = None
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if inplace and not want_counts and not needs_grad:
        inplace_op(*args)
        return x, None
    if inplace and needs_grad and not kind.saves_output(param):
        # the op saves its input, which the copy overwrites; a negative parameter's gradient,
        # which eager mode refuses (the output cannot give it), then comes from the clone, as
        # PyTorch's compiled graphs give it
        args = (x.clone(),) + args[1:]
    if want_counts:
        y, counts = counting(*args)
    else:
        y = op(*args)
    if inplace:
        y = x.copy_(y)
    return y, counts


# ---- eager calls --------------------------------------------------------------------------------


class _EagerActivation(torch.autograd.Function):
    """Eager forward and backward straight on the kernels; a backward that must itself be
    differentiable (create_graph=True) goes through the custom ops."""

    @staticmethod
    def forward(ctx, x, weight, kind, param, inplace, stats_sink):
        y, stats = kind.run(x, param, weight, out=x if inplace else None,
                            want_counts=stats_sink is not None)
        if stats_sink is not None:
            stats_sink.append(stats)
        ctx.kind, ctx.param = kind, param
        ctx.overwritten = ctx.from_output = False
        if inplace:
            ctx.mark_dirty(x)
        if kind is _PRELU:
            ctx.save_for_backward(x, weight)
        elif kind.saves_output(param) or (inplace and kind.inplace_ok(param)):
            ctx.from_output = True
            ctx.save_for_backward(y)
        elif inplace:
            ctx.overwritten = True
        else:
            ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        kind = ctx.kind
        if ctx.overwritten:
            raise RuntimeError(_INPLACE_REFUSAL[kind.name])
        if _pytorch_grad(grad):
            return _native_backward(ctx, grad) + (None,) * 4
        differentiable = torch.is_grad_enabled()
        if kind is _PRELU:
            x, weight = ctx.saved_tensors
            backward = _prelu_backward_op if differentiable else _prelu_backward_kernel
            dx, dw = backward(grad, x, weight)
            return dx, dw, None, None, None, None
        (saved,) = ctx.saved_tensors
        if differentiable:
            dx = _elementwise_backward(kind, grad, saved, ctx.param, ctx.from_output)
        else:
            dx = kind.run_backward(grad, saved, ctx.param, ctx.from_output)
        return dx, None, None, None, None, None


def _pytorch_grad(grad):
    """Whether the incoming gradient is one only PyTorch's ops take: batched (vmap, as for
    is_grads_batched), a dual tensor (forward-over-reverse), under a torch.func transform, or
    a tensor subclass; the backward then runs PyTorch's formulas, which those see through."""
    if type(grad) is not Tensor or _forward_ad._current_level >= 0 or \
            torch._C._functorch.is_functorch_wrapped_tensor(grad) or \
            torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    keys = torch._C._dispatch_keys(grad)  # a batched tensor of is_grads_batched has no backend
    return not (keys.has(torch._C.DispatchKey.CPU) or keys.has(torch._C.DispatchKey.CUDA))


def _native_backward(ctx, grad):
    """The eager backward by PyTorch's own ops (differentiable): (dx, dweight or None)."""
    kind = ctx.kind
    if kind is _PRELU:
        x, weight = ctx.saved_tensors
        positive = x > 0
        dx = torch.where(positive, grad, grad * _channel_view(weight, x))
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return dx, _sum_to_weight(torch.where(positive, zero, x * grad), weight)
    (saved,) = ctx.saved_tensors
    return kind.native_backward(grad, saved, ctx.param, ctx.from_output), None


def _recording():
    """Whether autograd records: grad mode on, outside inference mode (which records nothing,
    even under enable_grad)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


_CREATION = getattr(torch._C._autograd, "CreationMeta", None)
_VIEW_REFUSALS = {} if _CREATION is None else {
    _CREATION.NO_GRAD_MODE:
        "A view was created in no_grad mode and is being modified inplace with grad mode "
        "enabled. Given that this use case is ambiguous and error-prone, it is forbidden. You can "
        "clarify your code by moving both the view and the inplace either both inside the "
        "no_grad block (if you don't want the inplace to be tracked) or both outside (if you "
        "want the inplace to be tracked).",
    _CREATION.INFERENCE_MODE:
        "A view was created in inference mode and is being modified inplace in normal mode. "
        "Given that this use case is ambiguous and error-prone, it is forbidden. You can clarify "
        "your code by moving both the view and the inplace either both inside the "
        "inference_mode block (if you don't want the inplace to be tracked) or both outside (if "
        "you want the inplace to be tracked).",
}


def _creation_meta(view):
    """How a view was made (PyTorch refuses to write some in place), or None if unknown."""
    get = getattr(torch._C._autograd, "_get_creation_meta", None)
    return None if get is None else get(view)


def _check_inplace(x):
    """PyTorch's refusals of in-place ops, in its order, before anything is written: on
    inference tensors outside inference mode, on views made under no_grad or inference mode
    and on leaves (or their views) that require grad, and on tensors whose elements share
    memory."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not "
                           "allowed.You can make a clone to get a normal tensor before doing "
                           "inplace update.See https://github.com/pytorch/rfcs/pull/17 for more "
                           "details.")
    if x.requires_grad and _recording():
        if x._is_view():
            refusal = _VIEW_REFUSALS.get(_creation_meta(x))
            if refusal is not None:
                raise RuntimeError(refusal)
            if x._base.is_leaf:
                raise RuntimeError("a view of a leaf Variable that requires grad is being used "
                                   "in an in-place operation.")
        if x.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               "operation.")
    if torch._debug_has_internal_overlap(x) == 1:
        raise RuntimeError("unsupported operation: more than one element of the written-to "
                           "tensor refers to a single memory location. Please clone() the "
                           "tensor before performing the operation.")


def _activate(kind, x, param, weight, inplace, want_counts):
    """kind(x) on fastrelu's kernels: (y, statistics or None); the statistics are an
    ActivationStats in eager mode, a tensor of positive counts when traced."""
    if torch.compiler.is_compiling() or type(x) is not Tensor or \
            torch._C._len_torch_dispatch_stack():
        return _traced(kind, x, param, weight, inplace, want_counts)
    if inplace:
        _check_inplace(x)
        if torch._debug_has_internal_overlap(x) == 2 and not want_counts:
            # elements that may share memory: PyTorch writes them its own way, and so here
            return kind.native_inplace(x, param), None
    if _recording() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        stats_sink = [] if want_counts else None
        y = _EagerActivation.apply(x, weight, kind, param, inplace, stats_sink)
        return y, stats_sink[0] if want_counts else None
    y, stats = kind.run(x, param, weight, out=x if inplace else None, want_counts=want_counts)
    if inplace:
        torch.autograd.graph.increment_version(x)
    return y, stats


def _routed(kind, x, size_matters=True):
    """Whether fastrelu's kernels take `x`: a float CPU or CUDA tensor of at least CROSSOVER
    elements (checked first: it is what turns small calls away cheaply; when tracing for
    torch.compile or torch.export, on the traced size: see _small), outside the modes PyTorch's
    own kernels must serve (see _needs_native)."""
    if not isinstance(x, Tensor):
        return False
    if size_matters and _small(x.numel(), CROSSOVER["cuda" if _on_cuda(x) else "cpu"][kind.name]):
        return False
    if x.layout is not torch.strided or not (x.is_cpu or _on_cuda(x)) or x.dtype not in _DTYPES:
        return False
    return _needs_native(kind, x) is None


def _small(n, crossover):
    """Whether n elements are below the crossover.  A symbolic size that reaches Python as a
    torch.SymInt (torch.export's dimensions) is not, so that it gets no guard, unless no size is
    large enough; torch.compile sees an int here and guards the comparison."""
    return crossover == _NEVER or (isinstance(n, int) and n < crossover)


def _needs_native(kind, x):
    """What makes a call PyTorch's own, or None: forward-mode AD (a dual level is open),
    torch.func transforms and torch.jit.trace, which fastrelu's eager autograd.Function and
    kernel calls do not take part in (the trace would record an empty result), autocast for
    PReLU, whose inputs PyTorch casts, tensors of more than NumPy's 64 dimensions, and a tensor
    whose negative bit is set (its memory holds the negated values: an in-place call must write
    it through PyTorch)."""
    if kind is _PRELU and torch.is_autocast_enabled(x.device.type):
        return "autocast"
    if x.dim() > 64:
        return "a tensor of more than 64 dimensions"
    if torch.compiler.is_compiling():
        return None
    if x.is_neg():
        return "a lazily negated tensor"
    if _forward_ad._current_level >= 0:
        return "forward-mode AD"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform"
    if torch._C._get_tracing_state() is not None:
        return "torch.jit.trace"
    return None


# the largest parameter PyTorch's CPU kernels take, by dtype: float16 and bfloat16 compute in
# float32, and PyTorch refuses what overflows the type it computes in
_PARAM_MAX = {dtype: torch.finfo(torch.float64 if dtype is torch.float64 else torch.float32).max
              for dtype in _DTYPES}


def _number(value, x):
    """A Python float for a Python number PyTorch's kernels take for x, else None (left to
    PyTorch, which refuses a parameter that overflows the type it computes in)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and \
            not isinstance(value, torch.SymFloat):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float64: PyTorch's op says so in its words
            return None
        if abs(value) <= _PARAM_MAX[x.dtype]:
            return value
    return None


def _prelu_weight_ok(x, weight):
    """Whether `weight` is one PyTorch accepts for x without promotion (PyTorch's own prelu
    refuses the rest, with its messages)."""
    return (isinstance(weight, Tensor) and weight.dtype == x.dtype and
            weight.device == x.device and weight.dim() <= 1 and
            weight.numel() in (1, _units(x)) and weight.layout is torch.strided)


# ---- functional API (torch.nn.functional's signatures) ------------------------------------------


def relu(input, inplace=False):
    """torch.nn.functional.relu on fastrelu's kernels."""
    if not _routed(_RELU, input):
        return F.relu(input, inplace=inplace)
    return _activate(_RELU, input, 0.0, None, bool(inplace), False)[0]


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """torch.nn.functional.leaky_relu on fastrelu's kernels."""
    if not _routed(_LEAKY, input) or (slope := _number(negative_slope, input)) is None:
        return F.leaky_relu(input, negative_slope, inplace)
    return _activate(_LEAKY, input, slope, None, bool(inplace), False)[0]


def elu(input, alpha=1.0, inplace=False):
    """torch.nn.functional.elu on fastrelu's kernels (within 4 ulp of PyTorch)."""
    if not _routed(_ELU, input) or (a := _number(alpha, input)) is None:
        return F.elu(input, alpha, inplace)
    return _activate(_ELU, input, a, None, bool(inplace), False)[0]


def prelu(input, weight):
    """torch.nn.functional.prelu on fastrelu's kernels: the weight gradient is summed in float64
    in the same pass as the input gradient."""
    if not (_routed(_PRELU, input) and _prelu_weight_ok(input, weight)):
        return F.prelu(input, weight)
    return _activate(_PRELU, input, 0.0, weight, False, False)[0]


# ---- modules ------------------------------------------------------------------------------------


# modules fed to a tracker, by id, for the tracker op to find at run time
_TRACKED = weakref.WeakValueDictionary()


def _feed_tracker_impl(positive, per_unit, module_id):
    module = _TRACKED.get(module_id)
    if module is not None and module._tracker is not None:
        module._tracker.update(module._tracker_name, ActivationStats(positive.numpy(), per_unit))


_feed_tracker_op = _define("feed_tracker", "(Tensor positive, SymInt per_unit, int module) -> ()",
                           _feed_tracker_impl, lambda *args: None)
if hasattr(_feed_tracker_op, "register_effect"):
    from torch._library.effects import EffectType

    # an ordered side effect: compiled graphs keep the call, in order, though it returns nothing
    _feed_tracker_op.register_effect(EffectType.ORDERED)

    def _feed_tracker(positive, per_unit, module_id):
        _feed_tracker_op(positive, per_unit, module_id)
else:
    def _feed_tracker(positive, per_unit, module_id):
        raise RuntimeError(
            f"fastrelu.torch.track() feeds its tracker inside compiled graphs on PyTorch versions "
            f"that register side effects of custom ops (not {torch.__version__}); read each "
            "module's .stats after the step instead, or call fastrelu.torch.track(model, None) "
            "before compiling")


def _below_crossover(kind, x):
    return _small(x.numel(), CROSSOVER["cuda" if x.is_cuda else "cpu"][kind.name])


class _Tracked:
    """What the fastrelu modules add to their torch.nn classes: the forward on fastrelu's
    kernels, optional dead-unit statistics from the same pass (`track_stats`), the last batch's
    in `stats`, and a tracker fed by `track()`.  Class attributes give the defaults, so that
    convert() can retype torch modules in place."""

    track_stats = False
    _last_stats = None
    _tracker = None
    _tracker_name = None
    _param_name = None  # the torch module's attribute holding the op's parameter
    _op_name = None  # its kind's name, read once a call on the fast path

    def __setstate__(self, state):
        # a copy (deepcopy, pickle, torch.load) of a tracked module feeds its own tracker, also
        # from compiled graphs, which find it by id
        super().__setstate__(state)
        if self._tracker is not None:
            _TRACKED[id(self)] = self

    def forward(self, input):
        # small plain tensors first, in as few steps as possible: this is all they pay
        if type(input) is Tensor and not self.track_stats:
            limit = CROSSOVER["cuda" if input.is_cuda else "cpu"][self._op_name]
            if limit == _NEVER or _small(input.numel(), limit):
                return self._native(input)
        kind = self._kind
        if not self.track_stats and (not isinstance(input, Tensor) or
                                     _below_crossover(kind, input)):
            return super().forward(input)  # the torch module's own
        weight = self.weight if kind is _PRELU else None
        inplace = getattr(self, "inplace", False)
        kernels_take_it = _routed(kind, input, size_matters=False) and \
            (weight is None or _prelu_weight_ok(input, weight))
        param = 0.0 if self._param_name is None or not kernels_take_it else \
            _number(getattr(self, self._param_name), input)
        kernels_take_it = kernels_take_it and param is not None
        if not self.track_stats:
            if not kernels_take_it:
                return super().forward(input)
            return _activate(kind, input, param, weight, inplace, False)[0]
        mode = isinstance(input, Tensor) and (
            _needs_native(kind, input) or
            (inplace and not torch.compiler.is_compiling() and
             torch._debug_has_internal_overlap(input) == 2 and
             "an in-place call on elements that may share memory"))
        if mode:
            raise RuntimeError(f"{type(self).__name__}(track_stats=True) counts in fastrelu's "
                               f"kernels, which {mode} does not reach: turn track_stats off "
                               "there")
        if not kernels_take_it:
            raise TypeError(f"{type(self).__name__}(track_stats=True) needs a float16, bfloat16, "
                            "float32 or float64 CPU or CUDA tensor (a matching weight, a finite "
                            f"parameter), got {input.dtype} on {input.device}")
        y, stats = _activate(kind, input, param, weight, inplace, True)
        if isinstance(stats, Tensor):  # traced: the counts are an output of the graph
            per_unit = input.numel() // _units(input)
            if not torch.compiler.is_exporting():  # export's fake counts are no batch's
                self._last_stats = (stats, per_unit)
            if self._tracker is not None:
                _feed_tracker(stats, per_unit, id(self))
        else:
            self._last_stats = stats
            if self._tracker is not None:
                self._tracker.update(self._tracker_name, stats)
        return y

    @property
    def stats(self):
        """The last batch's ActivationStats (positive inputs per channel along dim 1), or None
        before the first batch with track_stats=True."""
        stats = self._last_stats
        if isinstance(stats, tuple):
            counts, per_unit = stats
            return ActivationStats(counts.cpu().numpy(), per_unit)
        return stats

    def extra_repr(self):
        parts = [super().extra_repr()] + (["track_stats=True"] if self.track_stats else [])
        return ", ".join(p for p in parts if p)

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in place of this module: the torch.nn module it
        extends, sharing its parameters.  TorchScript cannot call fastrelu's kernels, so the
        scripted model runs PyTorch's (the same results, no statistics); torch.jit.script also
        leaves these torch modules in the model it was given: convert() it again to go on
        eagerly on fastrelu's kernels."""
        native = copy.copy(self)
        native.__class__ = self._torch_class
        return native


class ReLU(_Tracked, torch.nn.ReLU):
    """torch.nn.ReLU on fastrelu's kernels; track_stats=True counts positive inputs per channel
    in the same pass (see `stats`)."""

    _kind, _op_name, _torch_class = _RELU, _RELU.name, torch.nn.ReLU

    def __init__(self, inplace=False, *, track_stats=False):
        super().__init__(inplace)
        self.track_stats = track_stats

    # torch.nn.ReLU's forward on a plain tensor, without torch.nn.functional's Python layer (the
    # same kernel): the other modules' alike
    def _native(self, input):
        return torch.relu_(input) if self.inplace else torch.relu(input)


class LeakyReLU(_Tracked, torch.nn.LeakyReLU):
    """torch.nn.LeakyReLU on fastrelu's kernels (see ReLU for track_stats)."""

    _kind, _op_name, _param_name = _LEAKY, _LEAKY.name, "negative_slope"
    _torch_class = torch.nn.LeakyReLU

    def __init__(self, negative_slope=0.01, inplace=False, *, track_stats=False):
        super().__init__(negative_slope, inplace)
        self.track_stats = track_stats

    def _native(self, input):
        nn_ops = torch._C._nn
        return nn_ops.leaky_relu_(input, self.negative_slope) if self.inplace else \
            nn_ops.leaky_relu(input, self.negative_slope)


class ELU(_Tracked, torch.nn.ELU):
    """torch.nn.ELU on fastrelu's kernels (see ReLU for track_stats)."""

    _kind, _op_name, _param_name = _ELU, _ELU.name, "alpha"
    _torch_class = torch.nn.ELU

    def __init__(self, alpha=1.0, inplace=False, *, track_stats=False):
        super().__init__(alpha, inplace)
        self.track_stats = track_stats

    def _native(self, input):
        nn_ops = torch._C._nn
        return nn_ops.elu_(input, self.alpha) if self.inplace else nn_ops.elu(input, self.alpha)


class PReLU(_Tracked, torch.nn.PReLU):
    """torch.nn.PReLU on fastrelu's kernels: forward, and the input and weight gradients in one
    pass (the weight's summed in float64).  See ReLU for track_stats."""

    _kind, _op_name, _torch_class = _PRELU, _PRELU.name, torch.nn.PReLU

    def __init__(self, num_parameters=1, init=0.25, device=None, dtype=None, *,
                 track_stats=False):
        super().__init__(num_parameters, init, device=device, dtype=dtype)
        self.track_stats = track_stats

    def _native(self, input):
        return torch.prelu(input, self.weight)


_COUNTERPARTS = {cls._torch_class: cls for cls in (ReLU, LeakyReLU, ELU, PReLU)}


def convert(module):
    """Turns every torch.nn.ReLU, LeakyReLU, PReLU and ELU in `module` (itself included, at any
    depth) into its fastrelu counterpart, in place, and returns `module`.

    The modules keep their identity, parameters (same Parameter objects, so an optimizer made
    before still updates them), devices, dtypes, hooks and state_dict keys: only their class
    changes, to a subclass of the torch one.  Subclasses of those torch classes are left alone
    (their forward may differ)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert takes a torch.nn.Module, not {type(module).__name__}")
    for m in module.modules():
        counterpart = _COUNTERPARTS.get(type(m))
        if counterpart is not None:
            m.__class__ = counterpart
    return module


def track(model, tracker):
    """Feeds `tracker` (a fastrelu.DeadUnitTracker) from every fastrelu activation module in
    `model`, named as in ``model.named_modules()``: each forward pass counts the positive inputs
    per channel in the same pass and adds them with ``tracker.update(name, stats)``.
    ``track(model, None)`` stops it (statistics stay on; set ``track_stats = False`` to turn
    them off).  Returns the names of the modules tracked.  Under torch.compile the counts leave
    the graph through an op with an ordered side effect, so the tracker is fed there too."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"track takes a torch.nn.Module, not {type(model).__name__}")
    if tracker is not None and not isinstance(tracker, DeadUnitTracker):
        raise TypeError(f"tracker must be a fastrelu.DeadUnitTracker or None, not "
                        f"{type(tracker).__name__}")
    names = []
    for name, m in model.named_modules():
        if isinstance(m, _Tracked):
            m.track_stats = m.track_stats or tracker is not None
            m._tracker, m._tracker_name = tracker, name
            _TRACKED[id(m)] = m
            names.append(name)
    if not names and tracker is not None:
        raise ValueError("the model has no fastrelu activation modules: call "
                         "fastrelu.torch.convert(model) first")
    return names
