"""GPU backend: numba.cuda kernels on any CUDA array (CuPy, PyTorch, numba), zero-copy.

Imported on the first CUDA array, never by ``import fastrelu``: importing numba's CUDA target
costs 0.3-0.5 s.  Arguments arrive validated by fastrelu._api; nothing here re-checks them.

The contract is the CPU kernels' (_kernels.h), written once more in numba: every element is
computed in float32 (float16 and float32 data) or float64, as exactly the same comparisons.  Two
kernel shapes serve every op:
  - flat: a grid-stride loop over all elements, every element taking the parameter p;
  - rows: the data seen as rows of `period` = C * inner columns, column j belonging to channel
    j // inner.  Each thread walks one column down many rows, so its channel is fixed: it gathers
    counts (forward statistics) or sums (PReLU weight or bias gradients) in registers, adds them to
    a per-channel array in shared memory, and the block adds that to global memory with one atomic
    per channel.  Per-channel weights and biases are read once per thread.
Each is made by a factory per compute type (float32 or float64); `op` and the flags are ordinary
arguments, uniform across the grid.
"""
import contextlib
import ctypes
import functools
import math

import numba
import numpy as np
from numba import cuda

from ._cpu import BIAS, COPY, COUNT, ELU, LEAKY, RELU, SUM_GRAD, SUM_NONE, SUM_WEIGHT, WEIGHT
from ._cuda_arrays import LIBRARIES, array_library as _kind, device_index

SHARED_CHANNELS = 1024  # per-channel sums in shared memory up to this many channels
THREADS = 256


def _kernels(CT):
    """The kernels computing in CT (numba.float32 or numba.float64)."""
    zero = CT(0)

    @cuda.jit(device=True, inline=True)
    def y_of(op, v, p):
        if op == RELU:
            return zero if v < 0 else v
        if op == LEAKY:
            return v if v > 0 else v * p
        if op == COPY:
            return v
        return p * math.expm1(v) if v <= 0 else v

    @cuda.jit(device=True, inline=True)
    def dx_of(op, v, g, p):
        if op == RELU:
            return zero if v <= 0 else g
        if op == LEAKY:
            return g if v > 0 else g * p
        if op == ELU:
            return g * p * math.exp(v) if v <= 0 else g
        if op == COPY:
            return g
        return g * (v + p) if v <= 0 else g  # ELU_FROM_Y: v is the output

    @cuda.jit(cache=True)
    def forward_flat(op, x, y, p):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            y[i] = y_of(op, CT(x[i]), p)

    @cuda.jit(cache=True)
    def backward_flat(op, g, x, dx, p):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            dx[i] = dx_of(op, CT(x[i]), CT(g[i]), p)

    @cuda.jit(device=True, inline=True)
    def add_per_channel(local, c, channel_sums, shared, use_shared):
        """The block's per-channel reduction: shared atomics, then one global atomic per
        channel (or global atomics directly when there are too many channels)."""
        if use_shared:
            if local != 0:
                cuda.atomic.add(shared, c, local)
        elif local != 0:
            cuda.atomic.add(channel_sums, c, local)

    @cuda.jit(device=True, inline=True)
    def start_shared(shared, C, use_shared):
        if use_shared:
            t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
            for c in range(t, C, cuda.blockDim.x * cuda.blockDim.y):
                shared[c] = 0
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def flush_shared(shared, C, channel_sums, use_shared):
        cuda.syncthreads()
        if use_shared:
            t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
            for c in range(t, C, cuda.blockDim.x * cuda.blockDim.y):
                if shared[c] != 0:
                    cuda.atomic.add(channel_sums, c, shared[c])

    @cuda.jit(cache=True)
    def forward_rows(op, x, y, p, inner, C, pw, pb, counts, flags):
        """x, y: (rows, period); pw, pb: C parameters / biases (x's dtype) when flags say so;
        counts: C int64 positives of x (+ b) when flags & COUNT."""
        shared = cuda.shared.array(SHARED_CHANNELS, numba.int64)
        use_shared = C <= SHARED_CHANNELS and flags & COUNT
        start_shared(shared, C, use_shared)
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j < x.shape[1]:
            c = j // inner
            pj = CT(pw[c % pw.size]) if flags & WEIGHT else p  # pw.size is C, or 1 when shared
            bj = CT(pb[c]) if flags & BIAS else zero
            positive = 0
            for r in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x.shape[0],
                           cuda.gridDim.y * cuda.blockDim.y):
                v = CT(x[r, j])
                if flags & BIAS:
                    v = v + bj
                y[r, j] = y_of(op, v, pj)
                if v > 0:
                    positive += 1
            if flags & COUNT:
                add_per_channel(positive, c, counts, shared, use_shared)
        flush_shared(shared, C, counts, use_shared)

    @cuda.jit(cache=True)
    def backward_rows(op, g, x, dx, p, inner, C, pw, sums, flags, sum_kind):
        """g, x, dx: (rows, period); sums: C accumulators (CT) of the weight gradient
        (x > 0 ? 0 : x*g) or of dx, per sum_kind."""
        shared = cuda.shared.array(SHARED_CHANNELS, CT)
        use_shared = C <= SHARED_CHANNELS and sum_kind != SUM_NONE
        start_shared(shared, C, use_shared)
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j < x.shape[1]:
            c = j // inner
            pj = CT(pw[c % pw.size]) if flags & WEIGHT else p
            local = zero
            for r in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x.shape[0],
                           cuda.gridDim.y * cuda.blockDim.y):
                v = CT(x[r, j])
                gv = CT(g[r, j])
                d = dx_of(op, v, gv, pj)
                dx[r, j] = d
                if sum_kind == SUM_WEIGHT and not v > 0:
                    local += v * gv
                elif sum_kind == SUM_GRAD:
                    local += d
            if sum_kind != SUM_NONE:
                add_per_channel(local, c, sums, shared, use_shared)
        flush_shared(shared, C, sums, use_shared)

    return {"forward_flat": forward_flat, "backward_flat": backward_flat,
            "forward_rows": forward_rows, "backward_rows": backward_rows}


@cuda.jit(cache=True)
def cast(src, dst):
    """dst[:] = src[:] converted (accumulated sums to the result's dtype)."""
    for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit(cache=True)
def fill_zero(a):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] = 0


KERNELS = {np.dtype(np.float32): _kernels(numba.float32),
           np.dtype(np.float64): _kernels(numba.float64)}


def _compute_dtype(dtype):
    """float16 and float32 data are computed in float32, float64 in float64."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _for(dtype):
    """The kernels for data of `dtype`."""
    return KERNELS[_compute_dtype(dtype)]


# ---- launch configuration -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _device_blocks(device_id):
    """Blocks that fill the device (cached per device): 8 blocks of 256 threads per
    multiprocessor, 2048 threads, the most one can hold, to keep memory requests in flight."""
    try:
        sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    except Exception:  # the simulator
        sms = 1
    return 8 * sms


def _flat_launch(n):
    blocks = max(1, min(_device_blocks(_device_id()), -(-n // THREADS)))
    return blocks, THREADS


def _rows_launch(rows, period):
    bx = 32
    while bx < min(period, THREADS):
        bx *= 2
    by = THREADS // bx
    gx = -(-period // bx)
    gy = max(1, min(-(-rows // by), max(1, _device_blocks(_device_id()) // gx)))
    return (gx, gy), (bx, by)


def _device_id():
    try:
        return cuda.get_current_device().id
    except Exception:
        return 0


# ---- arrays, streams, devices -------------------------------------------------------------------

def _as_numba(a):
    """A numba device array over the same memory (no copy, no synchronization)."""
    return a if _kind(a) == "numba" else cuda.as_cuda_array(a, sync=False)


def _adopt(*arrays):
    """Other producers' CUDA arrays as numba arrays (no copy); the rest as they are."""
    return [cuda.as_cuda_array(a, sync=False) if a is not None and _kind(a) == "cai" and
            not isinstance(a, np.ndarray) else a for a in arrays]


def _empty(like, shape, dtype):
    """A new C-contiguous array of `dtype` (NumPy) from like's library, on its device: CuPy and
    PyTorch arrays give their own kind; numba and other producers give numba arrays."""
    kind = _kind(like)
    if kind == "cupy":
        import cupy

        return cupy.empty(shape, dtype)
    if kind == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device=like.device)
    return cuda.device_array(shape, dtype)


def _scratch(like, n, dtype, s):
    """A 1-d temporary: from like's library's pool (ordered on its current stream, which is the
    launch stream), else from numba."""
    if _kind(like) in LIBRARIES:
        return _flat(_empty(like, (n,), dtype))
    return cuda.device_array(n, dtype, stream=s)


def _contiguous(a):
    """`a`, or a C-contiguous copy of it made by its own library (numba and other producers' arrays
    reach here C- or F-contiguous, so the ops only read them through a transpose)."""
    kind = _kind(a)
    if kind == "cupy":
        import cupy

        return cupy.ascontiguousarray(a)
    if kind == "torch":
        return a.contiguous()
    return a


def is_c_contiguous(a):
    kind = _kind(a)
    if kind == "torch":
        return a.is_contiguous()
    if kind == "cupy":
        return a.flags.c_contiguous
    return _as_numba(a).is_c_contiguous()


def is_f_contiguous(a):
    kind = _kind(a)
    if kind == "torch":
        return a.permute(*reversed(range(a.ndim))).is_contiguous()
    if kind == "cupy":
        return a.flags.f_contiguous
    return _as_numba(a).is_f_contiguous()


def _transpose(a):
    if _kind(a) == "torch":
        return a.permute(*reversed(range(a.ndim)))
    return a.T


def _numba_view(a, shape):
    """A numba array of `shape` over the memory of C-contiguous `a`: for CuPy and PyTorch arrays
    made from their interface in one step (no reshape, no stream of its own, no synchronize)."""
    if _kind(a) not in LIBRARIES:
        return a.reshape(shape)
    interface = a.__cuda_array_interface__
    return cuda.from_cuda_array_interface(
        {"shape": shape, "typestr": interface["typestr"], "data": interface["data"],
         "version": 2}, owner=a, sync=False)


def _flat(a):
    return _numba_view(a, (math.prod(a.shape),))


def _rows(a, period):
    n = math.prod(a.shape)
    return _numba_view(a, (n // period if period else 0, period))


def _copy_into(out, src):
    """out[...] = src for a CuPy or PyTorch `out` of another layout (the library's own copy)."""
    if _kind(out) == "torch":
        out.copy_(src)
    else:
        out[...] = src


@functools.lru_cache(maxsize=None)
def _unused_on(device_id, dtype):
    return cuda.to_device(np.zeros(1, dtype))


def _unused(dtype):
    """A one-element placeholder for a per-channel array a kernel's flags say it does not read
    (made once per device and dtype, so calls upload nothing)."""
    return _unused_on(_device_id(), np.dtype(dtype))


def _params(values, dtype, s):
    """Per-channel weights or biases as a contiguous 1-d numba array of the data's dtype (the
    kernels convert them): a view of a CUDA array, an upload of the NumPy array validation made
    of Python values, or a placeholder when there are none."""
    if values is None:
        return _unused(dtype)
    if isinstance(values, np.ndarray):
        return cuda.to_device(values.reshape(-1), stream=s)
    return _flat(_contiguous(values))


def _stream_handle(stream):
    """The cudaStream_t of a numba, CuPy (.ptr), PyTorch (.cuda_stream) or CUDA-stream-protocol
    stream, or of an int."""
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    handle = getattr(stream, "handle", None)
    if handle is not None:  # numba: a ctypes pointer or a cuda.bindings CUstream
        return (handle.value or 0) if isinstance(handle, ctypes.c_void_p) else int(handle)
    return int(getattr(stream, "cuda_stream", getattr(stream, "ptr", stream)))


def _external_stream(handle):
    if handle in (0, 1):  # the legacy default stream (1 in __cuda_array_interface__)
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def launch_stream(a, stream=None):
    """The numba stream to launch on: `stream` when given; else where a's library runs its own
    kernels (PyTorch's or CuPy's current stream); else the stream a's __cuda_array_interface__
    names; else the default stream."""
    if stream is not None:
        return stream if type(stream).__module__.startswith("numba") \
            else _external_stream(_stream_handle(stream))
    kind = _kind(a)
    if kind == "torch":
        import torch

        return _external_stream(torch.cuda.current_stream(a.device).cuda_stream)
    if kind == "cupy":
        import cupy

        return _external_stream(cupy.cuda.get_current_stream().ptr)
    interface = getattr(a, "__cuda_array_interface__", None)
    handle = interface.get("stream") if interface else None
    return _external_stream(handle) if handle else cuda.default_stream()


def _library_stream(a, s):
    """Makes `s` the current stream of a's library (CuPy, PyTorch) for the call, so the copies
    and temporaries it makes are ordered with the kernels, and its pool reuses them after."""
    kind = _kind(a)
    if kind not in LIBRARIES:
        return contextlib.nullcontext()
    handle = _stream_handle(s)
    legacy = handle in (0, 1)  # the libraries' own default stream
    if kind == "torch":
        import torch

        return torch.cuda.stream(torch.cuda.default_stream(a.device) if legacy else
                                 torch.cuda.ExternalStream(handle, device=a.device))
    import cupy

    return cupy.cuda.Stream.null if legacy else cupy.cuda.ExternalStream(handle)


@functools.lru_cache(maxsize=None)
def _gpu_count():
    try:
        return len(cuda.gpus)
    except Exception:  # the simulator
        return 1


@contextlib.contextmanager
def _launching(a, stream):
    """One call's scope; yields the stream to launch on.  On machines with several GPUs, the GPU
    holding `a` is made numba's (and CuPy's) current one, where they launch and allocate; a given
    `stream` is made the current stream of a's library."""
    index = device_index(a) if _gpu_count() > 1 else None
    with cuda.gpus[index] if index is not None else contextlib.nullcontext(), \
            a.device if index is not None and _kind(a) == "cupy" else contextlib.nullcontext():
        s = launch_stream(a, stream)
        with _library_stream(a, s) if stream is not None else contextlib.nullcontext():
            yield s


# ---- the ops ------------------------------------------------------------------------------------

def _layout(shape, axis):
    """(C, inner) of the channels along `axis`."""
    C = shape[axis]
    inner = math.prod(shape[axis + 1:])
    return C, inner


def _all_f_ordered(*arrays):
    """Every array is F- but not C-contiguous (or None): the op then runs on the transposes."""
    return all(a is None or (a.ndim > 1 and not is_c_contiguous(a) and is_f_contiguous(a))
               for a in arrays)


def forward(op, x, out, p, weight, axis, want_counts, bias, dtype, stream=None):
    """Like fastrelu._cpu.forward, on CUDA arrays of NumPy dtype `dtype`: returns (y, counts or
    None); counts come back as an int64 NumPy array (reading them waits for this stream only)."""
    result_out = out
    with _launching(x, stream) as s:
        x, out, weight, bias = _adopt(x, out, weight, bias)
        transposed = x.ndim > 1 and _all_f_ordered(x, out)
        if transposed:
            x, out = _transpose(x), (None if out is None else _transpose(out))
            axis = None if axis is None else x.ndim - 1 - axis
        xc = _contiguous(x)
        y = out if out is not None and is_c_contiguous(out) else \
            _empty(xc, tuple(xc.shape), dtype)
        k, ct = _for(dtype), _compute_dtype(dtype)
        n = math.prod(xc.shape)
        counts = None
        if n and axis is None and weight is None and bias is None and not want_counts:
            blocks, threads = _flat_launch(n)
            k["forward_flat"][blocks, threads, s](op, _flat(xc), _flat(y), ct.type(p))
        elif n or want_counts:
            C, inner = _layout(tuple(xc.shape), axis) if axis is not None else (1, n)
            pw, pb = _params(weight, dtype, s), _params(bias, dtype, s)
            flags = (COUNT if want_counts else 0) | (BIAS if bias is not None else 0) | \
                (WEIGHT if weight is not None else 0)
            if want_counts:
                dcounts = _scratch(xc, max(C, 1), np.int64, s)
                _fill_zero(dcounts, s)
            else:
                dcounts = _unused(np.int64)
            period = C * inner
            if n:
                grid, block = _rows_launch(n // period, period)
                k["forward_rows"][grid, block, s](op, _rows(xc, period), _rows(y, period),
                                                  ct.type(p), inner, C, pw, pb, dcounts, flags)
            if want_counts:
                counts = dcounts.copy_to_host(stream=s)[:C]
                s.synchronize()  # this stream only: the counts are read on the host
        if out is not None and y is not out:
            _copy_into(out, y)
        return result_out if result_out is not None else \
            (_transpose(y) if transposed else y), counts


def backward(op, grad, x, out, p, weight, axis, param_out, param_shape, sum_kind, dtype,
             stream=None, param_out_aliases_input=False):
    """Like fastrelu._cpu.backward, on CUDA arrays of NumPy dtype `dtype`.  With `param_shape`,
    also the per-channel sums of sum_kind (weight or input gradient), accumulated in float32
    (float64 for float64 data) and returned in `param_out` or a new array of that shape:
    returns (dx, sums or None).  `param_out_aliases_input`: param_out is one of the inputs
    (the weight, or grad), which the kernel reads while it sums, so the sums go to a scratch
    accumulator first."""
    result_out = out
    with _launching(x, stream) as s:
        grad, x, out, weight, param_out = _adopt(grad, x, out, weight, param_out)
        transposed = x.ndim > 1 and _all_f_ordered(x, grad, out)
        if transposed:
            x, grad = _transpose(x), _transpose(grad)
            out = None if out is None else _transpose(out)
            axis = None if axis is None else x.ndim - 1 - axis
        xc, gc = _contiguous(x), _contiguous(grad)
        dx = out if out is not None and is_c_contiguous(out) else \
            _empty(xc, tuple(xc.shape), dtype)
        k, ct = _for(dtype), _compute_dtype(dtype)
        n = math.prod(xc.shape)
        param = None
        if param_shape is None and axis is None and weight is None:
            if n:
                blocks, threads = _flat_launch(n)
                k["backward_flat"][blocks, threads, s](op, _flat(gc), _flat(xc), _flat(dx),
                                                       ct.type(p))
        else:
            C, inner = _layout(tuple(xc.shape), axis) if axis is not None else (1, n)
            pw = _params(weight, dtype, s)
            if param_shape is None:
                sum_kind, sums = SUM_NONE, _unused(ct)
            else:
                param = param_out if param_out is not None else _empty(xc, param_shape, dtype)
                # float32/float64 results are the accumulators themselves, unless the kernel
                # still reads them as an input (they are zeroed first)
                direct = dtype == ct and is_c_contiguous(param) and not param_out_aliases_input
                sums = _flat(param) if direct else _scratch(xc, C, ct, s)
                _fill_zero(sums, s)
            period = C * inner
            if n:
                grid, block = _rows_launch(n // period, period)
                k["backward_rows"][grid, block, s](op, _rows(gc, period), _rows(xc, period),
                                                   _rows(dx, period), ct.type(p), inner, C, pw,
                                                   sums, WEIGHT if weight is not None else 0,
                                                   sum_kind)
            if param is not None and not direct:
                target = param if is_c_contiguous(param) else _empty(xc, param_shape, dtype)
                blocks, threads = _flat_launch(C)
                cast[blocks, threads, s](sums, _flat(target))
                if target is not param:
                    _copy_into(param, target)
        if out is not None and dx is not out:
            _copy_into(out, dx)
        return result_out if result_out is not None else \
            (_transpose(dx) if transposed else dx), param


def _fill_zero(a, s):
    blocks, threads = _flat_launch(a.size)
    fill_zero[blocks, threads, s](a)


def copy(src, dst):
    """dst[...] = src through the flat kernel: the GPU benchmarks' roofline."""
    dtype = np.dtype(str(_as_numba(src).dtype))
    with _launching(src, None) as s:
        blocks, threads = _flat_launch(math.prod(src.shape))
        _for(dtype)["forward_flat"][blocks, threads, s](
            COPY, _flat(src), _flat(dst), _compute_dtype(dtype).type(0))


def state():
    """Whether the backend can run, and on what."""
    if cuda.is_available():
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        simulated = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))
        return {"available": True, "loaded": True, "device": name,
                "simulator": simulated, "numba": numba.__version__}
    return {"available": False, "loaded": True, "numba": numba.__version__,
            "reason": "numba finds no CUDA GPU (driver or device missing)"}


def compile_ptx_all(cc=(9, 0)):
    """Compiles every kernel, for every dtype, with the argument types calls give them, to PTX
    (no GPU needed): the CI check that the kernels type-check, which the simulator does not do.
    Returns {name: PTX size}."""
    from numba.core import types

    i = types.int64  # Python ints (op codes, flags, sizes) arrive as int64
    out = {}
    for dt_name in ("float16", "float32", "float64"):
        dt = getattr(types, dt_name)
        ct = types.float64 if dt_name == "float64" else types.float32
        k = _for(np.dtype(dt_name))
        a1, a2 = dt[::1], dt[:, ::1]
        launches = {
            "forward_flat": (k["forward_flat"], (i, a1, a1, ct)),
            "backward_flat": (k["backward_flat"], (i, a1, a1, a1, ct)),
            "forward_rows": (k["forward_rows"], (i, a2, a2, ct, i, i, a1, a1, i[::1], i)),
            "backward_rows": (k["backward_rows"], (i, a2, a2, a2, ct, i, i, a1, ct[::1], i, i)),
            "cast": (cast, (ct[::1], a1)),
        }
        for name, (kernel, sig) in launches.items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
            out[f"{name}[{dt_name}]"] = len(ptx)
    for zeroed in (types.float32, types.float64, i):  # accumulators and counts
        ptx, _ = cuda.compile_ptx(fill_zero.py_func, (zeroed[::1],), cc=cc)
        out[f"fill_zero[{zeroed}]"] = len(ptx)
    return out
