"""What fastrelu's reports share: the benchmark's arrays, implementations, timing, tables and plot
(the CPU and the GPU report run the same sweep), the checks of their options, the machine they
run on, and the progress bar and matplotlib loader the experiment uses too."""
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
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
# n-element arrays live at once in a comparison: x, grad, out, the copy buffers of 1.5 arrays
# each, the recipes' temporaries; they may fill this share of the available memory
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


def parse_dtypes(text):
    """--dtypes as NumPy dtypes, each one fastrelu computes in, none twice."""
    dtypes = []
    for entry in entries("--dtypes", text, "dtype"):
        unknown = UsageError(f"--dtypes: {entry} is not float16, float32 or float64, the types "
                             "fastrelu computes in")
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
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise UsageError(f"{option} {path}: not writable")


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


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'fastrelu[plot]'") from None
    return plt


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked options of a benchmark report; sizes wait for the device to be resolved."""
    sizes: list  # [(entry, elements or None)], see size_entries
    ops: tuple
    dtypes: list
    repeats: int
    min_time: float  # seconds each sample lasts at least
    quick: bool
    json: Optional[str]  # paths
    plot: Optional[str]
    pyplot: object  # matplotlib.pyplot when plotting


def report_options(args, default_sizes, quick_sizes):
    """The options the CPU and the GPU report share, checked; --sizes and --repeats, when given,
    win over what --quick picks."""
    sizes = args.sizes if args.sizes is not None else \
        ",".join(quick_sizes if args.quick else default_sizes)
    ops = tuple(entries("--ops", args.ops, "op", OPS)) if args.ops is not None else OPS
    return Options(
        sizes=size_entries(sizes, ops),
        ops=ops,
        dtypes=parse_dtypes(args.dtypes if args.dtypes is not None else "float32"),
        repeats=args.repeats if args.repeats is not None else (3 if args.quick else 7),
        min_time=0.002 if args.quick else 0.01,
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
    first_call_compiles: bool = False  # numba compiles a GPU kernel on its first call

    def max_elements(self, itemsize):
        """The largest size whose arrays fit in memory, or None if memory is unknown."""
        memory = self.memory[1]
        return None if memory is None else int(memory * MEMORY_SHARE) // (LIVE_ARRAYS * itemsize)

    def stream_elements(self, itemsize):
        """STREAM size: each array 4x the cache (2^26 elements at least), held to what memory
        allows; the report states the multiple of the cache it reached."""
        n = max(2**26, 4 * (self.cache[1] or 32 * 2**20) // itemsize)
        limit = self.max_elements(itemsize)
        return (n if limit is None else min(n, limit)) // 1000 * 1000


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


# ---- the implementations ------------------------------------------------------------------------

class Data:
    """The arrays of one size and dtype in the backend's library: x, grad, out buffers and their
    (N, CHANNELS) views, weights, and copy buffers."""

    def __init__(self, n, dtype, backend, seed=0):
        xp = backend.xp
        rng = np.random.default_rng(seed)
        self.n, self.dtype, self.backend = n, np.dtype(dtype), backend
        self.x = xp.asarray(rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False))
        self.g = xp.asarray(rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False))
        self.out = xp.empty_like(self.x)
        # the whole arrays when n is a multiple of CHANNELS, as size_entries makes sure it is
        # whenever an op on these views is timed
        rows = n // CHANNELS
        self.x_nc, self.g_nc, self.out_nc = (
            a[:rows * CHANNELS].reshape(rows, CHANNELS) for a in (self.x, self.g, self.out))
        self.w = xp.full(CHANNELS, 0.25, dtype)
        self.gw = xp.empty_like(self.w)
        self.copy_src = xp.ones(n * 3 // 2, dtype)
        self.copy_dst = xp.ones_like(self.copy_src)
        self.out.fill(0)  # touch every page now, so that no timed call pays the page faults


def fastrelu_impls(d):
    return {
        ("relu", "fwd"): lambda: relu(d.x, out=d.out),
        ("relu", "bwd"): lambda: relu_backward(d.g, d.x, out=d.out),
        ("leaky_relu", "fwd"): lambda: leaky_relu(d.x, SLOPE, out=d.out),
        ("leaky_relu", "bwd"): lambda: leaky_relu_backward(d.g, d.x, SLOPE, out=d.out),
        ("prelu", "fwd"): lambda: prelu(d.x_nc, d.w, 1, out=d.out_nc),
        ("prelu", "bwd"): lambda: prelu_backward(d.g_nc, d.x_nc, d.w, 1, out=(d.out_nc, d.gw)),
        ("elu", "fwd"): lambda: elu(d.x, ALPHA, out=d.out),
        ("elu", "bwd"): lambda: elu_backward(d.g, d.x, ALPHA, out=d.out),
        ("relu_stats", "fwd"): lambda: relu(d.x_nc, out=d.out_nc, stats=True, axis=1),
    }


def recipe_impls(d):
    """The NumPy recipes people write today (fastrelu.reference), run by the arrays' library.
    CuPy takes NumPy's calls through its array protocols, all but PReLU's: reference converts the
    weight with np.asarray, which CuPy refuses."""
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


def torch_impls(d):
    """PyTorch's kernels (the ones autograd calls) on the same memory, writing into preallocated
    outputs where they can."""
    import torch

    aten = torch.ops.aten
    x, g, out, x_nc, g_nc, w = (torch.as_tensor(a, device=d.backend.torch_device)
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
    import numexpr as ne

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
    fwd = (d.copy_src[:n], d.copy_dst[:n])
    return {
        "fwd": lambda: copy(*fwd),
        "bwd": lambda: copy(d.copy_src, d.copy_dst),
    }


PEER_IMPLS = {"torch": torch_impls, "numexpr": numexpr_impls}


def implementations(d, ops, peers):
    """{(implementation, op, direction): call} for one size and dtype: fastrelu, the NumPy recipe
    and np.maximum in the arrays' library (named after it), the installed peers, and the copy."""
    library = d.backend.xp.__name__
    makers = {"fastrelu": fastrelu_impls, library: recipe_impls,
              f"{library}-maximum": maximum_impls, **{p: PEER_IMPLS[p] for p in peers}}
    impls = {(name,) + key: fn for name, make in makers.items() for key, fn in make(d).items()
             if key[0] in ops}
    for direction, fn in copy_impls(d).items():
        impls[("copy", "copy", direction)] = fn
    return impls


# ---- timing -------------------------------------------------------------------------------------

SLOW_CALL = 0.5  # seconds: a call this slow is timed once, not repeated (NumPy at STREAM size)


def timed(fn, calls=1):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_side_by_side(impls, repeats, min_time, progress, timer=timed):
    """Median seconds per call, and the number of samples, of each implementation.

    Each implementation is called once first (page faults, first-call costs); each of its samples
    then runs enough calls to last min_time.  One implementation is sampled `repeats` times before
    the next, so that thread pools of other runtimes (OpenMP teams spin for a while after a
    parallel region) have gone quiet for all but its first sample, which the median discounts.
    An implementation whose first call takes longer than SLOW_CALL is timed by that call alone."""
    timings = {}
    for key, fn in impls.items():
        first = timer(fn)
        if first > SLOW_CALL:
            timings[key] = (first, 1)
            progress(repeats + 1)
            continue
        calls = max(1, math.ceil(min_time / max(timer(fn), 1e-9)))
        progress()
        samples = []
        for _ in range(repeats):
            samples.append(timer(fn, calls))
            progress()
        timings[key] = (statistics.median(samples), len(samples))
    return timings


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

def report_rows(d, ops, timings):
    """A row per fastrelu op and direction of one size and dtype: its time against the copy's
    and every peer's."""
    seconds = {key: t for key, (t, _) in timings.items()}
    peers = [name for name in dict.fromkeys(key[0] for key in timings)
             if name not in ("fastrelu", "copy")]
    n = d.n
    rows = []
    itemsize = d.dtype.itemsize
    for op in ops:
        for direction in ("fwd", "bwd"):
            if ("fastrelu", op, direction) not in seconds:
                continue
            t = seconds[("fastrelu", op, direction)]
            nbytes = (2 if direction == "fwd" else 3) * n * itemsize
            row = {
                "op": op, "direction": direction, "dtype": d.dtype.name, "elements": n,
                "bytes": nbytes, "seconds": t, "gb_per_s": nbytes / t / 1e9,
                "copy_seconds": seconds[("copy", "copy", direction)],
                "roofline_fraction": seconds[("copy", "copy", direction)] / t,
                "peers": {},
            }
            for peer in peers:
                if (peer, op, direction) in seconds:
                    row["peers"][peer] = seconds[(peer, op, direction)]
            row["samples"] = {impl: timings[(impl, op, direction)][1]
                              for impl in ("fastrelu", *row["peers"])}
            rows.append(row)
    return rows


def time_size(d, ops, peers, repeats, min_time, progress):
    impls = implementations(d, ops, peers)
    if d.backend.first_call_compiles:  # compiling is no part of a call's time
        for fn in impls.values():
            fn()
    timings = time_side_by_side(impls, repeats, min_time, progress, d.backend.timer)
    return report_rows(d, ops, timings)


def sweep(sizes, ops, peers, backend, repeats, min_time):
    """Times every implementation at each (elements, dtype) of `sizes` and prints each one's
    table as it is done; returns all the rows."""
    per_size = len(implementations(Data(CHANNELS, sizes[0][1], backend), ops, peers))
    progress = Progress(len(sizes) * per_size * (repeats + 1))
    columns = [backend.xp.__name__, *peers]
    cache_name, cache = backend.cache
    all_rows = []
    for n, dt in sizes:
        progress.label = f"{dt.name} {human_size(n)}"
        rows = time_size(Data(n, dt, backend), ops, peers, repeats, min_time, progress)
        all_rows.extend(rows)
        cache_note = f", {n * dt.itemsize / cache:.1f}x the {cache_name}" if cache else ""
        print(f"\n{dt.name}, {human_size(n)} elements "
              f"({n * dt.itemsize / 2**20:.1f} MiB per array{cache_note}):")
        print(format_table(rows, columns))
        single = sorted({impl for r in rows for impl, k in r["samples"].items() if k == 1})
        if single and repeats > 1:
            print(f"  ({', '.join(single)}: one call each, over {SLOW_CALL} s a call)")
    return all_rows


# ---- the report ---------------------------------------------------------------------------------

def human_size(n):
    exp = int(math.log10(n))
    return f"1e{exp}" if n == 10**exp and exp >= 3 else f"{n:,}"


def format_time(t):
    return f"{t * 1e6:.2f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def format_table(rows, peer_columns):
    head = f"{'op':<11}{'dir':<5}{'time':>11}{'GB/s':>8}{'x copy':>8}" + \
        "".join(f"{'vs ' + p:>11}" for p in peer_columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['op']:<11}{r['direction']:<5}{format_time(r['seconds']):>11}"
                f"{r['gb_per_s']:>8.1f}{r['roofline_fraction']:>8.2f}")
        for p in peer_columns:
            t = r["peers"].get(p)
            line += f"{t / r['seconds']:>10.1f}x" if t else f"{'-':>11}"
        lines.append(line)
    return "\n".join(lines)


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")


def plot_report(plt, rows, path, baseline):
    """The fraction of the copy roofline, and the speed-up over `baseline` (the NumPy recipe in
    the arrays' library), of each op and direction against size, every dtype timed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
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
                vs = [(n, r["peers"][baseline] / r["seconds"]) for n, r in pts
                      if baseline in r["peers"]]
                if vs:
                    axes[1].plot(*zip(*vs), style, label=label)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(xscale="log", xlabel="elements", ylabel="copy time / op time",
                title=f"fraction of the memory-copy roofline ({', '.join(dtypes)})")
    axes[1].set(xscale="log", yscale="log", xlabel="elements", ylabel="speed-up",
                title=f"speed-up over the NumPy recipe ({baseline})")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
