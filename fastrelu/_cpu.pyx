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
        Py_ssize_t n, C, inner
        double p
        const void *pw
        const void *bias
        int64_t *counts
        int sum
        void *param_grad
    int fr_run(fr_job *job)
    void fr_init_threads()
    int fr_select_isa(int cap)
    const char *fr_isa_name()
    int fr_get_num_threads()
    void fr_set_num_threads(int n)
    int FR_ISA_BASELINE, FR_ISA_AVX2, FR_ISA_AVX512
    Py_ssize_t FR_PARALLEL_MIN_ELEMENTS


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
    return _is_plain_call(x, out, grad)


def plain_forward(int op, x, out, double p):
    """op(x) (p: its parameter) for a plain call of C-contiguous arrays, in one step from Python;
    None for any other call, which goes through the full checks."""
    if not (_is_plain_call(x, out, None) and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x)
            and (out is None or cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>out))):
        return None
    cdef cnp.ndarray y = _target(x, out)
    _run(op, False, None, x, y, p, None, None, None, None)
    return y


def plain_backward(int op, grad, x, out, double p):
    """The gradient of op for a plain call of C-contiguous arrays, or None (see plain_forward)."""
    if not (_is_plain_call(x, out, grad) and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>grad)
            and (out is None or cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>out))):
        return None
    cdef cnp.ndarray dx = _target(x, out)
    _run(op, True, grad, x, dx, p, None, None, None, None)
    return dx


cdef bint _is_plain_call(x, out, grad):
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
    if out is not x and _memory_overlap(out, x) != 0:
        return False
    return grad is None or out is grad or _memory_overlap(out, grad) == 0


def plain_prelu_axis(x, weight, axis, weight_out=None, out=None, grad=None):
    """For a plain call (see is_plain_call): the channel axis in [0, ndim) when `weight` is a
    NumPy array of x's dtype with one element per channel along the integer `axis`, -1 when it
    has one element (shared), else None: the call then goes through the full checks.
    `weight_out` (backward) must be None or a plain writable array of weight's shape that
    shares no memory with x, grad, out or weight."""
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa), ax
    if not _plain_float(weight, cnp.PyArray_TYPE(xa), 0, NULL):
        return None
    cdef cnp.ndarray w = <cnp.ndarray>weight
    if weight_out is not None:
        if not (_plain_float(weight_out, cnp.PyArray_TYPE(xa), cnp.PyArray_NDIM(w),
                             cnp.PyArray_DIMS(w)) and cnp.PyArray_ISWRITEABLE(weight_out)):
            return None
        for other in (x, grad, out, weight):
            if other is not None and memory_overlap(weight_out, other) != 0:
                return None
    if type(axis) is not int:
        return None
    if cnp.PyArray_SIZE(w) == 1 and cnp.PyArray_NDIM(w) <= 1:
        return -1 if nd < 2 or -nd <= axis < nd else None
    if cnp.PyArray_NDIM(w) != 1 or nd < 2 or not -nd <= axis < nd:
        return None
    ax = axis % nd
    return ax if cnp.PyArray_DIMS(w)[0] == cnp.PyArray_DIMS(xa)[ax] else None


def memory_overlap(cnp.ndarray a, cnp.ndarray b):
    """0: a and b share no memory; 1: they are the same elements in the same order (in place);
    2: they overlap otherwise."""
    return _memory_overlap(a, b)


cdef int _memory_overlap(cnp.ndarray a, cnp.ndarray b) except -1:
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


cdef object _compute_type(int dt, a):
    """A per-channel array as a contiguous array of the compute type, or None."""
    if a is None:
        return None
    return cnp.PyArray_FROMANY(a, cnp.NPY_DOUBLE if dt == 2 else cnp.NPY_FLOAT, 0, 1,
                               cnp.NPY_ARRAY_IN_ARRAY)


cdef _run(int op, bint backward, cnp.ndarray g, cnp.ndarray x, cnp.ndarray y, double p,
          weight, axis, cnp.ndarray counts, cnp.ndarray param_grad, int sum=0, bias=None):
    """Runs one op over C-contiguous x (and g) into y.  With an `axis`, element k belongs to
    channel k's index along it, and the per-channel arrays apply: `weight` replaces p, `bias` is
    added to x first (forward), `counts` gets the int64 positives (forward), and `param_grad`
    the sums selected by `sum` (backward, in x's dtype).  Each may be None."""
    cdef fr_job job
    cdef Py_ssize_t d
    job.dt = _dtype_code(x)
    job.op = op
    job.backward = backward
    job.g = _data(g) if g is not None else NULL
    job.x = _data(x)
    job.y = _data(y)
    job.n = cnp.PyArray_SIZE(x)
    job.p = p
    job.C = 1
    job.inner = job.n
    if axis is not None:
        job.C = cnp.PyArray_DIMS(x)[axis]
        job.inner = 1
        for d in range(axis + 1, cnp.PyArray_NDIM(x)):
            job.inner *= cnp.PyArray_DIMS(x)[d]
    pw = _compute_type(job.dt, weight)
    pb = _compute_type(job.dt, bias)
    job.pw = cnp.PyArray_DATA(pw) if pw is not None else NULL
    job.bias = cnp.PyArray_DATA(pb) if pb is not None else NULL
    job.counts = <int64_t *>cnp.PyArray_DATA(counts) if counts is not None else NULL
    job.sum = sum
    job.param_grad = cnp.PyArray_DATA(param_grad) if param_grad is not None else NULL
    cdef int rc
    with nogil:
        rc = fr_run(&job)
    if rc != 0:
        raise MemoryError("fastrelu: out of memory for a kernel's per-thread sums")


def copy(cnp.ndarray src, cnp.ndarray dst):
    """dst[...] = src for C-contiguous arrays of one dtype, through the kernels' own threads and
    stores: the benchmarks' memory-copy roofline."""
    _run(3, False, None, src, dst, 0.0, None, None, None, None)


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


SUM_WEIGHT, SUM_GRAD = 1, 2  # what backward's param_grad sums: PReLU's weight, or a bias


def forward(int op, cnp.ndarray x, out, double p, weight, axis, bint want_counts, bias=None):
    """y = op(x (+ bias)) into `out` (or a new array).  Returns (y, int64 positives of x (+ bias)
    per channel along `axis`, or None).  `weight`, `bias`: one value per channel along `axis`."""
    cdef bint transposed = cnp.PyArray_NDIM(x) > 1 and _all_fortran((x, out))
    if transposed:
        (x, out), axis = _fortran_as_c((x, out), axis)
    cdef cnp.ndarray xc = _contiguous(x)
    cdef cnp.ndarray y = _target(xc, out)
    counts = np.empty(xc.shape[axis] if axis is not None else 1, np.int64) if want_counts else None
    _run(op, False, None, xc, y, p, weight, axis, counts, None, 0, bias)
    if out is not None and y is not out:
        np.copyto(out, y)
        y = out
    return (y.T if transposed else y), counts


def backward(int op, cnp.ndarray grad, cnp.ndarray x, out, double p, weight, axis,
             cnp.ndarray param_grad=None, int sum=SUM_WEIGHT):
    """dx into `out` (or a new array).  `weight`: one per channel along `axis` (or None: p).  With
    `param_grad` (C elements of x's dtype), the per-channel sums selected by `sum` go there."""
    cdef bint transposed = cnp.PyArray_NDIM(x) > 1 and _all_fortran((x, grad, out))
    if transposed:
        (x, grad, out), axis = _fortran_as_c((x, grad, out), axis)
    cdef cnp.ndarray xc = _contiguous(x)
    cdef cnp.ndarray gc = _contiguous(grad)
    cdef cnp.ndarray dx = _target(xc, out)
    cdef cnp.ndarray pg = param_grad
    if pg is not None and not (cnp.PyArray_ISCARRAY(pg) and cnp.PyArray_ISNOTSWAPPED(pg)):
        pg = np.empty(param_grad.size, dtype=xc.dtype)
    _run(op, True, gc, xc, dx, p, weight, axis, None, pg, sum if pg is not None else 0)
    if pg is not param_grad:
        np.copyto(param_grad, pg.reshape((<object>param_grad).shape))
    if out is not None and dx is not out:
        np.copyto(out, dx)
        dx = out
    return dx.T if transposed else dx
