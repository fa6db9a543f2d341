"""``fastrelu bench``: what each op costs next to ReLU, a memory copy, NumPy, PyTorch and numexpr.

Every figure that compares two implementations is measured as a ratio: the two are sampled in
alternating rounds on the same arrays, and the figure is the median of the per-round ratios, with
their interquartile range; a comparison whose range stays wide is measured again and marked (see
fastrelu._report, which the GPU report shares).  The roofline is a copy of the same bytes through
fastrelu's own kernel driver (same threads, same stores): a forward op moves 2 arrays' worth of
bytes (read x, write y), a backward op 3 (read grad and x, write dx).

Beyond the sweep over sizes: the ops on values of each sign and on values whose products are
subnormal, channels-last against contiguous NCHW data, one training step with each activation,
PReLU forward and backward against PyTorch autograd; and, with --contention, per-call times while
another process keeps one core busy.
"""
import contextlib
import dataclasses
import functools
import math
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np

from . import _cpu, _step_bench
from ._api import prelu, prelu_backward
from ._report import (CHANNELS, EXTRA_ROUNDS, EXTRA_TIME, FASTRELU, PASSES, PRECISION, SPREAD_LIMIT,
                      VALUE_CASES, Backend, Data, Progress, UsageError, available_memory_bytes,
                      check_threads, cost_ratios, element_count, entries, fastrelu_impls,
                      format_time, human_size, installed, last_level_cache_bytes,
                      machine_description, measure, measure_groups, memory_batches, op_directions,
                      pass_count, plot_report, recipe_impls, report_options, size_plan, sweep,
                      timed, write_json)
from ._runtime import get_num_threads, set_num_threads

DEFAULT_SIZES = ("1e3", "1e5", "1e6", "stream")
QUICK_SIZES = ("1e3", "1e5", "1e6")
PEERS = ("torch", "numexpr")
# the value sweep runs in cache and on one thread (below the size that takes a second): a slow
# multiply shows undiluted by memory traffic, and no wait for another thread enters the figures
VALUE_SWEEP_SIZE = (_cpu.PARALLEL_MIN_ELEMENTS - 1) // CHANNELS * CHANNELS
VALUE_SWEEP_OPS = ("relu", "leaky_relu", "prelu", "elu")
# what each case of values is set against: mixed signs, and for subnormal products the same
# all-negative branch with normal products
VALUE_BASES = {"positive": ("mixed",), "negative": ("mixed",), "subnormal": ("mixed", "negative")}
# a multiply on subnormal results this much slower than on normal ones is a penalty, not noise
PENALTY_THRESHOLD = 1.25
LAYOUT_OPS = ("relu", "leaky_relu", "prelu")
LAYOUT_IMAGE = (64, 16, 16)  # (C, H, W) of the NCHW batches the layout rows time
CONTENTION_SIZES = ("1e5", "1e6", "1e7")
CONTENTION_BLOCK = 0.05  # seconds of calls each variant runs before the next takes over


def cpu_backend():
    return Backend(xp=np, copy=_cpu.copy, timer=timed, torch_device="cpu",
                   cache=("last-level cache", last_level_cache_bytes()),
                   memory=("memory", available_memory_bytes()))


def set_peer_threads(n, found):
    if "torch" in found:
        import torch

        torch.set_num_threads(n)
    if "numexpr" in found:
        import numexpr

        numexpr.set_num_threads(n)


def load():
    return [round(x, 2) for x in os.getloadavg()]


def quartile_text(summary):
    return f"{summary['ratio']:.2f} [{summary['q1']:.2f}-{summary['q3']:.2f}]" + \
        ("!" if summary["unstable"] else "")


# ---- PReLU against autograd ---------------------------------------------------------------------

def prelu_autograd_comparison(timing):
    """PReLU forward + backward (input and weight gradients) on a (64, 64, 32, 32) float32
    batch: fastrelu's two calls against PyTorch autograd (which allocates), interleaved."""
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

    m = measure({"fastrelu": fast, "torch": autograd}, {"speedup": ("torch", "fastrelu")}, timing)
    return {"shape": shape, **m.seconds, "speedup": m.ratios["speedup"]}


# ---- values -------------------------------------------------------------------------------------

def value_sweep(ops, dtype, backend, timing, progress):
    """Each op and direction on each case of values, interleaved with ReLU and the NumPy recipe
    on the same values: {"rows": [...], "subnormal": {...}}.  A row's ratios: 'relu', its time
    over ReLU's on the same values; 'vs_mixed' and 'numpy_vs_mixed', fastrelu's and the recipe's
    time over their own on mixed signs; for the subnormal case also 'vs_negative' and
    'numpy_vs_negative', over their time on all-negative values (same branch, normal
    results)."""
    ops = [op for op in VALUE_SWEEP_OPS if op in ops]
    n, rows, impls = VALUE_SWEEP_SIZE, [], {}
    for case in VALUE_CASES:
        d = Data(n, dtype, backend, values=case)
        for name, make in ((FASTRELU, fastrelu_impls), ("numpy", recipe_impls)):
            impls.update({(name, *key, case): fn for key, fn in make(d).items()})
    groups, labels = [], []
    for op, direction in op_directions(ops):
        pairs = {}
        for case in VALUE_CASES:
            fast, numpy = (FASTRELU, op, direction, case), ("numpy", op, direction, case)
            if op != "relu":
                pairs[(case, "relu")] = (fast, (FASTRELU, "relu", direction, case))
            for base in VALUE_BASES.get(case, ()):
                pairs[(case, f"vs_{base}")] = (fast, (FASTRELU, op, direction, base))
                pairs[(case, f"numpy_vs_{base}")] = (numpy, ("numpy", op, direction, base))
        groups.append(({key: impls[key] for pair in pairs.values() for key in pair}, pairs))
        labels.append(f"values {op} {direction}")
    measurements = measure_groups(groups, timing, PASSES, progress, labels)
    for (op, direction), m in zip(op_directions(ops), measurements):
        for case in VALUE_CASES:
            rows.append({"elements": n, "dtype": dtype.name, "op": op, "direction": direction,
                         "case": case, "seconds": m.seconds[(FASTRELU, op, direction, case)],
                         "numpy_seconds": m.seconds[("numpy", op, direction, case)],
                         "ratios": {name: r for (c, name), r in m.ratios.items() if c == case},
                         "rounds": m.rounds, "attempts": m.attempts})
    return {"rows": rows, "subnormal": subnormal_verdict(rows)}


def subnormal_verdict(rows):
    """The slow-down of multiplies whose results are subnormal: each multiplying op's time on
    the subnormal case over its time on all-negative values (same branch, normal results)."""
    slowdowns = [{"op": r["op"], "direction": r["direction"],
                  "fastrelu": r["ratios"]["vs_negative"]["ratio"],
                  "numpy": r["ratios"]["numpy_vs_negative"]["ratio"]}
                 for r in rows if r["case"] == "subnormal" and r["op"] in ("leaky_relu", "prelu")]
    worst = max((s["fastrelu"] for s in slowdowns), default=None)
    return {"slowdowns": slowdowns, "worst_fastrelu": worst,
            "worst_numpy": max((s["numpy"] for s in slowdowns), default=None),
            "penalty": worst is not None and worst > PENALTY_THRESHOLD,
            "threshold": PENALTY_THRESHOLD}


def print_value_sweep(sweep_result):
    print("\nvalues: each op on mixed signs, all positive, all negative, and negative values "
          "whose products are subnormal\n(fastrelu's time, its time over ReLU's on the same "
          "values, and the NumPy recipe's time)")
    head = f"{'op':<11}{'dir':<5}{'elements':>9}" + "".join(f"{case:>29}" for case in VALUE_CASES)
    print(head)
    print("-" * len(head))
    by_key = {}
    for r in sweep_result["rows"]:
        by_key.setdefault((r["op"], r["direction"], r["elements"]), []).append(r)
    for (op, direction, n), rows in by_key.items():
        cells = []
        for r in rows:
            ratios = r["ratios"]
            text = format_time(r["seconds"])
            text += f" {ratios['relu']['ratio']:.2f}" if "relu" in ratios else "     "
            text += f" {format_time(r['numpy_seconds'])}"
            cells.append(f"{text:>29}")
        print(f"{op:<11}{direction:<5}{human_size(n):>9}" + "".join(cells))
    verdict = sweep_result["subnormal"]
    if verdict["worst_fastrelu"] is not None:
        print(f"subnormal products: at most {verdict['worst_fastrelu']:.2f}x the time on "
              f"all-negative values for fastrelu's leaky_relu and prelu "
              f"({verdict['worst_numpy']:.2f}x for the NumPy recipe): "
              + ("a subnormal penalty on this CPU" if verdict["penalty"] else
                 f"no subnormal penalty on this CPU (threshold {PENALTY_THRESHOLD}x)"))


# ---- layouts ------------------------------------------------------------------------------------

def layout_data(shape, channels_last, seed=0):
    """NCHW arrays for fastrelu_impls: x, grad and out of `shape`, C-contiguous or channels-last
    (NHWC buffers viewed as NCHW), the (N, C, ...) views being the arrays themselves."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape

    def array():
        if channels_last:
            return rng.standard_normal((n, h, w, c), dtype=np.float32).transpose(0, 3, 1, 2)
        return rng.standard_normal(shape, dtype=np.float32)

    x, g, out = array(), array(), array()
    return types.SimpleNamespace(x=x, g=g, out=out, x_nc=x, g_nc=g, out_nc=out,
                                 w=np.full(c, 0.25, np.float32), gw=np.empty(c, np.float32))


def layout_comparison(sizes, backend, timing, progress):
    """relu, leaky_relu and prelu (axis 1), forward and backward, on channels-last batches
    against contiguous ones of the same shape, interleaved, the sizes that fit in memory together
    measured in passes over them all: [{shape, ratios}] per size."""
    results = []
    f32 = np.dtype(np.float32)
    for batch in memory_batches([(n, f32) for n in sizes], backend):
        shapes = [(max(1, n // math.prod(LAYOUT_IMAGE)), *LAYOUT_IMAGE) for n, _ in batch]
        groups = []
        for shape in shapes:
            impls = {(layout, *key): fn
                     for layout in ("contiguous", "channels_last")
                     for key, fn in fastrelu_impls(layout_data(shape, layout == "channels_last"))
                     .items() if key[0] in LAYOUT_OPS}
            pairs = {f"{op} {direction}": (("channels_last", op, direction),
                                           ("contiguous", op, direction))
                     for _, op, direction in impls if _ == "contiguous"}
            groups.append((impls, pairs))
        measurements = measure_groups(groups, timing, PASSES, progress,
                                      [f"layout {shape}" for shape in shapes])
        del groups  # the arrays, before the next batch's
        results.extend({"shape": shape, "elements": math.prod(shape), "ratios": m.ratios,
                        "rounds": m.rounds, "attempts": m.attempts}
                       for shape, m in zip(shapes, measurements))
    return results


def print_layouts(layouts):
    print("\nchannels-last over contiguous NCHW (PReLU on axis 1), same shape, interleaved:")
    for entry in layouts:
        print(f"  {str(entry['shape']):<20}" + "  ".join(
            f"{name} {quartile_text(r)}" for name, r in entry["ratios"].items()))


# ---- contention ---------------------------------------------------------------------------------

@contextlib.contextmanager
def busy_core():
    """A child process spinning on one core (the last this process may use), killed on the way
    out whatever ends the block (Ctrl-C included), and by the kernel if this process dies."""
    core = max(os.sched_getaffinity(0))
    code = ("import ctypes, os, signal\n"
            "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"  # PR_SET_PDEATHSIG
            f"os.sched_setaffinity(0, {{{core}}})\n"
            "while True:\n    pass\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.2)  # the child pinned and spinning before anything is timed
        yield core
    finally:
        child.kill()
        child.wait()


def per_call_seconds(variants, blocks):
    """{name: [seconds of each call]}: variants (name -> (set-up, call)) take turns in blocks of
    CONTENTION_BLOCK seconds, in alternating order, every call timed on its own."""
    calls = {}
    for name, (setup, fn) in variants.items():
        setup()
        fn()
        calls[name] = max(1, int(CONTENTION_BLOCK / max(timed(fn), 1e-9)))
    times = {name: [] for name in variants}
    names = list(variants)
    for b in range(blocks):
        for name in names if b % 2 == 0 else reversed(names):
            setup, fn = variants[name]
            setup()
            fn()
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def contention(sizes, threads, found, blocks):
    """leaky_relu forward with `threads` threads, with 1 thread, and PyTorch's with `threads`,
    while a busy process holds one core: median and 90th percentile of each call's time."""
    from ._api import leaky_relu

    results = []
    torch = None
    if "torch" in found:
        import torch
    with busy_core() as core:
        for n in sizes:
            x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
            out = np.zeros_like(x)
            variants = {
                f"fastrelu {threads} threads": (functools.partial(set_num_threads, threads),
                                                lambda: leaky_relu(x, 0.01, out=out)),
                "fastrelu 1 thread": (functools.partial(set_num_threads, 1),
                                      lambda: leaky_relu(x, 0.01, out=out)),
            }
            if torch is not None:
                tx, tout = torch.from_numpy(x), torch.from_numpy(out)
                variants[f"torch {threads} threads"] = (
                    lambda: None, lambda: torch.ops.aten.leaky_relu.out(tx, 0.01, out=tout))
            times = per_call_seconds(variants, blocks)
            set_num_threads(threads)
            stats = {name: {"median": statistics.median(t), "p90": float(np.percentile(t, 90)),
                            "calls": len(t)} for name, t in times.items()}
            one = stats["fastrelu 1 thread"]["median"]
            results.append({"elements": n, "busy_core": core, "variants": stats,
                            "p90_over_1_thread_median": {
                                name: s["p90"] / one for name, s in stats.items()}})
    return results


def run_contention(sizes, threads, blocks, json_path):
    found = installed(("torch",))
    set_peer_threads(threads, found)
    machine = machine_description(threads)
    before = load()
    print(f"fastrelu {machine['fastrelu']} on {machine['cpu']}: {machine['simd']}; load average "
          f"{before}; a process spinning on one core; leaky_relu forward, each call timed")
    results = contention(sizes, threads, found, blocks)
    head = (f"{'elements':>10}  {'variant':<20}{'median':>11}{'p90':>11}"
            f"{'p90 / 1-thread median':>24}")
    print(head)
    print("-" * len(head))
    for r in results:
        for name, s in r["variants"].items():
            print(f"{human_size(r['elements']):>10}  {name:<20}{format_time(s['median']):>11}"
                  f"{format_time(s['p90']):>11}{r['p90_over_1_thread_median'][name]:>24.2f}")
    print(f"target: {threads}-thread p90 at most 1.5x the 1-thread median")
    if json_path is not None:
        write_json(json_path, {"machine": machine, "load_average": {"before": before,
                                                                     "after": load()},
                               "contention": results})
    return 0


# ---- the report ---------------------------------------------------------------------------------

def print_cost_table(ratios):
    """Cost over ReLU: a line per op and direction, a column per size (and dtype)."""
    columns = list(dict.fromkeys((r["dtype"], r["elements"]) for r in ratios))
    several = len({dtype for dtype, _ in columns}) > 1
    print("\ncost over ReLU: time(op) / time(relu), same size and direction, median "
          "[interquartile range] of per-round ratios (relu_stats: relu with stats=True)")
    labels = [(f"{dtype} " if several else "") + human_size(n) for dtype, n in columns]
    print(f"{'op':<11}{'dir':<5}" + "".join(f"{label:>20}" for label in labels))
    cells = {(r["op"], r["direction"], r["dtype"], r["elements"]): r for r in ratios}
    for op, direction in dict.fromkeys((r["op"], r["direction"]) for r in ratios):
        texts = [quartile_text(cells[(op, direction, *c)]) if (op, direction, *c) in cells
                 else "-" for c in columns]
        print(f"{op:<11}{direction:<5}" + "".join(f"{text:>20}" for text in texts))


def print_training_steps(steps):
    print("\none training step with each activation (interleaved; x relu: the step's time over "
          "the step with ReLU):")
    for model in steps:
        print(f"  {model['model']} ({model['description']}):")
        for name, seconds in model["seconds"].items():
            ratio = model["ratios"].get(name)
            print(f"    {name:<20}{format_time(seconds):>11}" +
                  (f"   x relu {quartile_text(ratio)}" if ratio else ""))


def plot_values(sweep_result):
    def draw(ax):
        rows = sweep_result["rows"]
        labels = list(dict.fromkeys(f"{r['op']} {r['direction']}" for r in rows))
        width = 0.8 / len(VALUE_CASES)
        for i, case in enumerate(VALUE_CASES):
            seconds = {f"{r['op']} {r['direction']}": r["seconds"] for r in rows
                       if r["case"] == case}
            ax.bar([j + i * width for j in range(len(labels))],
                   [seconds[label] * 1e6 for label in labels], width, label=case)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45,
                      ha="right", fontsize=7)
        ax.set(ylabel="us per call",
               title=f"values, {human_size(VALUE_SWEEP_SIZE)} elements")
        ax.legend(fontsize=7)
    return draw


def plot_steps(steps):
    def draw(ax):
        for i, model in enumerate(steps):
            names = [name for name in model["seconds"] if name in model["ratios"]]
            ax.barh([f"{model['model']}: {name}" for name in names],
                    [model["ratios"][name]["ratio"] for name in names], color=f"C{i}")
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="step time / step time with ReLU", title="one training step")
        ax.tick_params(axis="y", labelsize=7)
    return draw


def layout_sizes(sizes):
    return sorted({n for n, _ in sizes if n >= 10**5})


def check_contention_options(args):
    """The sizes and threads of --contention, which times one op on float32 and draws no plot."""
    for option in ("ops", "dtypes", "plot"):
        if getattr(args, option) is not None:
            raise UsageError(f"--contention times leaky_relu on float32 and draws nothing: "
                             f"--{option} does not apply")
    if args.quick:
        raise UsageError("--contention: --quick does not apply")
    if len(os.sched_getaffinity(0)) < 2:
        raise UsageError("--contention needs 2 CPUs: one to keep busy, one free")
    threads = args.threads if args.threads is not None else get_num_threads()
    if threads < 2:
        raise UsageError(f"--contention compares several threads with one; {threads} thread "
                         "is set (give --threads 2 or more)")
    text = args.sizes if args.sizes is not None else ",".join(CONTENTION_SIZES)
    sizes = [element_count(entry) for entry in entries("--sizes", text, "size")]
    if len(set(sizes)) < len(sizes):
        raise UsageError("--sizes: the same size twice")
    return sizes, threads


def prepare(args):
    """Checks every option (UsageError) and returns the run, which nothing has started yet."""
    check_threads(args.threads)
    if args.contention:
        sizes, threads = check_contention_options(args)
        if args.json is not None:
            report_options(args, DEFAULT_SIZES, QUICK_SIZES)  # the --json path's checks
        return functools.partial(run_contention, sizes, threads, args.repeats or 10, args.json)
    options = report_options(args, DEFAULT_SIZES, QUICK_SIZES)
    backend = cpu_backend()
    sizes = size_plan(options.sizes, options.dtypes, backend)
    return functools.partial(run, options, backend, sizes, args.threads)


def run(options, backend, sizes, threads=None):
    if threads is not None:
        set_num_threads(threads)
    threads = get_num_threads()
    found = installed(PEERS)
    set_peer_threads(threads, found)
    ops, timing = options.ops, dataclasses.replace(options.timing, timer=backend.timer)
    before = load()

    machine = machine_description(threads)
    print(f"fastrelu {machine['fastrelu']} on {machine['cpu']}: {machine['simd']}, "
          f"{threads} threads, last-level cache "
          f"{(machine['last_level_cache_bytes'] or 0) / 2**20:.0f} MiB; load average {before}")
    missing = [p for p in PEERS if p not in found]
    print("peers: " + (", ".join(f"{k} {v}" for k, v in found.items()) or "none") +
          (f" (not installed: {', '.join(missing)})" if missing else "") +
          f"; interleaved rounds ({timing.rounds}, or {timing.min_rounds} for slow groups, in "
          f"{pass_count(timing)} passes over the sweep) of samples of "
          f"{timing.min_time * 1e3:g} ms or more, medians of per-round ratios")
    if any(dt.itemsize == 2 for _, dt in sizes):
        print("float16 and bfloat16: the NumPy recipe computes in float32 and casts back; "
              "numexpr has no bfloat16")

    all_rows = sweep(sizes, ops, found, backend, timing)
    ratios = cost_ratios(all_rows)
    if ratios:
        print_cost_table(ratios)
    first_dtype = sizes[0][1]
    extras = {}
    if not options.quick:
        extra_steps = (len(op_directions([op for op in VALUE_SWEEP_OPS if op in ops])) +
                       len(layout_sizes(sizes))) * pass_count(timing) + 1
        progress = Progress(extra_steps)
        extras["value_sweep"] = value_sweep(ops, first_dtype, backend, timing, progress)
        print_value_sweep(extras["value_sweep"])
        extras["layout"] = layout_comparison(layout_sizes(sizes), backend, timing, progress)
        print_layouts(extras["layout"])
        progress.label = "training steps"
        extras["training_step"] = _step_bench.training_steps(found, timing)
        progress()
        print_training_steps(extras["training_step"])
        if "torch" in found and "prelu" in ops:
            autograd = extras["prelu_autograd"] = prelu_autograd_comparison(timing)
            print(f"\nPReLU forward + backward on {autograd['shape']} float32: fastrelu "
                  f"{format_time(autograd['fastrelu'])} (into out=), PyTorch autograd "
                  f"{format_time(autograd['torch'])} (allocating): "
                  f"{quartile_text(autograd['speedup'])}x")
    after = load()
    print(f"\nload average before {before}, after {after}")
    if options.json is not None:
        write_json(options.json, {
            "machine": machine, "peers": found, "load_average": {"before": before,
                                                                  "after": after},
            "method": {"rounds": timing.rounds, "min_rounds": timing.min_rounds,
                       "sample_seconds": timing.min_time, "group_budget_seconds": timing.budget,
                       "passes": pass_count(timing), "spread_limit": SPREAD_LIMIT,
                       "precision": PRECISION, "extra_rounds": EXTRA_ROUNDS,
                       "extra_time_budgets": EXTRA_TIME},
            "rows": all_rows, "cost_ratios": ratios, **extras})
    if options.plot is not None:
        panels = [plot_values(extras["value_sweep"]), plot_steps(extras["training_step"])] \
            if extras else []
        plot_report(options.pyplot, all_rows, options.plot, "numpy", panels)
    return 0
