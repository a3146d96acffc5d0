"""Expression nodes: one interned node type, built with ordinary Python operators.

    g = grad.cast(F32) * scale
    new_p = param - lr * g

Nodes are interned: building the same expression twice gives the same object, so shared
subexpressions are shared nodes, equality is identity, and hashing is O(1).
Binary operators require both sides to have the same dtype (a Python number takes the other
side's dtype); a rule casts explicitly, so that every conversion is visible in its dump.
"""

from __future__ import annotations

import weakref
from typing import Union

from .dtypes import DType
from .ops import BINARY, LEAVES, REDUCE, UNARY, Op

Operand = Union["Expr", int, float]


class Expr:
    """One node of an update rule: `op` applied to `src`, producing `dtype`.

    `arg` holds the leaf's name (TENSOR, SCALAR, PER_TENSOR), the literal (CONST) or nothing.
    `elementwise` is True when the value differs per element (it reads a tensor outside a SUM);
    otherwise the value is uniform over a tensor and a kernel computes it once per tensor.
    """

    __slots__ = ("op", "dtype", "src", "arg", "elementwise", "__weakref__")
    _interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    op: Op
    dtype: DType
    src: tuple[Expr, ...]
    arg: str | float | None
    elementwise: bool

    def __new__(cls, op: Op, dtype: DType, src: tuple[Expr, ...] = (), arg=None) -> Expr:
        if op is Op.CONST:
            arg = float(arg)
        # a literal is keyed by its bits' text: 0.0 == -0.0 would merge the two zeros, and
        # nan != nan would never intern a NaN
        key = (op, dtype, src, arg.hex() if op is Op.CONST else arg)
        node = cls._interned.get(key)
        if node is None:
            _check(op, dtype, src, arg)
            node = object.__new__(cls)
            node.op, node.dtype, node.src, node.arg = op, dtype, src, arg
            node.elementwise = op is Op.TENSOR or (
                op is not Op.SUM and any(s.elementwise for s in src)
            )
            cls._interned[key] = node
        return node

    # -- construction helpers -------------------------------------------------------------
    def cast(self, dtype: DType) -> Expr:
        return self if dtype is self.dtype else Expr(Op.CAST, dtype, (self,))

    def sqrt(self) -> Expr:
        return Expr(Op.SQRT, self.dtype, (self,))

    def sum(self) -> Expr:
        """Sum over all elements of the tensor, accumulated in float64."""
        return Expr(Op.SUM, DType.F64, (self.cast(DType.F64),))

    def _binary(self, op: Op, other: Operand, reflected: bool = False) -> Expr:
        other = _lift(other, self.dtype)
        a, b = (other, self) if reflected else (self, other)
        if a.dtype is not b.dtype:
            raise TypeError(
                f"{op.value}: operand dtypes differ ({a.dtype} and {b.dtype}); cast one"
            )
        return Expr(op, DType.BOOL if op is Op.CMPLT else a.dtype, (a, b))

    def __add__(self, o: Operand) -> Expr:
        return self._binary(Op.ADD, o)

    def __radd__(self, o: Operand) -> Expr:
        return self._binary(Op.ADD, o, True)

    def __sub__(self, o: Operand) -> Expr:
        return self._binary(Op.SUB, o)

    def __rsub__(self, o: Operand) -> Expr:
        return self._binary(Op.SUB, o, True)

    def __mul__(self, o: Operand) -> Expr:
        return self._binary(Op.MUL, o)

    def __rmul__(self, o: Operand) -> Expr:
        return self._binary(Op.MUL, o, True)

    def __truediv__(self, o: Operand) -> Expr:
        return self._binary(Op.DIV, o)

    def __rtruediv__(self, o: Operand) -> Expr:
        return self._binary(Op.DIV, o, True)

    def __neg__(self) -> Expr:
        return Expr(Op.NEG, self.dtype, (self,))

    def __abs__(self) -> Expr:
        return Expr(Op.ABS, self.dtype, (self,))

    def __lt__(self, o: Operand) -> Expr:
        return self._binary(Op.CMPLT, o)

    def __gt__(self, o: Operand) -> Expr:
        return self._binary(Op.CMPLT, o, True)

    def __bool__(self) -> bool:
        raise TypeError("an IR expression has no truth value; use where(cond, a, b)")

    def __repr__(self) -> str:
        if self.op is Op.CONST:
            return f"{self.arg!r}:{self.dtype}"
        if self.op in LEAVES:
            return f"{self.op.value}({self.arg}):{self.dtype}"
        return f"{self.op.value}({', '.join(map(repr, self.src))})"


def _lift(x: Operand, dtype: DType) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return const(x, dtype)
    raise TypeError(f"cannot use {type(x).__name__} in an IR expression")


def _check(op: Op, dtype: DType, src: tuple[Expr, ...], arg) -> None:
    arity = 0 if op in LEAVES else 1 if op in UNARY | REDUCE else 2 if op in BINARY else 3
    if len(src) != arity:
        raise TypeError(f"{op.value} takes {arity} operands, got {len(src)}")
    if op in LEAVES and op is not Op.CONST and not (isinstance(arg, str) and arg.isidentifier()):
        raise ValueError(f"{op.value}: a leaf needs an identifier name, got {arg!r}")
    if op in (Op.SQRT, Op.NEG, Op.ABS) and not dtype.is_float:
        raise TypeError(f"{op.value} needs a float operand")
    if op is Op.SUM:
        if src[0].dtype is not DType.F64:
            raise TypeError("sum accumulates float64: cast its operand")
        if _contains_sum(src[0]):
            raise ValueError("a sum may not contain another sum (one reduction pass per kernel)")
    if op is Op.WHERE:
        cond, a, b = src
        if cond.dtype is not DType.BOOL or a.dtype is not b.dtype or a.dtype is not dtype:
            raise TypeError("where(cond, a, b) needs a bool cond and a, b of the same dtype")


def _contains_sum(root: Expr) -> bool:
    seen, todo = set(), [root]
    while todo:
        e = todo.pop()
        if e.op is Op.SUM:
            return True
        if id(e) not in seen:
            seen.add(id(e))
            todo.extend(e.src)
    return False


# -- leaves and free functions ----------------------------------------------------------------
def tensor(name: str, dtype: DType) -> Expr:
    """One element of the tensor slot `name` (stored as `dtype`)."""
    return Expr(Op.TENSOR, dtype, arg=name)


def scalar(name: str, dtype: DType) -> Expr:
    """The group hyperparameter `name`, a kernel argument: changing its value compiles nothing."""
    return Expr(Op.SCALAR, dtype, arg=name)


def per_tensor(name: str, dtype: DType) -> Expr:
    """A value set per tensor in the launch table (for example: is this its first step?)."""
    return Expr(Op.PER_TENSOR, dtype, arg=name)


def const(value: float, dtype: DType) -> Expr:
    return Expr(Op.CONST, dtype, arg=value)


def where(cond: Expr, a: Operand, b: Operand) -> Expr:
    ref = a if isinstance(a, Expr) else b
    if not isinstance(ref, Expr):
        raise TypeError("where needs at least one expression among a and b")
    a, b = _lift(a, ref.dtype), _lift(b, ref.dtype)
    return Expr(Op.WHERE, a.dtype, (cond, a, b))


def maximum(a: Expr, b: Operand) -> Expr:
    return a._binary(Op.MAX, b)


def minimum(a: Expr, b: Operand) -> Expr:
    return a._binary(Op.MIN, b)


def sqrt(a: Expr) -> Expr:
    return a.sqrt()
