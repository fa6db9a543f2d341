"""bench/gpu_host_path.py runs the GPU backend's real launch path without a GPU (stand-ins for
the driver) and reports every op."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_host_path.py")


def test_host_path_runs_on_stand_ins_for_every_op():
    res = subprocess.run([sys.executable, SCRIPT, "--calls", "20"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]]
            for line in res.stdout.splitlines()[2:]}
    assert set(rows) == {"relu", "leaky_relu", "relu_backward", "prelu", "prelu_backward",
                         "relu+stats"}
    for total, *parts in rows.values():
        assert total > 0 and all(p > 0 for p in parts)


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_host_path", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numba_parameters(argtypes, args):
    """The parameters numba's _Kernel.launch would hand to the driver: (address, size) each, as
    cuda.core's ParamHolder lays them out (kept alive by the returned holder)."""
    import ctypes

    from numba.cuda import dispatcher

    try:
        from cuda.core._kernel_arg_handler import ParamHolder
    except ImportError:
        from cuda.core.cu13._kernel_arg_handler import ParamHolder
    kernel = object.__new__(dispatcher._Kernel)
    kernel.extensions = []
    values = []
    for ty, value in zip(argtypes, args):
        kernel._prepare_args(ty, value, 0, [], values)
    holder = ParamHolder(values)
    sizes = [8 if isinstance(v, int) else ctypes.sizeof(v) for v in values]
    addresses = [ctypes.c_void_p.from_address(holder.ptr + 8 * k).value
                 for k in range(len(values))]
    return holder, [ctypes.string_at(a, size) for a, size in zip(addresses, sizes)], sizes


def test_launcher_packs_every_kernel_signature_as_numba_does(monkeypatch):
    """For every kernel variant, the Launcher hands cuLaunchKernel the same parameter bytes
    numba's launch would, and the grid, block and stream it is given."""
    import ctypes

    import numpy as np
    from numba.cuda import types

    bench = _bench()
    bench.install_stand_ins(monkeypatch.setattr)
    from fastrelu import _gpu

    scalars = {types.float32: np.float32(-0.37), types.float64: np.float64(2.5e-300),
               types.int32: np.int32(123457), types.int64: 5 << 33}
    for name, (kernel, argtypes) in _gpu.kernel_variants().items():
        numba_args, our_args = [], []
        for k, ty in enumerate(argtypes):
            if isinstance(ty, types.Array):
                shape = (37,) if ty.ndim == 1 else (5, 12)
                dtype = np.dtype(str(ty.dtype))
                a = bench.fake_array(shape, dtype, bench.BASE + (k + 1) * (1 << 20) + 16 * k)
                numba_args.append(a)
                our_args.append(_gpu.KernelArray(a, shape, dtype.name))
            else:
                numba_args.append(scalars[ty])
                our_args.append(scalars[ty])
        holder, expected, sizes = _numba_parameters(argtypes, numba_args)
        seen = {}

        def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            seen["config"] = (f, (gx, gy, gz), (bx, by, bz), shared, stream, extra)
            pointers = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
            seen["params"] = [ctypes.string_at(pointers[k], size)
                              for k, size in enumerate(sizes)]
            return (0,)

        monkeypatch.setattr(_gpu, "_launch_kernel", launch_kernel)
        launcher = _gpu.Launcher("function", argtypes)
        assert launcher.layout.size == 8 * len(expected), name
        launcher.launch((7, 3, 1), (64, 4, 1), 0xABC, our_args)
        assert seen["config"] == ("function", (7, 3, 1), (64, 4, 1), 0, 0xABC, 0), name
        assert seen["params"] == expected, name


def test_ops_launch_with_the_arrays_addresses_and_sizes(monkeypatch):
    """relu and prelu_backward on the real launch path (stand-in driver) hand the kernel the
    arrays' own addresses and the element counts and layouts the op needs."""
    import ctypes
    import struct

    import numpy as np

    import fastrelu

    bench = _bench()
    bench.install_stand_ins(monkeypatch.setattr)
    from fastrelu import _gpu

    launches = []

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        pointers = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        launches.append([struct.unpack("q", ctypes.string_at(pointers[k], 8))[0]
                         for k in range(16)])
        return (0,)

    monkeypatch.setattr(_gpu, "_launch_kernel", launch_kernel)
    addresses = iter(range(bench.BASE, bench.BASE + (1 << 30), 1 << 24))
    x, y, g, dx = (bench.fake_array((4, 6, 10), np.float32, next(addresses)) for _ in range(4))
    w, dw = (bench.fake_array((6,), np.float32, next(addresses)) for _ in range(2))

    fastrelu.relu(x, out=y)
    params = launches.pop()
    # x, then y: meminfo, parent, size, itemsize, data, shape, stride
    assert params[:14] == [0, 0, 240, 4, bench.BASE, 240, 4,
                           0, 0, 240, 4, bench.BASE + (1 << 24), 240, 4]
    assert params[15] & 0xFFFFFFFF == 240  # n as int32

    fastrelu.prelu_backward(g, x, w, out=(dx, dw))
    params = launches.pop()
    # g as (rows, period) = (4, 60): meminfo, parent, size, itemsize, data, shape, strides
    assert params[:9] == [0, 0, 240, 4, bench.BASE + (2 << 24), 4, 60, 240, 4]
    assert params[13] == bench.BASE  # x's data
