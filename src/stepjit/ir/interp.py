"""The numpy evaluator of the IR: the living definition of every op.

Every compiled backend is tested against this file. It evaluates one tensor at a time, in the
dtypes the rule names (float32 arithmetic stays float32), so it is the `reference` backend too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .dtypes import DType
from .expr import Expr
from .ops import Op
from .rule import UpdateRule

NUMPY_OPS: dict[Op, Callable] = {
    Op.NEG: np.negative,
    Op.SQRT: np.sqrt,
    Op.ABS: np.abs,
    Op.ADD: np.add,
    Op.SUB: np.subtract,
    Op.MUL: np.multiply,
    Op.DIV: np.divide,
    Op.MAX: np.maximum,
    Op.MIN: np.minimum,
    Op.CMPLT: np.less,
    Op.WHERE: np.where,
}


def _typed(value, dtype: DType):
    """`value` as a numpy scalar or array of exactly `dtype`."""
    np_dtype = dtype.to_numpy()
    if isinstance(value, np.ndarray) and value.ndim:
        return value.astype(np_dtype, copy=False)
    return np_dtype.type(value)


def evaluate(
    rule: UpdateRule,
    arrays: Mapping[str, np.ndarray],
    scalars: Mapping[str, float],
    per_tensor: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate `rule` over one tensor: `arrays` maps slot names to equal-sized 1-D arrays.

    Returns a fresh array per written slot, in the slot's dtype; nothing is written in place.
    """
    per_tensor = per_tensor or {}
    numel = next(iter(arrays.values())).size if arrays else 0
    values: dict[Expr, object] = {}
    with np.errstate(all="ignore"):
        for n in rule.nodes:
            if n.op is Op.TENSOR:
                v = arrays[n.arg]
            elif n.op is Op.SCALAR:
                v = _typed(scalars[n.arg], n.dtype)
            elif n.op is Op.PER_TENSOR:
                v = _typed(per_tensor[n.arg], n.dtype)
            elif n.op is Op.CONST:
                v = _typed(n.arg, n.dtype)
            elif n.op is Op.CAST:
                v = _typed(values[n.src[0]], n.dtype)
            elif n.op is Op.SUM:
                src = values[n.src[0]]
                v = np.float64(np.sum(np.broadcast_to(src, (numel,)), dtype=np.float64))
            else:
                v = _typed(NUMPY_OPS[n.op](*(values[s] for s in n.src)), n.dtype)
            values[n] = v
    return {
        slot: np.broadcast_to(values[e], (numel,)).astype(e.dtype.to_numpy(), copy=True)
        for slot, e in rule.outputs
    }
