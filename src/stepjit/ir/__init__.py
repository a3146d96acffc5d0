"""The update-rule IR: dtypes, ops, interned expressions, rules and their numpy evaluator.

This package imports nothing else from stepjit: codegen and runtime build on it, never the
reverse.
"""

from .dtypes import DType
from .expr import (
    Expr,
    apply,
    const,
    exp,
    log,
    maximum,
    minimum,
    per_tensor,
    scalar,
    sqrt,
    stochastic_round,
    tanh,
    tensor,
    where,
)
from .interp import evaluate
from .ops import OPS, Op, OpInfo
from .rule import Slot, UpdateRule, stored_as, with_master, with_stochastic_rounding

__all__ = [
    "DType",
    "Expr",
    "OPS",
    "Op",
    "OpInfo",
    "Slot",
    "UpdateRule",
    "stored_as",
    "with_master",
    "with_stochastic_rounding",
    "apply",
    "const",
    "evaluate",
    "exp",
    "log",
    "maximum",
    "minimum",
    "per_tensor",
    "scalar",
    "sqrt",
    "stochastic_round",
    "tanh",
    "tensor",
    "where",
]
