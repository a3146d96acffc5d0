"""The update-rule IR: dtypes, ops, interned expressions, rules and their numpy evaluator.

This package imports nothing else from stepjit: codegen and runtime build on it, never the
reverse.
"""

from .dtypes import DType
from .expr import Expr, const, maximum, minimum, per_tensor, scalar, sqrt, tensor, where
from .interp import evaluate
from .ops import Op
from .rule import Slot, UpdateRule

__all__ = [
    "DType",
    "Expr",
    "Op",
    "Slot",
    "UpdateRule",
    "const",
    "evaluate",
    "maximum",
    "minimum",
    "per_tensor",
    "scalar",
    "sqrt",
    "tensor",
    "where",
]
