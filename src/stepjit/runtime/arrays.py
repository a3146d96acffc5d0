"""What the library needs to know about an array, whatever library it comes from.

numpy arrays live on the host ("cpu"); CuPy arrays on a CUDA device ("cuda:N"); torch tensors on
either. CuPy and torch are never imported here: an array is recognised as theirs only when the
module is already loaded (the caller made the array with it), so `import stepjit` imports neither.
"""

from __future__ import annotations

import sys

import numpy as np

from ..ir import DType


def _cupy():
    return sys.modules.get("cupy")


def _torch():
    return sys.modules.get("torch")


def is_torch(x: object) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def is_cupy(x: object) -> bool:
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def is_array(x: object) -> bool:
    return isinstance(x, np.ndarray) or is_cupy(x) or is_torch(x)


def type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def device(x) -> str:
    """'cpu' for host arrays, 'cuda:N' for device arrays."""
    if isinstance(x, np.ndarray):
        return "cpu"
    if is_torch(x):
        return "cpu" if x.device.type == "cpu" else f"{x.device.type}:{x.device.index or 0}"
    return f"cuda:{x.device.id}"


_DTYPES: dict = {}


def _torch_dtypes() -> dict:
    t = _torch()
    return {t.float16: DType.F16, t.bfloat16: DType.BF16, t.float32: DType.F32,
            t.float64: DType.F64}


def dtype(x) -> DType | None:
    """The IR dtype of an array, or None for dtypes the library does not update (int, complex)."""
    try:
        return _DTYPES[x.dtype]
    except KeyError:
        if is_torch(x):
            d = _torch_dtypes().get(x.dtype)
        else:
            d = DType.from_numpy(x.dtype)
            d = None if d is None or d is DType.BOOL else d
        _DTYPES[x.dtype] = d
        return d


def numel(x) -> int:
    return x.numel() if is_torch(x) else int(x.size)


def itemsize(x) -> int:
    return x.element_size() if is_torch(x) else x.dtype.itemsize


def data_ptr(x) -> int:
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    if is_torch(x):
        return x.data_ptr()
    return x.data.ptr


def is_writeable(x) -> bool:
    return bool(x.flags.writeable) if isinstance(x, np.ndarray) else True


def is_contiguous(x) -> bool:
    return x.is_contiguous() if is_torch(x) else bool(x.flags.c_contiguous)


def is_aligned(x) -> bool:
    """Whether the data pointer is a multiple of the element size."""
    return data_ptr(x) % itemsize(x) == 0


def byte_span(x) -> tuple[int, int]:
    """[start, end) of the bytes a contiguous array occupies."""
    start = data_ptr(x)
    return start, start + numel(x) * itemsize(x)


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two non-empty byte spans share a byte."""
    return a[0] < b[1] and b[0] < a[1] and a[0] < a[1] and b[0] < b[1]


def zeros(like, shape, dt: DType):
    """A zero-filled array of `shape` and `dt`, of the same library and device as `like`."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dt.to_numpy())
    if is_torch(like):
        t = _torch()
        torch_dtype = {v: k for k, v in _torch_dtypes().items()}[dt]
        return t.zeros(shape, dtype=torch_dtype, device=like.device)
    cp = _cupy()
    with cp.cuda.Device(like.device.id):
        return cp.zeros(shape, dt.to_numpy())


def copy(x):
    """An independent copy of an array, in its own library."""
    return x.detach().clone() if is_torch(x) else x.copy()


def assign(dst, src) -> None:
    """dst[...] = src, converting dtype and library (src may be a list, numpy, cupy or torch)."""
    if is_torch(dst):
        t = _torch()
        dst.copy_(src if is_torch(src) else t.as_tensor(np.asarray(src)))
    elif is_torch(src):
        dst[...] = host_view(src.detach().cpu())
    else:
        dst[...] = src


def host_view(x) -> np.ndarray:
    """A numpy array sharing memory with a host array (torch CPU tensors included)."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        x = x.detach()
        if x.dtype == _torch().bfloat16:
            return x.view(_torch().int16).numpy().view(DType.BF16.to_numpy())
        return x.numpy()
    raise TypeError(f"{type_name(x)} is not a host array")


def flat(x):
    """A 1-D view of a contiguous array (never a copy)."""
    return x.reshape(-1)
