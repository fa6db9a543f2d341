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
import functools
import math

import numba
import numpy as np
from numba import cuda

RELU, LEAKY, ELU, COPY, ELU_FROM_Y = 0, 1, 2, 3, 4  # the CPU kernels' op codes
SUM_NONE, SUM_WEIGHT, SUM_GRAD = 0, 1, 2
COUNT, BIAS, WEIGHT = 1, 2, 4  # rows kernel flags

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
        """x, y: (rows, period); pw, pb: C parameters / biases (CT) when flags say so; counts:
        C int64 positives of x (+ b) when flags & COUNT."""
        shared = cuda.shared.array(SHARED_CHANNELS, numba.int64)
        use_shared = C <= SHARED_CHANNELS and flags & COUNT
        start_shared(shared, C, use_shared)
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j < x.shape[1]:
            c = j // inner
            pj = pw[c % pw.size] if flags & WEIGHT else p  # pw.size is C, or 1 when shared
            bj = pb[c] if flags & BIAS else zero
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
            pj = pw[c % pw.size] if flags & WEIGHT else p
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

    @cuda.jit(cache=True)
    def cast(src, dst):
        for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
            dst[i] = src[i]

    @cuda.jit(cache=True)
    def fill_zero(a):
        for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
            a[i] = 0

    return {"forward_flat": forward_flat, "backward_flat": backward_flat,
            "forward_rows": forward_rows, "backward_rows": backward_rows, "cast": cast,
            "fill_zero": fill_zero}


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


# ---- arrays -------------------------------------------------------------------------------------

def _kind(a):
    module = type(a).__module__
    return "torch" if module.startswith("torch") else "cupy" if module.startswith("cupy") \
        else "numba"


def _as_numba(a):
    """A numba device array over the same memory (no copy, no synchronization)."""
    if _kind(a) == "numba":
        return a
    return cuda.as_cuda_array(a, sync=False)


def stream_of(a, stream=None):
    """The stream to launch on: `stream` when given (numba stream, CuPy/PyTorch stream, or a
    cudaStream_t as int), else the one the producer's __cuda_array_interface__ names, else 0."""
    if stream is not None:
        if type(stream).__module__.startswith("numba"):
            return stream
        ptr = getattr(stream, "cuda_stream", getattr(stream, "ptr", stream))
        return _external_stream(int(ptr))
    interface = getattr(a, "__cuda_array_interface__", None)
    ptr = interface.get("stream") if interface else None
    return _external_stream(ptr) if ptr else cuda.default_stream()


def _external_stream(ptr):
    if ptr == 1:
        return cuda.legacy_default_stream()
    if ptr == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(ptr)


def _empty(like, shape, dtype):
    """A new C-contiguous array of the same kind (and device) as `like`."""
    kind = _kind(like)
    if kind == "cupy":
        import cupy

        return cupy.empty(shape, dtype)
    if kind == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device=like.device)
    return cuda.device_array(shape, dtype)


def empty_like_kind(like, shape, dtype):
    """A new array of the kind (CuPy, PyTorch, numba) and device of `like`."""
    return _empty(like, tuple(shape), dtype)


def _contiguous(a):
    """`a`, or a C-contiguous copy of it (made by the array's own library)."""
    kind = _kind(a)
    if kind == "cupy":
        import cupy

        return cupy.ascontiguousarray(a)
    if kind == "torch":
        return a.contiguous()
    return a  # numba arrays are checked to be contiguous by the API


def is_c_contiguous(a):
    kind = _kind(a)
    if kind == "torch":
        return a.is_contiguous()
    if kind == "cupy":
        return a.flags.c_contiguous
    return a.is_c_contiguous()


def is_f_contiguous(a):
    kind = _kind(a)
    if kind == "torch":
        return a.permute(*reversed(range(a.ndim))).is_contiguous()
    if kind == "cupy":
        return a.flags.f_contiguous
    return a.is_f_contiguous()


def _transpose(a):
    if _kind(a) == "torch":
        return a.permute(*reversed(range(a.ndim)))
    return a.T


def _flat(a):
    return _as_numba(a).reshape(-1)


def _rows(a, period):
    d = _as_numba(a)
    return d.reshape(d.size // period if period else 0, period)


@functools.lru_cache(maxsize=None)
def _unused_on(device_id, dtype):
    return cuda.to_device(np.zeros(1, dtype))


def _unused(dtype):
    """A one-element placeholder for a per-channel array a kernel's flags say it does not read
    (made once per device and dtype, so calls upload nothing)."""
    return _unused_on(_device_id(), np.dtype(dtype))


def _small_device(values, dtype, stream):
    """Per-channel values as a contiguous 1-d numba array of the compute type: a view of a CUDA
    array that already is one, a cast of one that is not, or an upload of host values."""
    if isinstance(values, (np.ndarray, list, tuple, float, int)):
        return cuda.to_device(np.ascontiguousarray(values, dtype=dtype).reshape(-1), stream=stream)
    flat = _flat(_contiguous(values))
    if np.dtype(str(flat.dtype)) == dtype:
        return flat
    converted = cuda.device_array(flat.size, dtype, stream=stream)
    blocks, threads = _flat_launch(flat.size)
    KERNELS[dtype]["cast"][blocks, threads, stream](flat, converted)
    return converted


# ---- the ops ------------------------------------------------------------------------------------

def _layout(shape, axis):
    """(C, inner) of the channels along `axis`."""
    C = shape[axis]
    inner = math.prod(shape[axis + 1:])
    return C, inner


def forward(op, x, out, p, weight, axis, want_counts, bias=None, stream=None):
    """Like fastrelu._cpu.forward, on CUDA arrays: returns (y, counts or None); counts come back
    as an int64 NumPy array (reading them waits for this stream only)."""
    transposed = x.ndim > 1 and not is_c_contiguous(x) and is_f_contiguous(x) and \
        (out is None or (not is_c_contiguous(out) and is_f_contiguous(out)))
    if transposed:
        x, out = _transpose(x), (None if out is None else _transpose(out))
        axis = None if axis is None else x.ndim - 1 - axis
    s = stream_of(x, stream)
    xc = _contiguous(x)
    y = out if out is not None and is_c_contiguous(out) else _empty(xc, tuple(xc.shape), x.dtype)
    dtype = np.dtype(str(_as_numba(xc).dtype))
    k = _for(dtype)
    ct = _compute_dtype(dtype)
    n = math.prod(xc.shape)
    counts = None
    if n and axis is None and weight is None and bias is None and not want_counts:
        blocks, threads = _flat_launch(n)
        k["forward_flat"][blocks, threads, s](op, _flat(xc), _flat(y), ct.type(p))
    elif n or want_counts:
        C, inner = _layout(tuple(xc.shape), axis) if axis is not None else (1, n)
        pw = _small_device(weight, ct, s) if weight is not None else _unused(ct)
        pb = _small_device(bias, ct, s) if bias is not None else _unused(ct)
        dcounts = cuda.device_array(max(C, 1), np.int64, stream=s)
        k["fill_zero"][1, THREADS, s](dcounts)
        flags = (COUNT if want_counts else 0) | (BIAS if bias is not None else 0) | \
            (WEIGHT if weight is not None else 0)
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
        y = out
    return (_transpose(y) if transposed else y), counts


def backward(op, grad, x, out, p, weight, axis, param_grad=None, sum_kind=SUM_WEIGHT,
             stream=None):
    """Like fastrelu._cpu.backward, on CUDA arrays; `param_grad` (C elements of x's dtype, a CUDA
    array) receives the per-channel sums, accumulated in float32 (float64 for float64 data)."""
    transposed = x.ndim > 1 and not is_c_contiguous(x) and is_f_contiguous(x) and \
        not is_c_contiguous(grad) and is_f_contiguous(grad) and \
        (out is None or (not is_c_contiguous(out) and is_f_contiguous(out)))
    if transposed:
        x, grad = _transpose(x), _transpose(grad)
        out = None if out is None else _transpose(out)
        axis = None if axis is None else x.ndim - 1 - axis
    s = stream_of(x, stream)
    xc, gc = _contiguous(x), _contiguous(grad)
    dx = out if out is not None and is_c_contiguous(out) else _empty(xc, tuple(xc.shape), x.dtype)
    dtype = np.dtype(str(_as_numba(xc).dtype))
    k = _for(dtype)
    ct = _compute_dtype(dtype)
    n = math.prod(xc.shape)
    if param_grad is None:
        sum_kind = SUM_NONE
    if n and axis is None and weight is None and sum_kind == SUM_NONE:
        blocks, threads = _flat_launch(n)
        k["backward_flat"][blocks, threads, s](op, _flat(gc), _flat(xc), _flat(dx), ct.type(p))
    else:
        C, inner = _layout(tuple(xc.shape), axis) if axis is not None else (1, n)
        pw = _small_device(weight, ct, s) if weight is not None else _unused(ct)
        sums = cuda.device_array(max(C, 1), ct, stream=s)
        k["fill_zero"][1, THREADS, s](sums)
        flags = WEIGHT if weight is not None else 0
        period = C * inner
        if n:
            grid, block = _rows_launch(n // period, period)
            k["backward_rows"][grid, block, s](op, _rows(gc, period), _rows(xc, period),
                                               _rows(dx, period), ct.type(p), inner, C, pw, sums,
                                               flags, sum_kind)
        if param_grad is not None:
            target = _flat(param_grad)
            blocks, threads = _flat_launch(C)
            k["cast"][blocks, threads, s](sums[:C], target)
    if out is not None and dx is not out:
        _copy_into(out, dx)
        dx = out
    return _transpose(dx) if transposed else dx


def _copy_into(out, src):
    """out[...] = src for a non-contiguous `out` (CuPy or PyTorch)."""
    if _kind(out) == "torch":
        out.copy_(src)
    else:
        out[...] = src


def copy(src, dst):
    """dst[...] = src through the flat kernel: the GPU benchmarks' roofline."""
    blocks, threads = _flat_launch(math.prod(src.shape))
    dtype = np.dtype(str(_as_numba(src).dtype))
    _for(dtype)["forward_flat"][blocks, threads, stream_of(src)](
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
    """Compiles every kernel, for every dtype, to PTX (no GPU needed): the CI check that the
    kernels type-check, which the simulator does not do.  Returns {name: PTX size}."""
    from numba.core import types

    out = {}
    for dt_name in ("float16", "float32", "float64"):
        dt = getattr(types, dt_name)
        ct = types.float64 if dt_name == "float64" else types.float32
        k = KERNELS[np.dtype(np.float64 if dt_name == "float64" else np.float32)]
        a1, a2 = dt[::1], dt[:, ::1]
        i, i64 = types.int32, types.int64
        signatures = {
            "forward_flat": (i, a1, a1, ct),
            "backward_flat": (i, a1, a1, a1, ct),
            "forward_rows": (i, a2, a2, ct, i64, i64, ct[::1], ct[::1], i64[::1], i),
            "backward_rows": (i, a2, a2, a2, ct, i64, i64, ct[::1], ct[::1], i, i),
            "cast": (ct[::1], dt[::1]),
            "fill_zero": (ct[::1],),
        }
        for name, sig in signatures.items():
            ptx, _ = cuda.compile_ptx(k[name].py_func, sig, cc=cc)
            out[f"{name}[{dt_name}]"] = len(ptx)
    return out
