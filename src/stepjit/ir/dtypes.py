"""The element types an update rule can name, and their numpy counterparts."""

from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    """An element type of the IR. The value is the canonical (numpy-style) name."""

    BOOL = "bool"
    F16 = "float16"
    BF16 = "bfloat16"
    F32 = "float32"
    F64 = "float64"
    U8 = "uint8"  # the codes of 8-bit state (`ops.CODE_MAPS`): storage only, never arithmetic
    I8 = "int8"  # host arrays of signed codes (a kernel sees bytes: U8)

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    def __str__(self) -> str:
        return self.value

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def is_float(self) -> bool:
        return self not in (DType.BOOL, DType.U8, DType.I8)

    @property
    def is_half(self) -> bool:
        return self in (DType.F16, DType.BF16)

    @property
    def compute(self) -> DType:
        """The type arithmetic on this storage type runs in: half types compute in float32."""
        return DType.F32 if self.is_half else self

    def to_numpy(self) -> np.dtype:
        if self is DType.BF16:
            return np.dtype(_bfloat16())
        return np.dtype(self.value)

    @staticmethod
    def from_numpy(dtype: object) -> DType | None:
        """The IR type of a numpy dtype, or None when the IR has no such type."""
        try:
            name = np.dtype(dtype).name
        except TypeError:
            return None
        try:
            return DType(name)
        except ValueError:
            return None


def rounded(values, dtype: DType):
    """`values` (a number or an array) rounded to `dtype` as every backend rounds them:
    numpy's astype, to nearest even, but float64 to bfloat16 through float32, twice, as torch
    rounds (ml_dtypes rounds once from version 0.7, through float32 before it)."""
    if dtype is DType.BF16 and np.asarray(values).dtype == np.float64:
        values = np.asarray(values).astype(np.float32)
    np_dtype = dtype.to_numpy()
    if isinstance(values, np.ndarray) and values.ndim:
        return values.astype(np_dtype, copy=False)
    return np_dtype.type(values)


_ITEMSIZE = {DType.BOOL: 1, DType.F16: 2, DType.BF16: 2, DType.F32: 4, DType.F64: 8, DType.U8: 1,
             DType.I8: 1}


def _bfloat16() -> type:
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TypeError("bfloat16 numpy arrays need the ml_dtypes package") from exc
    return ml_dtypes.bfloat16
