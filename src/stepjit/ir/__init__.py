"""The update-rule IR: dtypes, ops, interned expressions, rules and their numpy evaluator.

This package imports nothing else from stepjit: codegen and runtime build on it, never the
reverse.
"""

from .dtypes import DType
from .expr import (
    Expr,
    apply,
    block_absmax,
    const,
    decode,
    encode,
    encode_stochastic,
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
from .ops import CODE_MAPS, OPS, QUANT_BLOCK, CodeMap, Op, OpInfo
from .rule import (
    Slot,
    UpdateRule,
    quantized,
    scales_of,
    stored_as,
    with_master,
    with_stochastic_rounding,
)

__all__ = [
    "CODE_MAPS",
    "CodeMap",
    "QUANT_BLOCK",
    "DType",
    "Expr",
    "OPS",
    "Op",
    "OpInfo",
    "Slot",
    "UpdateRule",
    "quantized",
    "scales_of",
    "stored_as",
    "with_master",
    "with_stochastic_rounding",
    "apply",
    "block_absmax",
    "const",
    "decode",
    "encode",
    "encode_stochastic",
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
