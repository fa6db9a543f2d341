"""``fastrelu bench --device cuda``: the GPU report, on CuPy arrays (or PyTorch tensors).

The roofline is a device-to-device copy of the same bytes (the array library's own copy); peers
are PyTorch CUDA and CuPy when installed.  Times come from CUDA events around many calls on one
stream, medians of repeats; the per-call overhead at 10^3 elements (where no kernel has work to
speak of) is reported beside PyTorch's.
"""
import statistics
import sys

import numpy as np

from . import _api
from .bench import SLOPE, ALPHA, CHANNELS, format_time, human_size

GPU_SIZES = ("1e3", "1e4", "1e6", "1e8")


class Arrays:
    """x, grad, out, weights of one size on the GPU, in CuPy (preferred) or PyTorch."""

    def __init__(self, n, dtype, lib):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(n, dtype=np.float32).astype(dtype)
        g = rng.standard_normal(n, dtype=np.float32).astype(dtype)
        self.lib, self.n, self.dtype = lib, n, np.dtype(dtype)
        if lib.__name__ == "cupy":
            self.x, self.g = lib.asarray(x), lib.asarray(g)
            self.out = lib.empty_like(self.x)
            self.w = lib.full(CHANNELS, 0.25, dtype)
            self.copy_src = lib.ones(n * 3 // 2, dtype)
            self.copy_dst = lib.empty_like(self.copy_src)
        else:
            dev = "cuda"
            self.x, self.g = lib.from_numpy(x).to(dev), lib.from_numpy(g).to(dev)
            self.out = lib.empty_like(self.x)
            self.w = lib.full((CHANNELS,), 0.25, dtype=self.x.dtype, device=dev)
            self.copy_src = lib.ones(n * 3 // 2, dtype=self.x.dtype, device=dev)
            self.copy_dst = lib.empty_like(self.copy_src)
        self.x2 = self.x.reshape(n // CHANNELS, CHANNELS)
        self.g2 = self.g.reshape(n // CHANNELS, CHANNELS)
        self.out2 = self.out.reshape(n // CHANNELS, CHANNELS)
        self.gw = self.w * 0


def fastrelu_impls(a):
    return {
        ("relu", "fwd"): lambda: _api.relu(a.x, out=a.out),
        ("relu", "bwd"): lambda: _api.relu_backward(a.g, a.x, out=a.out),
        ("leaky_relu", "fwd"): lambda: _api.leaky_relu(a.x, SLOPE, out=a.out),
        ("leaky_relu", "bwd"): lambda: _api.leaky_relu_backward(a.g, a.x, SLOPE, out=a.out),
        ("prelu", "fwd"): lambda: _api.prelu(a.x2, a.w, 1, out=a.out2),
        ("prelu", "bwd"): lambda: _api.prelu_backward(a.g2, a.x2, a.w, 1, out=(a.out2, a.gw)),
        ("elu", "fwd"): lambda: _api.elu(a.x, ALPHA, out=a.out),
        ("elu", "bwd"): lambda: _api.elu_backward(a.g, a.x, ALPHA, out=a.out),
    }


def torch_impls(a):
    import torch

    F = torch.nn.functional
    aten = torch.ops.aten
    x, g, out = (torch.as_tensor(v, device="cuda") for v in (a.x, a.g, a.out))
    x2, g2, w = (torch.as_tensor(v, device="cuda") for v in (a.x2, a.g2, a.w))
    return {
        ("relu", "fwd"): lambda: torch.relu(x),
        ("relu", "bwd"): lambda: aten.threshold_backward(g, x, 0),
        ("leaky_relu", "fwd"): lambda: F.leaky_relu(x, SLOPE),
        ("leaky_relu", "bwd"): lambda: aten.leaky_relu_backward(g, x, SLOPE, False),
        ("prelu", "fwd"): lambda: aten._prelu_kernel(x2, w),
        ("prelu", "bwd"): lambda: aten._prelu_kernel_backward(g2, x2, w),
        ("elu", "fwd"): lambda: F.elu(x, ALPHA),
        ("elu", "bwd"): lambda: aten.elu_backward(g, ALPHA, 1, 1, False, x),
    }


def cupy_impls(a):
    import cupy

    x, g, out = (cupy.asarray(v) for v in (a.x, a.g, a.out))
    s = a.dtype.type(SLOPE)
    return {
        ("relu", "fwd"): lambda: cupy.maximum(x, 0, out=out),
        ("leaky_relu", "fwd"): lambda: cupy.where(x > 0, x, x * s),
        ("leaky_relu", "bwd"): lambda: cupy.where(x > 0, g, g * s),
    }


def copy_impls(a):
    n = a.n
    src, dst = a.copy_src[:n], a.copy_dst[:n]
    if a.lib.__name__ == "cupy":
        return {"fwd": lambda: a.lib.copyto(dst, src),
                "bwd": lambda: a.lib.copyto(a.copy_dst, a.copy_src)}
    return {"fwd": lambda: dst.copy_(src), "bwd": lambda: a.copy_dst.copy_(a.copy_src)}


def time_gpu(fn, repeats, calls):
    """Median seconds per call: CUDA events around `calls` calls, `repeats` times."""
    from numba import cuda

    fn()
    cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(cuda.event_elapsed_time(start, end) / 1e3 / calls)
    return statistics.median(samples)


def main(args):
    try:
        import cupy as lib
    except ImportError:
        try:
            import torch as lib
        except ImportError:
            raise SystemExit("fastrelu bench --device cuda needs CuPy or PyTorch with CUDA") \
                from None
    from . import _gpu

    state = _gpu.state()
    if not state["available"]:
        raise SystemExit(f"fastrelu bench --device cuda: {state['reason']}")
    peers = {}
    for name in ("torch", "cupy"):
        try:
            peers[name] = __import__(name).__version__
        except ImportError:
            pass
    repeats = args.repeats or (3 if args.quick else 7)
    sizes = [int(float(s)) for s in (args.sizes.split(",") if args.sizes else GPU_SIZES)]
    dtype = np.dtype((args.dtypes or "float32").split(",")[0])
    print(f"fastrelu GPU on {state['device']} (numba {state['numba']}); arrays: "
          f"{lib.__name__}; peers: {', '.join(f'{k} {v}' for k, v in peers.items()) or 'none'}; "
          f"medians of {repeats} repeats, CUDA events")
    rows = []
    for n in sizes:
        a = Arrays(n, dtype, lib)
        calls = max(3, min(200, int(2e8 // n)))
        impls = {("fastrelu",) + k: f for k, f in fastrelu_impls(a).items()}
        if "torch" in peers:
            impls.update({("torch",) + k: f for k, f in torch_impls(a).items()})
        if "cupy" in peers:
            impls.update({("cupy",) + k: f for k, f in cupy_impls(a).items()})
        impls.update({("copy", "copy", d): f for d, f in copy_impls(a).items()})
        seconds = {k: time_gpu(f, repeats, calls) for k, f in impls.items()}
        print(f"\n{dtype.name}, {human_size(n)} elements:")
        print(f"{'op':<11}{'dir':<5}{'time':>11}{'GB/s':>9}{'x copy':>8}{'vs torch':>10}"
              f"{'vs cupy':>9}")
        for (impl, op, direction), t in seconds.items():
            if impl != "fastrelu":
                continue
            nbytes = (2 if direction == "fwd" else 3) * n * dtype.itemsize
            copy_t = seconds[("copy", "copy", direction)]
            row = {"op": op, "direction": direction, "elements": n, "seconds": t,
                   "gb_per_s": nbytes / t / 1e9, "roofline_fraction": copy_t / t, "peers": {}}
            for peer in ("torch", "cupy"):
                if (peer, op, direction) in seconds:
                    row["peers"][peer] = seconds[(peer, op, direction)]
            rows.append(row)
            vs = [f"{row['peers'][p] / t:9.2f}x" if p in row["peers"] else f"{'-':>10}"
                  for p in ("torch", "cupy")]
            print(f"{op:<11}{direction:<5}{format_time(t):>11}{row['gb_per_s']:>9.1f}"
                  f"{row['roofline_fraction']:>8.2f}{vs[0]}{vs[1][:-1]:>9}")
        del a
    small = [r for r in rows if r["elements"] == min(sizes)]
    if small:
        print(f"\nper-call time at {human_size(min(sizes))} elements (launch overhead): "
              + ", ".join(f"{r['op']} {r['direction']} {format_time(r['seconds'])}"
                          + (f" (torch {format_time(r['peers']['torch'])})"
                             if "torch" in r["peers"] else "") for r in small))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": state, "peers": peers, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
