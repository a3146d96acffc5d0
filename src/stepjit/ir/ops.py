"""The operations of the IR: a small enum that every backend must cover in full.

Leaves read the world (a tensor element, a group hyperparameter, a per-tensor value, a literal);
the rest compute. `SUM` is the only reduction: it adds its source over every element of one
tensor, in float64, and its result is a per-tensor value like any other uniform expression.
"""

from __future__ import annotations

import enum


class Op(enum.Enum):
    # leaves
    TENSOR = "load"  # one element of a named tensor slot
    SCALAR = "arg"  # a named group hyperparameter, passed to the kernel at every launch
    PER_TENSOR = "tensor_arg"  # a named value that differs per tensor (held in the launch table)
    CONST = "const"  # a literal number
    # unary
    CAST = "cast"
    NEG = "neg"
    SQRT = "sqrt"
    ABS = "abs"
    # binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    MAX = "max"  # NaN-propagating, like numpy.maximum
    MIN = "min"  # NaN-propagating, like numpy.minimum
    CMPLT = "cmplt"  # a < b, ordered (false when either is NaN)
    # ternary
    WHERE = "where"  # cond ? a : b
    # reduction
    SUM = "sum"  # sum over the tensor's elements, float64 in and out

    def __repr__(self) -> str:
        return f"Op.{self.name}"


LEAVES = frozenset({Op.TENSOR, Op.SCALAR, Op.PER_TENSOR, Op.CONST})
UNARY = frozenset({Op.CAST, Op.NEG, Op.SQRT, Op.ABS})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.MIN, Op.CMPLT})
TERNARY = frozenset({Op.WHERE})
REDUCE = frozenset({Op.SUM})

assert LEAVES | UNARY | BINARY | TERNARY | REDUCE == frozenset(Op)
