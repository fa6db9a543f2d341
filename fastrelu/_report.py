"""What fastrelu's reports share: the benchmark's arrays, implementations, timing, tables and plot
(the CPU and the GPU report run the same sweep), the checks of their options, the machine they
run on, and the progress bar and matplotlib loader the experiment uses too."""
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from typing import Optional

import numpy as np

from . import reference
from ._api import elu, elu_backward, leaky_relu, leaky_relu_backward, prelu, prelu_backward
from ._api import relu, relu_backward
from ._runtime import info

OPS = ("relu", "leaky_relu", "prelu", "elu", "relu_stats")  # relu_stats: relu(stats=True)
SLOPE, ALPHA, CHANNELS = 0.01, 1.0, 100  # PReLU data is (N, CHANNELS), axis 1: an MLP layer
CHANNEL_OPS = ("prelu", "relu_stats")  # the ops timed on the (N, CHANNELS) view of the data
FLOAT_DTYPES = tuple(np.dtype(name) for name in ("float16", "float32", "float64"))
DTYPE_NAMES = "float16, bfloat16, float32 or float64"
# n-element arrays live at once in a comparison: x and grad, out and the half array more that the
# copy writes, the recipes' temporaries, fastrelu's and the peers' allocated results; they may fill
# this share of the available memory
LIVE_ARRAYS, MEMORY_SHARE = 11, 0.7


class UsageError(ValueError):
    """A bad option or input file: reported on one line with exit status 2, before any work."""


# ---- options ------------------------------------------------------------------------------------

def entries(option, text, noun, choices=None):
    """The comma-separated entries of an option: none empty, none twice, each one of `choices`
    when given."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        raise UsageError(f"{option}: empty list")
    for i, item in enumerate(items):
        if not item:
            raise UsageError(f"{option}: empty entry in {text!r}")
        if item in items[:i]:
            raise UsageError(f"{option}: {noun} {item} given twice")
        if choices is not None and item not in choices:
            raise UsageError(f"{option}: unknown {noun} {item!r}; choose from {', '.join(choices)}")
    return items


def element_count(entry):
    """A --sizes entry as a number of elements: a positive whole number, 1000 or 1e3."""
    try:
        value = float(entry)
    except ValueError:
        raise UsageError(f"--sizes: {entry!r} is neither a number of elements nor 'stream'") \
            from None
    if not (math.isfinite(value) and value >= 1 and value.is_integer()):
        raise UsageError(f"--sizes: {entry} is not a positive whole number of elements")
    return int(value)


def size_entries(text, ops):
    """--sizes as given, checked for form and, when PReLU or the statistics are timed, for their
    (N, CHANNELS) shape: [(entry, elements, or None for 'stream')]."""
    on_channels = [op for op in ops if op in CHANNEL_OPS]
    sizes = []
    for entry in entries("--sizes", text, "size"):
        n = None if entry == "stream" else element_count(entry)
        if n is not None and n % CHANNELS and on_channels:
            raise UsageError(
                f"--sizes: {entry} is not a multiple of {CHANNELS}, which "
                f"{' and '.join(on_channels)} need (their data is (N, {CHANNELS})); "
                "leave them out with --ops to time any size")
        sizes.append((entry, n))
    return sizes


def is_bfloat16(dtype):
    return dtype.name == "bfloat16" and dtype.kind == "V"


def bfloat16_dtype():
    """ml_dtypes' bfloat16, or UsageError when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        raise UsageError("--dtypes: bfloat16 needs ml_dtypes: pip install 'fastrelu[bfloat16]'") \
            from None
    return np.dtype(ml_dtypes.bfloat16)


def parse_dtypes(text):
    """--dtypes as NumPy dtypes, each one fastrelu computes in, none twice."""
    dtypes = []
    for entry in entries("--dtypes", text, "dtype"):
        unknown = UsageError(f"--dtypes: {entry} is not {DTYPE_NAMES}, the types fastrelu "
                             "computes in")
        if entry == "bfloat16":
            dtypes.append(bfloat16_dtype())
            continue
        try:
            with warnings.catch_warnings():  # deprecated aliases ('a') are refused all the same
                warnings.simplefilter("ignore", DeprecationWarning)
                dtype = np.dtype(entry)
        except TypeError:
            raise unknown from None
        if dtype not in FLOAT_DTYPES:
            raise unknown
        if dtype in dtypes:
            raise UsageError(f"--dtypes: {entry} is {dtype} again")
        dtypes.append(dtype)
    return dtypes


def check_writable(option, path):
    """Refuses an output path that the run could not write to, before the run."""
    if not path:
        raise UsageError(f"{option}: empty path")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UsageError(f"{option} {path}: is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: folder {folder} does not exist")
    # a new file is created and removed again, at the end of any symbolic link (permissions
    # alone pass root in /proc); an existing regular file is opened for appending, which leaves
    # it as it is; anything else (a pipe, a terminal, /dev/stdout) is taken as it is
    target = os.path.realpath(path)
    try:
        if not os.path.exists(target):
            with open(target, "xb"):
                pass
            os.remove(target)
        elif os.path.isfile(target):
            with open(target, "ab"):
                pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: not writable ({exc.strerror or exc})") from None


def written(path, write):
    """Runs write(path); a failure to write at the end of a run is one line, exit status 1."""
    try:
        write(path)
    except OSError as exc:
        raise SystemExit(f"fastrelu: could not write {path}: {exc.strerror or exc}") from None
    print(f"wrote {path}")


def check_outputs(json_path, plot_path):
    """Checks the --json and --plot paths; returns matplotlib.pyplot when plotting."""
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None:
            check_writable(option, path)
    if plot_path is None:
        return None
    if json_path is not None and os.path.realpath(json_path) == os.path.realpath(plot_path):
        raise UsageError("--json and --plot name the same file")
    return pyplot()


def check_threads(threads):
    """--threads: at most the logical CPUs (more only time the switching between them)."""
    cpus = os.cpu_count()
    if threads is not None and cpus and threads > cpus:
        raise UsageError(f"--threads {threads}: more than the {cpus} logical CPUs here")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'fastrelu[plot]'") from None
    return plt


def timed(fn, calls=1):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


@dataclasses.dataclass(frozen=True)
class Timing:
    """How a report measures: rounds of interleaved samples, each at least min_time long; no new
    round once a group has had min_rounds and budget seconds."""
    rounds: int
    min_rounds: int
    min_time: float
    budget: float
    timer: object = timed  # timer(fn, calls) -> seconds per call


def default_timing(rounds=None):
    """Up to 15 rounds of 2 ms samples in a second; 3 rounds at least."""
    rounds = rounds or 15
    return Timing(rounds=rounds, min_rounds=min(3, rounds), min_time=0.002, budget=1.0)


def quick_timing(rounds=None):
    rounds = rounds or 5
    return Timing(rounds=rounds, min_rounds=min(3, rounds), min_time=0.0005, budget=0.2)


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked options of a benchmark report; sizes wait for the device to be resolved."""
    sizes: list  # [(entry, elements or None)], see size_entries
    ops: tuple
    dtypes: list
    timing: Timing
    quick: bool
    json: Optional[str]  # paths
    plot: Optional[str]
    pyplot: object  # matplotlib.pyplot when plotting


def report_options(args, default_sizes, quick_sizes):
    """The options the CPU and the GPU report share, checked; --sizes and --repeats (the rounds),
    when given, win over what --quick picks."""
    sizes = args.sizes if args.sizes is not None else \
        ",".join(quick_sizes if args.quick else default_sizes)
    ops = tuple(entries("--ops", args.ops, "op", OPS)) if args.ops is not None else OPS
    return Options(
        sizes=size_entries(sizes, ops),
        ops=ops,
        dtypes=parse_dtypes(args.dtypes if args.dtypes is not None else "float32"),
        timing=quick_timing(args.repeats) if args.quick else default_timing(args.repeats),
        quick=args.quick, json=args.json, plot=args.plot,
        pyplot=check_outputs(args.json, args.plot))


# ---- the machine --------------------------------------------------------------------------------

def last_level_cache_bytes():
    """The largest CPU cache the kernel reports (sysfs), or None."""
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    for entry in names:
        try:
            with open(f"{base}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        size = int(text.rstrip("KMG")) * scale
        if best is None or level > best[0] or (level == best[0] and size > best[1]):
            best = (level, size)
    return best[1] if best else None


def _proc_line(path, key):
    """What follows `key` on the first line of a /proc file that starts with it, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line[len(key):]
    except OSError:
        pass
    return None


def available_memory_bytes():
    available = _proc_line("/proc/meminfo", "MemAvailable:")
    return None if available is None else int(available.split()[0]) * 1024


def cpu_model():
    model = _proc_line("/proc/cpuinfo", "model name")
    if model is not None:
        return model.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(threads):
    desc = dict(info())
    desc.update({
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "threads": threads,
    })
    return desc


def installed(names):
    """The optional peers among `names` that are installed, with their modules' versions."""
    found = {}
    for name in names:
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where a report runs: the array library that holds the data and runs the NumPy recipe, the
    roofline copy, the clock, and the cache and memory that set the sizes."""
    xp: object  # numpy or cupy
    copy: object  # copy(src, dst)
    timer: object  # timer(fn, calls) -> seconds per call
    torch_device: str
    cache: tuple  # (name, bytes or None)
    memory: tuple  # (name, bytes available or None)

    def max_elements(self, itemsize):
        """The largest size whose arrays fit in memory, or None if memory is unknown."""
        memory = self.memory[1]
        return None if memory is None else int(memory * MEMORY_SHARE) // (LIVE_ARRAYS * itemsize)

    def stream_elements(self, itemsize):
        """STREAM size: each array 4x the cache (taken as 32 MiB when unknown), held to what
        memory allows, rounded down to two significant digits then (the memory available moves
        from run to run, and two runs should time the same size); the report states the
        multiple of the cache it reached."""
        n = 4 * (self.cache[1] or 32 * 2**20) // itemsize
        limit = self.max_elements(itemsize)
        if limit is not None and limit < n:
            unit = 10 ** max(len(str(limit)) - 2, 3)
            return limit // unit * unit
        return n // 1000 * 1000


def size_plan(sizes, dtypes, backend):
    """[(elements, dtype)]: every size of size_entries at every dtype, 'stream' resolved (a
    multiple of 1000), each checked against memory."""
    memory_name, memory = backend.memory
    plan = []
    for dtype in dtypes:
        limit = backend.max_elements(dtype.itemsize)
        seen = {}
        for entry, n in sizes:
            if n is None:
                n = backend.stream_elements(dtype.itemsize)
            if n in seen:
                raise UsageError(f"--sizes: {seen[n]} and {entry} are the same size")
            seen[n] = entry
            if limit is not None and n > limit:
                raise UsageError(
                    f"--sizes: {entry} elements of {dtype} do not fit: a comparison holds "
                    f"{LIVE_ARRAYS} arrays of them at once "
                    f"({n * dtype.itemsize * LIVE_ARRAYS / 2**30:.3g} GiB), and "
                    f"{MEMORY_SHARE:.0%} of the {memory / 2**30:.3g} GiB of {memory_name} "
                    f"available holds {limit:,} elements at most")
            plan.append((n, dtype))
    return plan


# ---- the data -----------------------------------------------------------------------------------

# the values an op is timed on: a multiply's speed can depend on them (subnormal results)
VALUE_CASES = ("mixed", "positive", "negative", "subnormal")


def input_values(case, n, dtype, rng):
    """n values of one case, as float32 to be cast: mixed signs (standard normal), all positive,
    all negative, or negative values whose products with the slopes (0.01, and PReLU's 0.25) are
    subnormal in `dtype`: -tiny * [1, 4), tiny being its smallest normal number."""
    if case == "subnormal":
        tiny = np.float32(finfo(dtype).tiny)  # bfloat16's and float32's are the same number
        return -tiny * rng.uniform(1, 4, n).astype(np.float32)
    values = rng.standard_normal(n, dtype=np.float32)
    return {"mixed": values, "positive": np.abs(values), "negative": -np.abs(values)}[case]


def finfo(dtype):
    if is_bfloat16(dtype):
        import ml_dtypes

        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


class Data:
    """The arrays of one size, dtype and value case in the backend's library, shared by every
    implementation: x and grad (one buffer), out, their (N, CHANNELS) views, weights; the roofline
    copy reads and writes the same buffers (x -> out forward, 1.5 n elements from x on backward)."""

    def __init__(self, n, dtype, backend, values="mixed", seed=0):
        xp = backend.xp
        rng = np.random.default_rng(seed)
        self.n, self.dtype, self.backend = n, np.dtype(dtype), backend
        inputs = xp.asarray(input_values(values, 2 * n, self.dtype, rng).astype(self.dtype))
        outputs = xp.empty(n + n // 2, self.dtype)
        outputs.fill(0)  # touch every page now, so that no timed call pays the page faults
        self.x, self.g, self.out = inputs[:n], inputs[n:], outputs[:n]
        self.copy_src, self.copy_dst = inputs[:len(outputs)], outputs
        # the whole arrays when n is a multiple of CHANNELS, as size_entries makes sure it is
        # whenever an op on these views is timed
        rows = n // CHANNELS
        self.x_nc, self.g_nc, self.out_nc = (
            a[:rows * CHANNELS].reshape(rows, CHANNELS) for a in (self.x, self.g, self.out))
        self.w = xp.full(CHANNELS, 0.25, self.dtype)
        self.gw = xp.empty_like(self.w)


# ---- the implementations ------------------------------------------------------------------------

def fastrelu_impls(d, allocate=False):
    """fastrelu writing into the preallocated outputs, or, with allocate, returning new ones."""
    def out(*buffers):
        return None if allocate else (buffers[0] if len(buffers) == 1 else buffers)

    return {
        ("relu", "fwd"): lambda: relu(d.x, out=out(d.out)),
        ("relu", "bwd"): lambda: relu_backward(d.g, d.x, out=out(d.out)),
        ("leaky_relu", "fwd"): lambda: leaky_relu(d.x, SLOPE, out=out(d.out)),
        ("leaky_relu", "bwd"): lambda: leaky_relu_backward(d.g, d.x, SLOPE, out=out(d.out)),
        ("prelu", "fwd"): lambda: prelu(d.x_nc, d.w, 1, out=out(d.out_nc)),
        ("prelu", "bwd"): lambda: prelu_backward(d.g_nc, d.x_nc, d.w, 1, out=out(d.out_nc, d.gw)),
        ("elu", "fwd"): lambda: elu(d.x, ALPHA, out=out(d.out)),
        ("elu", "bwd"): lambda: elu_backward(d.g, d.x, ALPHA, out=out(d.out)),
        ("relu_stats", "fwd"): lambda: relu(d.x_nc, out=out(d.out_nc), stats=True, axis=1),
    }


def recipe_impls(d):
    """The NumPy recipes people write today (fastrelu.reference), run by the arrays' library;
    they allocate their results, and compute float16 and bfloat16 in float32.  CuPy takes NumPy's
    calls through its array protocols, all but PReLU's: reference converts the weight with
    np.asarray, which CuPy refuses."""
    impls = {
        ("relu", "fwd"): lambda: reference.relu(d.x),
        ("relu", "bwd"): lambda: reference.relu_backward(d.g, d.x),
        ("leaky_relu", "fwd"): lambda: reference.leaky_relu(d.x, SLOPE),
        ("leaky_relu", "bwd"): lambda: reference.leaky_relu_backward(d.g, d.x, SLOPE),
        ("elu", "fwd"): lambda: reference.elu(d.x, ALPHA),
        ("elu", "bwd"): lambda: reference.elu_backward(d.g, d.x, ALPHA),
        ("relu_stats", "fwd"): lambda: (reference.relu(d.x_nc), (d.x_nc > 0).sum(axis=0)),
    }
    if d.backend.xp is np:
        impls[("prelu", "fwd")] = lambda: reference.prelu(d.x_nc, d.w, 1)
        impls[("prelu", "bwd")] = lambda: reference.prelu_backward(d.g_nc, d.x_nc, d.w, 1)
    return impls


def maximum_impls(d):
    return {("relu", "fwd"): lambda: d.backend.xp.maximum(d.x, 0, out=d.out)}


def as_tensor(a, device):
    """A PyTorch tensor on the memory of `a`; bfloat16 arrays through their bits, which PyTorch
    reads as its own bfloat16."""
    import torch

    if is_bfloat16(a.dtype):
        return torch.as_tensor(a.view(np.int16), device=device).view(torch.bfloat16)
    return torch.as_tensor(a, device=device)


def torch_impls(d):
    """PyTorch's kernels (the ones autograd calls) on the same memory, writing into the
    preallocated outputs, all but PReLU's, which allocate theirs."""
    import torch

    aten = torch.ops.aten
    x, g, out, x_nc, g_nc, w = (as_tensor(a, d.backend.torch_device)
                                for a in (d.x, d.g, d.out, d.x_nc, d.g_nc, d.w))
    return {
        ("relu", "fwd"): lambda: aten.threshold.out(x, 0, 0, out=out),
        ("relu", "bwd"): lambda: aten.threshold_backward.grad_input(g, x, 0, grad_input=out),
        ("leaky_relu", "fwd"): lambda: aten.leaky_relu.out(x, SLOPE, out=out),
        ("leaky_relu", "bwd"): lambda: aten.leaky_relu_backward.grad_input(
            g, x, SLOPE, False, grad_input=out),
        ("prelu", "fwd"): lambda: aten._prelu_kernel(x_nc, w),
        ("prelu", "bwd"): lambda: aten._prelu_kernel_backward(g_nc, x_nc, w),
        ("elu", "fwd"): lambda: aten.elu.out(x, ALPHA, 1, 1, out=out),
        ("elu", "bwd"): lambda: aten.elu_backward.grad_input(g, ALPHA, 1, 1, False, x,
                                                              grad_input=out),
    }


def numexpr_impls(d):
    """numexpr, writing into the preallocated outputs; it has no bfloat16."""
    import numexpr as ne

    if is_bfloat16(d.dtype):
        return {}
    x, g, out, s, a = d.x, d.g, d.out, d.dtype.type(SLOPE), d.dtype.type(ALPHA)
    x_nc, out_nc, w = d.x_nc, d.out_nc, d.w
    expr = {
        ("relu", "fwd"): ("where(x < 0, 0, x)", {"x": x}),
        ("relu", "bwd"): ("where(x <= 0, 0, g)", {"x": x, "g": g}),
        ("leaky_relu", "fwd"): ("where(x > 0, x, x * s)", {"x": x, "s": s}),
        ("leaky_relu", "bwd"): ("where(x > 0, g, g * s)", {"x": x, "g": g, "s": s}),
        ("prelu", "fwd"): ("where(x_nc > 0, x_nc, w * x_nc)", {"x_nc": x_nc, "w": w}),
        ("elu", "fwd"): ("where(x <= 0, a * expm1(x), x)", {"x": x, "a": a}),
        ("elu", "bwd"): ("where(x <= 0, g * a * exp(x), g)", {"x": x, "g": g, "a": a}),
    }
    outs = {("prelu", "fwd"): out_nc}
    return {key: (lambda e=e, v=v, o=outs.get(key, out): ne.evaluate(e, local_dict=v, out=o))
            for key, (e, v) in expr.items()}


def copy_impls(d):
    """The roofline: a copy of the bytes an op moves, n elements forward, 1.5 n backward."""
    copy, n = d.backend.copy, d.n
    return {
        ("copy", "fwd"): lambda: copy(d.copy_src[:n], d.copy_dst[:n]),
        ("copy", "bwd"): lambda: copy(d.copy_src, d.copy_dst),
    }


PEER_IMPLS = {"torch": torch_impls, "numexpr": numexpr_impls}
FASTRELU, ALLOCATING_FASTRELU = "fastrelu", "fastrelu-alloc"


def implementations(d, ops, peers):
    """{(implementation, op, direction): call} for one size and dtype: fastrelu (into out= and
    allocating), the NumPy recipe and np.maximum in the arrays' library (named after it), the
    installed peers, and the copy (op 'copy')."""
    library = d.backend.xp.__name__
    makers = {FASTRELU: fastrelu_impls,
              ALLOCATING_FASTRELU: functools.partial(fastrelu_impls, allocate=True),
              library: recipe_impls, f"{library}-maximum": maximum_impls,
              **{p: PEER_IMPLS[p] for p in peers}}
    impls = {(name,) + key: fn for name, make in makers.items() for key, fn in make(d).items()
             if key[0] in ops}
    impls.update({("copy",) + key: fn for key, fn in copy_impls(d).items()})
    return impls


def allocates(impl, op, library):
    """Whether an implementation returns a new array rather than filling a preallocated one."""
    return impl in (ALLOCATING_FASTRELU, library) or (impl == "torch" and op == "prelu")


# ---- timing -------------------------------------------------------------------------------------

SPREAD_LIMIT = 0.10  # a ratio whose interquartile range is wider than this share of it is unstable
PRECISION = 0.02  # a group is measured again while a ratio's median is less certain than this
EXTRA_ROUNDS = 80  # rounds, at most, added to a group for its precision
EXTRA_TIME = 4  # ... while the group has had less than this many times its budget
PASSES = 15  # passes of a report's section over all of its groups (see measure_groups)


def quartiles(values):
    if len(values) == 1:
        return values * 3
    return statistics.quantiles(values, n=4, method="inclusive")


def ratio_summary(numerators, denominators):
    """Median and quartiles of per-round ratios, whether their spread is over SPREAD_LIMIT, and
    the median's standard error as a share of it, estimated from the quartiles (1.253 sigma /
    sqrt(rounds), sigma = IQR / 1.349 as for a normal spread)."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    q1, median, q3 = quartiles(ratios)
    return {"ratio": median, "q1": q1, "q3": q3, "unstable": (q3 - q1) / median > SPREAD_LIMIT,
            "error": 1.253 * (q3 - q1) / 1.349 / math.sqrt(len(ratios)) / median}


def spread(summary):
    return (summary["q3"] - summary["q1"]) / summary["ratio"]


BATCH_TIME = 20e-6  # seconds a batch of calls lasts at least: the clock's cost stays under 1%
WARM_TIME = 0.02  # calls at least this long move more data than the caches hold


def calls_per_batch(fn, timing):
    """(seconds of one call, calls per batch) after a first call (page faults, compilation,
    first-call costs); a short call is timed 5 times and the fastest counts.  The first calls
    count towards the group's budget."""
    fn()
    once = timing.timer(fn)
    if once < timing.min_time:
        once = min([once] + [timing.timer(fn) for _ in range(4)])
    return once, max(1, math.ceil(BATCH_TIME / max(once, 1e-9)))


def sample(fn, calls, timing):
    """Seconds per call of the fastest batch of `calls` calls in at least min_time: work that
    shares the machine only ever adds time, so the fastest batch is the op's own cost."""
    best, start = math.inf, time.perf_counter()
    while best == math.inf or time.perf_counter() - start < timing.min_time:
        best = min(best, timing.timer(fn, calls))
    return best


SETTLE_POLL, SETTLE_LIMIT, SETTLE_TRIES = 0.0002, 0.05, 3  # seconds, seconds, waits
_OVERRUNS = {}  # thread id -> how many waits it outlasted
_RESTLESS = set()  # threads that outlasted SETTLE_TRIES waits: not waited for again


def _running_threads():
    """The ids of this process's threads other than the caller's (and _RESTLESS) that are running
    (state R); empty where /proc cannot tell."""
    me = str(threading.get_native_id())
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return set()
    running = set()
    for tid in tasks:
        if tid == me or tid in _RESTLESS:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split(None, 1)[0]
        except (OSError, IndexError):
            continue  # a thread that ended
        if state == "R":
            running.add(tid)
    return running


def settle():
    """Waits until no other thread of this process is running, up to SETTLE_LIMIT.  Thread pools
    spin a while after their work before they sleep: PyTorch's OpenMP threads for milliseconds
    (libgomp's GOMP_SPINCOUNT pauses), and a sample taken then shares a core with them
    (fastrelu's relu at 10^5 on two threads took 1.7x its time right after a PyTorch sample, at
    10^6 2.2x), and now and then one of them ran on past 20 ms.  Each sample starts without
    them, as in a program that calls one library at a time.  A thread still running after
    SETTLE_TRIES waits of SETTLE_LIMIT (one that never sleeps) is not waited for again."""
    end = time.perf_counter() + SETTLE_LIMIT
    while running := _running_threads():
        if time.perf_counter() >= end:
            for tid in running:
                _OVERRUNS[tid] = _OVERRUNS.get(tid, 0) + 1
                if _OVERRUNS[tid] >= SETTLE_TRIES:
                    _RESTLESS.add(tid)
            return
        time.sleep(SETTLE_POLL)


def interleaved_samples(impls, timing, calibration, first_round=0):
    """{key: [seconds per call, one sample per round]}, with `calibration` from calls_per_batch,
    the rounds numbered from `first_round` (the group's rounds so far).

    Each implementation is sampled once per round, in the group's order in even rounds and the
    reverse in odd ones: two implementations' samples of one round are close in time, so what
    the machine's load does to one it does to the other, and drift cancels over pairs of rounds.
    A sample of short calls is preceded by an untimed call, so that it starts with its own
    thread pool awake and its own data in cache; so is the first sample of calls shorter than
    WARM_TIME, whose data may fit in cache, in each call of this (one pass over the group)."""
    started = time.perf_counter()
    keys = list(impls)
    samples = {key: [] for key in keys}
    for r in range(timing.rounds):
        if r >= timing.min_rounds and time.perf_counter() - started > timing.budget:
            break
        for key in keys if (first_round + r) % 2 == 0 else reversed(keys):
            once, calls = calibration[key]
            settle()
            if once < timing.min_time or (r == 0 and once < WARM_TIME):
                impls[key]()
            samples[key].append(sample(impls[key], calls, timing))
    return samples


@dataclasses.dataclass
class Measurement:
    seconds: dict  # key -> median seconds per call
    ratios: dict  # name -> ratio_summary
    rounds: int
    attempts: int  # passes over the group

    @property
    def widest(self):
        return max((spread(s) for s in self.ratios.values()), default=0.0)


class _Group:
    """One group's samples, gathered over the passes of measure_groups."""

    def __init__(self, impls, pairs):
        self.impls, self.pairs = impls, pairs
        self.samples = {key: [] for key in impls}
        self.calibration = None
        self.seconds = 0.0
        self.passes = 0

    def measure(self, timing):
        started = time.perf_counter()
        if self.calibration is None:
            self.calibration = {key: calls_per_batch(fn, timing) for key, fn in self.impls.items()}
        for key, values in interleaved_samples(self.impls, timing, self.calibration,
                                               self.rounds).items():
            self.samples[key].extend(values)
        self.seconds += time.perf_counter() - started
        self.passes += 1

    @property
    def rounds(self):
        return len(next(iter(self.samples.values()), []))

    def result(self):
        s = self.samples
        return Measurement(seconds={k: statistics.median(v) for k, v in s.items()},
                           ratios={name: ratio_summary(s[a], s[b])
                                   for name, (a, b) in self.pairs.items()},
                           rounds=len(next(iter(s.values()))), attempts=self.passes)


def pass_count(timing, passes=PASSES):
    """The passes a section makes: `passes`, but no more than the rounds (a pass takes one at
    least)."""
    return max(1, min(passes, timing.rounds))


def measure_groups(groups, timing, passes=1, progress=None, labels=None):
    """Measures each group of `groups`, [(impls, pairs)], in `passes` passes over all of them
    (forward, then backward, and so on), each pass a share of the group's rounds and budget, and
    returns their Measurements.  `pairs` names a group's ratios, {name: (numerator key,
    denominator key)}; each is the median of the ratios of all its rounds.  The machine's speed
    drifts over seconds and minutes (frequency, neighbours, the other CPU's work), and ratios
    follow it: rounds spread over the whole run sample every group under the same mixture of
    conditions, so that two runs agree.  A group that has had its budget and min_rounds sits
    out the rest of the passes.  A group with a ratio whose median is less certain than PRECISION
    (its spread is wide for its rounds) is then measured again, up to EXTRA_ROUNDS more rounds
    and while it has taken less than EXTRA_TIME budgets: more rounds, so that a burst of load on the
    machine is outvoted and the median settles; ratios spread wider than SPREAD_LIMIT are marked
    unstable.  progress(), when given, is called after each of the `passes` passes over a group
    (or its place in a pass it sits out), and shows its label."""
    passes = pass_count(timing, passes)
    share = dataclasses.replace(timing, rounds=math.ceil(timing.rounds / passes),
                                min_rounds=math.ceil(timing.min_rounds / passes),
                                budget=timing.budget / passes)
    state = [_Group(impls, pairs) for impls, pairs in groups]
    labels = labels or [""] * len(state)

    def measure(indices, main=False):
        for i in indices:
            group = state[i]
            done = group.seconds >= timing.budget and group.rounds >= timing.min_rounds
            if not (main and done):
                if progress is not None:
                    progress.label = labels[i]
                group.measure(share)
            if progress is not None and main:
                progress()

    order = list(range(len(state)))
    for p in range(passes):
        measure(order if p % 2 == 0 else order[::-1], main=True)
    for _ in range(math.ceil(EXTRA_ROUNDS / share.rounds)):
        again = [i for i in order if state[i].seconds < EXTRA_TIME * timing.budget and
                 max((r["error"] for r in state[i].result().ratios.values()), default=0.0)
                 > PRECISION]
        if not again:
            break
        measure(again)
    return [g.result() for g in state]


def measure(impls, pairs, timing):
    """One group's Measurement (see measure_groups), in one pass."""
    return measure_groups([(impls, pairs)], timing)[0]


class Progress:
    """A one-line progress bar on stderr (redrawn in a terminal, printed now and then in a log)."""

    def __init__(self, total, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.t0 = time.perf_counter()
        self.label = ""
        self.last_print = -1.0

    def __call__(self, steps=1):
        self.done = min(self.total, self.done + steps)
        elapsed = time.perf_counter() - self.t0
        if not self.stream.isatty() and self.done < self.total and elapsed - self.last_print < 10:
            return
        self.last_print = elapsed
        label = self.label
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "." * (width - filled)
        end = "\n" if self.done >= self.total or not self.stream.isatty() else "\r"
        self.stream.write(f"[{bar}] {self.done}/{self.total} {elapsed:5.1f}s {label:<24}{end}")
        self.stream.flush()


# ---- the sweep ----------------------------------------------------------------------------------

def op_directions(ops):
    return [(op, direction) for op in ops for direction in ("fwd", "bwd")
            if (op, direction) != ("relu_stats", "bwd")]


def row_groups(impls, op, direction, library):
    """The two interleaved groups that give one op and direction its ratios, as (implementations,
    {ratio name: (numerator, denominator)}): what writes into preallocated outputs (fastrelu, the
    copy, ReLU for the cost over it, the peers that take an out=), and what allocates (fastrelu
    allocating, fastrelu into out= for the cost of allocating, the peers that allocate)."""
    fast, alloc = (FASTRELU, op, direction), (ALLOCATING_FASTRELU, op, direction)
    into_out = {"copy": (("copy", "copy", direction), fast)}
    relu_key = (FASTRELU, "relu", direction)
    if op != "relu" and relu_key in impls:
        into_out["relu"] = (fast, relu_key)
    allocating = {"alloc": (alloc, fast)}
    for key in impls:
        impl, key_op, key_direction = key
        if (key_op, key_direction) == (op, direction) and impl not in (FASTRELU,
                                                                       ALLOCATING_FASTRELU):
            if allocates(impl, op, library):
                allocating[impl] = (key, alloc)
            else:
                into_out[impl] = (key, fast)
    return [({k: impls[k] for pair in pairs.values() for k in pair}, pairs)
            for pairs in (into_out, allocating)]


def row_result(d, op, direction, measurements):
    """One op and direction at one size and dtype, from the Measurements of its row_groups:
    fastrelu's time, and each ratio's median and spread (x copy: copy time / op time; relu: op
    time / relu time; alloc: allocating / into out=; a peer: its time / fastrelu's of the same
    kind)."""
    library = d.backend.xp.__name__
    seconds, ratios = {}, {}
    for m in measurements:
        seconds.update({k: t for k, t in m.seconds.items() if k not in seconds})
        ratios.update(m.ratios)
    t = seconds[(FASTRELU, op, direction)]
    nbytes = (2 if direction == "fwd" else 3) * d.n * d.dtype.itemsize
    peers = [name for name in ratios if name not in ("copy", "relu", "alloc")]
    return {
        "op": op, "direction": direction, "dtype": d.dtype.name, "elements": d.n,
        "bytes": nbytes, "seconds": t, "gb_per_s": nbytes / t / 1e9,
        "alloc_seconds": seconds[(ALLOCATING_FASTRELU, op, direction)],
        "copy_seconds": seconds[("copy", "copy", direction)],
        "roofline_fraction": ratios["copy"]["ratio"],
        "peers": {p: seconds[(p, op, direction)] for p in peers},
        "peers_allocate": [p for p in peers if allocates(p, op, library)],
        "ratios": ratios, "rounds": [m.rounds for m in measurements],
        "attempts": [m.attempts for m in measurements],
        "unstable": sorted(name for name, r in ratios.items() if r["unstable"]),
    }


def memory_batches(sizes, backend):
    """`sizes` in order, cut into runs whose arrays fit in memory together (LIVE_ARRAYS of each
    size within MEMORY_SHARE of it); one size at a time when the memory is unknown."""
    memory = backend.memory[1]
    batches, held = [], math.inf
    for n, dt in sizes:
        need = n * dt.itemsize * LIVE_ARRAYS
        if memory is None or held + need > memory * MEMORY_SHARE:
            batches.append([])
            held = 0
        batches[-1].append((n, dt))
        held += need
    return batches


def measure_batch(batch, ops, peers, backend, timing, passes, progress):
    """The rows of every op and direction at the sizes of one memory batch, their arrays held
    for the whole measurement and freed on return."""
    library = backend.xp.__name__
    rows, groups, labels = [], [], []
    for n, dt in batch:
        d = Data(n, dt, backend)
        impls = implementations(d, ops, peers)
        for op, direction in op_directions(ops):
            found = row_groups(impls, op, direction, library)
            rows.append((d, op, direction, range(len(groups), len(groups) + len(found))))
            groups.extend(found)
            labels.extend([f"{dt.name} {human_size(n)} {op} {direction}"] * len(found))
    measurements = measure_groups(groups, timing, passes, progress, labels)
    return [row_result(d, op, direction, [measurements[i] for i in at])
            for d, op, direction, at in rows]


def sweep(sizes, ops, peers, backend, timing, passes=PASSES):
    """Times every op and direction at each (elements, dtype) of `sizes`, the groups of all the
    sizes that fit in memory together measured in `passes` passes over them all, and prints each
    size's table; returns all the rows."""
    library = backend.xp.__name__
    progress = Progress(len(sizes) * len(op_directions(ops)) * 2 *  # two groups a row
                        pass_count(timing, passes))
    columns = [library, f"{library}-maximum", *peers]
    cache_name, cache = backend.cache
    all_rows = []
    for batch in memory_batches(sizes, backend):
        results = measure_batch(batch, ops, peers, backend, timing, passes, progress)
        for n, dt in batch:
            cache_note = f", {n * dt.itemsize / cache:.1f}x the {cache_name}" if cache else ""
            print(f"\n{dt.name}, {human_size(n)} elements "
                  f"({n * dt.itemsize / 2**20:.1f} MiB per array{cache_note}):")
            print(format_table([r for r in results if (r["elements"], r["dtype"]) == (n, dt.name)],
                               columns))
        all_rows.extend(results)
    print(TABLE_LEGEND.format(library=library, limit=SPREAD_LIMIT, precision=PRECISION,
                              extra=EXTRA_ROUNDS))
    return all_rows


def cost_ratios(rows):
    """time(op) / time(relu) of every row that has it, with its quartiles."""
    return [{"dtype": r["dtype"], "elements": r["elements"], "direction": r["direction"],
             "op": r["op"], **r["ratios"]["relu"]} for r in rows if "relu" in r["ratios"]]


# ---- the report ---------------------------------------------------------------------------------

TABLE_LEGEND = """
x copy: the copy's time over the op's; /relu: the op's time over ReLU's (the cost of the op);
alloc: fastrelu returning a new array over fastrelu writing into out=; vs X: X's time over
fastrelu's, both writing into preallocated outputs, except for the NumPy recipe ({library}) and
PyTorch's PReLU, which allocate their results and are set against fastrelu allocating (*);
every figure is the median of per-round ratios of interleaved samples, the rounds spread over
passes across the whole sweep; iqr: the widest interquartile range of the row's ratios, over the
ratio; !: wider than {limit:.0%}.  A group is measured again (up to {extra} more rounds) until
each median is known within {precision:.0%}."""


def human_size(n):
    exp = int(math.log10(n))
    return f"1e{exp}" if n == 10**exp and exp >= 3 else f"{n:,}"


def format_time(t):
    return f"{t * 1e6:.2f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def format_table(rows, peer_columns):
    head = f"{'op':<11}{'dir':<5}{'time':>11}{'GB/s':>8}{'x copy':>8}{'/relu':>7}{'alloc':>7}" + \
        "".join(f"{'vs ' + p:>{max(11, len(p) + 4)}}" for p in peer_columns) + f"{'iqr':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r["ratios"]
        cost = f"{ratio['relu']['ratio']:>7.2f}" if "relu" in ratio else f"{'-':>7}"
        line = (f"{r['op']:<11}{r['direction']:<5}{format_time(r['seconds']):>11}"
                f"{r['gb_per_s']:>8.1f}{r['roofline_fraction']:>8.2f}{cost}"
                f"{ratio['alloc']['ratio']:>7.2f}")
        for p in peer_columns:
            width = max(11, len(p) + 4)
            mark = "*" if p in r["peers_allocate"] else "x"
            line += f"{ratio[p]['ratio']:>{width - 1}.1f}{mark}" if p in ratio else \
                f"{'-':>{width}}"
        widest = max(spread(s) for s in ratio.values())
        line += f"{widest:>5.0%}" + ("!" if r["unstable"] else " ")
        lines.append(line)
    return "\n".join(lines)


def write_json(path, result):
    def write(p):
        with open(p, "w") as f:
            json.dump(result, f, indent=1)
    print()
    written(path, write)


def plot_report(plt, rows, path, baseline, extra_panels=()):
    """The fraction of the copy roofline, and the speed-up over `baseline` (the NumPy recipe in
    the arrays' library), of each op and direction against size, every dtype timed; then one
    panel per entry of extra_panels, each a function drawing on the axes it is given."""
    panels = 2 + len(extra_panels)
    columns = 2
    fig, axes = plt.subplots((panels + 1) // columns, columns, figsize=(12, 4.5 * ((panels + 1)
                                                                                   // columns)),
                             squeeze=False)
    axes = axes.ravel()
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    for dtype in dtypes:
        for op in OPS:
            for direction, style in (("fwd", "-o"), ("bwd", "--s")):
                pts = sorted((r["elements"], r) for r in rows
                             if r["op"] == op and r["direction"] == direction
                             and r["dtype"] == dtype)
                if not pts:
                    continue
                label = f"{op} {direction}" + (f" {dtype}" if len(dtypes) > 1 else "")
                axes[0].plot([n for n, _ in pts], [r["roofline_fraction"] for _, r in pts], style,
                             label=label)
                vs = [(n, r["ratios"][baseline]["ratio"]) for n, r in pts
                      if baseline in r["ratios"]]
                if vs:
                    axes[1].plot(*zip(*vs), style, label=label)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(xscale="log", xlabel="elements", ylabel="copy time / op time",
                title=f"fraction of the memory-copy roofline ({', '.join(dtypes)})")
    axes[1].set(xscale="log", yscale="log", xlabel="elements", ylabel="speed-up",
                title=f"speed-up over the NumPy recipe ({baseline}), both allocating")
    axes[0].legend(fontsize=7, ncol=2)
    for draw, ax in zip(extra_panels, axes[2:]):
        draw(ax)
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    written(path, lambda p: fig.savefig(p, dpi=110))
