"""What the library needs to know about an array, whatever library it comes from.

numpy arrays live on the host ("cpu"); CuPy arrays on a CUDA device ("cuda:N"); torch tensors on
either. CuPy and torch are never imported here: an array is recognised as theirs only when the
module is already loaded (the caller made the array with it), so `import stepjit` imports neither.

Each library has an adapter; `adapter(x)` finds it by the array's type (memoized), so a check over
many tensors pays one dictionary lookup per array.
"""

from __future__ import annotations

import sys

import numpy as np

from ..ir import DType


def _cupy():
    return sys.modules.get("cupy")


def _torch():
    return sys.modules.get("torch")


class _Numpy:
    name = "numpy"

    def __init__(self) -> None:
        self.dtypes: dict = {}

    def device(self, x) -> str:
        return "cpu"

    def dtype(self, x) -> DType | None:
        try:
            return self.dtypes[x.dtype]
        except KeyError:
            d = DType.from_numpy(x.dtype)
            d = self.dtypes[x.dtype] = None if d is None or not d.is_float else d
            return d

    def storage_dtype(self, x) -> DType | None:
        return DType.from_numpy(x.dtype)

    def numel(self, x) -> int:
        return x.size

    def itemsize(self, x) -> int:
        return x.itemsize

    def data_ptr(self, x) -> int:
        return x.ctypes.data

    def writeable(self, x) -> bool:
        return x.flags.writeable

    def contiguous(self, x) -> bool:
        return x.flags.c_contiguous

    def strides(self, x) -> tuple | None:
        """Strides in elements, or None when one is not a whole number of elements."""
        size = x.itemsize
        if any(s % size for s in x.strides):
            return None
        return tuple(s // size for s in x.strides)

    def aligned(self, x) -> bool:
        return x.flags.aligned

    def unsupported(self, x) -> str | None:
        """Why stepjit cannot update x in place whatever its shape or dtype, or None."""
        if not x.dtype.isnative:
            return (f"non-native byte order ({x.dtype.str}); convert it with "
                    "a.astype(a.dtype.newbyteorder('='))")
        return None

    def zeros(self, like, shape, dt: DType):
        return np.zeros(shape, dt.to_numpy())

    def zeros_as(self, like, dt: DType):
        return np.zeros_like(like, dtype=dt.to_numpy(), order="K")

    def flat(self, x):
        return x.ravel(order="K")

    def copy(self, x):
        return x.copy()

    def host_view(self, x) -> np.ndarray:
        return x


class _Cupy(_Numpy):
    name = "cupy"

    def device(self, x) -> str:
        return f"cuda:{x.device.id}"

    def data_ptr(self, x) -> int:
        return x.data.ptr

    def aligned(self, x) -> bool:
        return x.data.ptr % x.itemsize == 0

    def writeable(self, x) -> bool:
        return True

    def zeros(self, like, shape, dt: DType):
        cp = _cupy()
        with cp.cuda.Device(like.device.id):
            return cp.zeros(shape, dt.to_numpy())

    def zeros_as(self, like, dt: DType):
        cp = _cupy()
        with cp.cuda.Device(like.device.id):
            return cp.zeros_like(like, dtype=dt.to_numpy(), order="K")

    def host_view(self, x) -> np.ndarray:
        raise TypeError("a CuPy array is not a host array")


class _Torch:
    name = "torch"

    def __init__(self) -> None:
        t = _torch()
        self.dtypes = {t.float16: DType.F16, t.bfloat16: DType.BF16, t.float32: DType.F32,
                       t.float64: DType.F64}
        self.torch_dtypes = {v: k for k, v in self.dtypes.items()}
        self.torch_dtypes.update({DType.U8: t.uint8, DType.I8: t.int8})  # 8-bit state's codes

    def device(self, x) -> str:
        d = x.device
        return "cpu" if d.type == "cpu" else f"{d.type}:{d.index or 0}"

    def dtype(self, x) -> DType | None:
        return self.dtypes.get(x.dtype)

    def storage_dtype(self, x) -> DType | None:
        return self.dtypes.get(x.dtype) or {self.torch_dtypes[DType.U8]: DType.U8,
                                            self.torch_dtypes[DType.I8]: DType.I8}.get(x.dtype)

    def numel(self, x) -> int:
        return x.numel()

    def itemsize(self, x) -> int:
        return x.element_size()

    def data_ptr(self, x) -> int:
        return x.data_ptr()

    def writeable(self, x) -> bool:
        return True

    def contiguous(self, x) -> bool:
        return x.is_contiguous()

    def strides(self, x) -> tuple:
        return x.stride()

    def aligned(self, x) -> bool:
        return x.data_ptr() % x.element_size() == 0

    def unsupported(self, x) -> str | None:
        """Why stepjit cannot update x in place whatever its shape or dtype, or None."""
        t = _torch()
        if x.layout != t.strided:
            return (f"layout {x.layout} is not supported: stepjit updates dense tensors "
                    "(sparse gradients come from e.g. nn.Embedding(sparse=True): use the default)")
        if x.is_neg():
            return ("the tensor has torch's negative bit (a lazily negated view, e.g. from "
                    "x.conj().imag): its memory holds -x; pass x.resolve_neg()")
        if x.device.type not in ("cpu", "cuda"):
            return (f"tensors on the {x.device.type!r} device are not supported (stepjit "
                    "updates cpu and cuda tensors)")
        return None

    def zeros(self, like, shape, dt: DType):
        return _torch().zeros(shape, dtype=self.torch_dtypes[dt], device=like.device)

    def zeros_as(self, like, dt: DType):
        t = _torch()
        return t.zeros_like(like, dtype=self.torch_dtypes[dt], memory_format=t.preserve_format,
                            requires_grad=False)

    def flat(self, x):
        return x.detach().as_strided((x.numel(),), (1,))

    def copy(self, x):
        return x.detach().clone(memory_format=_torch().preserve_format)

    def check_parameter(self, where: str, x, as_torch: bool = False) -> None:
        """Raise unless tensor `x` can be a parameter: real, strided, on cpu or cuda, a leaf
        that requires grad. `as_torch`: what torch.optim accepts too (torch checked the
        rest), a tensor that does not require grad (skipped while it has no gradient), is not a
        leaf (differentiable=True) or is on the meta device (deferred initialization:
        materialized before the first step)."""
        if as_torch and x.device.type == "meta" and x.layout == _torch().strided:
            return
        if x.is_complex():
            raise ValueError(f"{where}: complex parameters are not supported (stepjit updates "
                             f"real floating-point tensors; got {x.dtype}); optimize "
                             "torch.view_as_real(p) instead")
        if (problem := self.unsupported(x)) is not None:
            raise ValueError(f"{where}: {problem}")
        if not (x.is_leaf or as_torch):
            raise ValueError(f"{where}: the torch tensor is not a leaf (it is computed from "
                             "other tensors); optimize the leaf tensors it comes from")
        if not (x.requires_grad or as_torch):
            raise ValueError(f"{where}: the torch tensor does not require grad")

    @staticmethod
    def addresses(params, held: list | None = None) -> tuple[list, list]:
        """What torch may change without telling us: each gradient's address (0 for none), and
        per tensor its (address, strides, size in bytes, dtype), then its gradient's (strides,
        size in bytes, dtype) when it has one. torch keeps a gradient's shape, dtype and device
        those of its tensor when it is assigned, and `.data` cannot move a tensor to another
        device in place; the sizes and dtypes here catch a `.data` that was replaced in place.

        Launch tables of torch parameters do not keep gradients alive (`Launch.forget`), so that
        `zero_grad(set_to_none=True)` frees them and backward can reuse the memory. Gradients
        whose entries differ from the bound ones only in their addresses are new tensors of the
        same kind, which a launch can be re-pointed at; anything else (a gradient laid out
        otherwise, `.data` replaced, resized or transposed) means the tensor is checked again.
        """
        try:
            grads = [p.grad for p in params]
            if held is not None:  # the addresses stay theirs while the caller holds them
                held.append(grads)
            return [0 if g is None else g.data_ptr() for g in grads], [
                (p.data_ptr(), p.stride(), p.nbytes, p.dtype) if g is None
                else (p.data_ptr(), p.stride(), p.nbytes, p.dtype, g.stride(), g.nbytes, g.dtype,
                      g.is_neg())
                for p, g in zip(params, grads)
            ]
        except (RuntimeError, AttributeError):  # a sparse gradient, a tensor of another kind:
            # entries equal to nothing: a rebuild's checks name the culprit
            return [0] * len(params), [(object(),) * 4 for _ in params]

    def host_view(self, x) -> np.ndarray:
        t = _torch()
        x = x.detach()
        if x.dtype == t.bfloat16:
            return x.view(t.int16).numpy().view(DType.BF16.to_numpy())
        return x.numpy()


_NUMPY = _Numpy()
_ADAPTERS: dict[type, object] = {np.ndarray: _NUMPY}


def adapter(x):
    """The adapter for x's library, or None when x is not an array stepjit knows."""
    try:
        return _ADAPTERS[type(x)]
    except KeyError:
        pass
    found = None
    if isinstance(x, np.ndarray):
        found = _NUMPY
    elif (cp := _cupy()) is not None and isinstance(x, cp.ndarray):
        found = _Cupy()
    elif (t := _torch()) is not None and isinstance(x, t.Tensor):
        found = _Torch()
    if found is not None:
        _ADAPTERS[type(x)] = found
    return found


def _of(x):
    a = adapter(x)
    if a is None:
        raise TypeError(f"{type_name(x)} is not an array stepjit can update")
    return a


def is_array(x: object) -> bool:
    return adapter(x) is not None


def is_torch(x: object) -> bool:
    a = adapter(x)
    return a is not None and a.name == "torch"


def is_parameter(x: object) -> bool:
    """Whether x is a tensor that is its own parameter (torch's), rather than an array a
    `stepjit.Parameter` holds."""
    return is_torch(x)


def check_parameter(where: str, x, as_torch: bool = False) -> None:
    """Raise TypeError or ValueError unless x can be updated as a parameter by itself
    (`as_torch`: see `_Torch.check_parameter`)."""
    if not is_parameter(x):
        raise TypeError(f"{where}: expected stepjit.Parameter or a torch tensor, "
                        f"got {type_name(x)}")
    _of(x).check_parameter(where, x, as_torch)


def addresses(params, held: list | None = None) -> tuple[list, list]:
    """Where the gradient and values of each tensor parameter live (see `_Torch.addresses`);
    the gradients read are appended to `held`, which keeps them (and so their addresses)."""
    return _Torch.addresses(params, held)


def type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def device(x) -> str:
    """'cpu' for host arrays, 'cuda:N' for device arrays."""
    return _of(x).device(x)


def dtype(x) -> DType | None:
    """The IR dtype of an array, or None for dtypes the library does not update (int, complex)."""
    return _of(x).dtype(x)


def storage_dtype(x) -> DType | None:
    """The IR type of x's elements, including the integer types of 8-bit state's codes (which
    `dtype` leaves out: they are never parameters or gradients)."""
    return _of(x).storage_dtype(x)


def numel(x) -> int:
    return _of(x).numel(x)


def itemsize(x) -> int:
    return _of(x).itemsize(x)


def data_ptr(x) -> int:
    return _of(x).data_ptr(x)


def is_writeable(x) -> bool:
    return _of(x).writeable(x)


def is_contiguous(x) -> bool:
    return _of(x).contiguous(x)


def layout(x) -> tuple | None:
    """How x's elements fill memory, when they fill [data_ptr, data_ptr + nbytes) exactly, with
    no gap, overlap or negative stride: C order, or any other order of the dimensions
    (torch's channels_last, a transposed view of a contiguous array). Two arrays of one shape
    and layout hold element i at the same offset, so an elementwise kernel may walk both as
    flat buffers. The layout is the strides in elements, 0 for dimensions of size 1 (their
    stride is never used); None when x is not dense."""
    a = _of(x)
    strides = a.strides(x)
    if strides is None:
        return None
    shape = tuple(x.shape)
    key = tuple(s if n > 1 else 0 for n, s in zip(shape, strides))
    expected = 1
    for s, n in sorted((s, n) for s, n in zip(key, shape) if n > 1):
        if s != expected:
            return None
        expected *= n
    return key


def is_dense(x) -> bool:
    """Whether x's elements fill a range of memory exactly (see `layout`)."""
    return layout(x) is not None


def is_aligned(x) -> bool:
    """Whether the data pointer is a multiple of the element size."""
    a = _of(x)
    return a.data_ptr(x) % a.itemsize(x) == 0


def byte_span(x) -> tuple[int, int]:
    """[start, end) of the bytes a dense array occupies."""
    a = _of(x)
    start = a.data_ptr(x)
    return start, start + a.numel(x) * a.itemsize(x)


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two non-empty byte spans share a byte."""
    return a[0] < b[1] and b[0] < a[1] and a[0] < a[1] and b[0] < b[1]


def zeros(like, shape, dt: DType):
    """A zero-filled array of `shape` and `dt`, of the same library and device as `like`."""
    return _of(like).zeros(like, shape, dt)


def zeros_as(like, dt: DType):
    """A zero-filled array of dtype `dt` with the shape, layout, library and device of dense
    array `like` (state for a channels_last parameter is channels_last)."""
    return _of(like).zeros_as(like, dt)


def copy(x):
    """An independent copy of an array, in its own library."""
    return _of(x).copy(x)


def assign(dst, src) -> None:
    """dst[...] = src, converting dtype and library (src may be a list, numpy, cupy or torch)."""
    if isinstance(src, np.ndarray) and not src.dtype.isnative:
        src = src.astype(src.dtype.newbyteorder("="))
    if is_torch(dst):
        t = _torch()
        with t.no_grad():  # a copy of a parameter is state, not part of autograd's graph
            dst.copy_(src if is_torch(src) else t.as_tensor(np.asarray(src)))
    elif is_torch(src):
        dst[...] = host_view(src.detach().cpu())
    else:
        dst[...] = src


def to_host(x) -> np.ndarray:
    """A numpy copy of any array (a device array is copied to the host)."""
    if is_torch(x):
        return np.array(host_view(x.detach().cpu()))
    if adapter(x) is not None and adapter(x).name == "cupy":
        return x.get()
    return np.array(x)


def host_view(x) -> np.ndarray:
    """A numpy array sharing memory with a host array (torch CPU tensors included)."""
    return _of(x).host_view(x)


def flat(x):
    """A 1-D view of a dense array's elements in memory order (never a copy)."""
    return _of(x).flat(x)
