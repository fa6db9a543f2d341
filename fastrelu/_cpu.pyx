# cython: language_level=3, boundscheck=False, wraparound=False
"""CPU backend: lays validated NumPy arrays out for the C kernels in _kernels.h and runs them
with the GIL released.  Arguments arrive validated by fastrelu._api; nothing here re-checks them,
but no argument reaches C without its type checked (typed parameters refuse None).

The constants every backend shares (op codes, flags, sums) are _kernels.h's, exported here.
"""
import os

import numpy as np

try:
    from numpy.exceptions import TooHardError
except ImportError:  # NumPy < 1.25
    from numpy import TooHardError

cimport numpy as cnp
from libc.stdint cimport int64_t

cnp.import_array()

cdef extern from "numpy/ndarraytypes.h":
    enum: NPY_HALF, NPY_USERDEF  # not in Cython's numpy declarations

cdef extern from "numpy/arrayobject.h":
    # a new array of prototype's shape, dtype and (NPY_KEEPORDER) memory layout
    object PyArray_NewLikeArray(cnp.ndarray prototype, cnp.NPY_ORDER order, void *descr,
                                int subok)

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
        void *bias_grad
    int fr_run(fr_job *job)
    void fr_init_threads()
    int fr_select_isa(int cap)
    const char *fr_isa_name()
    int fr_get_num_threads()
    void fr_set_num_threads(int n)
    int fr_thread_cap()
    int FR_ISA_BASELINE, FR_ISA_AVX2, FR_ISA_AVX512
    int FR_F16, FR_F32, FR_F64, FR_BF16
    int FR_RELU, FR_LEAKY, FR_ELU, FR_COPY, FR_ELU_FROM_Y
    int FR_COUNT, FR_BIAS, FR_WEIGHT
    int FR_SUM_NONE, FR_SUM_WEIGHT, FR_SUM_GRAD, FR_SUM_BIAS_WEIGHT
    int FR_THREADS_PER_CPU
    Py_ssize_t FR_PARALLEL_MIN_ELEMENTS


# op codes; PReLU is LEAKY with per-channel slopes
RELU, LEAKY, ELU, COPY, ELU_FROM_Y = FR_RELU, FR_LEAKY, FR_ELU, FR_COPY, FR_ELU_FROM_Y
COUNT, BIAS, WEIGHT = FR_COUNT, FR_BIAS, FR_WEIGHT  # forward flags (WEIGHT: the GPU's only)
# backward sums
SUM_NONE, SUM_WEIGHT, SUM_GRAD, SUM_BIAS_WEIGHT = (FR_SUM_NONE, FR_SUM_WEIGHT, FR_SUM_GRAD,
                                                   FR_SUM_BIAS_WEIGHT)
THREADS_PER_CPU = FR_THREADS_PER_CPU

fr_init_threads()
_SIMD_LEVELS = {"baseline": FR_ISA_BASELINE, "avx2": FR_ISA_AVX2, "avx512": FR_ISA_AVX512}


def _select_simd():
    requested = os.environ.get("FASTRELU_SIMD", "").strip().lower()
    if requested and requested not in _SIMD_LEVELS:
        raise ValueError(f"FASTRELU_SIMD must be one of {sorted(_SIMD_LEVELS)}, not {requested!r}")
    fr_select_isa(_SIMD_LEVELS.get(requested, -1))


_select_simd()


def simd_level():
    """The instruction set the kernels run with: 'avx512', 'avx2' or 'baseline'."""
    return fr_isa_name().decode()


def get_num_threads():
    return fr_get_num_threads()


def set_num_threads(int n):
    fr_set_num_threads(n)


def thread_cap():
    """The most threads a kernel runs on (FR_THREADS_PER_CPU per logical CPU, or OpenMP's
    thread limit if lower)."""
    return fr_thread_cap()


PARALLEL_MIN_ELEMENTS = FR_PARALLEL_MIN_ELEMENTS


cdef inline char *_data(cnp.ndarray a):
    return <char *>cnp.PyArray_DATA(a)


cdef int _bfloat16_num = -1  # ml_dtypes.bfloat16's type number, once an array of it is seen


def is_bfloat16(dt):
    """dt is ml_dtypes' bfloat16 (told without importing ml_dtypes)."""
    global _bfloat16_num
    if dt.num == _bfloat16_num:
        return True
    if dt.kind == "V" and dt.name == "bfloat16" and dt.type.__module__.startswith("ml_dtypes"):
        _bfloat16_num = dt.num
        return True
    return False


cdef inline int _dtype_code(cnp.ndarray a):
    cdef int t = cnp.PyArray_TYPE(a)
    return (FR_F64 if t == cnp.NPY_DOUBLE else FR_F32 if t == cnp.NPY_FLOAT
            else FR_F16 if t == NPY_HALF else FR_BF16)


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
    """a is an aligned ndarray of type `typenum` (or any float type when typenum < 0) in native
    byte order with the given shape (ndim < 0: any shape; a 0-d shape's dims may be NULL)."""
    if type(a) is not np.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    if not (t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE or t == NPY_HALF or
            (t >= NPY_USERDEF and is_bfloat16(arr.dtype))):
        return False
    if (typenum >= 0 and t != typenum) or not cnp.PyArray_ISNOTSWAPPED(arr):
        return False
    if not cnp.PyArray_ISALIGNED(arr):
        return False
    if ndim >= 0:
        if cnp.PyArray_NDIM(arr) != ndim:
            return False
        for d in range(ndim):
            if cnp.PyArray_DIMS(arr)[d] != dims[d]:
                return False
    return True


def is_plain_call(x, out, grad=None, bint backward=False):
    """True for the common call that needs no conversion and cannot fail: aligned NumPy float
    arrays of one dtype and shape (x, and grad for a backward), and an `out` that is writable and
    either x (or grad) itself or disjoint from them.  Anything else goes through the full checks,
    which also word the errors."""
    return _is_plain_call(x, out, grad, backward)


def plain_forward(int op, x, out, double p):
    """op(x) (p: its parameter) for a plain call of dense arrays of one layout (any axis order),
    in one step from Python; None for any other call, which goes through the full checks."""
    if not (_is_plain_call(x, out, None, False) and _dense(<cnp.ndarray>x)
            and (out is None or _same_layout(<cnp.ndarray>x, <cnp.ndarray>out))):
        return None
    cdef cnp.ndarray y = _output(<cnp.ndarray>x, out)
    _run(op, False, None, x, y, p, None, None, None, None)
    return y


def plain_backward(int op, grad, x, out, double p):
    """The gradient of op for a plain call of dense arrays of one layout, or None (see
    plain_forward)."""
    if not (_is_plain_call(x, out, grad, True) and _dense(<cnp.ndarray>x)
            and _same_layout(<cnp.ndarray>x, <cnp.ndarray>grad)
            and (out is None or _same_layout(<cnp.ndarray>x, <cnp.ndarray>out))):
        return None
    cdef cnp.ndarray dx = _output(<cnp.ndarray>x, out)
    _run(op, True, grad, x, dx, p, None, None, None, None)
    return dx


cdef bint _is_plain_call(x, out, grad, bint backward):
    if not _plain_float(x, -1, -1, NULL):
        return False
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int t = cnp.PyArray_TYPE(xa), nd = cnp.PyArray_NDIM(xa)
    if backward and not _plain_float(grad, t, nd, cnp.PyArray_DIMS(xa)):
        return False
    if out is None:
        return True
    if not _plain_float(out, t, nd, cnp.PyArray_DIMS(xa)) or not cnp.PyArray_ISWRITEABLE(out):
        return False
    if not _dense(<cnp.ndarray>out):
        return False  # it may overlap itself: the full checks word that
    if out is not x and _memory_overlap(out, x) != 0:
        return False
    return not backward or out is grad or _memory_overlap(out, grad) == 0


def is_plain_param(param, x, out, param_out=None, grad=None):
    """For a plain call (see is_plain_call): True when `param` (PReLU's weight) is an aligned
    NumPy array of x's dtype that shares no memory with `out`, and `param_out` (its gradient, in
    a backward) is None or such an array of param's shape, writable, sharing no memory with x,
    grad, out or param.  Its shape against x's is checked by the caller."""
    cdef cnp.ndarray xa = <cnp.ndarray>x
    if not _plain_float(param, cnp.PyArray_TYPE(xa), -1, NULL):
        return False
    if out is not None and _memory_overlap(<cnp.ndarray>out, <cnp.ndarray>param) != 0:
        return False
    if param_out is None:
        return True
    cdef cnp.ndarray pa = <cnp.ndarray>param
    if not (_plain_float(param_out, cnp.PyArray_TYPE(xa), cnp.PyArray_NDIM(pa),
                         cnp.PyArray_DIMS(pa)) and cnp.PyArray_ISWRITEABLE(param_out)
            and _dense(<cnp.ndarray>param_out)):
        return False
    for other in (x, grad, out, param):
        if other is not None and _memory_overlap(<cnp.ndarray>param_out, <cnp.ndarray>other):
            return False
    return True


def memory_overlap(cnp.ndarray a not None, cnp.ndarray b not None):
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
    except TooHardError:
        return 2


cdef cnp.ndarray _contiguous(cnp.ndarray a):
    """`a` itself when C-contiguous and aligned in native byte order, else a copy that is, of
    the same shape (0-d included)."""
    if cnp.PyArray_ISCARRAY_RO(a) and cnp.PyArray_ISNOTSWAPPED(a):
        return a
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C")


cdef object _compute_type(int dt, a):
    """A per-channel array as a contiguous array of the compute type, or None."""
    if a is None:
        return None
    return cnp.PyArray_FROMANY(a, cnp.NPY_DOUBLE if dt == FR_F64 else cnp.NPY_FLOAT, 0, 1,
                               cnp.NPY_ARRAY_IN_ARRAY)


cdef _run(int op, bint backward, cnp.ndarray g, cnp.ndarray x, cnp.ndarray y, double p,
          weight, axis, cnp.ndarray counts, cnp.ndarray param_grad, int sum=0, bias=None,
          cnp.ndarray bias_grad=None):
    """Runs one op over dense x (and g) into y, all of one layout (see _dense).  With an `axis`,
    element k belongs to channel k's index along it, and the per-channel arrays apply: `weight` replaces p, `bias` is
    added to x first, `counts` gets the int64 positives (forward), `param_grad` the sums selected
    by `sum` (backward, in x's dtype) and `bias_grad` the bias's (SUM_BIAS_WEIGHT).  Each may be
    None."""
    cdef fr_job job
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
        # elements between consecutive channels: whatever the order of the dense block's axes,
        # those laid out inside the channel axis make runs of that many
        job.inner = cnp.PyArray_STRIDES(x)[axis] // cnp.PyArray_ITEMSIZE(x) if job.C > 1 else 1
    # no data: they are not read, only told apart from none (and a huge broadcast one must not
    # be copied)
    pw = _compute_type(job.dt, weight) if job.n else weight
    pb = _compute_type(job.dt, bias) if job.n else bias
    job.pw = cnp.PyArray_DATA(pw) if pw is not None else NULL
    job.bias = cnp.PyArray_DATA(pb) if pb is not None else NULL
    job.counts = <int64_t *>cnp.PyArray_DATA(counts) if counts is not None else NULL
    job.sum = sum
    job.param_grad = cnp.PyArray_DATA(param_grad) if param_grad is not None else NULL
    job.bias_grad = cnp.PyArray_DATA(bias_grad) if bias_grad is not None else NULL
    cdef int rc
    with nogil:
        rc = fr_run(&job)
    if rc != 0:
        raise MemoryError("fastrelu: out of memory for a kernel's per-thread sums")


def copy(cnp.ndarray src not None, cnp.ndarray dst not None):
    """dst[...] = src for C-contiguous arrays of one dtype, through the kernels' own threads and
    stores: the benchmarks' memory-copy roofline."""
    _run(FR_COPY, False, None, src, dst, 0.0, None, None, None, None)


cdef bint _dense(cnp.ndarray a):
    """a's elements fill one block of memory with no gaps, in some axis order (C and Fortran
    order, channels-last, any transpose), aligned and in native byte order: the kernels run on
    the block as it is, element k in channel (k / inner) % C with inner = strides[axis] / itemsize
    (see _run)."""
    if not (cnp.PyArray_ISALIGNED(a) and cnp.PyArray_ISNOTSWAPPED(a)):
        return False
    if cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_IS_F_CONTIGUOUS(a):
        return True
    cdef int nd = cnp.PyArray_NDIM(a), i, j, d, n = 0
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(a)
    cdef cnp.npy_intp step = cnp.PyArray_ITEMSIZE(a)
    cdef int longer[cnp.NPY_MAXDIMS]  # the axes of more than one element, smallest stride first
    for d in range(nd):
        if shape[d] > 1:
            j = n
            while j > 0 and strides[longer[j - 1]] > strides[d]:
                longer[j] = longer[j - 1]
                j -= 1
            longer[j] = d
            n += 1
    for i in range(n):
        if strides[longer[i]] != step:
            return False
        step *= shape[longer[i]]
    return True


cdef bint _same_layout(cnp.ndarray a, cnp.ndarray b):
    """b (of a's shape) lies in memory as dense a does: the same strides wherever they matter,
    aligned and in native byte order."""
    cdef int d
    if not (cnp.PyArray_ISALIGNED(b) and cnp.PyArray_ISNOTSWAPPED(b)):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[d] > 1 and cnp.PyArray_STRIDES(a)[d] != cnp.PyArray_STRIDES(b)[d]:
            return False
    return True


cdef cnp.ndarray _layout(cnp.ndarray x, out):
    """The array whose memory layout every operand takes for the kernel: x when it is dense,
    else out when it is, else a C-ordered copy of x.  Results keep x's layout (NumPy's
    order='K'); operands in another layout are copied into it, and an `out` in another is
    filled from a result in it."""
    if _dense(x):
        return x
    if out is not None and _dense(<cnp.ndarray>out):
        return <cnp.ndarray>out
    return _contiguous(x)


cdef cnp.ndarray _in_layout(cnp.ndarray a, cnp.ndarray layout):
    """a itself when laid out as `layout`, else a copy that is."""
    if a is layout or _same_layout(layout, a):
        return a
    cdef cnp.ndarray copy = PyArray_NewLikeArray(layout, cnp.NPY_KEEPORDER, NULL, 0)
    np.copyto(copy, a)
    return copy


cdef cnp.ndarray _output(cnp.ndarray layout, out):
    """Where the kernel writes: `out` when it is laid out as `layout`, else a new array that
    is (copied into `out` after)."""
    if out is not None and _same_layout(layout, <cnp.ndarray>out):
        return <cnp.ndarray>out
    return PyArray_NewLikeArray(layout, cnp.NPY_KEEPORDER, NULL, 0)


def forward(int op, cnp.ndarray x not None, out, double p, weight, axis, bint want_counts,
            bias=None):
    """y = op(x (+ bias)) into `out` (or a new array in x's memory layout).  Returns (y, int64
    positives of x (+ bias) per channel along `axis`, or None).  `weight`, `bias`: one value per
    channel along `axis`.  Dense arrays of any axis order run in place (see _layout)."""
    cdef cnp.ndarray layout = _layout(x, out)
    cdef cnp.ndarray xc = _in_layout(x, layout)
    cdef cnp.ndarray y = _output(layout, out)
    counts = np.empty(xc.shape[axis] if axis is not None else 1, np.int64) if want_counts else None
    _run(op, False, None, xc, y, p, weight, axis, counts, None, 0, bias)
    if out is not None and y is not out:
        np.copyto(out, y)
        return out, counts
    return y, counts


cdef cnp.ndarray _sums_target(cnp.ndarray a, dtype):
    """Where the kernel writes per-channel sums: `a` itself when it can, else a new array."""
    if a is None or (cnp.PyArray_ISCARRAY(a) and cnp.PyArray_ISNOTSWAPPED(a)):
        return a
    return np.empty(a.size, dtype=dtype)


def backward(int op, cnp.ndarray grad not None, cnp.ndarray x not None, out, double p, weight,
             axis, cnp.ndarray param_grad=None, int sum=FR_SUM_WEIGHT, bias=None,
             cnp.ndarray bias_grad=None):
    """dx into `out` (or a new array).  `weight`: one per channel along `axis` (or None: p).  With
    `param_grad` (C elements of x's dtype), the per-channel sums selected by `sum` (SUM_WEIGHT:
    PReLU's weight gradient, SUM_GRAD: a bias's) go there; with SUM_BIAS_WEIGHT, x is PReLU's
    input before `bias`, and `bias_grad` gets the bias's gradient beside the weight's."""
    cdef cnp.ndarray layout = _layout(x, out)
    cdef cnp.ndarray xc = _in_layout(x, layout)
    cdef cnp.ndarray gc = _in_layout(grad, layout)
    cdef cnp.ndarray dx = _output(layout, out)
    cdef cnp.ndarray pg = _sums_target(param_grad, xc.dtype)
    cdef cnp.ndarray bg = _sums_target(bias_grad, xc.dtype)
    _run(op, True, gc, xc, dx, p, weight, axis, None, pg, sum if pg is not None else 0, bias,
         bg)
    for given, written in ((param_grad, pg), (bias_grad, bg)):
        if written is not given:
            np.copyto(given, written.reshape((<object>given).shape))
    if out is not None and dx is not out:
        np.copyto(out, dx)
        return out
    return dx
