"""``fastrelu bench --device cuda``: the GPU report, on CuPy arrays.

The CPU report's sweep (fastrelu._report) with the data on the GPU: the roofline is a
device-to-device copy of the same bytes (CuPy's own copy); peers are the NumPy recipe run by
CuPy and PyTorch CUDA when installed.  Times come from CUDA events around many calls on the
default stream, in the CPU report's interleaved rounds; the per-call time at the smallest size
(where no kernel has work to speak of: the launch overhead) is reported beside PyTorch's.
"""
import dataclasses
import functools

from ._report import (Backend, UsageError, format_time, human_size, installed, is_bfloat16,
                      machine_description, plot_report, report_options, size_plan, sweep,
                      write_json)
from ._runtime import get_num_threads

GPU_SIZES = ("1e3", "1e4", "1e6", "1e8")
QUICK_GPU_SIZES = ("1e3", "1e4", "1e6")


def cuda_timed(fn, calls=1):
    """Seconds per call: CUDA events around `calls` calls on the default stream."""
    from numba import cuda

    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return cuda.event_elapsed_time(start, end) / 1e3 / calls


def cuda_backend():
    """(backend, the GPU backend's state, the peers): the GPU as a report backend, or UsageError
    when CuPy, numba's CUDA target or a GPU is missing."""
    try:
        import cupy
    except ImportError:
        raise UsageError("CuPy is required for --device cuda: pip install cupy-cuda12x "
                         "(or the CuPy package for your CUDA)") from None
    try:
        from . import _gpu
    except ImportError as exc:
        raise UsageError(f"--device cuda needs numba's CUDA target: pip install "
                         f"'fastrelu[cuda]' ({exc})") from None
    state = _gpu.state()
    if not state["available"]:
        raise UsageError(f"--device cuda: {state['reason']}")
    if state["simulator"]:
        raise UsageError("--device cuda: numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM), "
                         "and it cannot time a GPU")
    from numba import cuda

    free_bytes, _ = cuda.current_context().get_memory_info()
    backend = Backend(xp=cupy, copy=lambda src, dst: cupy.copyto(dst, src), timer=cuda_timed,
                      torch_device="cuda",
                      cache=("L2 cache", cuda.get_current_device().L2_CACHE_SIZE),
                      memory=("GPU memory", free_bytes))
    peers = installed(("torch",))
    if peers:
        import torch

        if not torch.cuda.is_available():  # a CPU-only PyTorch is no GPU peer
            peers.clear()
    return backend, state, peers


def prepare(args):
    """Checks every option (UsageError), then the GPU, and returns the run, which nothing has
    started yet."""
    options = report_options(args, GPU_SIZES, QUICK_GPU_SIZES)
    if args.threads is not None:
        raise UsageError("--threads sets CPU threads; the GPU report (--device cuda) has none")
    if args.contention:
        raise UsageError("--contention shares CPU cores; the GPU report (--device cuda) has none")
    if any(is_bfloat16(dt) for dt in options.dtypes):
        raise UsageError("--dtypes: the GPU report's arrays are CuPy's, which have no bfloat16")
    backend, state, peers = cuda_backend()
    sizes = size_plan(options.sizes, options.dtypes, backend)
    return functools.partial(run, options, backend, sizes, state, peers)


def run(options, backend, sizes, state, peers):
    library = backend.xp.__name__
    timing = dataclasses.replace(options.timing, timer=backend.timer)
    print(f"fastrelu GPU on {state['device']} (numba {state['numba']}); arrays: {library} "
          f"{backend.xp.__version__}; peers: "
          f"{', '.join(f'{k} {v}' for k, v in peers.items()) or 'none'}; "
          f"CUDA events, interleaved rounds ({timing.rounds}, or {timing.min_rounds} for slow "
          "groups), medians of per-round ratios")
    rows = sweep(sizes, options.ops, peers, backend, timing)
    smallest = min(n for n, _ in sizes)
    for dtype in options.dtypes:
        small = [r for r in rows if r["elements"] == smallest and r["dtype"] == dtype.name]
        print(f"\nper-call time at {human_size(smallest)} {dtype.name} elements (launch "
              "overhead): " + ", ".join(
                  f"{r['op']} {r['direction']} {format_time(r['seconds'])}"
                  + (f" (torch {format_time(r['peers']['torch'])})" if "torch" in r["peers"]
                     else "") for r in small))
    if options.json is not None:
        write_json(options.json, {"machine": machine_description(get_num_threads()),
                                  "device": state, "peers": {library: backend.xp.__version__,
                                                             **peers},
                                  "rounds": timing.rounds, "rows": rows})
    if options.plot is not None:
        plot_report(options.pyplot, rows, options.plot, library)
    return 0
