"""fastrelu: fused, compiled kernels for the ReLU family of activation functions.

Forward ops return the activation; backward ops return the gradient with respect to the input
(and, for PReLU, the weight).  Every op takes ``out=`` and works in place; NumPy arrays run on the
CPU kernels.  The exact semantics (NaN, signed zeros, infinities) match PyTorch.
"""
try:
    from . import _cpu
except ImportError as _exc:
    from ._missing import explain as _explain

    raise ImportError(_explain(__file__, _exc)) from _exc

from ._api import (
    bias_activation,
    bias_activation_backward,
    bias_prelu_backward,
    elu,
    elu_backward,
    leaky_relu,
    leaky_relu_backward,
    prelu,
    prelu_backward,
    relu,
    relu_backward,
)
from ._runtime import get_num_threads, info, set_num_threads
from .monitor import ActivationStats, DeadUnitTracker

from ._version import __version__

__all__ = [
    "relu",
    "relu_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "prelu",
    "prelu_backward",
    "elu",
    "elu_backward",
    "bias_activation",
    "bias_activation_backward",
    "bias_prelu_backward",
    "ActivationStats",
    "DeadUnitTracker",
    "get_num_threads",
    "set_num_threads",
    "info",
]
