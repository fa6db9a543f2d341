"""``fastrelu bench``: what each op costs next to a memory copy, NumPy, PyTorch and numexpr.

Every number in one report comes from one run: the implementations are timed side by side on the
same arrays, and each figure is the median of the repeats.  The roofline is a copy of
the same number of bytes through fastrelu's own kernel driver (same threads, same stores): a
forward op moves 2 arrays' worth of bytes (read x, write y), a backward op 3 (read grad and x,
write dx), so a copy of n or 1.5 n elements is its roofline.  The sweep itself, shared with the
GPU report, is in fastrelu._report.
"""
import functools
import os

import numpy as np

from . import _cpu
from ._api import prelu, prelu_backward
from ._report import (Backend, UsageError, available_memory_bytes, format_time, human_size,
                      installed, last_level_cache_bytes, machine_description, plot_report,
                      report_options, size_plan, sweep, time_side_by_side, timed, write_json)
from ._runtime import get_num_threads, set_num_threads

DEFAULT_SIZES = ("1e3", "1e5", "1e6", "stream")
QUICK_SIZES = ("1e3", "1e5", "1e6")
PEERS = ("torch", "numexpr")


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


def cost_ratios(rows):
    """time(op) / time(relu), per dtype, size and direction."""
    out = []
    by_key = {(r["dtype"], r["elements"], r["direction"], r["op"]): r["seconds"] for r in rows}
    for (dtype, n, direction, op), t in sorted(by_key.items()):
        base = by_key.get((dtype, n, direction, "relu"))
        if op != "relu" and base:
            out.append({"dtype": dtype, "elements": n, "direction": direction, "op": op,
                        "ratio": t / base})
    return out


def prepare(args):
    """Checks every option (UsageError) and returns the run, which nothing has started yet."""
    options = report_options(args, DEFAULT_SIZES, QUICK_SIZES)
    cpus = os.cpu_count()
    if args.threads is not None and cpus and args.threads > cpus:
        raise UsageError(f"--threads {args.threads}: more than the {cpus} logical CPUs here")
    backend = cpu_backend()
    sizes = size_plan(options.sizes, options.dtypes, backend)
    return functools.partial(run, options, backend, sizes, args.threads)


def run(options, backend, sizes, threads=None):
    if threads is not None:
        set_num_threads(threads)
    threads = get_num_threads()
    found = installed(PEERS)
    set_peer_threads(threads, found)
    ops, repeats, min_time = options.ops, options.repeats, options.min_time

    machine = machine_description(threads)
    print(f"fastrelu {machine['fastrelu']} on {machine['cpu']}: {machine['simd']}, "
          f"{threads} threads, last-level cache "
          f"{(machine['last_level_cache_bytes'] or 0) / 2**20:.0f} MiB")
    missing = [p for p in PEERS if p not in found]
    print("peers: " + (", ".join(f"{k} {v}" for k, v in found.items()) or "none") +
          (f" (not installed: {', '.join(missing)})" if missing else "") +
          f"; medians of {repeats} repeats, timed side by side")

    all_rows = sweep(sizes, ops, found, backend, repeats, min_time)
    ratios = cost_ratios(all_rows)
    if ratios:
        print("\ncost over ReLU: time(op) / time(relu) at the same size and direction "
              "(relu_stats: relu with stats=True)")
        several = len(options.dtypes) > 1
        for r in ratios:
            print(f"  {r['op']:<11}{r['direction']:<5}" + (f"{r['dtype']:>8}" if several else "")
                  + f"{human_size(r['elements']):>14}{r['ratio']:>7.2f}")
    autograd = None
    if not options.quick and "prelu" in ops:
        autograd = prelu_autograd_comparison(found, repeats, min_time)
        if autograd:
            print(f"\nPReLU forward + backward on {autograd['shape']} float32: fastrelu "
                  f"{format_time(autograd['fastrelu'])}, PyTorch autograd "
                  f"{format_time(autograd['torch'])}: {autograd['speedup']:.1f}x")
    if options.json is not None:
        write_json(options.json, {"machine": machine, "peers": found, "repeats": repeats,
                                  "rows": all_rows, "cost_ratios": ratios,
                                  "prelu_autograd": autograd})
    if options.plot is not None:
        plot_report(options.pyplot, all_rows, options.plot, "numpy")
    return 0
