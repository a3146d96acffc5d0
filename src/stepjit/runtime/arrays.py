"""What the library needs to know about an array, whatever library it comes from.

numpy arrays live on the host ("cpu"); CuPy arrays on a CUDA device ("cuda:N"). CuPy is only
imported when an array's type says it is a CuPy array, so `import stepjit` never imports it.
"""

from __future__ import annotations

import sys

import numpy as np

from ..ir import DType


def _cupy():
    return sys.modules.get("cupy")


def is_array(x: object) -> bool:
    if isinstance(x, np.ndarray):
        return True
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def device(x) -> str:
    """'cpu' for host arrays, 'cuda:N' for CuPy arrays."""
    if isinstance(x, np.ndarray):
        return "cpu"
    return f"cuda:{x.device.id}"


_DTYPES: dict = {}


def dtype(x) -> DType | None:
    """The IR dtype of an array, or None for dtypes the library does not update (int, complex)."""
    try:
        return _DTYPES[x.dtype]
    except KeyError:
        d = DType.from_numpy(x.dtype)
        d = None if d is None or d is DType.BOOL else d
        _DTYPES[x.dtype] = d
        return d


def data_ptr(x) -> int:
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    return x.data.ptr


def is_writeable(x) -> bool:
    return bool(x.flags.writeable) if isinstance(x, np.ndarray) else True


def is_contiguous(x) -> bool:
    return bool(x.flags.c_contiguous)


def byte_span(x) -> tuple[int, int]:
    """[start, end) of the bytes a contiguous array occupies."""
    start = data_ptr(x)
    return start, start + x.size * x.dtype.itemsize


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two non-empty byte spans share a byte."""
    return a[0] < b[1] and b[0] < a[1] and a[0] < a[1] and b[0] < b[1]


def zeros(like, shape, dt: DType):
    """A zero-filled array of `shape` and `dt` on the same device as `like`."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dt.to_numpy())
    cp = _cupy()
    with cp.cuda.Device(like.device.id):
        return cp.zeros(shape, dt.to_numpy())


def flat(x):
    """A 1-D view of a contiguous array (never a copy)."""
    return x.reshape(-1)
