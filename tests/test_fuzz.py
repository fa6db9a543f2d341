"""Hostile-input fuzzing of the whole public API: every function, every argument.

Each example builds one call.  Its arrays are carved out of byte buffers at any offset, stride,
memory order, byte order and alignment -- often all of them views of ONE buffer, so that x, grad,
weight, bias and out overlap in every way -- or are given as Python numbers, lists or array-likes;
and often one argument is replaced by a hostile value (None, strings, bytes, dicts, objects,
complex numbers, bools, NumPy integers and bools, huge integers, NaN and infinite parameters,
arrays of the wrong dtype or shape, masked arrays, objects that fake a CUDA array...).  Then:

* a call with valid arguments returns what ``fastrelu.reference`` computes on copies made before
  the call (bit for bit; ELU within 4 ulp of NumPy's exp/expm1; the PReLU weight and the bias
  gradients within the rounding of a float64 sum), in the right dtype and shape, and ``out``
  itself when given, and writes nothing but ``out``;
* a call with an invalid argument, or an ``out`` that overlaps an input other than as the exact
  in-place target, raises TypeError or ValueError naming the argument, and writes nothing;
* an ``out`` whose elements share memory with each other is refused or holds the right values.

FASTRELU_FUZZ_EXAMPLES=n runs every fuzz test here with n examples; FASTRELU_FUZZ_SHRINK=1
minimizes the failures found.
"""
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import threadpoolctl
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastrelu
from fastrelu import reference
from helpers import DTYPES, EDGE_VALUES, assert_bitwise

EXAMPLES = int(os.environ.get("FASTRELU_FUZZ_EXAMPLES") or 0)
# Failures are reported as found, each draw labelled; FASTRELU_FUZZ_SHRINK=1 minimizes them first
# (which can take minutes per failure).
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + \
    [Phase.shrink] * bool(os.environ.get("FASTRELU_FUZZ_SHRINK"))


def fuzz(default):
    return settings(max_examples=EXAMPLES or default, deadline=None, derandomize=True,
                    database=None, phases=PHASES, suppress_health_check=list(HealthCheck))


# ---- hostile and unusual values ------------------------------------------------------------------


class FakeCudaArray:
    """An object that claims to be a CUDA array, with a malformed interface."""

    def __init__(self, interface):
        self.__cuda_array_interface__ = interface

    def __repr__(self):
        return f"FakeCudaArray({self.__cuda_array_interface__!r})"


class RaisingArray:
    """An array-like whose conversion fails."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("this object cannot be converted")

    def __repr__(self):
        return "RaisingArray()"


class ArrayLike:
    """A valid array-like: converts to a float array of its own dtype."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a.copy() if dtype is None else self.a.astype(dtype)

    def __repr__(self):
        return f"ArrayLike({self.a!r})"


class Subclass(np.ndarray):
    pass


def sets_dtype(v):
    """Arrays, array-likes and NumPy scalars set a call's dtype; Python numbers and lists (and
    np.float64, a float) take it."""
    return isinstance(v, (np.ndarray, ArrayLike, np.generic)) and not isinstance(v, float)


def python_int(v):
    """An integral float as a Python int: a real number however large (1e308 included)."""
    return int(v)


def fake_cuda_arrays():
    return [
        FakeCudaArray({}),
        FakeCudaArray({"shape": 3, "typestr": "<f4", "data": (0, False), "version": 3}),
        FakeCudaArray({"shape": (2,), "typestr": "<f4", "data": None, "version": 3}),
        FakeCudaArray({"shape": (2,), "typestr": "not a type", "data": (0, False), "version": 3}),
    ]


def hostile_common():
    """Values that no argument of any op accepts (None is left to each argument)."""
    return ["x", "", "1.5", b"\x00\x00\x80\x3f", bytearray(4), memoryview(b"ab"), {},
            {"shape": (2,)}, object(), 1j, complex(1, 0), np.complex64(1), True, False, np.True_,
            np.False_, set(), Ellipsis, slice(None), type, len, 10**400, -10**400]


def hostile_arrays(shape, dtype):
    """Array arguments of the wrong kind: every one must be refused."""
    shape = shape if len(shape) else (2,)
    return hostile_common() + fake_cuda_arrays() + [
        None, np.int64(3), np.uint64(2**64 - 1), np.int8(-1), np.array([1, 2], np.int32),
        np.zeros(shape, np.int16), np.zeros(shape, np.uint8), np.zeros(shape, np.bool_),
        np.zeros(shape, np.complex64), np.zeros(shape, np.longdouble),
        np.zeros(shape, "datetime64[s]"), np.zeros(shape, "m8[ns]"), np.zeros(shape, object),
        np.zeros(shape, "U3"), np.zeros(shape, [("a", np.float32)]),
        np.ma.array(np.zeros(shape, dtype)), ["a", "b"], [None], [1j], [[1.0], [1.0, 2.0]],
        [True, False], [10**400], [2**64], [RaisingArray()], RaisingArray(),
    ]


def hostile_params():
    return hostile_common() + [
        float("nan"), float("inf"), -float("inf"), np.float32("nan"), np.float16("inf"),
        np.float64(-np.inf), 2 * 10**308, -2 * 10**308, Fraction(10**400, 3), [0.1], (0.1,),
        np.array([0.5]), np.array(np.nan), np.array(True), np.array("a"), np.array(1j),
        Decimal("0.1"), np.datetime64(1, "s"), FakeCudaArray({}),
    ]


def valid_params(nonnegative):
    values = [0, 1, 3, 0.0, -0.0, 0.01, 0.2, 1.0, 2.5, 5e-324, 1e300, 1e308, 10**300,
              np.float16(0.5), np.float32(0.25), np.float64(3.0), np.int8(1), np.uint64(7),
              np.int64(0), np.array(0.25), np.array(2, np.int32), np.array(0.5, np.float16),
              Fraction(1, 3), np.longdouble(0.1)]
    if not nonnegative:
        values += [-1, -0.01, -2.5, -1e300, -1e308, np.float32(-0.5), np.int16(-3),
                   np.array(-0.75), Fraction(-7, 2)]
    return values


NEGATIVE_PARAMS = [-1, -0.5, np.float32(-2), -1e-300, np.array(-1.0), Fraction(-1, 3)]
VALID_FLAGS = [True, False, np.True_, np.False_, 0, 1, np.int8(1), np.uint64(0), np.int64(1),
               np.uint8(1)]
HOSTILE_FLAGS = [2, -1, 10**400, 0.0, 1.0, np.float64(1.0), None, "True", "", b"1", [], [1],
                 (1,), {}, object(), 1j, np.array([1]), np.array([True]), float("nan")]
HOSTILE_AXES = [True, False, np.True_, np.False_, 1.0, np.float64(1.0), float("nan"), "1", b"1",
                None, [1], (1,), {}, object(), 1j, np.array([1]), 0.5, Decimal(1), Fraction(1, 1)]
INTEGER_TYPES = [int, int, int, np.int8, np.int16, np.int32, np.int64, np.intp, np.uint64]
ACTIVATIONS = ["relu", "leaky_relu", "elu", np.str_("elu"), np.str_("relu")]
HOSTILE_ACTIVATIONS = ["ReLU", "relu ", "", "sigmoid", "leaky", b"relu", None, 1, ["relu"],
                       object(), np.array("relu"), {"relu": 1}]
HOSTILE_STREAMS = [0, 1, -1, True, False, "stream", object(), np.int64(0), 2**70,
                   type("Stream", (), {"__cuda_stream__": 1})(), FakeCudaArray({})]
HOSTILE_PAIRS = ["ab", {0: None, 1: None}, 1.0, object(), (None,), (None, None, None), [None],
                 np.zeros(2), np.zeros((2, 3)), True]

SIZES = [0, 1, 1, 2, 2, 3, 3, 4, 5, 7]
STEPS = [1, 1, 1, 2, 3, -1, -1, -2, 0]  # element steps of a drawn layout: gaps, reversal, zero
ELEMENTS = st.one_of(
    st.sampled_from(EDGE_VALUES),
    st.floats(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(allow_nan=True, allow_infinity=True, width=16),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3).map(float),
)

# argument -> what an error about it must mention
NAMES = {
    "x": r"\bx\b", "y": r"\by\b", "grad": r"\bgrad\b", "weight": r"\bweight\b",
    "bias": r"\bbias\b", "out": r"\bout\b", "axis": r"\baxis\b", "stats": r"\bstats\b",
    "from_output": r"\bfrom_output\b", "negative_slope": r"\bnegative_slope\b",
    "alpha": r"\balpha\b", "param": r"param|negative_slope|alpha", "activation": r"activation",
    "stream": r"\bstream\b", "keyword": r"outt|positional",
}
ANY_ARRAY = r"\b(x|y|grad|weight|bias|out)\b"


# ---- memory --------------------------------------------------------------------------------------


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def address(a):
    return a.__array_interface__["data"][0]


def element_offsets(a):
    """Byte offsets of a's elements from its data pointer, as a flat array."""
    off = np.zeros(a.shape, np.int64)
    for d, (n, s) in enumerate(zip(a.shape, a.strides)):
        shape = [1] * a.ndim
        shape[d] = n
        off = off + (np.arange(n, dtype=np.int64) * s).reshape(shape)
    return off.ravel()


def same_elements(a, b):
    """a and b are the same elements in the same order (in place)."""
    return (address(a) == address(b) and a.shape == b.shape and a.itemsize == b.itemsize
            and all(sa == sb or n <= 1 for n, sa, sb in zip(a.shape, a.strides, b.strides)))


def relation(a, b):
    """0: no memory in common; 1: the same elements; 2: any other overlap."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or not a.size or not b.size:
        return 0
    if same_elements(a, b):
        return 1
    return 2 if np.shares_memory(a, b) else 0


def forbidden_overlap(out, inp):
    """An output that may not share any memory with inp (the weight, bias, or for out[1], the
    other arrays): even being inp itself is refused."""
    return relation(out, inp) != 0


def self_overlapping(a):
    """Some elements of a share bytes with others (zero or too small strides)."""
    if not isinstance(a, np.ndarray) or a.size <= 1:
        return False
    return bool(np.any(np.diff(np.sort(element_offsets(a))) < a.itemsize))


class Placed:
    """An ndarray argument to be carved out of a buffer: its shape, dtype and a drawn layout (memory
    order, steps -- gapped, negative or zero --, byte order, alignment, subclass)."""

    def __init__(self, case, name, shape, dtype, values=None, readonly=False, like=None):
        self.name, self.shape, self.values, self.readonly = name, tuple(shape), values, readonly
        self.like, self.array, self.buf, self.start = like, None, None, None
        if like is not None:  # an identical view of another placed array, made with it
            self.dtype, self.subclass = like.dtype, None
            return
        draw = case.draw
        kind = draw(st.sampled_from(["C", "C", "C", "F", "any"]), label=f"{name} layout")
        ndim = len(self.shape)
        order = list(range(ndim))[::-1] if kind != "F" else list(range(ndim))
        steps = [1] * ndim
        swapped = misalign = False
        if kind == "any":
            order = draw(st.permutations(order), label=f"{name} memory order")
            steps = [draw(st.sampled_from(STEPS), label=f"{name} step")
                     for _ in range(ndim)]
            swapped = draw(st.sampled_from([False, False, True]), label=f"{name} byte-swapped")
            misalign = draw(st.sampled_from([False, False, True]), label=f"{name} unaligned")
        elif ndim:
            misalign = draw(st.sampled_from([False] * 7 + [True]), label=f"{name} unaligned")
        self.dtype = np.dtype(dtype).newbyteorder("S") if swapped else np.dtype(dtype)
        itemsize = self.dtype.itemsize
        self.misalign = draw(st.integers(1, itemsize - 1), label=f"{name} misalignment") \
            if misalign else 0
        self.strides, acc = [0] * ndim, itemsize
        for ax in order:
            self.strides[ax] = acc * steps[ax]
            acc *= max(self.shape[ax], 1) * max(abs(steps[ax]), 1)
        self.lo = sum(min(0, (n - 1) * s) for n, s in zip(self.shape, self.strides) if n)
        hi = sum(max(0, (n - 1) * s) for n, s in zip(self.shape, self.strides) if n)
        self.span = hi - self.lo + itemsize
        self.subclass = draw(st.sampled_from([None] * 9 + [Subclass] + [np.matrix] * (ndim == 2)),
                             label=f"{name} subclass")

    def make(self, buf, start):
        self.buf, self.start = buf, start
        a = np.ndarray(self.shape, self.dtype, buffer=buf, offset=start - self.lo,
                       strides=self.strides)
        self.array = a.view(self.subclass) if self.subclass else a

    def __repr__(self):
        return f"Placed({self.name}, {self.shape}, {self.dtype})"


class Case:
    """One call under construction: its buffers, its arguments, and what makes it invalid."""

    def __init__(self, data, argnames):
        self.data = data
        self.placed = []
        self.buffers = []
        self.problems = []       # (argument, pattern the error must match)
        self.may_refuse = False  # an out whose elements overlap each other
        self.wide_params = []    # parameters beyond float32's range (see run)
        self.dtype_set = False   # an input array sets the dtype
        self.dtype = np.dtype(self.draw(st.sampled_from(DTYPES), label="dtype"))
        self.big = self.draw(st.sampled_from([False] * 24 + [True]), label="big")
        self.shared = self.draw(st.sampled_from([False, True]), label="one buffer")
        self.target = self.draw(st.sampled_from([None] * len(argnames) + list(argnames)),
                                label="hostile argument")

    def draw(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    @property
    def result_dtype(self):
        return self.dtype if self.dtype_set else np.dtype(np.float64)

    def problem(self, name, pattern=None):
        if name not in [n for n, _ in self.problems]:
            self.problems.append((name, NAMES[name] if pattern is None else pattern))

    def hostile(self, name, pool, pattern=None):
        value = self.draw(st.sampled_from(pool), label=f"hostile {name}")
        cuda = isinstance(value, FakeCudaArray) and name in ("x", "y", "grad", "weight", "bias",
                                                             "out")
        self.problem(name, ANY_ARRAY if cuda else pattern)
        return value

    # -- shapes and values

    def shape(self, min_dims=0, max_dims=4):
        if self.big:
            c = self.draw(st.sampled_from([1, 3, 16, 100, 257, 512]), label="channels")
            inner = self.draw(st.sampled_from([None, None, 1, 5, 64, 256, 300]), label="inner")
            n = self.draw(st.integers(33_000, 70_000), label="elements")
            if inner is None:
                return (-(-n // c), c)
            shape = (-(-n // (c * inner)), c, inner)
            return shape if self.draw(st.booleans(), label="channels first") else shape[::-1]
        if self.draw(st.sampled_from([False] * 11 + [True]), label="many dims"):
            ndim = self.draw(st.integers(max(min_dims, 5), 12), label="ndim")
            return tuple(self.draw(st.lists(st.sampled_from([1, 1, 1, 2]), min_size=ndim,
                                            max_size=ndim), label="shape"))
        ndim = self.draw(st.integers(min_dims, max_dims), label="ndim")
        return tuple(self.draw(st.lists(st.sampled_from(SIZES), min_size=ndim, max_size=ndim),
                               label="shape"))

    def values(self, shape):
        n = math.prod(shape)
        if n <= 64:
            return np.array(self.draw(st.lists(ELEMENTS, min_size=n, max_size=n), label="values"),
                            np.float64).reshape(shape)
        rng = np.random.default_rng(self.draw(st.integers(0, 2**32 - 1), label="seed"))
        v = rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3], n)
        sprinkle = rng.random(n) < 0.05
        v[sprinkle] = rng.choice(EDGE_VALUES, int(sprinkle.sum()))
        return v.reshape(shape)

    # -- arguments

    def input(self, name, shape, extra_hostile=()):
        """An array argument: a placed ndarray (mostly), a Python number or list, an array-like,
        or (when it is the hostile argument) something that must be refused."""
        if self.target == name:
            pool = hostile_arrays(shape, self.dtype) + list(extra_hostile)
            if self.dtype_set:  # a float array of another dtype than the call's
                other = [d for d in DTYPES if np.dtype(d) != self.dtype]
                pool += [np.zeros(shape, d) for d in other]
            return self.hostile(name, pool)
        python_ok = all(shape[:-1]) and not self.big
        forms = ["array"] * 8 + (["python", "arraylike"] if python_ok else []) + \
            ["scalar"] * (shape == ())
        form = self.draw(st.sampled_from(forms), label=f"{name} form")
        values = self.values(shape)
        if form == "scalar" and self.dtype == np.float64:  # a float subclass: a Python value
            return np.float64(values[()])
        if form == "python":
            if not shape:
                v = float(values)
                return python_int(v) if v.is_integer() and self.draw(st.booleans(), label="int") \
                    else v
            nested = values.tolist()
            return tuple(nested) if self.draw(st.booleans(), label="tuple") else nested
        self.dtype_set = True
        if form == "scalar":  # a NumPy float16 or float32 scalar
            with np.errstate(all="ignore"):
                return self.dtype.type(values[()])
        if form == "arraylike":
            with np.errstate(all="ignore"):
                return ArrayLike(values.astype(self.dtype))
        readonly = self.draw(st.sampled_from([False] * 4 + [True]), label=f"{name} read-only")
        p = Placed(self, name, shape, self.dtype, values, readonly)
        self.placed.append(p)
        return p

    def out(self, name, shape, aliases=(), hostile=None):
        """None, a placed array, an alias of a placed input (the same object, or an identical new
        view), or a hostile value.  aliases: (label, value) of candidate inputs."""
        dtype = self.result_dtype
        if hostile or (hostile is None and self.target == name):
            wrong_shapes = sorted({shape[:-1] + (shape[-1] + 1,) if shape else (1,),
                                   shape + (1,), (0,), (2,), (3,), shape[1:] + (2,)} - {shape})
            if self.draw(st.sampled_from([False, False, True]), label=f"{name} placed wrong"):
                p = Placed(self, name, self.draw(st.sampled_from(wrong_shapes)), dtype)
                p.values = np.full(p.shape, 7.0)
                self.placed.append(p)
                self.problem("out")
                return p
            pool = hostile_common() + fake_cuda_arrays() + [
                [0.0], "out", 1.0, np.zeros(shape, np.int32), np.zeros(shape, np.complex128),
                np.zeros(shape, np.longdouble), np.ma.array(np.zeros(shape, dtype)),
                (np.zeros(shape, dtype),), self.readonly_array(shape, dtype)]
            pool += [np.zeros(s, dtype) for s in wrong_shapes]
            pool += [np.zeros(shape, d) for d in DTYPES if np.dtype(d) != dtype]
            return self.hostile("out", pool)
        aliases = [(label, v) for label, v in aliases if isinstance(v, Placed) and v.like is None]
        choices = ["none", "none", "placed", "placed", "placed"] + \
            [f"{label} itself" for label, _ in aliases] + [f"{label} view" for label, _ in aliases]
        choice = self.draw(st.sampled_from(choices), label=f"{name}")
        if choice == "none":
            return None
        if choice != "placed":
            label, how = choice.rsplit(" ", 1)
            target = dict(aliases)[label]
            if how == "itself":
                return target
            alias = Placed(self, name, target.shape, target.dtype, like=target)
            self.placed.append(alias)
            return alias
        p = Placed(self, name, shape, dtype)
        p.values = self.values(shape) if math.prod(shape) <= 64 else np.full(shape, 7.0)
        self.placed.append(p)
        return p

    def out_pair(self, shapes, aliases):
        """out for the backward ops with a parameter gradient: None, or a pair."""
        if self.target == "out":
            if self.draw(st.booleans(), label="hostile pair"):
                return self.hostile("out", HOSTILE_PAIRS)
            which = self.draw(st.sampled_from([0, 1]), label="hostile element")
            pair = [None, None]
            pair[which] = self.out(f"out{which}", shapes[which], hostile=True)
            return tuple(pair) if self.draw(st.booleans(), label="pair type") else pair
        if self.draw(st.sampled_from([True, False, False]), label="out=None"):
            return None
        pair = [self.out(f"out{i}", shapes[i], aliases[i]) for i in (0, 1)]
        return tuple(pair) if self.draw(st.booleans(), label="pair type") else pair

    @staticmethod
    def readonly_array(shape, dtype):
        a = np.zeros(shape, dtype)
        a.flags.writeable = False
        return a

    def param(self, name, default, nonnegative=False, problem_name=None):
        """(passed, value): a scalar parameter; passed False leaves it to its default (None
        is a valid value only where it is the default)."""
        if self.target == name:
            pool = hostile_params() + [None] * (default is not None) + \
                (NEGATIVE_PARAMS if nonnegative else [])
            return True, self.hostile(problem_name or name, pool, NAMES[name])
        if self.draw(st.sampled_from([True, False]), label=f"{name} default"):
            return False, default
        value = self.draw(st.sampled_from(valid_params(nonnegative)), label=name)
        if abs(float(value)) > np.finfo(np.float32).max:
            self.wide_params.append(name)
        return True, value

    def flag(self, name):
        """(passed, value, truth)."""
        if self.target == name:
            return True, self.hostile(name, HOSTILE_FLAGS), None
        if self.draw(st.booleans(), label=f"{name} default"):
            return False, False, False
        value = self.draw(st.sampled_from(VALID_FLAGS), label=name)
        return True, value, bool(value)

    def axis(self, ndim, default=1):
        """(passed, value, in_range); in_range is None for a hostile (non-integer) axis, whose
        problem is already recorded.  Whether an integer out of range is a problem depends on
        whether the call uses the axis: the caller decides."""
        if self.target == "axis":
            return True, self.hostile("axis", HOSTILE_AXES), None
        if self.draw(st.sampled_from([True, False, False]), label="axis default"):
            return False, default, -ndim <= default < ndim
        if ndim and self.draw(st.sampled_from([True] * 5 + [False]), label="axis in range"):
            value = self.draw(st.integers(-ndim, ndim - 1), label="axis")
        else:
            value = self.draw(st.sampled_from([ndim, ndim + 3, -ndim - 1, 10**400, -10**400,
                                               2**63 - 1, 2**64 - 1]), label="axis")
        kind = self.draw(st.sampled_from(INTEGER_TYPES), label="axis type")
        if kind is not int and np.iinfo(kind).min <= value <= np.iinfo(kind).max:
            value = kind(value)
        return True, value, bool(-ndim <= value < ndim)

    def stream(self):
        """(passed, value)."""
        if self.target == "stream":
            return True, self.hostile("stream", HOSTILE_STREAMS)
        return self.draw(st.sampled_from([False] * 5 + [True]), label="stream=None"), None

    def activation(self):
        """(passed, value, name)."""
        if self.target == "activation":
            return True, self.hostile("activation", HOSTILE_ACTIVATIONS), None
        if self.draw(st.sampled_from([True, False, False]), label="activation default"):
            return False, "relu", "relu"
        value = self.draw(st.sampled_from(ACTIVATIONS), label="activation")
        return True, value, str(value)

    def weight_and_axis(self, args, kwargs, weight, passed_axis, axis):
        """Passes PReLU's weight positionally (then perhaps the axis too) or as a keyword;
        returns whether the axis is still to be passed."""
        if not self.draw(st.booleans(), label="weight positional"):
            kwargs["weight"] = weight
            return passed_axis
        args.append(weight)
        if passed_axis and self.draw(st.booleans(), label="axis positional"):
            args.append(axis)
            return False
        return passed_axis

    def positional_or_keyword(self, args, kwargs, optional):
        """Appends a drawn number of the (passed, key, value) of `optional` to `args` (values
        left to their defaults hold the defaults), and passes the rest given as keywords."""
        positional = self.draw(st.integers(0, len(optional)), label="positional count")
        for i, (passed, key, value) in enumerate(optional):
            if i < positional:
                args.append(value)
            elif passed:
                kwargs[key] = value

    def keywords(self, args, kwargs, optional):
        """Adds each (passed, key, value) of `optional` as a keyword, then the hostile 'keyword'
        argument: an unknown keyword or positional arguments too many."""
        for passed, key, value in optional:
            if passed:
                kwargs[key] = value
        if self.target == "keyword":
            self.problem("keyword")
            if self.draw(st.booleans(), label="unknown keyword"):
                return args, dict(kwargs, outt=None)
            return args + [None] * 6, kwargs
        return args, kwargs

    # -- building and running

    def materialize(self):
        """Carves the placed arrays out of buffers (all out of one in shared mode, at drawn
        offsets), then fills them in order: later arrays overwrite the bytes they share."""
        own = [p for p in self.placed if p.like is None]
        if self.shared and own:
            factor = self.draw(st.sampled_from([1, 1, 2, 3]), label="buffer size factor")
            size = max(p.span for p in own) * factor + 16
            buf = np.zeros(size, np.uint8)
            self.buffers.append(buf)
            for p in own:
                start = self.draw(st.integers(0, size - p.span), label=f"{p.name} offset")
                if not p.misalign:  # aligned, unless the layout asked otherwise
                    start -= (address(buf) + start) % p.dtype.itemsize
                    start += p.dtype.itemsize if start < 0 else 0
                p.make(buf, start)
        else:
            for p in own:
                buf = np.zeros(p.span + 128, np.uint8)
                self.buffers.append(buf)
                p.make(buf, (-address(buf)) % 64 + p.misalign)
        for p in self.placed:
            if p.like is not None:
                p.lo, p.strides, p.shape = p.like.lo, p.like.strides, p.like.shape
                p.make(p.like.buf, p.like.start)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for p in self.placed:
                if p.values is not None:
                    p.array[...] = p.values
        for p in self.placed:
            if p.readonly:
                p.array.flags.writeable = False

    @staticmethod
    def value(v):
        """What is passed for an argument: a placed array's ndarray, else the value itself."""
        return v.array if isinstance(v, Placed) else v

    def resolve(self, named):
        """The inputs as the library must see them: native copies, Python values converted to the
        dtype of the array inputs (float64 when there is none)."""
        arrays = [v for _, v in named if sets_dtype(v)]
        dtype = native(np.asarray(arrays[0]).dtype) if arrays else np.dtype(np.float64)
        if dtype.kind != "f":
            dtype = self.result_dtype
        resolved = {}
        if self.problems:  # the call must raise: nothing to compute (hostile values may not
            return resolved, dtype  # even convert)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, v in named:
                a = np.asarray(v)
                resolved[name] = np.array(a, dtype=native(a.dtype) if sets_dtype(v) else dtype)
        return resolved, dtype

    def check_out(self, out, shape, dtype, same_ok=(), no_touch=(), other_out=None):
        """Records what makes `out` invalid: its shape, dtype or writability, and overlaps: with
        `same_ok` inputs other than as the same elements, with `no_touch` inputs and the other
        output at all."""
        if not isinstance(out, np.ndarray):
            return
        if out.shape != tuple(shape) or out.dtype.char != dtype.char or not out.flags.writeable:
            self.problem("out")
        for inp in same_ok:
            if relation(out, inp) == 2:
                self.problem("out")
        for inp in no_touch:
            if forbidden_overlap(out, inp):
                self.problem("out")
        if relation(out, other_out):
            self.problem("out")
        if self_overlapping(out):
            self.may_refuse = True

    def run(self, fn, args, kwargs, outs=()):
        """Calls fn and checks the outcome against the problems recorded: returns the result, or
        None when the call was (rightly) refused."""
        before = [b.copy() for b in self.buffers]
        threads = self.draw(st.sampled_from([None, 1, 2, 3, 4]), label="threads") \
            if self.big else None
        error = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                if threads is None:
                    result = fn(*args, **kwargs)
                else:
                    with threadpoolctl.threadpool_limits(limits=threads, user_api="openmp"):
                        result = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - its type is what is checked
                error = exc
        # data computed in float32 refuses a parameter beyond its range, after every other check
        problems = self.problems or [(name, rf"{name}=.* beyond the range of float32")
                                     for name in self.wide_params
                                     if self.result_dtype.itemsize < 8]
        if error is not None:
            assert isinstance(error, (TypeError, ValueError)), \
                f"{type(error).__name__} raised: {error}"
            for buf, old in zip(self.buffers, before):
                assert np.array_equal(buf, old), f"arrays modified by a call that raised {error!r}"
            assert problems or self.may_refuse, f"a valid call raised {error!r}"
            if len(problems) == 1:
                name, pattern = problems[0]
                assert re.search(pattern, str(error)), \
                    f"the error does not name {name}: {type(error).__name__}: {error}"
            return None
        assert not problems, f"accepted, but should raise: {problems}"
        written = [a for a in outs if isinstance(a, np.ndarray)]
        for buf, old in zip(self.buffers, before):
            allowed = np.zeros(buf.size, bool)
            for a in written:
                if a.size and np.shares_memory(a, buf):
                    start = address(a) - address(buf) + element_offsets(a)
                    for j in range(a.itemsize):
                        allowed[start + j] = True
            stray = (buf != old) & ~allowed
            assert not stray.any(), f"bytes outside out modified, at {np.flatnonzero(stray)[:8]}"
        return result


# ---- expected values -----------------------------------------------------------------------------


def compute_type(dtype):
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else native(dtype)


def other_axes(ndim, axis):
    return tuple(d for d in range(ndim) if d != axis)


def along(a, ndim, axis):
    """A (C,) array shaped to broadcast along `axis` of an ndim-dimensional array."""
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


def as_native(a):
    a = np.asarray(a)
    return a.astype(native(a.dtype))


def check_array(actual, dtype, shape):
    assert isinstance(actual, np.ndarray), type(actual)
    assert actual.dtype.kind == "f" and actual.dtype.char == np.dtype(dtype).char, \
        (actual.dtype, dtype)
    assert actual.shape == tuple(shape), (actual.shape, shape)


def ulp_steps(e, k):
    """e moved k ulps (towards +inf for k > 0); zeros keep their sign, non-finite e stays."""
    out = e.copy()
    for _ in range(abs(k)):
        out = np.nextafter(out, np.inf if k > 0 else -np.inf)
    keep = ~np.isfinite(e) | (np.signbit(out) != np.signbit(e))
    return np.where(keep, e, out)


def assert_one_of(actual, candidates):
    """Each element of actual equals that element of some candidate (bit for bit, or NaN)."""
    actual = as_native(actual)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
    a = np.array(actual, order="C").view(bits)
    ok = np.zeros(actual.shape, bool)
    for c in candidates:
        c = np.array(c, dtype=actual.dtype, order="C")
        ok |= (a == c.view(bits)) | (np.isnan(actual) & np.isnan(c))
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())[:5]
        mid = candidates[len(candidates) // 2]
        raise AssertionError(f"{(~ok).sum()} elements more than 4 ulp off: "
                             f"{actual.ravel()[bad]} vs {mid.ravel()[bad]}")


def elu_forward_candidates(v, alpha, dtype):
    """ELU of v (in the compute type) with expm1 anywhere within 4 ulp of NumPy's; the middle
    candidate is NumPy's."""
    c = v.dtype.type
    with np.errstate(all="ignore"):
        e = np.expm1(v)
        return [np.where(v <= 0, c(alpha) * ulp_steps(e, k), v).astype(dtype)
                for k in range(-4, 5)]


def elu_backward_candidates(g, x, alpha, dtype):
    c = x.dtype.type
    with np.errstate(all="ignore"):
        e = np.exp(x)
        return [np.where(x <= 0, g * c(alpha) * ulp_steps(e, k), g).astype(dtype)
                for k in range(-4, 5)]


def elu_backward_from_output(g, y, alpha):
    """The contract's ELU gradient from the output y, ``y <= 0 ? g * (y + alpha) : g``, in the
    compute type, written as reference.py writes the other ops."""
    c = y.dtype.type
    with np.errstate(all="ignore"):
        return np.where(y <= 0, g * (y + c(alpha)), g)


def assert_sums(actual, terms, axes, dtype):
    """actual is the sum of the float64 `terms` over `axes`, added in float64 in any order and
    rounded once to dtype."""
    actual = as_native(actual).astype(np.float64)
    with np.errstate(all="ignore"):
        exact = np.asarray(terms.sum(axis=axes))
        n = terms.size // max(exact.size, 1)
        magnitude = np.asarray(np.abs(np.where(np.isfinite(terms), terms, 0.0)).sum(axis=axes))
        bound = 2.0 * n * 2.0**-52 * magnitude
        lo, hi = exact - bound, exact + bound
        lo_d, hi_d = lo.astype(dtype), hi.astype(dtype)
        lo_d = np.where(lo_d.astype(np.float64) > lo, np.nextafter(lo_d, -np.inf), lo_d)
        hi_d = np.where(hi_d.astype(np.float64) < hi, np.nextafter(hi_d, np.inf), hi_d)
    actual = actual.reshape(exact.shape)
    wild = ~np.isfinite(magnitude)  # float64 partial sums may overflow: any outcome
    nonfinite = ~np.isfinite(exact) & ~wild
    ok = wild | np.where(nonfinite, (actual == exact) | (np.isnan(actual) & np.isnan(exact)),
                         (actual >= lo_d.astype(np.float64)) & (actual <= hi_d.astype(np.float64)))
    assert ok.all(), f"sums {actual[~ok][:5]} outside [{lo_d[~ok][:5]}, {hi_d[~ok][:5]}]"


def check_stats(stats, v, unit_axis):
    """stats counts the v > 0 per unit along unit_axis (one unit when None)."""
    assert isinstance(stats, fastrelu.ActivationStats), type(stats)
    positive = v > 0
    if unit_axis is None:
        expected, per_unit = np.array([positive.sum()]), v.size
    else:
        expected = positive.sum(axis=other_axes(v.ndim, unit_axis)).reshape(-1)
        per_unit = math.prod(v.shape[:unit_axis] + v.shape[unit_axis + 1:])
    assert isinstance(stats.positive, np.ndarray) and stats.positive.dtype == np.int64
    assert stats.positive.shape == expected.shape, (stats.positive.shape, expected.shape)
    np.testing.assert_array_equal(stats.positive, expected)
    assert stats.per_unit == per_unit, (stats.per_unit, per_unit)
    repr(stats)  # every derived property can be computed


def split_forward(result, stats_on, out, case):
    if stats_on:
        assert isinstance(result, tuple) and len(result) == 2, type(result)
        y, stats = result
    else:
        y, stats = result, None
    if out is not None:
        assert_is_out(y, out)
    else:
        fresh(y, case)
    return y, stats


def split_backward(result, out, case):
    assert isinstance(result, tuple) and len(result) == 2, type(result)
    for r, o in zip(result, out if out is not None else (None, None)):
        if o is not None:
            assert_is_out(r, o)
        else:
            fresh(r, case)
    return result


def assert_is_out(result, out):
    assert result is out, f"the result is not out itself but {type(result).__name__} " \
        f"{'sharing its memory' if np.shares_memory(result, out) else 'elsewhere'}"


def fresh(result, case):
    """A result the call allocated shares no memory with the arguments."""
    for buf in case.buffers:
        assert not np.shares_memory(result, buf), "a new result shares memory with an argument"


def pair_values(case, pair):
    if pair is None:
        return None
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        values = [case.value(v) for v in pair]
        return tuple(values) if isinstance(pair, tuple) else values
    return pair


# ---- the ops -------------------------------------------------------------------------------------

PARAMS = {"relu": None, "leaky_relu": ("negative_slope", 0.01), "elu": ("alpha", 1.0)}


@pytest.mark.parametrize("op", ["relu", "leaky_relu", "elu"])
@fuzz(100)
@given(data=st.data())
def test_elementwise_forward(op, data):
    pname, pdefault = PARAMS[op] or (None, None)
    case = Case(data, ["x", "out", "stats", "axis", "stream", "keyword"] + [pname] * bool(pname))
    shape = case.shape()
    x = case.input("x", shape)
    passed_p, p = case.param(pname, pdefault) if pname else (False, None)
    passed_stats, stats, stats_on = case.flag("stats")
    passed_axis, axis, axis_ok = case.axis(len(shape))
    if stats_on and len(shape) >= 2 and axis_ok is False:
        case.problem("axis")
    out = case.out("out", shape, [("x", x)])
    passed_stream, stream = case.stream()
    case.materialize()
    xv, outv = case.value(x), case.value(out)
    resolved, dtype = case.resolve([("x", xv)])
    case.check_out(outv, shape, dtype, same_ok=[xv])
    args, kwargs = [xv], {}
    if passed_p and case.draw(st.booleans(), label="parameter positional"):
        args.append(p)
    elif passed_p:
        kwargs[pname] = p
    args, kwargs = case.keywords(args, kwargs, [
        (passed_stats, "stats", stats), (passed_axis, "axis", axis),
        (outv is not None, "out", outv), (passed_stream, "stream", stream)])
    result = case.run(getattr(fastrelu, op), args, kwargs, [outv])
    if result is None:
        return
    y, stats_obj = split_forward(result, stats_on, outv, case)
    xr = resolved["x"]
    check_array(y, dtype, xr.shape)
    if op == "relu":
        assert_bitwise(as_native(y), reference.relu(xr))
    elif op == "leaky_relu":
        assert_bitwise(as_native(y), reference.leaky_relu(xr, float(p)))
    else:
        candidates = elu_forward_candidates(xr.astype(compute_type(dtype)), float(p), dtype)
        assert_bitwise(candidates[4], reference.elu(xr, float(p)))
        assert_one_of(y, candidates)
    if stats_on:
        unit = int(axis) % xr.ndim if xr.ndim >= 2 else None
        check_stats(stats_obj, xr.astype(compute_type(dtype)), unit)


def wrong_shapes(case, shape):
    """Arrays of the call's dtype whose shape differs from `shape` (for grad against x)."""
    shapes = {shape + (2,), shape[1:], (0,), (1,), (2, 1)} - {shape}
    return [np.zeros(s, case.dtype) for s in sorted(shapes)]


def weight_shapes(case, shape, axis, axis_ok):
    """A valid PReLU weight shape for x of `shape`, and wrong ones."""
    ndim = len(shape)
    c = shape[int(axis) % ndim] if ndim >= 2 and axis_ok else (shape[-1] if ndim else 1)
    kinds = [(), (1,)] + ([(c,), (c,)] if ndim >= 2 else [])
    wshape = case.draw(st.sampled_from(kinds), label="weight shape")
    wrong = [np.zeros((1, 1), case.dtype), np.zeros((max(c, 1), 2), case.dtype),
             np.zeros((c + 1 if c + 1 != 1 else 2,), case.dtype) if ndim >= 2
             else np.zeros((2,), case.dtype), [0.5, 0.25, 0.125] if c != 3 else [0.5, 0.25]]
    return wshape, wrong


@fuzz(150)
@given(data=st.data())
def test_prelu(data):
    case = Case(data, ["x", "weight", "axis", "out", "stats", "stream", "keyword"])
    shape = case.shape()
    x = case.input("x", shape)
    passed_axis, axis, axis_ok = case.axis(len(shape))
    wshape, wrong = weight_shapes(case, shape, axis, axis_ok)
    weight = case.input("weight", wshape, extra_hostile=wrong)
    if len(shape) >= 2 and axis_ok is False:
        case.problem("axis")
    passed_stats, stats, stats_on = case.flag("stats")
    out = case.out("out", shape, [("x", x), ("weight", weight)])
    passed_stream, stream = case.stream()
    case.materialize()
    xv, wv, outv = case.value(x), case.value(weight), case.value(out)
    resolved, dtype = case.resolve([("x", xv), ("weight", wv)])
    case.check_out(outv, shape, dtype, same_ok=[xv], no_touch=[wv])
    args, kwargs = [xv], {}
    passed_axis = case.weight_and_axis(args, kwargs, wv, passed_axis, axis)
    args, kwargs = case.keywords(args, kwargs, [
        (passed_axis, "axis", axis), (passed_stats, "stats", stats),
        (outv is not None, "out", outv), (passed_stream, "stream", stream)])
    result = case.run(fastrelu.prelu, args, kwargs, [outv])
    if result is None:
        return
    y, stats_obj = split_forward(result, stats_on, outv, case)
    xr, wr = resolved["x"], resolved["weight"]
    check_array(y, dtype, xr.shape)
    unit = int(axis) % xr.ndim if xr.ndim >= 2 else None
    assert_bitwise(as_native(y), reference.prelu(xr, wr, unit if unit is not None else 0))
    if stats_on:
        check_stats(stats_obj, xr.astype(compute_type(dtype)), unit)


@fuzz(140)
@given(data=st.data())
def test_bias_activation(data):
    names = ["x", "bias", "activation", "param", "axis", "out", "stats", "stream", "keyword"]
    case = Case(data, names)
    shape = case.shape()
    x = case.input("x", shape)
    ndim = len(shape)
    if ndim == 0:
        case.problem("x")
    passed_axis, axis, axis_ok = case.axis(ndim)
    if ndim and axis_ok is False:
        case.problem("axis")
    c = shape[int(axis) % ndim] if ndim and axis_ok else (shape[-1] if ndim else 1)
    bias = case.input("bias", (c,), extra_hostile=[
        np.zeros((), case.dtype), np.zeros((c + 1,), case.dtype), np.zeros((1, c), case.dtype),
        0.5, [0.5] * (c + 1)])
    passed_act, activation, act = case.activation()
    if act == "relu":
        passed_p, p = False, None
        if case.target == "param":
            passed_p, p = True, case.hostile("param", hostile_params() + valid_params(False))
    else:
        passed_p, p = case.param("param", None, problem_name="param")
        if passed_p and p is None:
            passed_p = case.draw(st.booleans(), label="param=None")
    passed_stats, stats, stats_on = case.flag("stats")
    out = case.out("out", shape, [("x", x), ("bias", bias)])
    passed_stream, stream = case.stream()
    case.materialize()
    xv, bv, outv = case.value(x), case.value(bias), case.value(out)
    resolved, dtype = case.resolve([("x", xv), ("bias", bv)])
    case.check_out(outv, shape, dtype, same_ok=[xv], no_touch=[bv])
    args, kwargs = [xv, bv], {}
    case.positional_or_keyword(args, kwargs, [(passed_act, "activation", activation),
                                              (passed_p, "param", p),
                                              (passed_axis, "axis", axis)])
    args, kwargs = case.keywords(args, kwargs, [
        (passed_stats, "stats", stats), (outv is not None, "out", outv),
        (passed_stream, "stream", stream)])
    result = case.run(fastrelu.bias_activation, args, kwargs, [outv])
    if result is None:
        return
    y, stats_obj = split_forward(result, stats_on, outv, case)
    xr, br = resolved["x"], resolved["bias"]
    check_array(y, dtype, xr.shape)
    unit = int(axis) % xr.ndim
    ct = compute_type(dtype)
    with np.errstate(all="ignore"):
        v = xr.astype(ct) + along(br.astype(ct), xr.ndim, unit)
        relu_v = reference.relu(v).astype(dtype)
    pv = {"relu": None, "leaky_relu": 0.01, "elu": 1.0}[act] if p is None else float(p)
    if act == "relu":
        assert_bitwise(as_native(y), relu_v)
    elif act == "leaky_relu":
        with np.errstate(all="ignore"):
            expected = reference.leaky_relu(v, pv).astype(dtype)
        assert_bitwise(as_native(y), expected)
    else:
        assert_one_of(y, elu_forward_candidates(v, pv, dtype))
    if stats_on:
        check_stats(stats_obj, v, unit)


@pytest.mark.parametrize("op", ["relu", "leaky_relu", "elu"])
@fuzz(100)
@given(data=st.data())
def test_elementwise_backward(op, data):
    pname, pdefault = PARAMS[op] or (None, None)
    names = ["grad", "x", "out", "stream", "keyword"] + [pname] * bool(pname) + \
        ["from_output"] * (op == "elu")
    case = Case(data, names)
    shape = case.shape()
    grad = case.input("grad", shape, extra_hostile=wrong_shapes(case, shape))
    x = case.input("x", shape, extra_hostile=wrong_shapes(case, shape))
    passed_p, p = case.param(pname, pdefault) if pname else (False, None)
    passed_fo, from_output, fo_on = case.flag("from_output") if op == "elu" else (False, 0, 0)
    if fo_on and passed_p and case.target != pname and float(p) < 0:
        case.problem("alpha")
    out = case.out("out", shape, [("x", x), ("grad", grad)])
    passed_stream, stream = case.stream()
    case.materialize()
    gv, xv, outv = case.value(grad), case.value(x), case.value(out)
    resolved, dtype = case.resolve([("grad", gv), ("x", xv)])
    case.check_out(outv, shape, dtype, same_ok=[xv, gv])
    args, kwargs = [gv, xv], {}
    if passed_p and case.draw(st.booleans(), label="parameter positional"):
        args.append(p)
    elif passed_p:
        kwargs[pname] = p
    args, kwargs = case.keywords(args, kwargs, [
        (passed_fo, "from_output", from_output), (outv is not None, "out", outv),
        (passed_stream, "stream", stream)])
    result = case.run(getattr(fastrelu, f"{op}_backward"), args, kwargs, [outv])
    if result is None:
        return
    if outv is not None:
        assert_is_out(result, outv)
    else:
        fresh(result, case)
    gr, xr = resolved["grad"], resolved["x"]
    check_array(result, dtype, xr.shape)
    if op == "relu":
        assert_bitwise(as_native(result), reference.relu_backward(gr, xr))
    elif op == "leaky_relu":
        assert_bitwise(as_native(result), reference.leaky_relu_backward(gr, xr, float(p)))
    elif fo_on:
        ct = compute_type(dtype)
        with np.errstate(all="ignore"):
            expected = elu_backward_from_output(gr.astype(ct), xr.astype(ct),
                                                float(p)).astype(dtype)
        assert_bitwise(as_native(result), expected)
    else:
        ct = compute_type(dtype)
        candidates = elu_backward_candidates(gr.astype(ct), xr.astype(ct), float(p), dtype)
        assert_bitwise(candidates[4], reference.elu_backward(gr, xr, float(p)))
        assert_one_of(result, candidates)


@fuzz(150)
@given(data=st.data())
def test_prelu_backward(data):
    case = Case(data, ["grad", "x", "weight", "axis", "out", "stream", "keyword"])
    shape = case.shape()
    grad = case.input("grad", shape, extra_hostile=wrong_shapes(case, shape))
    x = case.input("x", shape, extra_hostile=wrong_shapes(case, shape))
    passed_axis, axis, axis_ok = case.axis(len(shape))
    wshape, wrong = weight_shapes(case, shape, axis, axis_ok)
    weight = case.input("weight", wshape, extra_hostile=wrong)
    if len(shape) >= 2 and axis_ok is False:
        case.problem("axis")
    out = case.out_pair([shape, wshape], [
        [("x", x), ("grad", grad), ("weight", weight)],
        [("weight", weight), ("x", x), ("grad", grad)]])
    passed_stream, stream = case.stream()
    case.materialize()
    gv, xv, wv = case.value(grad), case.value(x), case.value(weight)
    outv = pair_values(case, out)
    resolved, dtype = case.resolve([("grad", gv), ("x", xv), ("weight", wv)])
    if isinstance(outv, (tuple, list)) and len(outv) == 2:
        out0, out1 = outv
        case.check_out(out0, shape, dtype, same_ok=[xv, gv], no_touch=[wv])
        case.check_out(out1, wshape, dtype, same_ok=[wv], no_touch=[xv, gv], other_out=out0)
    else:
        out0 = out1 = None
    args, kwargs = [gv, xv], {}
    passed_axis = case.weight_and_axis(args, kwargs, wv, passed_axis, axis)
    args, kwargs = case.keywords(args, kwargs, [
        (passed_axis, "axis", axis), (outv is not None, "out", outv),
        (passed_stream, "stream", stream)])
    result = case.run(fastrelu.prelu_backward, args, kwargs, [out0, out1])
    if result is None:
        return
    dx, dw = split_backward(result, outv, case)
    gr, xr, wr = resolved["grad"], resolved["x"], resolved["weight"]
    check_array(dx, dtype, xr.shape)
    check_array(dw, dtype, wr.shape)
    unit = int(axis) % xr.ndim if xr.ndim >= 2 else None
    ref_dx, _ = reference.prelu_backward(gr, xr, wr, unit if unit is not None else 0)
    assert_bitwise(as_native(dx), ref_dx)
    with np.errstate(all="ignore"):
        terms = np.where(xr > 0, 0.0, xr.astype(np.float64) * gr.astype(np.float64))
    shared = wr.size == 1 or xr.ndim < 2
    axes = tuple(range(xr.ndim)) if shared else other_axes(xr.ndim, unit)
    assert_sums(np.asarray(dw).reshape(-1) if not shared else np.asarray(dw).reshape(()),
                terms, axes, dtype)


@fuzz(140)
@given(data=st.data())
def test_bias_activation_backward(data):
    names = ["grad", "y", "activation", "param", "axis", "out", "stream", "keyword"]
    case = Case(data, names)
    shape = case.shape()
    grad = case.input("grad", shape, extra_hostile=wrong_shapes(case, shape))
    y = case.input("y", shape, extra_hostile=wrong_shapes(case, shape))
    ndim = len(shape)
    if ndim == 0:
        case.problem("y")
    passed_axis, axis, axis_ok = case.axis(ndim)
    if ndim and axis_ok is False:
        case.problem("axis")
    c = shape[int(axis) % ndim] if ndim and axis_ok else (shape[-1] if ndim else 1)
    passed_act, activation, act = case.activation()
    if act == "relu":
        passed_p, p = False, None
        if case.target == "param":
            passed_p, p = True, case.hostile("param", hostile_params() + valid_params(False))
    else:
        passed_p, p = case.param("param", None, nonnegative=True, problem_name="param")
        if passed_p and p is None:
            passed_p = case.draw(st.booleans(), label="param=None")
    out = case.out_pair([shape, (c,)], [[("y", y), ("grad", grad)],
                                        [("grad", grad), ("y", y)]])
    passed_stream, stream = case.stream()
    case.materialize()
    gv, yv = case.value(grad), case.value(y)
    outv = pair_values(case, out)
    resolved, dtype = case.resolve([("grad", gv), ("y", yv)])
    if isinstance(outv, (tuple, list)) and len(outv) == 2:
        out0, out1 = outv
        case.check_out(out0, shape, dtype, same_ok=[yv, gv])
        case.check_out(out1, (c,), dtype, same_ok=[], no_touch=[yv, gv], other_out=out0)
    else:
        out0 = out1 = None
    args, kwargs = [gv, yv], {}
    case.positional_or_keyword(args, kwargs, [(passed_act, "activation", activation),
                                              (passed_p, "param", p),
                                              (passed_axis, "axis", axis)])
    args, kwargs = case.keywords(args, kwargs, [
        (outv is not None, "out", outv), (passed_stream, "stream", stream)])
    result = case.run(fastrelu.bias_activation_backward, args, kwargs, [out0, out1])
    if result is None:
        return
    dx, db = split_backward(result, outv, case)
    gr, yr = resolved["grad"], resolved["y"]
    check_array(dx, dtype, yr.shape)
    check_array(db, dtype, (c,))
    unit = int(axis) % yr.ndim
    pv = {"relu": 0.0, "leaky_relu": 0.01, "elu": 1.0}[act] if p is None else float(p)
    ct = compute_type(dtype)
    gc, yc = gr.astype(ct), yr.astype(ct)
    with np.errstate(all="ignore"):
        if act == "relu":
            dxc = np.where(yc <= 0, ct.type(0), gc)
            assert_bitwise(dxc.astype(dtype), reference.relu_backward(gr, yr))
        elif act == "leaky_relu":
            dxc = np.where(yc > 0, gc, gc * ct.type(pv))
            assert_bitwise(dxc.astype(dtype), reference.leaky_relu_backward(gr, yr, pv))
        else:
            dxc = elu_backward_from_output(gc, yc, pv)
        expected = dxc.astype(dtype)
    assert_bitwise(as_native(dx), expected)
    assert_sums(db, dxc.astype(np.float64), other_axes(yr.ndim, unit), dtype)


# ---- zero-stride giants --------------------------------------------------------------------------

GIANT = 2**40  # elements: 4 TiB of float32, far more than any machine here has


def giant(shape):
    """A read-only zero-stride view of one float32 with `shape`: no memory of its own."""
    return np.broadcast_to(np.float32(-0.5), shape)


EMPTY_RESULTS = {
    "prelu, empty x, giant weight": lambda: fastrelu.prelu(
        np.zeros((0, GIANT), np.float32), giant((GIANT,))),
    "bias_activation, empty x, giant bias": lambda: fastrelu.bias_activation(
        np.zeros((0, GIANT), np.float32), giant((GIANT,))),
    "prelu, empty x, shared weight": lambda: fastrelu.prelu(giant((0, GIANT)), 0.5),
    "relu stats, no units": lambda: fastrelu.relu(giant((GIANT, 0)), stats=True)[0],
    "leaky_relu_backward, empty": lambda: fastrelu.leaky_relu_backward(
        giant((0, GIANT)), giant((0, GIANT)), 0.5),
    "prelu_backward, no channels": lambda: fastrelu.prelu_backward(
        giant((GIANT, 0)), giant((GIANT, 0)), np.zeros(0, np.float32))[0],
}


@pytest.mark.parametrize("call", list(EMPTY_RESULTS.values()), ids=list(EMPTY_RESULTS))
def test_empty_results_of_giant_shapes(call):
    """Calls whose result is empty succeed, however large a zero-stride argument says it is."""
    assert call().size == 0


GIANT_RESULTS = {
    "relu": lambda: fastrelu.relu(giant((GIANT,))),
    "relu stats": lambda: fastrelu.relu(giant((GIANT,)), stats=True),
    "elu into a writable zero-stride out": lambda: fastrelu.elu(
        giant((GIANT,)), out=np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (GIANT,),
                                                              (0,), writeable=True)),
    "prelu, giant channels": lambda: fastrelu.prelu(giant((1, GIANT)), giant((GIANT,))),
    "prelu_backward": lambda: fastrelu.prelu_backward(giant((2, GIANT)), giant((2, GIANT)), 0.5),
    "bias_activation_backward": lambda: fastrelu.bias_activation_backward(
        giant((GIANT, 1)), giant((GIANT, 1)), "elu"),
}


@pytest.mark.parametrize("call", list(GIANT_RESULTS.values()), ids=list(GIANT_RESULTS))
def test_giant_results_fail_cleanly(call):
    """A result larger than memory is a MemoryError (or a refusal), never a crash or another
    exception."""
    with pytest.raises((MemoryError, TypeError, ValueError)):
        call()


# ---- threads, info, monitoring -------------------------------------------------------------------


@fuzz(150)
@given(value=st.one_of(st.sampled_from(
    hostile_common() + [None, 0, -1, 2**31, 10**400, -10**400, np.int64(0), np.uint64(2**64 - 1),
                        np.int32(-5), 1.0, 2.5, np.float64(2.0), float("nan"), "2", [2], (2,),
                        np.array([2]), Fraction(2, 1), Decimal(2)]),
    st.integers(max_value=0), st.integers(min_value=2**31)))
def test_set_num_threads_refuses_bad_counts(value):
    before = fastrelu.get_num_threads()
    with pytest.raises((TypeError, ValueError), match=r"\bn\b"):
        fastrelu.set_num_threads(value)
    assert fastrelu.get_num_threads() == before


@pytest.mark.parametrize("fn", [fastrelu.get_num_threads, fastrelu.info])
@pytest.mark.parametrize("args", [(1,), (None,), ("x",)])
def test_argumentless_functions_refuse_arguments(fn, args):
    with pytest.raises(TypeError):
        fn(*args)
    with pytest.raises(TypeError):
        fn(n=1)


def test_info_describes_the_installation():
    info = fastrelu.info()
    assert info["fastrelu"] == fastrelu.__version__
    assert info["simd"] in ("avx512", "avx2", "baseline")
    assert 1 <= info["threads"] <= info["thread_cap"]
    assert info["threads"] == fastrelu.get_num_threads()


THREAD_SCRIPT = textwrap.dedent("""
    import ast, sys, warnings
    import numpy as np
    import fastrelu
    from fastrelu import reference
    requests = ast.literal_eval(sys.argv[1])
    cap = fastrelu.info()["thread_cap"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 100)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(100).astype(np.float32)
    for n in [None] + requests:
        if n is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fastrelu.set_num_threads(n)
            assert bool(caught) == (n > cap), (n, cap, [str(c.message) for c in caught])
            assert fastrelu.get_num_threads() == min(n, cap), (n, fastrelu.get_num_threads())
        threads = fastrelu.get_num_threads()
        assert 1 <= threads <= cap, threads
        assert np.array_equal(fastrelu.relu(x), reference.relu(x))
        assert np.array_equal(fastrelu.leaky_relu(x, 0.1), reference.leaky_relu(x, 0.1))
        dx, dw = fastrelu.prelu_backward(g, x, w)
        rdx, rdw = reference.prelu_backward(g, x, w)
        assert np.array_equal(dx, rdx)
        np.testing.assert_allclose(dw, rdw, rtol=1e-6, atol=1e-6)
        y, stats = fastrelu.relu(x, stats=True)
        assert np.array_equal(stats.positive, (x > 0).sum(axis=0))
""")


def python_process(code, args=(), env=None):
    """A Python process running `code`, with the thread settings of `env` only."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("FASTRELU_NUM_THREADS", "OMP_NUM_THREADS", "OMP_THREAD_LIMIT",
                                "OMP_DYNAMIC")}
    environment.update(env or {})
    return subprocess.Popen([sys.executable, "-c", code, *args], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_thread_counts_in_a_fresh_process():
    """Valid counts, capped ones included, in a process of their own (they change global state):
    each is taken, capped with a warning, and the results do not change."""
    requests = [1, 2, 3, 1, 4, 2**31 - 1, 1, 10**6, 2]
    process = python_process(THREAD_SCRIPT, [repr(requests)])
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]


ENVIRONMENTS = [
    {"FASTRELU_NUM_THREADS": v} for v in
    ["1", " 2 ", "0002", "99999999999999999999999999", "0", "-1", "+2", "2.0", "abc",
     "\u0662", "\uff12", "   "]
] + [
    {"OMP_NUM_THREADS": v} for v in ["1", "4", "100000", "0", "-3", "abc", "2,1", "1,,"]
] + [
    {"OMP_THREAD_LIMIT": "1", "OMP_NUM_THREADS": "8"},
    {"OMP_THREAD_LIMIT": "3", "FASTRELU_NUM_THREADS": "16"},
    {"OMP_DYNAMIC": "true", "OMP_NUM_THREADS": "4"},
    {"OMP_NUM_THREADS": "1", "FASTRELU_NUM_THREADS": "2"},
]


@pytest.mark.slow
def test_thread_environments():
    """Any FASTRELU_NUM_THREADS / OMP_* value: the import either works (and so do the kernels, on
    a capped count), or -- for a FASTRELU_NUM_THREADS that is not a positive integer -- stops with
    a ValueError naming the variable.  One process per environment, all at once."""
    processes = [(env, python_process(THREAD_SCRIPT, ["[1, 2]"], env)) for env in ENVIRONMENTS]
    wrong = []
    for env, process in processes:
        _, err = process.communicate(timeout=300)
        value = env.get("FASTRELU_NUM_THREADS", "").strip()
        if value and not (value.isascii() and value.isdigit() and value.strip("0")):
            if process.returncode == 0 or "ValueError" not in err or \
                    "FASTRELU_NUM_THREADS" not in err:
                wrong.append((env, process.returncode, err[-500:]))
        elif process.returncode != 0:
            wrong.append((env, process.returncode, err[-1500:]))
    assert not wrong, wrong


HOSTILE_COUNTS = hostile_common() + [None, [1, 2], np.array([[1, 2]]), "12", float("inf"),
                                     float("nan"), FakeCudaArray({})]
VALID_COUNTS = [np.array([1, 0, 2], np.int64), np.zeros(0, np.int64), np.array([5], np.int64)]
HOSTILE_PER_UNIT = hostile_common() + [None, float("inf"), float("nan"), -1, [2], np.array([2, 3])]


@fuzz(150)
@given(positive=st.sampled_from(HOSTILE_COUNTS + VALID_COUNTS),
       per_unit=st.sampled_from([5, np.int64(2), 0] + HOSTILE_PER_UNIT))
def test_activation_stats(positive, per_unit):
    """ActivationStats(positive, per_unit) is public: valid counts give the right figures; a bad
    argument raises TypeError/ValueError (at once, or when a figure needs it), nothing else."""
    valid = any(positive is v for v in VALID_COUNTS) and not any(
        per_unit is v for v in HOSTILE_PER_UNIT)
    try:
        stats = fastrelu.ActivationStats(positive, per_unit)
        figures = {prop: getattr(stats, prop) for prop in (
            "units", "total", "sparsity", "activation_rate", "dead", "dead_fraction")}
        repr(stats)
        fastrelu.DeadUnitTracker().update("layer", stats)
    except (TypeError, ValueError) as exc:
        assert not valid, f"valid statistics refused: {exc!r}"
        return
    if valid:
        n = int(per_unit)
        assert figures["units"] == positive.size and figures["total"] == positive.size * n
        if positive.size and n:
            assert figures["sparsity"] == 1.0 - positive.sum() / (positive.size * n)
            np.testing.assert_array_equal(figures["activation_rate"], positive / n)
        np.testing.assert_array_equal(figures["dead"], (positive == 0) & (n > 0))


NOT_STATS = [None, 1, "stats", (np.zeros(2, np.int64), 3), object(), {}, np.zeros(3, np.int64)]


@fuzz(150)
@given(data=st.data())
def test_dead_unit_tracker(data):
    """A tracker adds up the statistics it is given per layer; a hostile layer or statistics raise
    TypeError/ValueError and leave it as it was."""
    tracker = fastrelu.DeadUnitTracker()
    totals = {}  # layer -> (positive, per_unit, batches)
    for _ in range(data.draw(st.integers(1, 6), label="updates")):
        layer = data.draw(st.sampled_from(["a", "b", 0, (1, 2), None]), label="layer")
        units = data.draw(st.integers(0, 4), label="units")
        rows = data.draw(st.integers(0, 3), label="rows")
        with np.errstate(over="ignore"):
            x = np.array(data.draw(st.lists(ELEMENTS, min_size=rows * units,
                                            max_size=rows * units), label="x"),
                         np.float32).reshape(rows, units)
        _, stats = fastrelu.relu(x, stats=True)
        kind = data.draw(st.sampled_from(
            ["valid"] * 4 + ["layer", "not stats", "positive None", "positive list",
                             "positive floats", "other units", "more than per_unit"]),
            label="update")
        # the statistics are made inside the checked call: ActivationStats refuses bad counts
        # itself (not integers, or outside [0, per_unit]), and a list of integer counts is counts
        invalid = kind in ("layer", "not stats", "positive None", "positive floats",
                           "more than per_unit")
        valid = stats
        make = lambda: valid  # noqa: E731
        if kind == "layer":
            layer = data.draw(st.sampled_from([[], {}, set(), np.zeros(2)]), label="bad layer")
        elif kind == "not stats":
            bad = data.draw(st.sampled_from(NOT_STATS), label="not stats")
            make = lambda: bad  # noqa: E731
        elif kind == "positive None":
            make = lambda: fastrelu.ActivationStats(None, rows)  # noqa: E731
        elif kind == "positive list":
            make = lambda: fastrelu.ActivationStats([min(1, rows)] * units, rows)  # noqa: E731
        elif kind == "more than per_unit":
            make = lambda: fastrelu.ActivationStats([rows + 1] * (units + 1), rows)  # noqa: E731
        elif kind == "positive floats":
            make = lambda: fastrelu.ActivationStats(valid.positive.astype(np.float64), rows)  # noqa: E731,E501
        elif kind == "other units":
            make = lambda: fastrelu.ActivationStats(  # noqa: E731
                np.minimum(np.arange(units + 1, dtype=np.int64), rows), rows)
        report_before = tracker.report()
        shape = (units + 1,) if kind == "other units" else (units,)
        if not invalid and layer in totals and totals[layer][0].shape != shape:
            invalid = True
        try:
            stats = make()
            tracker.update(layer, stats)
        except (TypeError, ValueError):
            assert invalid is not False, f"a valid update ({kind}) was refused"
            assert tracker.report() == report_before
            continue
        assert not invalid or invalid is None, f"an invalid update ({kind}) was accepted"
        positive = np.asarray(stats.positive).astype(np.int64)
        if layer in totals:
            old = totals[layer]
            totals[layer] = (old[0] + positive, old[1] + rows, old[2] + 1)
        else:
            totals[layer] = (positive, rows, 1)
    report = tracker.report()
    assert set(report) == set(totals)
    for layer, (positive, per_unit, batches) in totals.items():
        np.testing.assert_array_equal(tracker.stats(layer).positive, positive)
        assert report[layer]["units"] == positive.size
        assert report[layer]["batches"] == batches
        assert report[layer]["dead_units"] == int(((positive == 0) & (per_unit > 0)).sum())
    for unknown in ["never seen", 12345]:  # a lookup of a name it never saw: KeyError
        with pytest.raises(KeyError, match="no statistics for layer"):
            tracker.stats(unknown)
    assert tracker.end_epoch() == report and tracker.layers == []
