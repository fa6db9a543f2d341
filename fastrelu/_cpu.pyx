# cython: language_level=3, boundscheck=False, wraparound=False
"""CPU backend: lays validated NumPy arrays out for the C kernels in _kernels.h and runs them
with the GIL released.  Arguments arrive validated by fastrelu._api; nothing here re-checks them.
"""
import os

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t

cnp.import_array()

cdef extern from "numpy/ndarraytypes.h":
    enum: NPY_HALF  # not in Cython's numpy declarations

cdef extern from "_kernels.h" nogil:
    ctypedef struct fr_job:
        int dt, op, backward
        const char *g
        const char *x
        char *y
        Py_ssize_t n, C, inner, L
        double p
        const void *pw
        void *sums
        int stream
    int fr_run(fr_job *job)
    void fr_init_threads()
    int fr_select_isa(int cap)
    const char *fr_isa_name()
    int fr_get_num_threads()
    void fr_set_num_threads(int n)
    int FR_ISA_BASELINE, FR_ISA_AVX2, FR_ISA_AVX512
    Py_ssize_t FR_PARALLEL_MIN_ELEMENTS

# Rows layouts shorter than this are repeated to it, so each loop runs over enough lanes.
cdef Py_ssize_t _MIN_ROW = 64
# Channel runs at least this long take the blocks layout (one parameter per run); shorter runs
# are laid out as rows (one parameter per element of a row).
cdef Py_ssize_t _MIN_RUN = 64

fr_init_threads()
_SIMD_LEVELS = {"baseline": FR_ISA_BASELINE, "avx2": FR_ISA_AVX2, "avx512": FR_ISA_AVX512}


def _select_simd():
    requested = os.environ.get("FASTRELU_SIMD", "").strip().lower()
    if requested and requested not in _SIMD_LEVELS:
        raise ValueError(f"FASTRELU_SIMD must be one of {sorted(_SIMD_LEVELS)}, not {requested!r}")
    fr_select_isa(_SIMD_LEVELS.get(requested, -1))


_select_simd()


def _threads_from_environment():
    requested = os.environ.get("FASTRELU_NUM_THREADS", "").strip()
    if not requested:
        return
    if not requested.isdigit() or int(requested) < 1:
        raise ValueError(f"FASTRELU_NUM_THREADS must be a positive integer, not {requested!r}")
    fr_set_num_threads(int(requested))


_threads_from_environment()


def simd_level():
    """The instruction set the kernels run with: 'avx512', 'avx2' or 'baseline'."""
    return fr_isa_name().decode()


def get_num_threads():
    return fr_get_num_threads()


def set_num_threads(int n):
    fr_set_num_threads(n)


PARALLEL_MIN_ELEMENTS = FR_PARALLEL_MIN_ELEMENTS


cdef inline char *_data(cnp.ndarray a):
    return <char *>cnp.PyArray_DATA(a)


cdef inline int _dtype_code(cnp.ndarray a):
    """The C kernels' dtype code (FR_F16, FR_F32, FR_F64)."""
    cdef int t = cnp.PyArray_TYPE(a)
    return 2 if t == cnp.NPY_DOUBLE else 1 if t == cnp.NPY_FLOAT else 0


cdef void _extent(cnp.ndarray a, Py_ssize_t *lo, Py_ssize_t *hi):
    """The bytes [lo, hi) spanned by a non-empty array."""
    cdef Py_ssize_t first = <Py_ssize_t>cnp.PyArray_DATA(a), last = first, step
    cdef int d
    for d in range(cnp.PyArray_NDIM(a)):
        step = cnp.PyArray_STRIDES(a)[d] * (cnp.PyArray_DIMS(a)[d] - 1)
        if step < 0:
            first += step
        else:
            last += step
    lo[0] = first
    hi[0] = last + cnp.PyArray_ITEMSIZE(a)


cdef inline bint _plain_float(a, int typenum, int ndim, cnp.npy_intp *dims):
    """a is an ndarray of type `typenum` (or any float type when typenum < 0) in native byte
    order with the given shape."""
    if type(a) is not np.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    if not (t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE or t == NPY_HALF):
        return False
    if (typenum >= 0 and t != typenum) or not cnp.PyArray_ISNOTSWAPPED(arr):
        return False
    if dims != NULL:
        if cnp.PyArray_NDIM(arr) != ndim:
            return False
        for d in range(ndim):
            if cnp.PyArray_DIMS(arr)[d] != dims[d]:
                return False
    return True


def is_plain_call(x, out, grad=None):
    """True for the common call that needs no conversion and cannot fail: NumPy float arrays of
    one dtype and shape, and an `out` that is writable and either x (or grad) itself or disjoint
    from them.  Anything else goes through the full checks, which also word the errors."""
    if not _plain_float(x, -1, 0, NULL):
        return False
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int t = cnp.PyArray_TYPE(xa), nd = cnp.PyArray_NDIM(xa)
    if grad is not None and not _plain_float(grad, t, nd, cnp.PyArray_DIMS(xa)):
        return False
    if out is None:
        return True
    if not _plain_float(out, t, nd, cnp.PyArray_DIMS(xa)) or not cnp.PyArray_ISWRITEABLE(out):
        return False
    if out is not x and memory_overlap(out, x) != 0:
        return False
    return grad is None or out is grad or memory_overlap(out, grad) == 0


def memory_overlap(cnp.ndarray a, cnp.ndarray b):
    """0: a and b share no memory; 1: they are the same elements in the same order (in place);
    2: they overlap otherwise."""
    cdef Py_ssize_t lo_a, hi_a, lo_b, hi_b
    cdef int d
    if cnp.PyArray_SIZE(a) == 0 or cnp.PyArray_SIZE(b) == 0:
        return 0
    _extent(a, &lo_a, &hi_a)
    _extent(b, &lo_b, &hi_b)
    if hi_a <= lo_b or hi_b <= lo_a:
        return 0
    if (cnp.PyArray_DATA(a) == cnp.PyArray_DATA(b) and cnp.PyArray_NDIM(a) == cnp.PyArray_NDIM(b)
            and cnp.PyArray_ITEMSIZE(a) == cnp.PyArray_ITEMSIZE(b)):
        for d in range(cnp.PyArray_NDIM(a)):
            if (cnp.PyArray_DIMS(a)[d] != cnp.PyArray_DIMS(b)[d]
                    or (cnp.PyArray_STRIDES(a)[d] != cnp.PyArray_STRIDES(b)[d]
                        and cnp.PyArray_DIMS(a)[d] > 1)):
                break
        else:
            return 1
    try:  # the spans meet: interleaved views may still be disjoint
        return 2 if np.shares_memory(a, b, max_work=1 << 20) else 0
    except np.exceptions.TooHardError:
        return 2


cdef cnp.ndarray _contiguous(cnp.ndarray a):
    """`a` itself when C-contiguous in native byte order, else a copy that is."""
    if cnp.PyArray_ISCARRAY_RO(a) and cnp.PyArray_ISNOTSWAPPED(a):
        return a
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


cdef cnp.ndarray _target(cnp.ndarray x, out):
    """Where the kernel writes: `out` itself when it can, else a new C-contiguous array."""
    if out is not None and cnp.PyArray_ISCARRAY(out) and cnp.PyArray_ISNOTSWAPPED(out):
        return out
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)


cdef _run(int op, bint backward, cnp.ndarray g, cnp.ndarray x, cnp.ndarray y, double p,
          weight, axis, bint want_sums):
    """Runs one op over C-contiguous x (and g) into y.  With `weight` (one per channel along
    `axis`) or `want_sums`, the channel layout along `axis` is used and the per-channel sums are
    returned: positive counts (forward) or weight-gradient sums (backward)."""
    cdef fr_job job
    cdef cnp.ndarray pw = None, sums = None
    cdef Py_ssize_t C = 1, inner, period, reps
    job.dt = _dtype_code(x)
    job.op = op
    job.backward = backward
    job.g = _data(g) if g is not None else NULL
    job.x = _data(x)
    job.y = _data(y)
    job.n = cnp.PyArray_SIZE(x)
    job.p = p
    job.pw = NULL
    job.sums = NULL
    job.inner = job.n
    job.C = 1
    job.L = 0
    if job.n == 0:
        return np.zeros(x.shape[axis] if axis is not None else 1,
                        dtype=np.float64 if backward else np.int64) if want_sums else None
    compute_dtype = np.float64 if job.dt == 2 else np.float32
    fold = None
    if axis is not None:
        shape = (<object>x).shape
        C = shape[axis]
        inner = 1
        for d in shape[axis + 1:]:
            inner *= d
        if weight is not None and weight.size == 1:
            job.p = float(weight.reshape(()))
            weight = None
        if inner >= _MIN_RUN:
            job.C, job.inner = C, inner
            if weight is not None:
                pw = np.ascontiguousarray(weight, dtype=compute_dtype)
        else:
            # rows of C*inner elements, repeated to at least _MIN_ROW
            period = C * inner
            reps = -(-_MIN_ROW // period)
            if weight is not None:
                pw = np.repeat(np.asarray(weight, dtype=compute_dtype).reshape(C), inner)
            else:
                pw = np.full(period, job.p, dtype=compute_dtype)
            pw = np.tile(pw, reps)
            job.inner, job.L = 0, period * reps
            fold = (reps, C, inner)
        if pw is not None:
            job.pw = cnp.PyArray_DATA(pw)
    elif weight is not None:
        job.p = float(weight.reshape(()))
    if want_sums:
        sums = np.empty(job.C if job.inner else job.L,
                        dtype=np.float64 if backward else np.int64)
        job.sums = cnp.PyArray_DATA(sums)
    cdef int rc
    with nogil:
        rc = fr_run(&job)
    if rc != 0:
        raise MemoryError("fastrelu: could not allocate per-thread partial sums")
    if sums is None:
        return None
    if fold is not None:
        sums = sums.reshape(fold).sum(axis=(0, 2))
    return sums


def copy(cnp.ndarray src, cnp.ndarray dst):
    """dst[...] = src for C-contiguous arrays of one dtype, through the kernels' own threads and
    stores: the benchmarks' memory-copy roofline."""
    _run(3, False, None, src, dst, 0.0, None, None, False)


cdef tuple _fortran_as_c(arrays, axis):
    """Fortran-ordered operands are run as their C-ordered transposes (no copy)."""
    cdef list flipped = []
    for a in arrays:
        flipped.append(None if a is None else a.T)
    if axis is not None:
        axis = arrays[0].ndim - 1 - axis
    return flipped, axis


cdef bint _all_fortran(tuple arrays):
    """True when every array given is Fortran-ordered and not also C-ordered."""
    for a in arrays:
        if a is not None and not (cnp.PyArray_IS_F_CONTIGUOUS(a)
                                  and not cnp.PyArray_IS_C_CONTIGUOUS(a)):
            return False
    return True


def forward(int op, cnp.ndarray x, out, double p, weight, axis, bint want_counts):
    """y = op(x) into `out` (or a new array); returns (y, positive counts per channel or None)."""
    cdef bint transposed = cnp.PyArray_NDIM(x) > 1 and _all_fortran((x, out))
    if transposed:
        (x, out), axis = _fortran_as_c((x, out), axis)
    cdef cnp.ndarray xc = _contiguous(x)
    cdef cnp.ndarray y = _target(xc, out)
    counts = _run(op, False, None, xc, y, p, weight, axis, want_counts)
    if out is not None and y is not out:
        np.copyto(out, y)
        y = out
    return (y.T if transposed else y), counts


def backward(int op, cnp.ndarray grad, cnp.ndarray x, out, double p, weight, axis,
             bint want_wsums):
    """dx into `out` (or a new array); returns (dx, weight-gradient sums per channel or None)."""
    cdef bint transposed = cnp.PyArray_NDIM(x) > 1 and _all_fortran((x, grad, out))
    if transposed:
        (x, grad, out), axis = _fortran_as_c((x, grad, out), axis)
    cdef cnp.ndarray xc = _contiguous(x)
    cdef cnp.ndarray gc = _contiguous(grad)
    cdef cnp.ndarray dx = _target(xc, out)
    wsums = _run(op, True, gc, xc, dx, p, weight, axis, want_wsums)
    if out is not None and dx is not out:
        np.copyto(out, dx)
        dx = out
    return (dx.T if transposed else dx), wsums
