"""The operations of the IR: an enum, and one record per op that says everything about it.

Leaves read the world (a tensor element, a group hyperparameter, a per-tensor value, a literal);
the rest compute. `SUM` is the only reduction: it adds its source over every element of one
tensor, in float64, and its result is a per-tensor value like any other uniform expression.

`OPS[op]` is the one place an op is declared: how many operands it takes and of which dtypes,
the dtype of its result, its numeric definition (a numpy function: the reference interpreter
runs it), its special cases (signed zeros, NaN, ties) as text and as checked examples, what the
compiled backends promise against that definition, and the C math function that computes it.
Expression checks, the interpreter, the C names the CUDA backend reserves and the symbols the
LLVM runtime resolves are all derived from these records; each backend adds only how it spells
the op (`LLVM_OPS` in codegen/llvm.py, `CUDA_OPS` in codegen/cuda.py), and refuses a rule that
uses an op its table lacks.

What the backends promise:

- `ulps == 0` (every op but exp, log, tanh and sum): every backend gives the definition's bits,
  in every dtype the op accepts, NaN aside (any NaN is a NaN: payloads and signs are not kept).
  Float operations round once to nearest-even and keep denormals (IEEE 754); float16 and
  bfloat16 compute in float32 and round the result once, which is exact for these ops. This holds
  for one op; in a rule, the LLVM backend may fuse a multiply and an add into one rounding
  (`contract`), the CUDA backend never does (`-fmad=false`).
- `ulps > 0` (exp, log, tanh): C libraries differ, so backends agree within `ulps` units in the
  last place in float32 and float64 (1 in float16 and bfloat16, computed in float32), and exactly
  on the special values of `examples`. The interpreter evaluates float32 and the half types in
  float64 and rounds once (nearly always the correctly rounded result), float64 with numpy's
  functions; the LLVM backend calls the C library's expf, logf, tanhf, exp, log, tanh (with glibc,
  at most 2 ulps from the interpreter in the tests); CUDA calls its own, documented within 2 ulps
  of the correctly rounded result (expf, tanhf) or 1 (logf, exp, log, tanh).
- `SUM` adds in float64 from +0, in an unspecified order: within (n - 1) * eps * sum(|x|) of the
  exact sum, so two backends within twice that of each other. On CUDA a term that is the product
  of (at most) two float32-or-narrower values is computed in float32 and runs of at most 8 terms
  are added in float32 before their float64 sum (docs/cuda.md): within a further
  9 * 2**-24 * sum(|x|).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .dtypes import DType


class Op(enum.Enum):
    """One operation of the IR; `OPS[op]` describes it. The value is its name in rule text."""

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
    EXP = "exp"
    LOG = "log"
    TANH = "tanh"
    # binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    MAX = "max"
    MIN = "min"
    CMPLT = "cmplt"
    # ternary
    WHERE = "where"
    # reduction
    SUM = "sum"
    # rounding with a random stream: reads the element's index within its tensor
    ROUND_SR = "round_sr"
    # 8-bit state: the block's largest magnitude, and a value's code in a code map (`CODE_MAPS`)
    BLOCK_ABSMAX = "block_absmax"
    ENCODE = "encode"
    ENCODE_SR = "encode_sr"  # stochastically: reads the element's index, like ROUND_SR
    DECODE = "decode"

    def __repr__(self) -> str:
        return f"Op.{self.name}"


class Kind(enum.Enum):
    """Where an op's value comes from."""

    LEAF = "leaf"  # read from the world: a tensor element, an argument, a literal
    ELEMENTWISE = "elementwise"  # computed from its operands' values
    REDUCE = "reduce"  # computed from every element of its operand over a tensor
    BLOCK = "block"  # computed from the elements of its operand in the element's block


class Result(enum.Enum):
    """How the dtype of an op's result follows from its operands."""

    GIVEN = "given"  # chosen by whoever builds the node (leaves, cast)
    OPERAND = "operand"  # the dtype of its operands
    BOOL = "bool"  # a comparison


FLOATS = frozenset(d for d in DType if d.is_float)
ANY = frozenset(DType) - {DType.U8, DType.I8}  # codes are no numbers: only DECODE reads them

Example = tuple[tuple[float, ...], float]
"""(operands, result): a special case every backend must reproduce bit for bit, in every float
dtype the op accepts (True and False are written 1.0 and 0.0). For a reduction, the operands are
the elements of one tensor."""


@dataclass(frozen=True)
class OpInfo:
    """Everything the IR says about one op (see the module docstring)."""

    kind: Kind
    arity: int
    accepts: frozenset[DType]
    """The dtypes its operands may have; all of them have the same one (a condition aside)."""
    result: Result
    definition: Callable | None
    """numpy function of the operands' values (numpy scalars or arrays of the operands' dtype)
    whose value, rounded to nearest-even in the result's dtype, defines the op. None for leaves,
    whose value the interpreter reads from its inputs."""
    semantics: str
    """Signed zeros, NaN and ties, in words."""
    examples: tuple[Example, ...] = ()
    ulps: int = 0
    """0: every backend gives the definition's bits (a reduction: within the float64 summation
    bound); else the tolerance described above."""
    libm: str | None = None
    """The C math function computing it (float versions add `f`): CUDA C calls it by name, LLVM
    lowers its intrinsic to a call of it, which the JIT resolves in the C library."""
    condition: bool = False
    """Whether the first operand is a bool condition, outside `accepts`."""
    arg: type | None = None
    """What a node's `arg` holds: a name (`str`), a literal (`float`) or nothing."""
    indexed: bool = False
    """Whether the value depends on the element's index within its tensor (a random stream):
    the definition takes that index as a last argument, and the node is elementwise even when
    its operands are uniform."""
    produces: DType | None = None
    """The result dtype of an op whose result is GIVEN by the op itself (ENCODE, DECODE):
    their `arg` names a code map (`CODE_MAPS`), which the definition takes first; their
    examples are in the "signed" map."""

    def result_dtype(self, operand: DType) -> DType:
        """The dtype of the result for operands of dtype `operand` (not for GIVEN results)."""
        if self.result is Result.GIVEN:
            raise TypeError("the result dtype of this op is given by whoever builds the node")
        return DType.BOOL if self.result is Result.BOOL else operand

    def tolerance(self, dtype: DType) -> int:
        """Units in the last place of `dtype` by which compiled backends may differ."""
        if not self.ulps:
            return 0
        return 1 if dtype.is_half else self.ulps


# -- definitions the interpreter runs ------------------------------------------------------------
def _same(x):
    return x


def _in_float64(fn: Callable) -> Callable:
    """`fn` evaluated in float64 (rounded once to the operand's dtype by the interpreter)."""

    def definition(x):
        return fn(np.asarray(x, dtype=np.float64))

    definition.__name__ = fn.__name__
    return definition


RANDOM_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
              np.uint64(0x94D049BB133111EB))
"""The multipliers of `random_bits16` (SplitMix64's), which every backend spells."""


def random_bits16(key, index) -> np.ndarray:
    """16 random bits per element: SplitMix64's finalizer of key * golden-ratio + index, its top
    16 bits. `key`: an integer in [0, 2**53) held in a float64; `index`: the element's index
    within its tensor. Every backend computes exactly this (wrapping 64-bit arithmetic)."""
    with np.errstate(over="ignore"):  # 64-bit arithmetic wraps, as it should
        z = np.uint64(int(key)) * RANDOM_MIX[0] + np.asarray(index, np.uint64)
        z = (z ^ (z >> np.uint64(30))) * RANDOM_MIX[1]
        z = (z ^ (z >> np.uint64(27))) * RANDOM_MIX[2]
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(48)).astype(np.uint32)


HASH32 = (np.uint32(0x7FEB352D), np.uint32(0x846CA68B))
"""The multipliers of Wellons' lowbias32 hash (`code_stream`), which every backend spells."""

WEYL32 = np.uint32(0x9E3779B9)
"""2**32 over the golden ratio, rounded to odd: the step of `code_stream` from one element to
the next."""


def lowbias32(x) -> np.ndarray:
    """Wellons' lowbias32 hash of uint32 `x` (wrapping arithmetic)."""
    x = np.asarray(x, np.uint32)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint32(16))) * HASH32[0]
        x = (x ^ (x >> np.uint32(15))) * HASH32[1]
    return x ^ (x >> np.uint32(16))


def code_stream(key, index) -> np.ndarray:
    """32 random bits per element for stochastically rounded codes (ENCODE_SR): a Weyl
    sequence, lowbias32(low 32 bits of the key) + index * WEYL32, wrapping. One addition per
    element (hashing each element cost the 8-bit AdamW step 10-20% of its time): the key's
    hash is computed once per tensor. Rounding needs each element's bits uniform and
    independent from one draw to the next: the key is fresh every step
    (`optim.optimizer.rounding_keys` mixes seed, parameter and step) and each state slot
    hashes its own (key + its position), so they are. Within one step, the elements' bits are
    evenly spread (the golden-ratio step) and the streams of two slots differ by a constant.
    `key`: an integer in [0, 2**53) held in a float64; `index`: the element's index within
    its tensor."""
    with np.errstate(over="ignore"):
        return lowbias32(np.uint32(int(key) % 2**32)) + (
            np.asarray(index).astype(np.uint32) * WEYL32)


def _round_sr(x, key, index):
    """float32 `x` to bfloat16, rounded away from zero with probability equal to the dropped
    low 16 bits over 2**16 (the distance to the lower neighbour over the spacing): add 16 random
    bits to the float32 pattern, truncate. Infinities and NaN round to nearest."""
    x = np.asarray(x, np.float32)
    bits = np.broadcast_to(x, np.shape(index)).view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    up = ((bits + random_bits16(key, index)) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(special, np.broadcast_to(x, np.shape(index)), up)


QUANT_BLOCK = 256
"""Elements per block of 8-bit state: each block keeps one float32 scale, its largest magnitude."""


@dataclass(frozen=True)
class CodeMap:
    """An 8-bit code map: a small floating-point format for values in [-1, 1] (`signed`) or
    [0, 1], scaled by the block's largest magnitude. `exponent` bits hold the binade (bias
    2**exponent - 1, so the top binade is [1, 2), of which only 1.0 is used), `fraction` bits
    the position inside it; the lowest binade is subnormal (evenly spaced down to 0), as in
    IEEE formats. Logarithmic spacing keeps a few bits of relative precision over many orders
    of magnitude (`2**-(2**exponent + fraction - 2)` is the smallest nonzero value); the codes
    are bit patterns, so encoding and decoding are a few integer operations on every backend."""

    name: str
    signed: bool
    exponent: int
    fraction: int

    @property
    def bias(self) -> int:
        return 2 ** self.exponent - 1

    @property
    def top(self) -> int:
        """The code of 1.0 (magnitude bits), the largest an encoding gives."""
        return self.bias << self.fraction

    def magnitudes(self) -> np.ndarray:
        """The float32 value of each magnitude code 0 .. top (increasing)."""
        m = np.arange(self.top + 1)
        field, frac = m >> self.fraction, m & (2 ** self.fraction - 1)
        sub = frac * 2.0 ** (1 - self.bias - self.fraction)
        normal = 2.0 ** (field - self.bias) * (1 + frac / 2 ** self.fraction)
        return np.where(field == 0, sub, normal).astype(np.float32)

    def decode(self, codes) -> np.ndarray:
        """The float32 value of each code (magnitude codes above `top` continue the format)."""
        c = np.asarray(codes, np.uint32)
        mag = c & np.uint32(0x7F if self.signed else 0xFF)
        field, frac = mag >> np.uint32(self.fraction), mag & np.uint32(2 ** self.fraction - 1)
        sub = frac.astype(np.float32) * np.float32(2.0 ** (1 - self.bias - self.fraction))
        normal = (((field + np.uint32(127 - self.bias)) << np.uint32(23))
                  | (frac << np.uint32(23 - self.fraction))).view(np.float32)
        value = np.where(field == 0, sub, normal)
        if self.signed:
            value = np.where(c & np.uint32(0x80), -value, value)
        return value.astype(np.float32)

    def magnitude(self, x) -> np.ndarray:
        """What a code's magnitude bits round, float32: |x| in a signed map, x in an unsigned
        one (negative values give 0), clamped to 1 (so are infinity and NaN: a NaN's code is
        1's, whose block then reads NaN anyway, its scale being NaN)."""
        x = np.asarray(x, np.float32)
        with np.errstate(invalid="ignore"):
            a = np.abs(x) if self.signed else np.where(x < 0, np.float32(0), x)
            return np.where(a <= 1, a, np.float32(1))

    def _signed(self, code: np.ndarray, x) -> np.ndarray:
        """A signed map's code of a negative x (x < 0: not -0, whose code is +0's, and not
        NaN, whose sign bit backends set differently) takes the sign bit."""
        if self.signed:
            with np.errstate(invalid="ignore"):
                negative = np.asarray(x, np.float32) < 0
            code |= np.where(negative, np.uint8(0x80), np.uint8(0))
        return code

    def encode(self, x) -> np.ndarray:
        """The code nearest each float32 `x` (ties to the even code), of `magnitude(x)` and x's
        sign."""
        a = self.magnitude(x).astype(np.float64)
        values = self.magnitudes().astype(np.float64)
        hi = np.clip(np.searchsorted(values, a), 1, self.top)
        lo = hi - 1
        dlo, dhi = a - values[lo], values[hi] - a
        code = np.where((dlo < dhi) | ((dlo == dhi) & (lo % 2 == 0)), lo, hi).astype(np.uint8)
        return self._signed(code, x)

    def encode_stochastic(self, x, stream) -> np.ndarray:
        """The code of each float32 `x` rounded up in magnitude with probability (|x| - down) /
        (up - down), to 2**-20 of the spacing, from `stream` (32 random bits per element,
        `code_stream`): unbiased, so that an average kept in codes drifts no more than one kept
        in floats. Magnitude and sign as `encode`. Defined by the recipe every backend runs, in
        float32 and 32-bit integers, without branches: with a = magnitude(x) and B the bias,
        w = max(a * 2**B + 2 (rounded once), a * 2**(B + 1)) is a float in [2, 2**(B + 1)]
        whose bits above the lowest 23 - F, less 2.0's, are the code below a (the first term
        counts subnormal steps, the second takes over at the smallest normal value); adding
        the stream's low 23 - F bits and truncating rounds up with the dropped fraction's
        probability. (2**(B + 1) * a is the exponent field plus B + 1, which is smaller than
        the first term wherever a is not normal.)"""
        a = self.magnitude(x)
        shift = 23 - self.fraction
        with np.errstate(over="ignore"):
            first = a * np.float32(2.0**self.bias) + np.float32(2)  # a * 2**B is exact
            second = (a.view(np.uint32) + np.uint32((self.bias + 1) << 23)).view(np.float32)
            w = np.maximum(first, second).view(np.uint32)
            r = np.asarray(stream, np.uint32) & np.uint32((1 << shift) - 1)
            code = (w + r - np.uint32(0x40000000)) >> np.uint32(shift)
        return self._signed(code.astype(np.uint8), x)

    def quantize(self, values) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scales) of flat float32 `values`, as a kernel stores them: each block's
        scale its largest magnitude (NaN if it holds a NaN), each code `encode(x * (1 / scale))`."""
        x = np.asarray(values, np.float32).reshape(-1)
        scales = block_absmax(x)[::QUANT_BLOCK].copy()
        with np.errstate(all="ignore"):
            ratio = x * np.repeat(np.float32(1) / scales, QUANT_BLOCK)[: x.size]
        return self.encode(ratio), scales

    def dequantize(self, codes, scales) -> np.ndarray:
        """The float32 values that (codes, scales) hold: decode(code) * its block's scale."""
        c = np.asarray(codes).reshape(-1)
        with np.errstate(all="ignore"):
            return self.decode(c) * np.repeat(np.asarray(scales, np.float32), QUANT_BLOCK)[: c.size]


CODE_MAPS = {
    "signed": CodeMap("signed", True, 4, 3),  # first moments: sign, 4 exponent, 3 fraction bits
    "unsigned": CodeMap("unsigned", False, 5, 3),  # second moments: 5 exponent, 3 fraction bits
}
"""The code maps of 8-bit state, by name (an ENCODE or DECODE node's `arg`)."""


def block_absmax(x) -> np.ndarray:
    """Each element's block's largest magnitude (NaN when the block holds a NaN), float32."""
    x = np.asarray(x, np.float32).reshape(-1)
    padded = np.zeros(-(-x.size // QUANT_BLOCK) * QUANT_BLOCK, np.float32)
    padded[: x.size] = np.abs(x)
    per_block = padded.reshape(-1, QUANT_BLOCK).max(axis=1)  # max propagates NaN
    return np.repeat(per_block, QUANT_BLOCK)[: x.size]


def _encode(name: str, x) -> np.ndarray:
    return CODE_MAPS[name].encode(x)


def _encode_sr(name: str, x, key, index) -> np.ndarray:
    return CODE_MAPS[name].encode_stochastic(x, code_stream(key, index))


def _decode(name: str, codes) -> np.ndarray:
    return CODE_MAPS[name].decode(codes)


def _maximum(a, b):
    """NaN if either is NaN, else the larger; on a tie the second operand."""
    return np.where(np.isnan(a) | np.isnan(b), a + b, np.where(a > b, a, b))


def _minimum(a, b):
    """NaN if either is NaN, else the smaller; on a tie the second operand."""
    return np.where(np.isnan(a) | np.isnan(b), a + b, np.where(a < b, a, b))


def _sum(x):
    return np.sum(x, dtype=np.float64) + 0.0  # from +0, as the kernels add: -0 + -0 is +0


_nan, _inf = float("nan"), float("inf")


def _leaf(arg: type | None, semantics: str) -> OpInfo:
    return OpInfo(Kind.LEAF, 0, ANY, Result.GIVEN, None, semantics, arg=arg)


def _unary(definition, semantics, examples=(), **more) -> OpInfo:
    return OpInfo(Kind.ELEMENTWISE, 1, FLOATS, Result.OPERAND, definition, semantics,
                  tuple(examples), **more)


def _binary(definition, semantics, examples=(), result=Result.OPERAND) -> OpInfo:
    return OpInfo(Kind.ELEMENTWISE, 2, FLOATS, result, definition, semantics, tuple(examples))


OPS: dict[Op, OpInfo] = {
    Op.TENSOR: _leaf(str, "The element of the named tensor slot, as stored."),
    Op.SCALAR: _leaf(str, "The named hyperparameter, a Python float rounded once to the node's "
                          "dtype, to nearest-even (to bfloat16 through float32, as torch "
                          "rounds; to bool: nonzero, NaN included, is true)."),
    Op.PER_TENSOR: _leaf(str, "The named per-tensor value, rounded as a scalar."),
    Op.CONST: _leaf(float, "The literal, rounded as a scalar; -0.0 and NaN are kept."),
    Op.CAST: OpInfo(
        Kind.ELEMENTWISE, 1, ANY, Result.GIVEN, _same,
        "numpy's astype: to nearest-even (float64 to bfloat16 through float32, as torch "
        "does); overflow gives infinity; to bool, nonzero (NaN included) is true; from bool, "
        "1 and 0; the sign of zero and NaN are kept.",
        [((-0.0,), -0.0), ((_nan,), _nan), ((_inf,), _inf)],
    ),
    Op.NEG: _unary(np.negative, "Flips the sign bit: -(+0) is -0, -NaN is NaN.",
                   [((0.0,), -0.0), ((-0.0,), 0.0), ((-_inf,), _inf)]),
    Op.SQRT: _unary(np.sqrt, "IEEE square root, correctly rounded: sqrt(-0) is -0, sqrt(x < 0) "
                             "is NaN, sqrt(inf) is inf.",
                    [((-0.0,), -0.0), ((-1.0,), _nan), ((_inf,), _inf), ((4.0,), 2.0)],
                    libm="sqrt"),
    Op.ABS: _unary(np.abs, "Clears the sign bit: abs(-0) is +0.",
                   [((-0.0,), 0.0), ((-_inf,), _inf), ((_nan,), _nan)], libm="fabs"),
    Op.EXP: _unary(_in_float64(np.exp), "e**x: exp(+-0) is 1, exp(-inf) is +0, exp(inf) is "
                                        "inf; overflow gives inf, underflow denormals or +0.",
                   [((0.0,), 1.0), ((-0.0,), 1.0), ((-_inf,), 0.0), ((_inf,), _inf),
                    ((_nan,), _nan)], ulps=4, libm="exp"),
    Op.LOG: _unary(_in_float64(np.log), "Natural logarithm: log(+-0) is -inf, log(x < 0) is "
                                        "NaN, log(1) is +0, log(inf) is inf.",
                   [((0.0,), -_inf), ((-0.0,), -_inf), ((-1.0,), _nan), ((1.0,), 0.0),
                    ((_inf,), _inf), ((_nan,), _nan)], ulps=4, libm="log"),
    Op.TANH: _unary(_in_float64(np.tanh), "Hyperbolic tangent: odd, tanh(+-0) is +-0, "
                                          "tanh(+-inf) is +-1.",
                    [((0.0,), 0.0), ((-0.0,), -0.0), ((_inf,), 1.0), ((-_inf,), -1.0),
                     ((_nan,), _nan)], ulps=4, libm="tanh"),
    Op.ADD: _binary(np.add, "IEEE a + b: (+0) + (-0) is +0, inf + (-inf) is NaN.",
                    [((0.0, -0.0), 0.0), ((-0.0, -0.0), -0.0), ((_inf, -_inf), _nan)]),
    Op.SUB: _binary(np.subtract, "IEEE a - b: (+0) - (+0) is +0, inf - inf is NaN.",
                    [((0.0, 0.0), 0.0), ((-0.0, 0.0), -0.0), ((_inf, _inf), _nan)]),
    Op.MUL: _binary(np.multiply, "IEEE a * b: the sign is the XOR of the signs, 0 * inf is NaN.",
                    [((-0.0, 3.0), -0.0), ((0.0, _inf), _nan)]),
    Op.DIV: _binary(np.divide, "IEEE a / b: 1 / -0 is -inf, 0 / 0 is NaN.",
                    [((1.0, -0.0), -_inf), ((0.0, 0.0), _nan), ((-1.0, _inf), -0.0)]),
    Op.MAX: _binary(_maximum, "NaN if either operand is NaN, else the larger; on a tie the "
                              "second operand (which shows only for zeros: maximum(+0, -0) "
                              "is -0, maximum(-0, +0) is +0), in every dtype.",
                    [((0.0, -0.0), -0.0), ((-0.0, 0.0), 0.0), ((_nan, 1.0), _nan),
                     ((1.0, _nan), _nan), ((-_inf, 1.0), 1.0)]),
    Op.MIN: _binary(_minimum, "NaN if either operand is NaN, else the smaller; on a tie the "
                              "second operand (minimum(+0, -0) is -0, minimum(-0, +0) is +0), "
                              "in every dtype.",
                    [((0.0, -0.0), -0.0), ((-0.0, 0.0), 0.0), ((_nan, 1.0), _nan),
                     ((1.0, _nan), _nan), ((_inf, 1.0), 1.0)]),
    Op.CMPLT: _binary(np.less, "a < b, ordered: false when either is NaN; -0 < +0 is false.",
                      [((-0.0, 0.0), 0.0), ((_nan, 1.0), 0.0), ((1.0, _nan), 0.0),
                       ((-_inf, _inf), 1.0)], result=Result.BOOL),
    Op.WHERE: OpInfo(
        Kind.ELEMENTWISE, 3, ANY, Result.OPERAND, np.where,
        "cond ? a : b, with the chosen operand's bits (signed zeros and NaN kept).",
        [((1.0, -0.0, 1.0), -0.0), ((0.0, 1.0, _nan), _nan)], condition=True,
    ),
    Op.ROUND_SR: OpInfo(
        Kind.ELEMENTWISE, 2, frozenset({DType.F32}), Result.GIVEN, _round_sr,
        "float32 x to bfloat16, stochastically: rounded up in magnitude with probability "
        "(x - down) / (up - down), from 16 random bits of (key, the element's index): unbiased, "
        "reproducible from the key, the same on every backend and thread count (a NaN's "
        "payload aside, as for every op). The second "
        "operand is the key, a float64 holding an integer in [0, 2**53). Infinities and NaN "
        "round to nearest; finite values in the top spacing may round to infinity.",
        indexed=True,
    ),
    Op.BLOCK_ABSMAX: OpInfo(
        Kind.BLOCK, 1, frozenset({DType.F32}), Result.OPERAND, block_absmax,
        f"The largest magnitude of the operand over the element's block (the {QUANT_BLOCK} "
        f"elements from a multiple of {QUANT_BLOCK} in its tensor, the last block shorter): "
        "NaN when the block holds a NaN, +0 for a block of zeros.",
        [((-2.0, 1.0), 2.0), ((-0.0, -0.0), 0.0), ((_inf, 1.0), _inf), ((1.0, _nan), _nan)],
    ),
    Op.ENCODE: OpInfo(
        Kind.ELEMENTWISE, 1, frozenset({DType.F32}), Result.GIVEN, _encode,
        "The code of `arg`'s code map (CODE_MAPS) nearest x, ties to the even code: "
        "magnitudes above 1 give 1's code, and so does NaN; a negative value in an unsigned "
        "map gives 0; in a signed map, x < 0 sets the sign bit (not -0, nor NaN: its sign "
        "is not portable).",
        [((1.0,), 120.0), ((0.0,), 0.0), ((-0.0,), 0.0), ((_nan,), 120.0), ((3.0,), 120.0),
         ((-_nan,), 120.0), ((-2.0,), 248.0)],
        arg=str, produces=DType.U8,
    ),
    Op.ENCODE_SR: OpInfo(
        Kind.ELEMENTWISE, 2, frozenset({DType.F32}), Result.GIVEN, _encode_sr,
        "The code of `arg`'s code map (CODE_MAPS) below or above x, up with probability "
        "(|x| - below) / (above - below) to 2**-20, from the element's bits of `code_stream` "
        "(the key, the element's index): unbiased, reproducible, the same on every backend "
        "(`CodeMap.encode_stochastic` is the recipe). The second operand is the key (a "
        "float64 integer below 2**53). Clamping, NaN and signs as ENCODE.",
        [((1.0, 0.0), 120.0), ((0.0, 0.0), 0.0), ((-0.0, 0.0), 0.0), ((_nan, 0.0), 120.0),
         ((3.0, 0.0), 120.0), ((-1.0, 7.0), 248.0)],
        arg=str, produces=DType.U8, indexed=True,
    ),
    Op.DECODE: OpInfo(
        Kind.ELEMENTWISE, 1, frozenset({DType.U8}), Result.GIVEN, _decode,
        "The value of a code of `arg`'s code map (CODE_MAPS), exact in float32.",
        [((120.0,), 1.0), ((0.0,), 0.0), ((128.0,), -0.0), ((248.0,), -1.0)],
        arg=str, produces=DType.F32,
    ),
    Op.SUM: OpInfo(
        Kind.REDUCE, 1, frozenset({DType.F64}), Result.OPERAND, _sum,
        "The float64 sum over the tensor's elements, from +0 in an unspecified order: a NaN "
        "or both infinities give NaN, zeros (even all -0) and an empty tensor +0.",
        [((-0.0, -0.0), 0.0), ((1.0, _nan), _nan), ((_inf, -_inf), _nan), ((_inf, 1.0), _inf),
         ((1.0, 2.0), 3.0)],
    ),
}
"""The record of every op."""

LEAVES = frozenset(op for op, info in OPS.items() if info.kind is Kind.LEAF)
CODED = frozenset({Op.ENCODE, Op.ENCODE_SR, Op.DECODE})
"""Ops whose `arg` names a code map (their definitions are the map's)."""

assert OPS.keys() == set(Op), "every op needs its record"


def accepted(dtypes: Iterable[DType]) -> str:
    """Dtype names for an error message, in DType order."""
    wanted = set(dtypes)
    return ", ".join(str(d) for d in DType if d in wanted)
