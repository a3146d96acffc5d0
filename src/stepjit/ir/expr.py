"""Expression nodes: one interned node type, built with ordinary Python operators.

    g = grad.cast(F32) * scale
    new_p = param - lr * g

Nodes are interned: building the same expression twice gives the same object, so shared
subexpressions are shared nodes, equality is identity, and hashing is O(1).
Binary operators require both sides to have the same dtype (a Python number takes the other
side's dtype); a rule casts explicitly, so that every conversion is visible in its dump.
Which operands and dtypes each op accepts, and its result's dtype, come from its record in
`ops.OPS`.
"""

from __future__ import annotations

import weakref
from typing import Union

from .dtypes import DType
from .ops import CODE_MAPS, LEAVES, OPS, Kind, Op, Result, accepted

Operand = Union["Expr", int, float]


class Expr:
    """One node of an update rule: `op` applied to `src`, producing `dtype`.

    `arg` holds the leaf's name (TENSOR, SCALAR, PER_TENSOR), the literal (CONST) or nothing.
    `elementwise` is True when the value differs per element (it reads a tensor outside a SUM);
    otherwise the value is uniform over a tensor and a kernel computes it once per tensor (a
    block reduction of a uniform value is its magnitude).
    """

    __slots__ = ("op", "dtype", "src", "arg", "elementwise", "__weakref__")
    _interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    op: Op
    dtype: DType
    src: tuple[Expr, ...]
    arg: str | float | None
    elementwise: bool

    def __new__(cls, op: Op, dtype: DType, src: tuple[Expr, ...] = (), arg=None) -> Expr:
        literal = OPS[op].arg is float
        if literal:
            arg = float(arg)
        # a literal is keyed by its bits' text: 0.0 == -0.0 would merge the two zeros, and
        # nan != nan would never intern a NaN
        key = (op, dtype, src, arg.hex() if literal else arg)
        node = cls._interned.get(key)
        if node is None:
            _check(op, dtype, src, arg)
            node = object.__new__(cls)
            node.op, node.dtype, node.src, node.arg = op, dtype, src, arg
            node.elementwise = op is Op.TENSOR or OPS[op].indexed or (
                OPS[op].kind is not Kind.REDUCE and any(s.elementwise for s in src)
            )
            cls._interned[key] = node
        return node

    # -- construction helpers -------------------------------------------------------------
    def cast(self, dtype: DType) -> Expr:
        """This value converted to `dtype` (rounded to nearest-even; see `OPS[Op.CAST]`)."""
        return self if dtype is self.dtype else Expr(Op.CAST, dtype, (self,))

    def sqrt(self) -> Expr:
        """The square root, correctly rounded."""
        return apply(Op.SQRT, self)

    def exp(self) -> Expr:
        """e to the power of this value."""
        return apply(Op.EXP, self)

    def log(self) -> Expr:
        """The natural logarithm."""
        return apply(Op.LOG, self)

    def tanh(self) -> Expr:
        """The hyperbolic tangent."""
        return apply(Op.TANH, self)

    def sum(self) -> Expr:
        """Sum over all elements of the tensor, accumulated in float64."""
        return apply(Op.SUM, self.cast(DType.F64))

    def _binary(self, op: Op, other: Operand, reflected: bool = False) -> Expr:
        other = _lift(other, self.dtype)
        return apply(op, other, self) if reflected else apply(op, self, other)

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
        return apply(Op.NEG, self)

    def __abs__(self) -> Expr:
        return apply(Op.ABS, self)

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


def apply(op: Op, *operands: Expr) -> Expr:
    """The node `op(*operands)`, its dtype given by the op's record (not for leaves and casts,
    whose dtype is chosen: use `tensor`, `const`, ..., `Expr.cast`)."""
    info = OPS[op]
    if info.result is Result.GIVEN:
        raise TypeError(f"{op.value}: the result dtype is chosen, not derived; build it directly")
    _check_arity(op, len(operands))
    values = operands[1:] if info.condition else operands
    return Expr(op, info.result_dtype(values[0].dtype), tuple(operands))


def _check_arity(op: Op, count: int) -> None:
    if count != OPS[op].arity:
        raise TypeError(f"{op.value} takes {OPS[op].arity} operands, got {count}")


def _check(op: Op, dtype: DType, src: tuple[Expr, ...], arg) -> None:
    """Raise unless `op(src)` of `dtype` is a node its record allows."""
    info = OPS[op]
    _check_arity(op, len(src))
    if info.kind is Kind.LEAF and info.arg is str and not (
            isinstance(arg, str) and arg.isidentifier()):
        raise ValueError(f"{op.value}: a leaf needs an identifier name, got {arg!r}")
    if op is Op.CAST and dtype not in info.accepts:
        raise TypeError(f"cast to {dtype}: codes of 8-bit state are no numbers (DECODE reads "
                        "them, ENCODE writes them)")
    if info.produces is not None:
        if arg not in CODE_MAPS:
            raise ValueError(f"{op.value}: unknown code map {arg!r}: choose "
                             f"{', '.join(map(repr, CODE_MAPS))}")
        if dtype is not info.produces:
            raise TypeError(f"{op.value} gives {info.produces}, not {dtype}")
    if info.condition:
        if src[0].dtype is not DType.BOOL:
            raise TypeError(f"{op.value}: the condition must be bool, not {src[0].dtype}")
        src = src[1:]
    if not src:
        return
    if info.indexed:  # a value and its float64 key
        result = info.produces or DType.BF16
        if (src[0].dtype, src[1].dtype, dtype) != (DType.F32, DType.F64, result):
            raise TypeError(f"{op.value} rounds a float32 value with a float64 key to {result}, "
                            f"not {src[0].dtype} with {src[1].dtype} to {dtype}")
        return
    operand = src[0].dtype
    if any(s.dtype is not operand for s in src):
        raise TypeError(f"{op.value}: operand dtypes differ "
                        f"({', '.join(str(s.dtype) for s in src)}); cast one")
    if operand not in info.accepts:
        raise TypeError(f"{op.value} takes {accepted(info.accepts)} operands, not {operand}")
    if info.result is not Result.GIVEN and dtype is not info.result_dtype(operand):
        raise TypeError(f"{op.value} of {operand} is {info.result_dtype(operand)}, not {dtype}")
    if info.kind is Kind.REDUCE and _contains_reduction(src[0], (Kind.REDUCE, Kind.BLOCK)):
        raise ValueError(f"a {op.value} may not contain another reduction "
                         "(one reduction pass per kernel)")
    if info.kind is Kind.BLOCK and _contains_reduction(src[0], (Kind.BLOCK,)):
        raise ValueError(f"a {op.value} may not contain another block reduction "
                         "(one pass over each block before its values are stored)")


def _contains_reduction(root: Expr, kinds: tuple[Kind, ...]) -> bool:
    seen, todo = set(), [root]
    while todo:
        e = todo.pop()
        if OPS[e.op].kind in kinds:
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
    """The literal `value`, rounded to `dtype`."""
    return Expr(Op.CONST, dtype, arg=value)


def where(cond: Expr, a: Operand, b: Operand) -> Expr:
    """`a` where the bool `cond` is true, else `b` (a Python number takes the other's dtype)."""
    ref = a if isinstance(a, Expr) else b
    if not isinstance(ref, Expr):
        raise TypeError("where needs at least one expression among a and b")
    return apply(Op.WHERE, cond, _lift(a, ref.dtype), _lift(b, ref.dtype))


def stochastic_round(x: Expr, key: Expr) -> Expr:
    """float32 `x` rounded to bfloat16 stochastically, from 16 random bits of (`key`, the
    element's index within its tensor): see `OPS[Op.ROUND_SR]`. `key` is a float64 holding an
    integer in [0, 2**53): a new one every step gives new rounding decisions."""
    return Expr(Op.ROUND_SR, DType.BF16, (x, key))


def block_absmax(x: Expr) -> Expr:
    """The largest magnitude of float32 `x` over the element's block of `ops.QUANT_BLOCK`
    elements (see `OPS[Op.BLOCK_ABSMAX]`): the scale of 8-bit state."""
    return apply(Op.BLOCK_ABSMAX, x)


def encode(x: Expr, code_map: str) -> Expr:
    """The uint8 code of float32 `x` (in [-1, 1]) in `ops.CODE_MAPS[code_map]`."""
    return Expr(Op.ENCODE, DType.U8, (x,), code_map)


def encode_stochastic(x: Expr, key: Expr, code_map: str) -> Expr:
    """The uint8 code of float32 `x` (in [-1, 1]) in `ops.CODE_MAPS[code_map]`, rounded
    stochastically from (`key`, the element's index): see `OPS[Op.ENCODE_SR]`."""
    return Expr(Op.ENCODE_SR, DType.U8, (x, key), code_map)


def decode(code: Expr, code_map: str) -> Expr:
    """The float32 value of uint8 `code` in `ops.CODE_MAPS[code_map]`."""
    return Expr(Op.DECODE, DType.F32, (code,), code_map)


def maximum(a: Expr, b: Operand) -> Expr:
    """The larger of `a` and `b`; NaN if either is NaN; `b` on a tie (see `OPS[Op.MAX]`)."""
    return a._binary(Op.MAX, b)


def minimum(a: Expr, b: Operand) -> Expr:
    """The smaller of `a` and `b`; NaN if either is NaN; `b` on a tie (see `OPS[Op.MIN]`)."""
    return a._binary(Op.MIN, b)


def sqrt(a: Expr) -> Expr:
    """The square root of `a`, correctly rounded."""
    return a.sqrt()


def exp(a: Expr) -> Expr:
    """e to the power `a`."""
    return a.exp()


def log(a: Expr) -> Expr:
    """The natural logarithm of `a`."""
    return a.log()


def tanh(a: Expr) -> Expr:
    """The hyperbolic tangent of `a`."""
    return a.tanh()
