"""GPU backend: numba.cuda kernels on any CUDA array (CuPy, PyTorch, numba), zero-copy.

Imported on the first CUDA array, never by ``import fastrelu``: importing numba's CUDA target
costs 0.3-0.5 s.  Arguments arrive validated by fastrelu._api; nothing here re-checks them.

The contract is the CPU kernels' (_kernels.h), written once more in numba: every element is
computed in float32 (float16, bfloat16 and float32 data) or float64, as exactly the same
comparisons; bfloat16 results are rounded to nearest even as on the CPU (NaN stays NaN).  Each
kernel is specialised at compile time for its op, storage type and flags (so the op's branches
fold away), from one definition per kernel shape:
  - flat: every element takes the parameter p.  Each thread moves 16 bytes per load and store
    (4 float32, 8 float16 or bfloat16, 2 float64), UNROLL loads in flight before it stores, in a
    grid-stride loop whose index arithmetic is 32-bit when the array has fewer than 2^31 elements;
  - rows: the data seen as rows of `period` = C * inner columns, column j belonging to channel
    j // inner.  Each thread walks one column down many rows, so its channel is fixed: it gathers
    counts (forward statistics) or sums (PReLU weight or bias gradients) in registers; a warp
    then adds its lanes of one channel with shuffles, and the first lane of each channel adds
    that to global memory with one atomic.
"""
import contextlib
import ctypes
import functools
import math
import struct
import threading

import numba
import numpy as np
from numba import cuda
from numba.cuda import types

from ._cpu import (BIAS, COPY, COUNT, ELU, ELU_FROM_Y, LEAKY, RELU, SUM_GRAD, SUM_NONE,
                   SUM_WEIGHT, WEIGHT)
from ._cuda_arrays import LIBRARIES, array_library as _kind, device_index

SIMULATOR = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))
if not SIMULATOR:
    from cuda.bindings.driver import cuLaunchKernel as _launch_kernel
    from numba.cuda.cudadrv import devices
THREADS = 256
VECTOR_BYTES = 16  # per load and store: the widest global access (LDG.E.128 / STG.E.128)
UNROLL = 4  # vectors loaded per thread before any is stored: 64 bytes in flight per thread
WARP = 32
FULL_MASK = 0xFFFFFFFF
# bfloat16 data travel as their uint16 bits (numba has no bfloat16 arrays)
STORAGE = {"float16": types.float16, "float32": types.float32, "float64": types.float64,
           "bfloat16": types.uint16}
OP_NAMES = {RELU: "relu", LEAKY: "leaky_relu", ELU: "elu", COPY: "copy", ELU_FROM_Y: "elu_from_y"}


# ---- primitives: LLVM IR on the GPU, their Python equivalents under the simulator --------------

def _compiled_primitives():
    """Vector loads and stores, index casts and bit casts as LLVM IR (numba has no vector
    loads: indexing an array moves one element, with a negative-index fix-up)."""
    from llvmlite import ir
    from numba.cuda.core.errors import RequireLiteralValue
    from numba.cuda.extending import intrinsic

    def literal(t):
        if not isinstance(t, types.IntegerLiteral):
            raise RequireLiteralValue(t)
        return t.literal_value

    def vector_pointers(context, builder, sig, args, count, width):
        """Global-memory pointers to `count` vectors of `width` elements of the 1-d array
        args[0], at vector indices i + u * stride (in i's integer width: 32-bit indices stay
        32-bit); with the vectors' type and size in bytes."""
        aty, ity = sig.args[0], sig.args[1]
        data = context.make_array(aty)(context, builder, args[0]).data
        element = context.get_data_type(aty.dtype)
        vector = ir.VectorType(element, width)
        base = builder.addrspacecast(builder.bitcast(data, ir.PointerType(vector)),
                                     ir.PointerType(vector, 1), "global")
        i = args[1]
        stride = context.cast(builder, args[2], sig.args[2], ity)
        pointers = []
        for u in range(count):
            index = i if u == 0 else builder.add(
                i, builder.mul(stride, ir.Constant(i.type, u), flags=["nsw"]), flags=["nsw"])
            pointers.append(builder.gep(base, [index], inbounds=True))
        return pointers, vector, element.get_abi_size(context.target_data) * width

    i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
    # 16 bytes of 16-bit elements: NVVM splits <8 x half> into two 8-byte accesses, so they move
    # as four 32-bit words through PTX's own 16-byte load and store
    words_load = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([i32] * 4), [i64]),
                              "ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
                              side_effect=True)
    words_store = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [i64] + [i32] * 4),
                               "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r",
                               side_effect=True)

    def load_elements(builder, pointer, vector, size):
        if size == 16 and vector.count == 8:
            words = builder.call(words_load, [builder.ptrtoint(pointer, i64)])
            elements = []
            for k in range(8):
                half = builder.lshr(builder.extract_value(words, k // 2),
                                    ir.Constant(i32, 16 * (k % 2)))
                elements.append(builder.bitcast(builder.trunc(half, i16), vector.element))
            return elements
        v = builder.load(pointer, align=size)
        return [builder.extract_element(v, ir.Constant(i32, k)) for k in range(vector.count)]

    def store_elements(builder, pointer, vector, size, elements):
        if size == 16 and vector.count == 8:
            bits = [builder.zext(builder.bitcast(e, i16), i32) for e in elements]
            words = [builder.or_(bits[2 * q], builder.shl(bits[2 * q + 1], ir.Constant(i32, 16)))
                     for q in range(4)]
            builder.call(words_store, [builder.ptrtoint(pointer, i64)] + words)
            return
        v = ir.Constant(vector, ir.Undefined)
        for k, e in enumerate(elements):
            v = builder.insert_element(v, e, ir.Constant(i32, k))
        builder.store(v, pointer, align=size)

    def buffer_slots(context, builder, bty, buf, n):
        data = context.make_array(bty)(context, builder, buf).data
        return [builder.gep(data, [ir.Constant(i32, k)], inbounds=True) for k in range(n)]

    @intrinsic
    def load_vectors(typingctx, a, i, stride, buf, count, width):
        """buf[u * width + k] = a[(i + u * stride) * width + k]: `count` loads, all issued
        before buf is written."""
        n, w = literal(count), literal(width)

        def codegen(context, builder, sig, args):
            pointers, vector, size = vector_pointers(context, builder, sig, args, n, w)
            loaded = [load_elements(builder, p, vector, size) for p in pointers]
            slots = buffer_slots(context, builder, sig.args[3], args[3], n * w)
            for u, elements in enumerate(loaded):
                for k, e in enumerate(elements):
                    builder.store(e, slots[u * w + k])
            return context.get_dummy_value()

        return types.void(a, i, stride, buf, count, width), codegen

    @intrinsic
    def store_vectors(typingctx, a, i, stride, buf, count, width):
        """a[(i + u * stride) * width + k] = buf[u * width + k]: `count` stores."""
        n, w = literal(count), literal(width)

        def codegen(context, builder, sig, args):
            pointers, vector, size = vector_pointers(context, builder, sig, args, n, w)
            slots = buffer_slots(context, builder, sig.args[3], args[3], n * w)
            for u, p in enumerate(pointers):
                store_elements(builder, p, vector, size,
                               [builder.load(slots[u * w + k]) for k in range(w)])
            return context.get_dummy_value()

        return types.void(a, i, stride, buf, count, width), codegen

    @intrinsic
    def as_type_of(typingctx, like, value):
        """`value` in like's type (numba widens integer arithmetic to 64 bits: this keeps 32-bit
        indices and int32 counts 32-bit)."""
        def codegen(context, builder, sig, args):
            return context.cast(builder, args[1], sig.args[1], sig.args[0])

        return like(like, value), codegen

    @intrinsic
    def float32_bits(typingctx, f):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def bits_float32(typingctx, u):
        def codegen(context, builder, sig, args):
            return builder.bitcast(context.cast(builder, args[0], sig.args[0], types.uint32),
                                   ir.FloatType())

        return types.float32(u), codegen

    @cuda.jit(device=True, inline=True)
    def shfl_down(value, delta):
        return cuda.shfl_down_sync(FULL_MASK, value, delta)

    return load_vectors, store_vectors, as_type_of, float32_bits, bits_float32, shfl_down


def _simulated_primitives():
    """The same operations in Python for numba's simulator, which runs each CUDA thread as a
    Python thread (and has no warp shuffles: lanes exchange values through shared memory)."""
    def load_vectors(a, i, stride, buf, count, width):
        for u in range(count):
            for k in range(width):
                buf[u * width + k] = a[(i + u * stride) * width + k]

    def store_vectors(a, i, stride, buf, count, width):
        for u in range(count):
            for k in range(width):
                a[(i + u * stride) * width + k] = buf[u * width + k]

    def as_type_of(like, value):
        return type(like)(value)

    def float32_bits(f):
        return np.float32(f).view(np.uint32)

    def bits_float32(u):
        return np.uint32(u).view(np.float32)

    def shfl_down(value, delta):
        # every thread of the block calls this, as every lane of a warp calls shfl_down_sync
        lanes = cuda.shared.array(THREADS, types.float64)
        t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        lanes[t] = value
        cuda.syncthreads()
        inside = t % WARP + delta < WARP and t + delta < cuda.blockDim.x * cuda.blockDim.y
        other = lanes[t + delta] if inside else value
        cuda.syncthreads()
        return type(value)(other)

    return load_vectors, store_vectors, as_type_of, float32_bits, bits_float32, shfl_down


load_vectors, store_vectors, as_type_of, float32_bits, bits_float32, shfl_down = \
    _simulated_primitives() if SIMULATOR else _compiled_primitives()


# ---- element functions --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _elements(storage):
    """(CT, to_ct, from_ct, y_of, dx_of) for data stored as `storage` (a STORAGE key): the
    compute type, the conversions, and the ops' element functions in CT."""
    T = STORAGE[storage]
    CT = types.float64 if storage == "float64" else types.float32
    zero = CT(0)

    if storage == "bfloat16":
        @cuda.jit(device=True, inline=True)
        def to_ct(v):
            return bits_float32(types.uint32(v) << 16)

        @cuda.jit(device=True, inline=True)
        def from_ct(f):
            # round to nearest even; a NaN keeps its sign and payload's top bits, made quiet
            u = float32_bits(f)
            if u & 0x7FFFFFFF > 0x7F800000:
                return types.uint16((u >> 16) | 0x40)
            return types.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    else:
        @cuda.jit(device=True, inline=True)
        def to_ct(v):
            return CT(v)

        @cuda.jit(device=True, inline=True)
        def from_ct(f):
            return T(f)

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

    return T, CT, to_ct, from_ct, y_of, dx_of


# ---- flat kernels -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def flat_kernel(direction, op, storage, width):
    """The flat kernel of `direction` ("forward": (x, y, p, n); "backward": (g, x, dx, p, n)) for
    one op and storage type, moving `width` elements per access: 16 bytes' worth when every
    array is 16-byte aligned, else 1.  `n` (int32 below 2^31 elements, else int64) sets the
    index arithmetic's width.  Compiled per signature on first launch (cached on disk)."""
    T, CT, to_ct, from_ct, y_of, dx_of = _elements(storage)
    W, U = width, UNROLL
    chunk = U * W
    backward = direction == "backward"

    @cuda.jit(device=True, inline=True)
    def compute(xs, gs, ys, count, p):
        for k in range(count):
            if backward:
                ys[k] = from_ct(dx_of(op, to_ct(xs[k]), to_ct(gs[k]), p))
            else:
                ys[k] = from_ct(y_of(op, to_ct(xs[k]), p))

    @cuda.jit(device=True, inline=True)
    def run(g, x, y, p, n):
        xs = cuda.local.array(chunk, T)
        gs = cuda.local.array(chunk, T)
        ys = cuda.local.array(chunk, T)
        t = as_type_of(n, cuda.grid(1))
        stride = as_type_of(n, cuda.gridsize(1))
        vectors = as_type_of(n, n // W)
        # main loop: U whole vectors per thread and step, a warp's accesses contiguous
        step = as_type_of(n, stride * U)
        main_end = as_type_of(n, vectors - vectors % step)
        for i in range(t, main_end, step):
            load_vectors(x, i, stride, xs, U, W)
            if backward:
                load_vectors(g, i, stride, gs, U, W)
            compute(xs, gs, ys, chunk, p)
            store_vectors(y, i, stride, ys, U, W)
        for i in range(as_type_of(n, main_end + t), vectors, stride):  # the last vectors
            load_vectors(x, i, stride, xs, 1, W)
            if backward:
                load_vectors(g, i, stride, gs, 1, W)
            compute(xs, gs, ys, W, p)
            store_vectors(y, i, stride, ys, 1, W)
        for i in range(as_type_of(n, vectors * W + t), n, stride):  # the last elements
            load_vectors(x, i, stride, xs, 1, 1)
            if backward:
                load_vectors(g, i, stride, gs, 1, 1)
            compute(xs, gs, ys, 1, p)
            store_vectors(y, i, stride, ys, 1, 1)

    if backward:
        def kernel(g, x, dx, p, n):
            run(g, x, dx, p, n)
    else:
        def kernel(x, y, p, n):
            run(x, x, y, p, n)
    return cuda.jit(cache=True)(kernel)


# ---- rows kernels -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def rows_kernel(direction, op, storage, flags, sum_kind):
    """The rows kernel of `direction` for one op, storage type and flags (COUNT, BIAS, WEIGHT) or
    sum_kind: "forward": (x, y, p, inner, pw, pb, counts); "backward": (g, x, dx, p, inner, pw,
    sums), on (rows, period) arrays; pw and pb hold C weights (or one, shared) and biases, counts
    C int64 positives of x (+ b), sums C accumulators (CT) of the weight gradient
    (x > 0 ? 0 : x*g) or of dx, per sum_kind.  Arguments the flags leave unused are placeholders."""
    T, CT, to_ct, from_ct, y_of, dx_of = _elements(storage)
    zero = CT(0)

    @cuda.jit(device=True, inline=True)
    def add_per_channel(total, j, c, inner, sums):
        """sums[c] += total over the grid.  A warp's lanes hold consecutive columns j, so its
        lanes of one channel are consecutive: shuffles fold each channel's totals into its first
        lane (a lane adds its neighbour `delta` lanes on while that one is in its channel), which
        adds the warp's share with one atomic.  Every lane of the block calls this."""
        lane = cuda.threadIdx.x % WARP
        channel_end = (c + 1) * inner
        for delta in (1, 2, 4, 8, 16):
            other = shfl_down(total, delta)
            if lane + delta < WARP and j + delta < channel_end:
                total = as_type_of(total, total + other)
        if (lane == 0 or j % inner == 0) and total != 0:
            cuda.atomic.add(sums, c, total)

    @cuda.jit(device=True, inline=True)
    def column_parameters(c, pw, pb, p):
        pj = to_ct(pw[c % pw.size]) if flags & WEIGHT else p  # pw.size is C, or 1 when shared
        bj = to_ct(pb[c]) if flags & BIAS else zero
        return pj, bj

    if direction == "forward":
        def kernel(x, y, p, inner, pw, pb, counts):
            j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            c = j // inner
            positive = 0
            if j < x.shape[1]:
                pj, bj = column_parameters(c, pw, pb, p)
                for r in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x.shape[0],
                               cuda.gridDim.y * cuda.blockDim.y):
                    v = to_ct(x[r, j])
                    if flags & BIAS:
                        v = v + bj
                    y[r, j] = from_ct(y_of(op, v, pj))
                    if flags & COUNT and v > 0:
                        positive += 1
            if flags & COUNT:
                add_per_channel(types.int32(positive), j, c, inner, counts)
    else:
        def kernel(g, x, dx, p, inner, pw, sums):
            j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            c = j // inner
            local = zero
            if j < x.shape[1]:
                pj, _ = column_parameters(c, pw, pw, p)
                for r in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x.shape[0],
                               cuda.gridDim.y * cuda.blockDim.y):
                    v = to_ct(x[r, j])
                    gv = to_ct(g[r, j])
                    d = dx_of(op, v, gv, pj)
                    dx[r, j] = from_ct(d)
                    if sum_kind == SUM_WEIGHT and not v > 0:
                        local += v * gv
                    elif sum_kind == SUM_GRAD:
                        local += d
            if sum_kind != SUM_NONE:
                add_per_channel(local, j, c, inner, sums)
    return cuda.jit(cache=True)(kernel)


@functools.lru_cache(maxsize=None)
def cast_kernel(storage):
    """dst[:] = src[:] (CT accumulators) rounded to `storage`: float16 and bfloat16 parameter
    gradients of numba arrays (PyTorch and CuPy convert with their own copies)."""
    _, _, _, from_ct, _, _ = _elements(storage)

    def cast(src, dst):
        for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
            dst[i] = from_ct(src[i])

    return cuda.jit(cache=True)(cast)


# ---- launching ----------------------------------------------------------------------------------

def _storage(dtype):
    """The STORAGE key of NumPy dtype `dtype`."""
    return "bfloat16" if dtype.kind == "V" else dtype.name


def _compute_dtype(dtype):
    """float16, bfloat16 and float32 data are computed in float32, float64 in float64."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


@functools.lru_cache(maxsize=None)
def _compiled(kernel, argtypes):
    """`kernel` compiled for `argtypes`, once per process (numba's disk cache makes that a load
    after the first), without the dispatcher's per-call argument typing and launch configuration,
    and its low-occupancy warnings (our small grids are small by design)."""
    return kernel.compile(argtypes)


class KernelArray:
    """A C-contiguous CUDA array as a kernel parameter: its first element's device address and
    the shape the kernel sees; `array` keeps the memory alive (and makes the simulator's view)."""

    __slots__ = ("array", "address", "shape", "storage")

    def __init__(self, array, shape, storage):
        self.array, self.address, self.shape, self.storage = array, _address(array), shape, \
            storage


# numba's parameters for a scalar of each type: struct format, each in its own 8-byte slot
_SCALAR_FORMATS = {types.float32: "f4x", types.float64: "d", types.int32: "i4x",
                   types.int64: "q"}


class Launcher:
    """One compiled kernel launched through the driver's cuLaunchKernel, its parameters packed
    into a buffer made once: as numba's _Kernel.launch packs them (each array as meminfo, parent,
    size, itemsize, data, shape, strides, all pointer-sized; each scalar in its type), so the
    kernel reads what it would under numba, without numba's per-call argument typing, views and
    cuda.core's packing.  Not yet run on a GPU: tests compare the packing with numba's."""

    def __init__(self, function, argtypes):
        self.function, self.argtypes = function, argtypes
        formats, self.array_dims = [], []
        for ty in argtypes:
            if isinstance(ty, types.Array):
                formats.append("q" * (5 + 2 * ty.ndim))
                self.array_dims.append(ty.ndim)
            else:
                formats.append(_SCALAR_FORMATS[ty])
                self.array_dims.append(0)
        self.itemsizes = [ty.dtype.bitwidth // 8 if isinstance(ty, types.Array) else 0
                          for ty in argtypes]
        self.layout = struct.Struct("=" + "".join(formats))
        self.buffer = ctypes.create_string_buffer(self.layout.size)
        count = self.layout.size // 8
        self.pointers = (ctypes.c_void_p * count)(
            *(ctypes.addressof(self.buffer) + 8 * k for k in range(count)))
        self.lock = threading.Lock()  # the buffer is shared: one packing and launch at a time

    def values(self, args):
        """The parameter values of `args` (KernelArrays and scalars), in the buffer's order."""
        values = []
        for a, ndim, itemsize in zip(args, self.array_dims, self.itemsizes):
            if not ndim:
                values.append(a)
            elif ndim == 1:
                n = a.shape[0]
                values += (0, 0, n, itemsize, a.address, n, itemsize)
            else:
                rows, period = a.shape
                values += (0, 0, rows * period, itemsize, a.address, rows, period,
                           period * itemsize, itemsize)
        return values

    def launch(self, grid, block, stream_handle, args):
        values = self.values(args)
        with self.lock:
            self.layout.pack_into(self.buffer, 0, *values)
            err, = _launch_kernel(self.function, *grid, *block, 0, stream_handle,
                                  ctypes.addressof(self.pointers), 0)
        if err:
            raise RuntimeError(f"cuLaunchKernel failed: {err!r}")


@functools.lru_cache(maxsize=None)
def _launcher(kernel, argtypes, device_id):
    """The Launcher of `kernel` for `argtypes` on a device (numba loads a module per device)."""
    return Launcher(_compiled(kernel, argtypes)._codelibrary.get_cufunc().handle, argtypes)


def _launch(kernel, argtypes, grid, block, s, device_id, args):
    """kernel[grid, block, s](*args); args' arrays are KernelArrays.  On a GPU through its
    Launcher; under the simulator through numba's dispatcher, on numba views of the arrays."""
    if SIMULATOR:
        kernel[grid, block, s](*(_numba_view(a.array, a.shape, a.storage)
                                 if type(a) is KernelArray else a for a in args))
    else:
        _launcher(kernel, argtypes, device_id).launch(grid, block, s.handle, args)


@functools.lru_cache(maxsize=None)
def _resident_blocks(kernel, argtypes, threads, device_id):
    """Blocks of `threads` threads the device holds at once running `kernel` (its registers and
    shared memory decide): the grid that fills every multiprocessor, cached per device.  The
    simulator stands for one multiprocessor holding 8."""
    if SIMULATOR:
        return 8
    return max(1, _compiled(kernel, argtypes).max_cooperative_grid_blocks(threads))


@functools.lru_cache(maxsize=None)
def _array_type(storage, ndim):
    return types.Array(STORAGE[storage], ndim, "C")


@functools.lru_cache(maxsize=None)
def _flat_signature(direction, op, storage, aligned, int64_index):
    """(kernel, argument types, elements per thread and step, the scalars' NumPy types) of a
    flat launch."""
    width = VECTOR_BYTES // np.dtype(STORAGE[storage].name).itemsize if aligned else 1
    ct = types.float64 if storage == "float64" else types.float32
    index = types.int64 if int64_index else types.int32
    arrays = 2 if direction == "forward" else 3
    argtypes = (_array_type(storage, 1),) * arrays + (ct, index)
    return (flat_kernel(direction, op, storage, width), argtypes, width * UNROLL,
            np.dtype(ct.name).type, np.dtype(index.name).type)


def _launch_flat(direction, op, storage, arrays, p, n, device_id, s):
    """One flat kernel over n elements of the contiguous arrays (x, y) or (g, x, dx)."""
    aligned = not any(a.address % VECTOR_BYTES for a in arrays)
    kernel, argtypes, per_thread, ct, index = _flat_signature(direction, op, storage, aligned,
                                                              n >= 2 ** 31)
    blocks = min(_resident_blocks(kernel, argtypes, THREADS, device_id),
                 -(-n // (THREADS * per_thread)))
    _launch(kernel, argtypes, (blocks, 1, 1), (THREADS, 1, 1), s, device_id,
            (*arrays, ct(p), index(n)))


@functools.lru_cache(maxsize=None)
def _rows_signature(direction, op, storage, flags, sum_kind):
    """(kernel, argument types, the compute type's NumPy type) of a rows launch."""
    ct = types.float64 if storage == "float64" else types.float32
    a1, a2 = _array_type(storage, 1), _array_type(storage, 2)
    if direction == "forward":
        argtypes = (a2, a2, ct, types.int64, a1, a1, types.Array(types.int64, 1, "C"))
    else:
        argtypes = (a2, a2, a2, ct, types.int64, a1, types.Array(ct, 1, "C"))
    return rows_kernel(direction, op, storage, flags, sum_kind), argtypes, np.dtype(ct.name).type


def _launch_rows(kernel, argtypes, rows, period, device_id, s, args):
    """A rows kernel over (rows, period) data: warps along the columns, as many rows per block
    as fit in THREADS threads, and enough blocks down the rows to fill the device, or to keep
    each thread's int32 count below 2^31 (2^26 rows, summed over a warp's 32 lanes)."""
    bx = WARP
    while bx < min(period, THREADS):
        bx *= 2
    by = THREADS // bx
    gx = -(-period // bx)
    fill = max(1, _resident_blocks(kernel, argtypes, THREADS, device_id) // gx)
    gy = max(1, min(-(-rows // by), fill), -(-rows // (by << 26)))
    _launch(kernel, argtypes, (gx, gy, 1), (bx, by, 1), s, device_id, args)


def _address(a):
    """The device address of a C-contiguous array's first element (the simulator's: its host
    memory)."""
    kind = _kind(a)
    if kind == "torch":
        return a.data_ptr()
    if kind == "cupy":
        return a.data.ptr
    if SIMULATOR:
        return a._ary.ctypes.data
    return a.device_ctypes_pointer.value or 0


# ---- arrays, streams, devices -------------------------------------------------------------------

def _as_numba(a):
    """A numba device array over the same memory (no copy, no synchronization)."""
    return a if _kind(a) == "numba" else cuda.as_cuda_array(a, sync=False)


def _adopt(*arrays):
    """Other producers' CUDA arrays as numba arrays (no copy); the rest as they are."""
    return [cuda.as_cuda_array(a, sync=False) if a is not None and _kind(a) == "cai" and
            not isinstance(a, np.ndarray) else a for a in arrays]


def _torch_dtype(dtype):
    import torch

    return torch.bfloat16 if dtype.kind == "V" else getattr(torch, dtype.name)


def _empty(like, shape, dtype):
    """A new C-contiguous array of `dtype` (NumPy) from like's library, on its device: CuPy and
    PyTorch arrays give their own kind; numba and other producers give numba arrays."""
    kind = _kind(like)
    if kind == "cupy":
        import cupy

        return cupy.empty(shape, dtype)
    if kind == "torch":
        import torch

        return torch.empty(shape, dtype=_torch_dtype(dtype), device=like.device)
    return cuda.device_array(shape, dtype)


def _zeros(like, shape, dtype, s):
    """A new zeroed C-contiguous array like _empty's, zeroed by the library's own memset on the
    launch stream (the current stream of CuPy and PyTorch during the call)."""
    kind = _kind(like)
    if kind == "cupy":
        import cupy

        return cupy.zeros(shape, dtype)
    if kind == "torch":
        import torch

        return torch.zeros(shape, dtype=_torch_dtype(dtype), device=like.device)
    if SIMULATOR:
        return cuda.to_device(np.zeros(shape, dtype))
    a = cuda.device_array(shape, dtype, stream=s)
    _zero(a, s)
    return a


def _zero(a, s):
    """Zeroes a contiguous array in place with its library's memset."""
    kind = _kind(a)
    if kind == "torch":
        a.zero_()
    elif kind == "cupy":
        a.fill(0)
    elif SIMULATOR:
        a._ary[...] = 0
    else:
        from numba.cuda.cudadrv.driver import device_memset

        device_memset(a, 0, a.nbytes, stream=s)


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


def _numba_view(a, shape, storage):
    """A numba array of `shape` and `storage` over the memory of C-contiguous `a`, made in one
    step (no reshape, no stream of its own, no synchronize): bfloat16 data as their uint16 bits.
    The simulator's kernel arguments, and the statistics counts' copy to the host."""
    if _kind(a) == "torch" and storage == "bfloat16":  # PyTorch exports no bfloat16 interface
        import torch

        a = a.view(torch.int16)
    if SIMULATOR and not hasattr(a, "__cuda_array_interface__"):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = a._ary.reshape(shape)
        return FakeCUDAArray(host.view(np.uint16) if storage == "bfloat16" else host)
    interface = a.__cuda_array_interface__
    return cuda.from_cuda_array_interface(
        {"shape": shape, "typestr": "<u2" if storage == "bfloat16" else interface["typestr"],
         "data": interface["data"], "version": 2}, owner=a, sync=False)


def _flat(a, storage):
    return KernelArray(a, (math.prod(a.shape),), storage)


def _rows(a, period, storage):
    n = math.prod(a.shape)
    return KernelArray(a, (n // period if period else 0, period), storage)


def _copy_into(out, src):
    """out[...] = src for a CuPy or PyTorch `out` of another layout (the library's own copy)."""
    if _kind(out) == "torch":
        out.copy_(src)
    else:
        out[...] = src


@functools.lru_cache(maxsize=None)
def _unused_on(device_id, dtype):
    """The placeholder for a parameter a kernel's flags leave unused, made once per device."""
    return _flat(cuda.to_device(np.zeros(1, dtype)), dtype.name)


def _params(values, storage, device_id, s):
    """Per-channel weights or biases as a contiguous 1-d KernelArray of the data's storage (the
    kernels convert them): a view of a CUDA array, an upload of the NumPy array validation made
    of Python values, or a placeholder when there are none (made once per device)."""
    if values is None:
        return _unused_on(device_id, np.dtype(STORAGE[storage].name))
    if isinstance(values, np.ndarray):
        host = values.reshape(-1)
        return _flat(cuda.to_device(host.view(np.uint16) if storage == "bfloat16" else host,
                                    stream=s), storage)
    return _flat(_contiguous(values), storage)


def _stream_handle(stream):
    """The cudaStream_t of a numba, CuPy (.ptr), PyTorch (.cuda_stream) or CUDA-stream-protocol
    stream, or of an int."""
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    handle = getattr(stream, "handle", None)
    if handle is not None:  # numba: a ctypes pointer or a cuda.bindings CUstream
        return (handle.value or 0) if isinstance(handle, ctypes.c_void_p) else int(handle)
    return int(getattr(stream, "cuda_stream", getattr(stream, "ptr", stream)))


@functools.lru_cache(maxsize=None)
def _external_stream(device_id, handle):
    """The numba stream object for a cudaStream_t on a device, made once: a new object per call
    would miss numba's per-stream caches."""
    if handle in (0, 1):  # the legacy default stream (1 in __cuda_array_interface__)
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def launch_stream(a, stream, device_id):
    """The numba stream to launch on: `stream` when given; else where a's library runs its own
    kernels (PyTorch's or CuPy's current stream); else the stream a's __cuda_array_interface__
    names; else the default stream."""
    if stream is not None:
        return stream if type(stream).__module__.startswith("numba") \
            else _external_stream(device_id, _stream_handle(stream))
    kind = _kind(a)
    if kind == "torch":
        import torch

        return _external_stream(device_id, torch.cuda.current_stream(a.device).cuda_stream)
    if kind == "cupy":
        import cupy

        return _external_stream(device_id, cupy.cuda.get_current_stream().ptr)
    if kind == "numba":
        return a.stream or _external_stream(device_id, 0)
    interface = getattr(a, "__cuda_array_interface__", None)
    handle = interface.get("stream") if interface else None
    return _external_stream(device_id, handle or 0)


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


_this_thread = threading.local()


@contextlib.contextmanager
def _launching(a, stream):
    """One call's scope; yields (the stream to launch on, the device id).  With one GPU that is
    device 0 with no lookup; with several, the GPU holding `a` (numba's current one for numba
    arrays) is made numba's (and CuPy's) current one, where they launch and allocate; a given
    `stream` is made the current stream of a's library."""
    if _gpu_count() == 1:
        device_id, switch = 0, contextlib.nullcontext()
        if not SIMULATOR and not getattr(_this_thread, "has_context", False):
            devices.get_context()  # the Launchers launch in the current context
            _this_thread.has_context = True
    else:
        index = device_index(a)
        device_id = index if index is not None else cuda.get_current_device().id
        switch = cuda.gpus[device_id]
    with switch, a.device if _gpu_count() > 1 and _kind(a) == "cupy" else \
            contextlib.nullcontext():
        s = launch_stream(a, stream, device_id)
        with _library_stream(a, s) if stream is not None else contextlib.nullcontext():
            yield s, device_id


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
    storage, ct = _storage(dtype), _compute_dtype(dtype)
    with _launching(x, stream) as (s, device_id):
        x, out, weight, bias = _adopt(x, out, weight, bias)
        transposed = x.ndim > 1 and _all_f_ordered(x, out)
        if transposed:
            x, out = _transpose(x), (None if out is None else _transpose(out))
            axis = None if axis is None else x.ndim - 1 - axis
        xc = _contiguous(x)
        y = out if out is not None and is_c_contiguous(out) else \
            _empty(xc, tuple(xc.shape), dtype)
        n = math.prod(xc.shape)
        counts = None
        if n and axis is None and weight is None and bias is None and not want_counts:
            _launch_flat("forward", op, storage, (_flat(xc, storage), _flat(y, storage)), p, n,
                         device_id, s)
        elif n or want_counts:
            C, inner = _layout(tuple(xc.shape), axis) if axis is not None else (1, n)
            pw = _params(weight, storage, device_id, s)
            pb = _params(bias, storage, device_id, s)
            flags = (COUNT if want_counts else 0) | (BIAS if bias is not None else 0) | \
                (WEIGHT if weight is not None else 0)
            int64 = np.dtype(np.int64)
            dcounts = _flat(_zeros(xc, (max(C, 1),), int64, s), "int64") if want_counts \
                else _unused_on(device_id, int64)
            period = C * inner
            if n:
                kernel, argtypes, ct_type = _rows_signature("forward", op, storage, flags,
                                                            SUM_NONE)
                _launch_rows(kernel, argtypes, n // period, period, device_id, s,
                             (_rows(xc, period, storage), _rows(y, period, storage), ct_type(p),
                              inner, pw, pb, dcounts))
            if want_counts:
                counts = _numba_view(dcounts.array, dcounts.shape, "int64").copy_to_host(
                    stream=s)[:C]
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
    storage, ct = _storage(dtype), _compute_dtype(dtype)
    with _launching(x, stream) as (s, device_id):
        grad, x, out, weight, param_out = _adopt(grad, x, out, weight, param_out)
        transposed = x.ndim > 1 and _all_f_ordered(x, grad, out)
        if transposed:
            x, grad = _transpose(x), _transpose(grad)
            out = None if out is None else _transpose(out)
            axis = None if axis is None else x.ndim - 1 - axis
        xc, gc = _contiguous(x), _contiguous(grad)
        dx = out if out is not None and is_c_contiguous(out) else \
            _empty(xc, tuple(xc.shape), dtype)
        n = math.prod(xc.shape)
        param = None
        if param_shape is None and axis is None and weight is None:
            if n:
                _launch_flat("backward", op, storage,
                             (_flat(gc, storage), _flat(xc, storage), _flat(dx, storage)), p, n,
                             device_id, s)
        else:
            C, inner = _layout(tuple(xc.shape), axis) if axis is not None else (1, n)
            pw = _params(weight, storage, device_id, s)
            if param_shape is None:
                sum_kind, sums = SUM_NONE, _unused_on(device_id, ct)
            else:
                param = param_out if param_out is not None else _empty(xc, param_shape, dtype)
                # float32/float64 results are the accumulators themselves, unless the kernel
                # still reads them as an input (they are zeroed first)
                direct = dtype == ct and is_c_contiguous(param) and not param_out_aliases_input
                if direct:
                    _zero(param, s)
                    sums = _flat(param, storage)
                else:
                    accumulators = _zeros(xc, (C,), ct, s)
                    sums = _flat(accumulators, ct.name)
            period = C * inner
            if n:
                kernel, argtypes, ct_type = _rows_signature(
                    "backward", op, storage, WEIGHT if weight is not None else 0, sum_kind)
                _launch_rows(kernel, argtypes, n // period, period, device_id, s,
                             (_rows(gc, period, storage), _rows(xc, period, storage),
                              _rows(dx, period, storage), ct_type(p), inner, pw, sums))
            if param is not None and not direct:
                _store_sums(accumulators, sums, param, param_shape, storage, device_id, s)
        if out is not None and dx is not out:
            _copy_into(out, dx)
        return result_out if result_out is not None else \
            (_transpose(dx) if transposed else dx), param


def _store_sums(accumulators, sums, param, param_shape, storage, device_id, s):
    """param[...] = the CT `accumulators` (`sums`: as a KernelArray), rounded to param's
    dtype: by PyTorch's and CuPy's own copies, for numba arrays by cast_kernel."""
    if _kind(param) in LIBRARIES:
        _copy_into(param, accumulators.reshape(param_shape))
        return
    kernel = cast_kernel(storage)
    ctype = types.float64 if storage == "float64" else types.float32
    argtypes = (types.Array(ctype, 1, "C"), _array_type(storage, 1))
    blocks = max(1, min(_resident_blocks(kernel, argtypes, THREADS, device_id),
                        -(-sums.shape[0] // THREADS)))
    _launch(kernel, argtypes, (blocks, 1, 1), (THREADS, 1, 1), s, device_id,
            (sums, _flat(param, storage)))


def copy(src, dst):
    """dst[...] = src through the flat kernel: the GPU benchmarks' roofline."""
    dtype = np.dtype(str(_as_numba(src).dtype))
    storage = _storage(dtype)
    with _launching(src, None) as (s, device_id):
        _launch_flat("forward", COPY, storage, (_flat(src, storage), _flat(dst, storage)), 0.0,
                     math.prod(src.shape), device_id, s)


def state():
    """Whether the backend can run, and on what."""
    if cuda.is_available():
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        return {"available": True, "loaded": True, "device": name, "simulator": SIMULATOR,
                "numba": numba.__version__}
    return {"available": False, "loaded": True, "numba": numba.__version__,
            "reason": "numba finds no CUDA GPU (driver or device missing)"}


def kernel_variants():
    """{name: (kernel, argument types)}: every flat kernel (each op, direction and storage, with
    16-byte accesses and 32-bit indices, plus float32's 64-bit-index and unaligned ones), the
    rows kernels with every flag on, and the casts: what CI compiles for a Hopper GPU."""
    variants = {}
    for storage in STORAGE:
        ct = types.float64 if storage == "float64" else types.float32
        a1, a2 = _array_type(storage, 1), _array_type(storage, 2)
        width = VECTOR_BYTES // np.dtype(STORAGE[storage].name).itemsize
        for direction, ops in (("forward", (RELU, LEAKY, ELU, COPY)),
                               ("backward", (RELU, LEAKY, ELU, ELU_FROM_Y))):
            arrays = (a1,) * (2 if direction == "forward" else 3)
            for op in ops:
                variants[f"flat_{direction}[{OP_NAMES[op]},{storage}]"] = (
                    flat_kernel(direction, op, storage, width), arrays + (ct, types.int32))
                if storage == "float32" and op == RELU:
                    variants[f"flat_{direction}[{OP_NAMES[op]},{storage},int64]"] = (
                        flat_kernel(direction, op, storage, width), arrays + (ct, types.int64))
                    variants[f"flat_{direction}[{OP_NAMES[op]},{storage},unaligned]"] = (
                        flat_kernel(direction, op, storage, 1), arrays + (ct, types.int32))
        for op in (LEAKY, ELU):
            variants[f"rows_forward[{OP_NAMES[op]},{storage}]"] = (
                rows_kernel("forward", op, storage, COUNT | BIAS | WEIGHT, SUM_NONE),
                (a2, a2, ct, types.int64, a1, a1, types.int64[::1]))
            for sum_kind in (SUM_WEIGHT, SUM_GRAD):
                variants[f"rows_backward[{OP_NAMES[op]},{storage},sum{sum_kind}]"] = (
                    rows_kernel("backward", op, storage, WEIGHT, sum_kind),
                    (a2, a2, a2, ct, types.int64, a1, types.Array(ct, 1, "C")))
        if storage != "float32":
            variants[f"cast[{storage}]"] = (cast_kernel(storage), (types.Array(ct, 1, "C"), a1))
    return variants


def compile_ptx_all(cc=(9, 0)):
    """Every kernel_variants() kernel compiled to PTX for compute capability `cc` (no GPU
    needed; the simulator does not type-check): {name: PTX text}."""
    return {name: cuda.compile_ptx(kernel.py_func, argtypes, cc=cc)[0]
            for name, (kernel, argtypes) in kernel_variants().items()}
