"""The CUDA-array model shared by argument validation (fastrelu._api) and the GPU backend
(fastrelu._gpu): which objects are CUDA arrays, which library made them, the GPU they live on,
and what validation needs of them (shape, dtype, strides, address), read from
``__cuda_array_interface__`` without importing any GPU library."""
import functools
import math

import numpy as np


def is_device(a):
    """A CUDA array: anything exporting __cuda_array_interface__ (CuPy, PyTorch CUDA tensors,
    numba), or a numba device array of the CUDA simulator (which exports none)."""
    if a is None or isinstance(a, (np.ndarray, list, tuple, int, float)):
        return False
    library = array_library(a)
    if library == "torch":
        return bool(getattr(a, "is_cuda", False))
    if library == "numba" and hasattr(a, "copy_to_host"):
        return True
    return hasattr(a, "__cuda_array_interface__")


LIBRARIES = ("torch", "cupy")  # array libraries with their own allocator, copies and streams


def array_library(a):
    """Which library made a CUDA array: "torch", "cupy", "numba", or "cai" for any other
    __cuda_array_interface__ producer (whose results are numba arrays)."""
    return _library_of_type(type(a))


@functools.lru_cache(maxsize=None)
def _library_of_type(cls):
    module = cls.__module__
    for library in ("torch", "cupy", "numba"):
        if module.startswith(library):
            return library
    return "cai"


def device_index(a):
    """The GPU a PyTorch or CuPy array lives on; None for others (numba's current GPU)."""
    library = array_library(a)
    if library == "torch":
        return a.device.index
    if library == "cupy":
        return a.device.id
    return None


class DeviceView:
    """What validation needs of a CUDA array: shape, dtype, byte strides, address, writability."""

    __slots__ = ("obj", "library", "device", "shape", "dtype", "strides", "ptr", "readonly",
                 "_orders")

    @property
    def ndim(self):
        return len(self.shape)

    def __init__(self, name, obj):
        self.obj, self.library, self._orders = obj, array_library(obj), None
        if self.library == "torch" and obj.requires_grad:
            raise TypeError(f"{name} requires grad and exports no CUDA array interface: "
                            f"pass {name}.detach()")
        # numba's own arrays are read off the array: their interface is built per access
        numba_array = self.library == "numba" and "gpu_data" in getattr(obj, "__dict__", ())
        interface = None if self.library == "torch" or numba_array else \
            getattr(obj, "__cuda_array_interface__", None)
        if numba_array:
            self.shape, self.dtype, self.strides = obj.shape, obj.dtype, obj.strides
            self.ptr, self.readonly = obj.device_ctypes_pointer.value or 0, False
        elif self.library == "torch":  # read off the tensor: bfloat16 ones export no interface
            self.dtype = numpy_dtype_of_torch(obj.dtype)
            self.shape = tuple(obj.shape)
            self.strides = tuple(st * self.dtype.itemsize for st in obj.stride())
            self.ptr, self.readonly = obj.data_ptr(), False
        elif interface is not None:
            try:
                self.shape = tuple(int(n) for n in interface["shape"])
                self.dtype = np.dtype(interface["typestr"])
                ptr, readonly = interface["data"]
                self.ptr, self.readonly = int(ptr), bool(readonly)
                strides = interface.get("strides")
                self.strides = tuple(int(st) for st in strides) if strides is not None else \
                    c_strides(self.shape, self.dtype.itemsize)
            except Exception as exc:
                raise TypeError(f"{name} has a malformed __cuda_array_interface__ "
                                f"({type(exc).__name__}: {exc})") from None
            if len(self.strides) != len(self.shape) or any(n < 0 for n in self.shape):
                raise TypeError(f"{name} has a malformed __cuda_array_interface__ (shape "
                                f"{self.shape}, strides {self.strides})")
        else:  # the simulator's arrays wrap a NumPy array
            host = obj._ary
            self.shape, self.dtype, self.strides = host.shape, host.dtype, host.strides
            self.ptr, self.readonly = host.ctypes.data, not host.flags.writeable
        self.device = device_index(obj)

    def extent(self):
        lo = hi = self.ptr
        for n, s in zip(self.shape, self.strides):
            lo, hi = (lo + s * (n - 1), hi) if s < 0 else (lo, hi + s * (n - 1))
        return lo, hi + self.dtype.itemsize

    def same_memory(self, other):
        return (self.ptr, self.shape, self.strides) == (other.ptr, other.shape, other.strides)

    def overlaps(self, other):
        if not math.prod(self.shape) or not math.prod(other.shape):
            return False
        (a0, a1), (b0, b1) = self.extent(), other.extent()
        return a0 < b1 and b0 < a1

    def orders(self):
        """(C-contiguous, F-contiguous), worked out once."""
        if self._orders is None:
            self._orders = (_contiguous(reversed(self.shape), reversed(self.strides),
                                        self.dtype.itemsize),
                            _contiguous(self.shape, self.strides, self.dtype.itemsize))
        return self._orders


def _contiguous(shape, strides, itemsize):
    """Each axis of more than one element steps over all the axes before it, packed (an empty
    array's strides say nothing about its order: it is contiguous)."""
    step, packed = itemsize, True
    for n, s in zip(shape, strides):
        if n == 0:
            return True
        packed = packed and (n <= 1 or s == step)
        step *= n
    return packed


@functools.lru_cache(maxsize=None)
def numpy_dtype_of_torch(dtype):
    """The NumPy dtype of a torch dtype (bfloat16: ml_dtypes'; one NumPy lacks, such as float8:
    a void dtype of its size, which validation refuses)."""
    name = str(dtype).removeprefix("torch.")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype((np.void, dtype.itemsize))


def check_device_arrays(named_views):
    """CUDA arrays of one call must be on one GPU; numba's (and other producers') arrays must be
    contiguous, and in one memory order with the call's other arrays: the GPU backend copies CuPy
    and PyTorch arrays of other layouts with their own library, but has no copy for those."""
    views = [(n, v) for n, v in named_views if isinstance(v, DeviceView)]
    located = [(n, v.device) for n, v in views if v.device is not None]
    for name, device in located[1:]:
        if device != located[0][1]:
            raise ValueError(f"{name} is on CUDA device {device} but {located[0][0]} is on "
                             f"device {located[0][1]}; move them to one device")
    orders = [v.orders() for _, v in views]
    for (name, v), (c, f) in zip(views, orders):
        if v.library not in LIBRARIES and not (c or f):
            raise TypeError(f"{name} is a strided {v.library} device array: make it contiguous "
                            "first (CuPy arrays and PyTorch tensors of any layout are accepted)")
    if any(v.library not in LIBRARIES for _, v in views) and \
            not (all(c for c, _ in orders) or all(f for _, f in orders)):
        names = " and ".join(n for n, _ in views)
        raise TypeError(f"{names} mix C and Fortran memory orders, which numba device arrays "
                        "cannot be copied between: give them one order")


def c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
