"""Host cost of one fastrelu call on CUDA arrays, up to the driver, measured without a GPU.

    python bench/gpu_host_path.py [--calls N]

The GPU backend's real (not simulator) code runs on numba device arrays whose pointers are made
up, with the driver-facing calls replaced by stand-ins that do nothing: numba's context lookup,
stream creation, the allocator (stats' counts), memset, the copy of the counts to the host and
its stream synchronize, and the launch itself: fastrelu._gpu's Launcher packs the parameters into
its buffer and calls cuda.bindings' cuLaunchKernel, replaced here by a Python function that
returns success, so what is timed is everything fastrelu and numba do per call up to that call;
not timed: cuda.bindings' conversion of cuLaunchKernel's arguments and the driver itself.  Prints
microseconds per call for each op, and where they go:
  api     validation and routing in fastrelu._api (its time outside fastrelu._gpu)
  gpu     fastrelu._gpu outside the two below: streams, layouts, launch configurations
  args    the arrays as kernel parameters: address and shape (KernelArray)
  launch  the Launcher: parameter values, packing, the driver call's stand-in
On a GPU (bench/run_gpu.sh) the same script also times the real calls (--real).
"""
import argparse
import contextlib
import functools
import statistics
import sys
import time

import numpy as np

BASE = 0x7F00_0000_0000  # made-up device addresses, 16-byte aligned


def install_stand_ins(setattr_=setattr):
    """Replaces the driver-facing calls under fastrelu._gpu and numba by stand-ins that do
    nothing (setattr_: setattr, or pytest's monkeypatch.setattr to undo them)."""
    from numba import cuda
    from numba.cuda import api, dispatcher, types
    from numba.cuda.cudadrv import devicearray, devices, driver

    from fastrelu import _gpu

    def stream(handle):
        return driver.Stream(driver.binding.CUstream(handle), external=True)

    class Context:  # what numba asks of the current context per call
        def get_legacy_default_stream(self):
            return stream(1)

        def get_default_stream(self):
            return stream(0)

    context = Context()
    setattr_(devices._runtime, "ensure_context", contextlib.nullcontext)
    setattr_(api, "current_context", lambda: context)
    setattr_(devices, "get_context", lambda devnum=None: context)
    setattr_(cuda, "external_stream", stream)
    setattr_(driver.Stream, "synchronize", lambda self: None)
    setattr_(driver, "device_memset", lambda dst, val, size, stream=0: None)
    setattr_(driver, "device_to_host", lambda dst, src, size, stream=0: None)
    allocated = iter(range(BASE + (1 << 40), BASE + (1 << 41), 1 << 20))
    setattr_(cuda, "device_array",
             lambda shape, dtype=np.float64, strides=None, order="C", stream=0:
             fake_array(shape, dtype, next(allocated)))

    class CodeLibrary:
        def get_cufunc(self):
            return Function()

    class Function:
        handle = driver.binding.CUkernel(0)

    @functools.lru_cache(maxsize=None)
    def compiled(kernel, argtypes):
        k = object.__new__(dispatcher._Kernel)
        k.signature = types.void(*argtypes)
        k.extensions, k.debug, k.cooperative = [], False, False
        k._codelibrary = CodeLibrary()
        return k

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        return (driver.binding.CUresult.CUDA_SUCCESS,)

    setattr_(_gpu, "_compiled", compiled)
    setattr_(_gpu, "_resident_blocks", lambda kernel, argtypes, threads, device_id: 132 * 8)
    setattr_(_gpu, "_launch_kernel", launch_kernel)
    for cached in (_gpu._external_stream, _gpu._unused_on, _gpu._launcher):
        cached.cache_clear()
    setattr_(_gpu, "_unused_on", functools.lru_cache(maxsize=None)(
        lambda device_id, dtype: _gpu._flat(fake_array((1,), dtype, BASE + (1 << 42)),
                                            dtype.name)))
    return devicearray


def fake_array(shape, dtype, address):
    """A numba device array at a made-up address (nothing is allocated)."""
    from numba import cuda

    interface = {"shape": tuple(shape), "typestr": np.dtype(dtype).str, "data": (address, False),
                 "version": 3, "strides": None}
    return cuda.from_cuda_array_interface(interface, sync=False)


def cases(make):
    """{op: call} on arrays made by make(shape, dtype): 2^20 float32 elements, PReLU and
    statistics along 64 channels."""
    import fastrelu

    shape, w_shape = (16, 64, 1024), (64,)
    x, g, y, dx = (make(shape, np.float32) for _ in range(4))
    w, dw = make(w_shape, np.float32), make(w_shape, np.float32)
    return {
        "relu": lambda: fastrelu.relu(x, out=y),
        "leaky_relu": lambda: fastrelu.leaky_relu(x, 0.01, out=y),
        "relu_backward": lambda: fastrelu.relu_backward(g, x, out=dx),
        "prelu": lambda: fastrelu.prelu(x, w, out=y),
        "prelu_backward": lambda: fastrelu.prelu_backward(g, x, w, out=(dx, dw)),
        "relu+stats": lambda: fastrelu.relu(x, out=y, stats=True),
    }


class Clock:
    """Time spent inside wrapped functions (outermost calls only)."""

    def __init__(self):
        self.total, self.depth = 0.0, 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if not self.depth:
                    self.total += time.perf_counter() - start
        return timed


def per_call(call, calls, rounds=7):
    """Median over rounds of the microseconds per call."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def breakdown(call, calls):
    """(total, api, gpu, args, launch) microseconds per call, from one timed run with the
    backend's entry points, its kernel arrays and its launches wrapped in clocks."""
    from fastrelu import _gpu

    clocks = {k: Clock() for k in ("backend", "args", "launch")}
    saved = {name: getattr(_gpu, name) for name in ("forward", "backward", "KernelArray",
                                                      "_launch")}
    _gpu.forward = clocks["backend"].wrap(saved["forward"])
    _gpu.backward = clocks["backend"].wrap(saved["backward"])
    _gpu.KernelArray = clocks["args"].wrap(saved["KernelArray"])
    _gpu._launch = clocks["launch"].wrap(saved["_launch"])
    try:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        total = time.perf_counter() - start
    finally:
        for name, fn in saved.items():
            setattr(_gpu, name, fn)
    us = {k: c.total / calls * 1e6 for k, c in clocks.items()}
    return (total / calls * 1e6, total / calls * 1e6 - us["backend"],
            us["backend"] - us["args"] - us["launch"], us["args"], us["launch"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--real", action="store_true",
                        help="on a GPU: real numba arrays and launches, no stand-ins")
    args = parser.parse_args(argv)
    if args.real:
        from numba import cuda

        ops = cases(lambda shape, dtype: cuda.device_array(shape, dtype))
        print("real GPU: us per call (host time; launches are asynchronous)")
    else:
        install_stand_ins()
        ops = cases(lambda shape, dtype, c=iter(range(BASE, BASE + (1 << 40), 1 << 24)):
                    fake_array(shape, dtype, next(c)))
        print("stand-in driver: us per call, host path up to the driver")
    print(f"{'op':16} {'total':>7} {'api':>7} {'gpu':>7} {'args':>7} {'launch':>7}  (median "
          f"of 7 x {args.calls} calls; breakdown from one instrumented run)")
    for name, call in ops.items():
        for _ in range(50):
            call()
        total = per_call(call, args.calls)
        parts = breakdown(call, args.calls)
        print(f"{name:16} {total:7.1f} " + " ".join(f"{p:7.1f}" for p in parts[1:]))
    if args.real:
        cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
