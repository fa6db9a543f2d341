"""``fastrelu bench``: what each op costs next to a memory copy, NumPy, PyTorch and numexpr.

Every number in one report comes from one run: the implementations are timed side by side on the
same arrays, and each figure is the median of the repeats.  The roofline is a copy of
the same number of bytes through fastrelu's own kernel driver (same threads, same stores): a
forward op moves 2 arrays' worth of bytes (read x, write y), a backward op 3 (read grad and x,
write dx), so a copy of n or 1.5 n elements is its roofline.
"""
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from . import _cpu, reference
from ._api import elu, elu_backward, leaky_relu, leaky_relu_backward, prelu, prelu_backward
from ._api import relu, relu_backward
from ._runtime import get_num_threads, info, set_num_threads

OPS = ("relu", "leaky_relu", "prelu", "elu", "relu_stats")  # relu_stats: relu(stats=True)
SLOPE, ALPHA, CHANNELS = 0.01, 1.0, 100  # PReLU data is (N, CHANNELS), axis 1: an MLP layer
DEFAULT_SIZES = ("1e3", "1e5", "1e6", "stream")
QUICK_SIZES = ("1e3", "1e5", "1e6")


# ---- the machine --------------------------------------------------------------------------------

def last_level_cache_bytes():
    """The largest CPU cache the kernel reports (sysfs), or None."""
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
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


def available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stream_elements(itemsize):
    """STREAM size: each array 4x the last-level cache (2^26 elements at least), held to what
    memory allows: about 11 arrays are live at once (x, grad, out, the copy buffers of 1.5 arrays
    each, NumPy's temporaries); the report states the multiple of the cache it reached."""
    llc = last_level_cache_bytes() or 32 * 2**20
    n = max(2**26, 4 * llc // itemsize)
    memory = available_memory_bytes()
    if memory is not None:
        n = min(n, int(memory * 0.7) // (11 * itemsize))
    return n // 1000 * 1000


def parse_size(text, itemsize):
    if text == "stream":
        return stream_elements(itemsize)
    n = int(float(text))
    if n < 1000 or n % 1000:
        raise ValueError(f"sizes must be multiples of 1000 (PReLU data is (N, 100)): {text}")
    return n


# ---- the implementations ------------------------------------------------------------------------

class Data:
    """The arrays of one size and dtype: x, grad, out buffers, weights, and copy buffers."""

    def __init__(self, n, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.n, self.dtype = n, np.dtype(dtype)
        self.x = rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False)
        self.g = rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False)
        self.out = np.empty_like(self.x)
        self.x3 = self.x.reshape(n // CHANNELS, CHANNELS)
        self.g3 = self.g.reshape(self.x3.shape)
        self.out3 = self.out.reshape(self.x3.shape)
        self.w = np.full(CHANNELS, 0.25, dtype)
        self.gw = np.empty_like(self.w)
        self.copy_src = np.ones(n * 3 // 2, dtype)
        self.copy_dst = np.ones_like(self.copy_src)
        self.out.fill(0)  # touch every page now, so that no timed call pays the page faults


def fastrelu_impls(d):
    return {
        ("relu", "fwd"): lambda: relu(d.x, out=d.out),
        ("relu", "bwd"): lambda: relu_backward(d.g, d.x, out=d.out),
        ("leaky_relu", "fwd"): lambda: leaky_relu(d.x, SLOPE, out=d.out),
        ("leaky_relu", "bwd"): lambda: leaky_relu_backward(d.g, d.x, SLOPE, out=d.out),
        ("prelu", "fwd"): lambda: prelu(d.x3, d.w, 1, out=d.out3),
        ("prelu", "bwd"): lambda: prelu_backward(d.g3, d.x3, d.w, 1, out=(d.out3, d.gw)),
        ("elu", "fwd"): lambda: elu(d.x, ALPHA, out=d.out),
        ("elu", "bwd"): lambda: elu_backward(d.g, d.x, ALPHA, out=d.out),
        ("relu_stats", "fwd"): lambda: relu(d.x3, out=d.out3, stats=True, axis=1),
    }


def numpy_impls(d):
    """The NumPy recipes people write today (fastrelu.reference), plus np.maximum for ReLU."""
    return {
        ("relu", "fwd"): lambda: reference.relu(d.x),
        ("relu", "bwd"): lambda: reference.relu_backward(d.g, d.x),
        ("leaky_relu", "fwd"): lambda: reference.leaky_relu(d.x, SLOPE),
        ("leaky_relu", "bwd"): lambda: reference.leaky_relu_backward(d.g, d.x, SLOPE),
        ("prelu", "fwd"): lambda: reference.prelu(d.x3, d.w, 1),
        ("prelu", "bwd"): lambda: reference.prelu_backward(d.g3, d.x3, d.w, 1),
        ("elu", "fwd"): lambda: reference.elu(d.x, ALPHA),
        ("elu", "bwd"): lambda: reference.elu_backward(d.g, d.x, ALPHA),
        ("relu_stats", "fwd"): lambda: (reference.relu(d.x3), (d.x3 > 0).sum(axis=0)),
    }


def numpy_maximum_impls(d):
    return {("relu", "fwd"): lambda: np.maximum(d.x, 0, out=d.out)}


def torch_impls(d):
    """PyTorch's CPU kernels (the ones autograd calls), writing into preallocated outputs."""
    import torch

    aten = torch.ops.aten
    x, g, out = (torch.from_numpy(a) for a in (d.x, d.g, d.out))
    x3, g3, w = (torch.from_numpy(a) for a in (d.x3, d.g3, d.w))
    return {
        ("relu", "fwd"): lambda: aten.threshold.out(x, 0, 0, out=out),
        ("relu", "bwd"): lambda: aten.threshold_backward.grad_input(g, x, 0, grad_input=out),
        ("leaky_relu", "fwd"): lambda: aten.leaky_relu.out(x, SLOPE, out=out),
        ("leaky_relu", "bwd"): lambda: aten.leaky_relu_backward.grad_input(
            g, x, SLOPE, False, grad_input=out),
        ("prelu", "fwd"): lambda: aten._prelu_kernel(x3, w),
        ("prelu", "bwd"): lambda: aten._prelu_kernel_backward(g3, x3, w),
        ("elu", "fwd"): lambda: aten.elu.out(x, ALPHA, 1, 1, out=out),
        ("elu", "bwd"): lambda: aten.elu_backward.grad_input(g, ALPHA, 1, 1, False, x,
                                                              grad_input=out),
    }


def numexpr_impls(d):
    import numexpr as ne

    x, g, out, s, a = d.x, d.g, d.out, d.dtype.type(SLOPE), d.dtype.type(ALPHA)
    x3, out3, wb = d.x3, d.out3, d.w
    expr = {
        ("relu", "fwd"): ("where(x < 0, 0, x)", {"x": x}),
        ("relu", "bwd"): ("where(x <= 0, 0, g)", {"x": x, "g": g}),
        ("leaky_relu", "fwd"): ("where(x > 0, x, x * s)", {"x": x, "s": s}),
        ("leaky_relu", "bwd"): ("where(x > 0, g, g * s)", {"x": x, "g": g, "s": s}),
        ("prelu", "fwd"): ("where(x3 > 0, x3, wb * x3)", {"x3": x3, "wb": wb}),
        ("elu", "fwd"): ("where(x <= 0, a * expm1(x), x)", {"x": x, "a": a}),
        ("elu", "bwd"): ("where(x <= 0, g * a * exp(x), g)", {"x": x, "g": g, "a": a}),
    }
    outs = {("prelu", "fwd"): out3}
    return {key: (lambda e=e, v=v, o=outs.get(key, out): ne.evaluate(e, local_dict=v, out=o))
            for key, (e, v) in expr.items()}


def copy_impls(d):
    n = d.n
    fwd = (d.copy_src[:n], d.copy_dst[:n])
    return {
        "fwd": lambda: _cpu.copy(*fwd),
        "bwd": lambda: _cpu.copy(d.copy_src, d.copy_dst),
    }


def peers():
    """The optional peers that are installed, with their modules' versions."""
    found = {}
    for name in ("torch", "numexpr"):
        try:
            module = __import__(name)
            found[name] = module.__version__
        except ImportError:
            pass
    return found


def set_peer_threads(n, found):
    if "torch" in found:
        import torch

        torch.set_num_threads(n)
    if "numexpr" in found:
        import numexpr

        numexpr.set_num_threads(n)


# ---- timing -------------------------------------------------------------------------------------

SLOW_CALL = 0.5  # seconds: a call this slow is timed once, not repeated (NumPy at STREAM size)


def timed(fn, calls=1):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_side_by_side(impls, repeats, min_time, progress):
    """Median seconds per call, and the number of samples, of each implementation.

    Each implementation is called once first (page faults, first-call costs); each of its samples
    then runs enough calls to last min_time.  One implementation is sampled `repeats` times before
    the next, so that thread pools of other runtimes (OpenMP teams spin for a while after a
    parallel region) have gone quiet for all but its first sample, which the median discounts.
    An implementation whose first call takes longer than SLOW_CALL is timed by that call alone."""
    timings = {}
    for key, fn in impls.items():
        first = timed(fn)
        if first > SLOW_CALL:
            timings[key] = (first, 1)
            progress(repeats + 1)
            continue
        calls = max(1, math.ceil(min_time / max(timed(fn), 1e-9)))
        progress()
        samples = []
        for _ in range(repeats):
            samples.append(timed(fn, calls))
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

def implementations(d, ops, found):
    """{(implementation, op, direction): call} for one size and dtype."""
    impls = {}
    for impl_name, make in (("fastrelu", fastrelu_impls), ("numpy", numpy_impls),
                            ("numpy-maximum", numpy_maximum_impls)):
        for key, fn in make(d).items():
            if key[0] in ops:
                impls[(impl_name,) + key] = fn
    for peer, make in (("torch", torch_impls), ("numexpr", numexpr_impls)):
        if peer in found:
            for key, fn in make(d).items():
                if key[0] in ops:
                    impls[(peer,) + key] = fn
    for direction, fn in copy_impls(d).items():
        impls[("copy", "copy", direction)] = fn
    return impls


def run_size(d, impls, ops, repeats, min_time, progress):
    timings = time_side_by_side(impls, repeats, min_time, progress)
    seconds = {key: t for key, (t, _) in timings.items()}
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
            for peer in ("numpy", "numpy-maximum", "torch", "numexpr"):
                if (peer, op, direction) in seconds:
                    row["peers"][peer] = seconds[(peer, op, direction)]
            row["samples"] = {impl: timings[(impl, op, direction)][1]
                              for impl in ("fastrelu", *row["peers"])}
            rows.append(row)
    return rows


def prelu_autograd_comparison(found, repeats, min_time):
    """PReLU forward + backward (input and weight gradients) on a (64, 64, 32, 32) float32
    batch: fastrelu's two calls against PyTorch autograd."""
    if "torch" not in found:
        return None
    import torch

    rng = np.random.default_rng(1)
    shape = (64, 64, 32, 32)
    x = rng.standard_normal(shape, dtype=np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    w = np.full(64, 0.25, np.float32)
    y, dx, dw = np.empty_like(x), np.empty_like(x), np.empty_like(w)
    tx, tg, tw = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(w)

    def fast():
        prelu(x, w, 1, out=y)
        prelu_backward(g, x, w, 1, out=(dx, dw))

    def autograd():
        xr, wr = tx.detach().requires_grad_(), tw.detach().requires_grad_()
        torch.nn.functional.prelu(xr, wr).backward(tg)

    timings = time_side_by_side({"fastrelu": fast, "torch": autograd}, repeats, min_time,
                                lambda steps=1: None)
    seconds = {key: t for key, (t, _) in timings.items()}
    return {"shape": shape, **seconds, "speedup": seconds["torch"] / seconds["fastrelu"]}


# ---- the report ---------------------------------------------------------------------------------

def human_size(n):
    exp = int(math.log10(n))
    return f"1e{exp}" if n == 10**exp else f"{n:,}"


def format_table(rows, found):
    peer_cols = ["numpy"] + (["torch"] if "torch" in found else []) + \
        (["numexpr"] if "numexpr" in found else [])
    head = f"{'op':<11}{'dir':<5}{'time':>11}{'GB/s':>8}{'x copy':>8}" + \
        "".join(f"{'vs ' + p:>11}" for p in peer_cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['op']:<11}{r['direction']:<5}{format_time(r['seconds']):>11}"
                f"{r['gb_per_s']:>8.1f}{r['roofline_fraction']:>8.2f}")
        for p in peer_cols:
            t = r["peers"].get(p)
            line += f"{t / r['seconds']:>10.1f}x" if t else f"{'-':>11}"
        lines.append(line)
    return "\n".join(lines)


def format_time(t):
    return f"{t * 1e6:.2f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def cost_ratios(rows):
    """time(op) / time(relu), per size and direction."""
    out = []
    by_key = {(r["elements"], r["direction"], r["op"]): r["seconds"] for r in rows}
    for (n, direction, op), t in sorted(by_key.items()):
        base = by_key.get((n, direction, "relu"))
        if op != "relu" and base:
            out.append({"elements": n, "direction": direction, "op": op, "ratio": t / base})
    return out


def machine_description(threads):
    llc = last_level_cache_bytes()
    desc = dict(info())
    desc.update({
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "last_level_cache_bytes": llc,
        "threads": threads,
    })
    return desc


def main(args):
    if getattr(args, "device", "cpu") == "cuda":
        from . import _gpu_bench

        return _gpu_bench.main(args)
    sizes_text = args.sizes.split(",") if args.sizes else (
        QUICK_SIZES if args.quick else DEFAULT_SIZES)
    ops = args.ops.split(",") if args.ops else OPS
    for op in ops:
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    dtypes = [np.dtype(t) for t in (args.dtypes.split(",") if args.dtypes else ["float32"])]
    if args.threads:
        set_num_threads(args.threads)
    threads = get_num_threads()
    found = peers()
    set_peer_threads(threads, found)
    repeats = args.repeats or (3 if args.quick else 7)
    min_time = 0.002 if args.quick else 0.01

    machine = machine_description(threads)
    print(f"fastrelu {machine['fastrelu']} on {machine['cpu']}: {machine['simd']}, "
          f"{threads} threads, last-level cache "
          f"{(machine['last_level_cache_bytes'] or 0) / 2**20:.0f} MiB")
    missing = [p for p in ("torch", "numexpr") if p not in found]
    print("peers: " + (", ".join(f"{k} {v}" for k, v in found.items()) or "none") +
          (f" (not installed: {', '.join(missing)})" if missing else "") +
          f"; medians of {repeats} repeats, timed side by side")

    try:
        plan = [(parse_size(s, dt.itemsize), dt) for dt in dtypes for s in sizes_text]
    except ValueError as exc:
        raise SystemExit(f"fastrelu bench: {exc}") from None
    impls_per_size = len(implementations(Data(1000, np.float32), ops, found))
    progress = Progress(len(plan) * impls_per_size * (repeats + 1))
    all_rows = []
    for n, dt in plan:
        d = Data(n, dt)
        progress.label = f"{dt.name} {human_size(n)}"
        rows = run_size(d, implementations(d, ops, found), ops, repeats, min_time, progress)
        del d
        all_rows.extend(rows)
        llc = machine["last_level_cache_bytes"]
        cache_note = f", {n * dt.itemsize / llc:.1f}x the last-level cache" if llc else ""
        print(f"\n{dt.name}, {human_size(n)} elements "
              f"({n * dt.itemsize / 2**20:.1f} MiB per array{cache_note}):")
        print(format_table(rows, found))
        single = sorted({impl for r in rows for impl, k in r["samples"].items() if k == 1})
        if single and repeats > 1:
            print(f"  ({', '.join(single)}: one call each, over {SLOW_CALL} s a call)")
    ratios = cost_ratios(all_rows)
    if ratios:
        print("\ncost over ReLU: time(op) / time(relu) at the same size and direction "
              "(relu_stats: relu with stats=True)")
        for r in ratios:
            print(f"  {r['op']:<11}{r['direction']:<5}{human_size(r['elements']):>14}"
                  f"{r['ratio']:>7.2f}")
    autograd = None
    if not args.quick and "prelu" in ops:
        autograd = prelu_autograd_comparison(found, repeats, min_time)
        if autograd:
            print(f"\nPReLU forward + backward on {autograd['shape']} float32: fastrelu "
                  f"{format_time(autograd['fastrelu'])}, PyTorch autograd "
                  f"{format_time(autograd['torch'])}: {autograd['speedup']:.1f}x")
    result = {"machine": machine, "peers": found, "repeats": repeats, "rows": all_rows,
              "cost_ratios": ratios, "prelu_autograd": autograd}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(all_rows, args.plot)
    return 0


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (said on stderr) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'fastrelu[plot]'", file=sys.stderr)
        return None
    return plt


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for op in OPS:
        for direction, style in (("fwd", "-o"), ("bwd", "--s")):
            pts = sorted((r["elements"], r) for r in rows
                         if r["op"] == op and r["direction"] == direction
                         and r["dtype"] == rows[0]["dtype"])
            if not pts:
                continue
            ns = [p[0] for p in pts]
            axes[0].plot(ns, [p[1]["roofline_fraction"] for p in pts], style,
                         label=f"{op} {direction}")
            axes[1].plot(ns, [p[1]["peers"]["numpy"] / p[1]["seconds"] for p in pts], style,
                         label=f"{op} {direction}")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(xscale="log", xlabel="elements", ylabel="copy time / op time",
                title=f"fraction of the memory-copy roofline ({rows[0]['dtype']})")
    axes[1].set(xscale="log", yscale="log", xlabel="elements", ylabel="speed-up",
                title="speed-up over the NumPy recipe")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
