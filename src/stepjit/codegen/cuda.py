"""Lowering of an update rule to CUDA C: a table {op: C expression} and kernel skeletons.

    source = render(rule, templates)   # the complete .cu text: prelude and every kernel
    info = describe(rule)              # kernel names, launch geometry, parameter list

Pure functions without I/O: the kernel skeletons of `codegen_templates/` are given as text
(`Templates`; `stepjit.runtime.gpu` reads them), and nothing here compiles or launches, so every
rule can be lowered and inspected on a machine without a GPU.

The emitted code follows the rule node by node: each computed node `%N` of the rule becomes
`const T vN = ...;  // %N = op ...`, so a dumped kernel reads like the rule's own text (which
heads the file as a comment). Nodes that are uniform over a tensor (hyperparameter arithmetic,
the clip factor) are computed once per block; elementwise nodes run in a lambda called per
element.

Launch layout (one block of `block` threads per chunk of `chunk` elements of one tensor, all the
tensors of a group in one launch; the tables live in device memory):

    tensor_ptrs        uint64 [tensors, slots]       element addresses, slots in rule order
    tensor_numel       int64  [tensors]
    chunk_table        int32  [chunks, 2]            (tensor, chunk index within the tensor);
                                                     a tensor's chunks are consecutive
    per_tensor_values  float64 [tensors, max(1, P)]  the rule's per-tensor values
    chunk_partials     float64 [chunks, max(1, R)]   partial sums of the R reductions

followed by the rule's scalars in `rule.scalars` order, each in its own dtype. `info.kernels`
are launched in that order over the same grid, block and arguments: for a rule with reductions
`partial_sums` (one partial per chunk), `tensor_sums` (each tensor's total, written over the
partials of its first chunk) and `update` (one load of the total per block); else `update`
alone. Sums are added in an order fixed by the block size: deterministic, no atomics.

A rule with per-block values (8-bit state: `blocked`) has a block-structured update kernel
(`update_blocks.cu`): each block of QUANT_BLOCK elements is held by `info.group` consecutive
threads, which reduce it (`block_absmax`) and store its per-block values once; a per-block slot's
column of tensor_ptrs addresses ceil(numel / QUANT_BLOCK) values, element i's at i >> 8.

The capturable variant (`capturable=` the optimizer's `tensor_formulas()`) is for steps captured
in a CUDA graph: its kernels (names ending in `_capturable`) take `const float* lr_source` after
`chunk_partials`; when it is not null, the value the rule uses as `lr` is the `lr` argument
times `*lr_source` (a learning rate that lives on the device). Its `prepare` kernel, launched
first with its own geometry, increments the tensors' step counts and computes the per-tensor
values from the formulas on the device.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..ir import CODE_MAPS, OPS, QUANT_BLOCK, DType, Expr, Op, Slot, UpdateRule, apply
from ..ir.ops import CODED, HASH32, LEAVES, RANDOM_MIX, WEYL32
from . import check_supported

BLOCK = 512
"""Threads per block."""

CHUNK = 65536
"""Elements per chunk: one block updates one chunk of one tensor."""

PREPARE_BLOCK = 256
"""Threads per block of a capturable rule's prepare kernel (one thread per tensor)."""

LR = "lr"
"""The scalar a capturable kernel may scale by the learning rate at `lr_source`."""

FIRST = "first"
"""The per-tensor flag of a buffer's first step: a capturable step derives it from the count."""

STEP = "step"
"""The per-tensor value the formulas of a capturable step read: the tensor's step count, this
step included."""

CTYPES: dict[DType, str] = {
    DType.F32: "float",
    DType.F64: "double",
    DType.F16: "__half",
    DType.BF16: "__nv_bfloat16",
    DType.BOOL: "bool",
    DType.U8: "unsigned char",  # 8-bit codes
    DType.I8: "signed char",  # (signed codes live in int8 host arrays; kernels read them as U8)
}
"""The C type of each IR dtype."""

TEMPLATE_NAMES = ("prelude.cuh", "partial_sums.cu", "tensor_sums.cu", "update.cu", "prepare.cu",
                  "quantized.cuh", "update_blocks.cu")

QUANT_SHIFT = QUANT_BLOCK.bit_length() - 1
"""An element's index shifted right by this many bits: the index of its block's value in a
per-block slot."""

Emitter = Callable[[Expr, Sequence[str]], str]


# -- literals and casts ----------------------------------------------------------------------------
def round_to(value: float, dtype: DType) -> float:
    """`value` rounded to `dtype` as the reference interpreter rounds it (exact as a double)."""
    if dtype is DType.F64:
        return float(value)
    with np.errstate(over="ignore"):  # out of range: infinity, as numpy gives
        if dtype is DType.F16:
            return float(np.float16(value))
        f32 = np.float32(value)
    if dtype is DType.F32 or np.isnan(f32):
        return float(f32)
    # bfloat16 (through float32, as torch rounds): round-to-nearest-even on the bit pattern
    bits = int(np.array(f32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array(bits, np.uint32).view(np.float32))


_SPECIAL_LITERALS = {  # (NaN, infinity) from their bits: NVRTC has no __builtin_nan, ...
    "f": ("__int_as_float(0x7fc00000)", "__int_as_float(0x7f800000)"),
    "": ("__longlong_as_double(0x7ff8000000000000LL)",
         "__longlong_as_double(0x7ff0000000000000LL)"),
}


def _float_literal(value: float, suffix: str) -> str:
    nan, inf = _SPECIAL_LITERALS[suffix]
    if value != value:
        return nan
    if value in (float("inf"), float("-inf")):
        return inf if value > 0 else f"(-{inf})"
    text = repr(value)
    return f"{text}{suffix}" if value >= 0 or text.startswith("-0") else f"({text}{suffix})"


def literal(value: float, dtype: DType) -> str:
    """A C expression for the IR constant `value` of `dtype` (rounded as the interpreter does)."""
    if dtype is DType.BOOL:
        return "true" if value else "false"
    rounded = round_to(value, dtype)
    if dtype is DType.F64:
        return _float_literal(rounded, "")
    text = _float_literal(rounded, "f")
    if dtype is DType.F16:
        return f"__float2half_rn({text})"
    if dtype is DType.BF16:
        return f"__float2bfloat16_rn({text})"
    return text


def _to_float(x: str, dtype: DType) -> str:
    """A half value as the float32 it represents (exact)."""
    return f"__half2float({x})" if dtype is DType.F16 else f"__bfloat162float({x})"


def _from_float(x: str, dtype: DType) -> str:
    """A float32 value rounded to a half type, to nearest even."""
    return f"__float2half_rn({x})" if dtype is DType.F16 else f"__float2bfloat16_rn({x})"


def cast(x: str, src: DType, dst: DType) -> str:
    """C code converting the value `x` from `src` to `dst`, rounding as numpy's astype does
    (never 8-bit codes: the IR refuses such a cast, DECODE and ENCODE convert them)."""
    if src is dst:
        return x
    if dst is DType.BOOL:  # nonzero (NaN included) is true
        return f"({_to_float(x, src) if src.is_half else x} != 0)"
    if src is DType.BOOL:
        return f"({x} ? {literal(1.0, dst)} : {literal(0.0, dst)})"
    if src.is_half:
        as_float = _to_float(x, src)
        return cast(as_float, DType.F32, dst)
    if dst is DType.F64:
        return f"(double){x}"
    if dst is DType.F32:
        return f"(float){x}"
    if dst is DType.F16:  # one rounding from either width, like numpy
        return f"__double2half({x})" if src is DType.F64 else f"__float2half_rn({x})"
    # bfloat16: from float64 through float32, as the reference interpreter (and torch) does
    return _from_float(x if src is DType.F32 else f"(float){x}", DType.BF16)


# -- the op table ----------------------------------------------------------------------------------
def _compute(node: Expr) -> DType:
    """The dtype arithmetic on `node`'s operands runs in: half types compute in float32."""
    return node.src[0].dtype.compute


def _arith(make: Callable[[DType, Sequence[str]], str]) -> Emitter:
    """An emitter for an op whose operands share one dtype; half operands compute in float32
    and the result is rounded back (exact for +, -, *, /, sqrt: float32 has over 2p+2 bits)."""

    def emit(node: Expr, args: Sequence[str]) -> str:
        dtype = node.src[0].dtype
        if not dtype.is_half:
            return make(dtype, args)
        value = make(DType.F32, [_to_float(a, dtype) for a in args])
        return value if node.dtype is DType.BOOL else _from_float(value, dtype)

    return emit


def _leaf_name(node: Expr, args: Sequence[str]) -> str:
    return c_name(str(node.arg))


def _suffix(dtype: DType) -> str:
    return "f" if dtype is DType.F32 else ""


def _libm_call(name: str) -> Emitter:
    """A call of the C math function `name` (`namef` in float32, and for half types)."""
    return _arith(lambda d, a: f"{name}{_suffix(d)}({a[0]})")


def _code_map_call(helper: str, stochastic: bool = False) -> Emitter:
    """A call of `helper` (codegen_templates/quantized.cuh) for the node's code map, its format
    as template arguments: <signed, exponent bits, fraction bits>. `stochastic`: the second
    operand is a key, and the helper takes the element's random bits of it (`code_stream`)."""

    def emit(node: Expr, args: Sequence[str]) -> str:
        m = CODE_MAPS[str(node.arg)]
        form = f"{'true' if m.signed else 'false'}, {m.exponent}, {m.fraction}"
        operands = f"{args[0]}, code_stream({args[1]}, index)" if stochastic else args[0]
        return f"{helper}<{form}>({operands})"

    return emit


CUDA_OPS: dict[Op, Emitter] = {
    # leaves: a slot's element, a kernel argument, a per-tensor local, a literal
    Op.TENSOR: _leaf_name,
    Op.SCALAR: _leaf_name,
    Op.PER_TENSOR: _leaf_name,
    Op.CONST: lambda n, a: literal(float(n.arg), n.dtype),
    Op.CAST: lambda n, a: cast(a[0], n.src[0].dtype, n.dtype),
    Op.NEG: _arith(lambda d, a: f"(-{a[0]})"),
    # sqrt, fabs, exp, log, tanh: the C math function of the op's record
    **{op: _libm_call(info.libm) for op, info in OPS.items() if info.libm},
    Op.ADD: _arith(lambda d, a: f"{a[0]} + {a[1]}"),
    Op.SUB: _arith(lambda d, a: f"{a[0]} - {a[1]}"),
    Op.MUL: _arith(lambda d, a: f"{a[0]} * {a[1]}"),
    Op.DIV: _arith(lambda d, a: f"{a[0]} / {a[1]}"),
    Op.MAX: _arith(lambda d, a: f"nan_max({a[0]}, {a[1]})"),  # NaN-propagating, b on a tie
    Op.MIN: _arith(lambda d, a: f"nan_min({a[0]}, {a[1]})"),
    Op.CMPLT: _arith(lambda d, a: f"{a[0]} < {a[1]}"),  # ordered: false when either is NaN
    Op.WHERE: lambda n, a: f"{a[0]} ? {a[1]} : {a[2]}",
    Op.ROUND_SR: lambda n, a: f"round_sr_bf16({a[0]}, {a[1]}, index)",
    # the tensor's total: reduced before the element loop; its operand is the total's name
    Op.SUM: lambda n, a: a[0],
    # 8-bit state: a block's largest magnitude, reduced over the block's threads before the code
    # that reads it (its operand is the reduction's name); codes to and from float32
    Op.BLOCK_ABSMAX: lambda n, a: a[0],
    Op.DECODE: _code_map_call("decode_code"),
    Op.ENCODE: _code_map_call("encode_code"),
    Op.ENCODE_SR: _code_map_call("encode_code_sr", stochastic=True),
}
"""How each op is written in CUDA C: `emitter(node, operand_expressions) -> expression`."""


_ROUND_SR_HELPER = f"""
#ifndef STEPJIT_ROUND_SR
#define STEPJIT_ROUND_SR
// float32 to bfloat16, stochastically (round_sr): 16 random bits of (key, the element's index
// within its tensor), the top bits of SplitMix64's finalizer of key * golden ratio + index,
// added to the float32 pattern, which is then truncated; infinities and NaN round to nearest.
// The same bits as the interpreter's stepjit.ir.ops.random_bits16.
__device__ __forceinline__ __nv_bfloat16 round_sr_bf16(float x, double key, long long index) {{
    unsigned long long z = (unsigned long long)key * {int(RANDOM_MIX[0]):#x}ull
                           + (unsigned long long)index;
    z = (z ^ (z >> 30)) * {int(RANDOM_MIX[1]):#x}ull;
    z = (z ^ (z >> 27)) * {int(RANDOM_MIX[2]):#x}ull;
    z ^= z >> 31;
    const unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) {{
        return __float2bfloat16_rn(x);
    }}
    return __ushort_as_bfloat16((unsigned short)((bits + (unsigned)(z >> 48)) >> 16));
}}
#endif  // STEPJIT_ROUND_SR
"""


_CODE_STREAM_HELPER = f"""
#ifndef STEPJIT_CODE_STREAM
#define STEPJIT_CODE_STREAM
// 32 random bits of (key, the element's index within its tensor), for encode_code_sr: a Weyl
// sequence from lowbias32 of the key's low 32 bits, plus the index times 2^32 over the golden
// ratio (32-bit wrapping arithmetic). The same bits as the interpreter's
// stepjit.ir.ops.code_stream.
__device__ __forceinline__ unsigned code_stream(double key, long long index) {{
    unsigned x = (unsigned)(unsigned long long)key;
    x = (x ^ (x >> 16)) * {int(HASH32[0]):#x}u;
    x = (x ^ (x >> 15)) * {int(HASH32[1]):#x}u;
    return (x ^ (x >> 16)) + (unsigned)index * {int(WEYL32):#x}u;
}}
#endif  // STEPJIT_CODE_STREAM
"""


# -- names -----------------------------------------------------------------------------------------
_C_MATH = frozenset(
    name for info in OPS.values() if info.libm for name in (info.libm, info.libm + "f")
)
"""The C math functions the op table calls, from the ops' records."""

_RESERVED = _C_MATH | frozenset(
    """alignas alignof and asm auto bool break case catch char class const constexpr continue
    decltype default delete do double else enum explicit export extern false float for friend goto
    if inline int long mutable namespace new noexcept not nullptr operator or private protected
    public register return short signed sizeof static static_assert struct switch template this
    thread_local throw true try typedef typename union unsigned using virtual void volatile while
    xor threadIdx blockIdx blockDim gridDim warpSize min max
    BLOCK CHUNK VEC Pack load_pack store_pack pack_aligned nan_max nan_min block_sum
    index round_sr_bf16 float32_run_ok
    tensor_ptrs tensor_numel chunk_table per_tensor_values chunk_partials chunk tensor numel
    begin end i k aligned spacing wide update accumulate accumulate_exact scratch first_chunk
    n_chunks c partials totals lr_source lr_arg steps n_tensors step_count
    GROUP base early late absmax_bits power_of_two decode_code encode_code encode_code_sr
    code_stream fold_absmax group_barrier group_max""".split()
)


def c_name(name: str) -> str:
    """The C identifier of an IR name (slot, scalar or per-tensor value)."""
    if (name in _RESERVED or re.fullmatch(r"(v\d+(_kept)?|(sum|run|absmax)_\d+)", name)
            or name.startswith("__")):
        return f"{name}_arg"
    return name


def _argument_name(name: str, capturable: bool) -> str:
    """The C parameter of the scalar `name`: a capturable kernel takes lr as `lr_arg` and derives
    the `lr` its code uses from it and `lr_source`."""
    return "lr_arg" if capturable and name == LR else c_name(name)


def _declaration(ctype: str, name: str) -> str:
    """A kernel parameter: pointers restricted, values const."""
    return f"{ctype} __restrict__ {name}" if ctype.endswith("*") else f"const {ctype} {name}"


# -- kernel description ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelInfo:
    """What a launcher needs to know about the kernels `render(rule)` produces.

    `kernels` are launched in that order, each over one block per chunk of `block` threads, with
    the arguments `params` (as the update kernel declares them: the others write chunk_partials).
    A capturable variant's `prepare` kernel runs before them, over
    ceil(n_tensors / prepare_block) blocks of `prepare_block` threads, with `prepare_params`.
    A rule with per-block values (`blocked`) updates each block of QUANT_BLOCK elements with
    `group` consecutive threads.
    """

    rule_name: str
    update: str  # name of the update kernel
    partial_sums: str | None  # name of the partial-sum kernel, when the rule has reductions
    tensor_sums: str | None  # name of the per-tensor total kernel, when the rule has reductions
    kernels: tuple[str, ...]  # the kernels of a step, in launch order
    block: int  # threads per block
    chunk: int  # elements per chunk (one block per chunk)
    vec: int  # elements per thread per wide access
    group: int  # blocked rules: threads per block of QUANT_BLOCK elements (QUANT_BLOCK / vec)
    slots: tuple[str, ...]  # columns of tensor_ptrs
    scalars: tuple[tuple[str, DType], ...]  # trailing kernel arguments, in order
    n_per_tensor: int  # columns of per_tensor_values (at least 1)
    n_reductions: int  # columns of chunk_partials (at least 1)
    params: tuple[tuple[str, str], ...]  # (C type, name) of the parameters of `kernels`
    capturable: bool  # the variant for CUDA graphs: lr_source, names ending in _capturable
    prepare: str | None  # capturable: the kernel that counts steps, computes per-tensor values
    prepare_inputs: tuple[str, ...]  # the scalars the formulas read: prepare's double arguments
    prepare_block: int  # threads per block of `prepare`
    prepare_params: tuple[tuple[str, str], ...]  # (C type, name) of prepare's parameters


_TABLE_PARAMS = (
    ("const unsigned long long*", "tensor_ptrs"),
    ("const long long*", "tensor_numel"),
    ("const int2*", "chunk_table"),
    ("const double*", "per_tensor_values"),
    ("const double*", "chunk_partials"),
)
"""The leading parameters of every kernel of `KernelInfo.kernels`: the launch tables."""

_PREPARE_PARAMS = (
    ("float*", "steps"),
    ("double*", "per_tensor_values"),
    ("const float*", "lr_source"),
    ("int", "n_tensors"),
)
"""The leading parameters of a prepare kernel, before the formulas' scalars."""


def describe(
    rule: UpdateRule,
    *,
    block: int = BLOCK,
    chunk: int = CHUNK,
    capturable: Mapping[str, Expr] | None = None,
) -> KernelInfo:
    """Names, geometry and parameters of the kernels of `rule`, or of its capturable variant
    when `capturable` holds the optimizer's per-tensor formulas (see `render`)."""
    if block % 32 or not 32 <= block <= 1024:
        raise ValueError(f"block must be a multiple of 32 in [32, 1024], got {block}")
    # per-block slots are not moved in packs: one value per block
    widest = max((s.dtype.itemsize for s in rule.slots if not s.per_block), default=4)
    vec = max(1, 16 // widest)
    if chunk <= 0 or chunk % vec:
        raise ValueError(f"chunk must be a positive multiple of {vec}, got {chunk}")
    group = QUANT_BLOCK // vec if blocked(rule) else 0
    if group and chunk % QUANT_BLOCK:
        raise ValueError(f"rule {rule.name} keeps one value per block of {QUANT_BLOCK} "
                         f"elements: chunk must be a multiple of {QUANT_BLOCK}, got {chunk}")
    if group and block % group:
        raise ValueError(f"rule {rule.name}: a block of {QUANT_BLOCK} elements takes {group} "
                         f"threads of {vec} elements: block must be a multiple of {group}, "
                         f"got {block}")
    variant = capturable is not None
    inputs = _prepare_inputs(rule, capturable) if variant else ()

    def name(kernel: str) -> str:
        return f"{rule.name}_{kernel}{'_capturable' if variant else ''}"

    update = name("update")
    sums = (name("partial_sums"), name("tensor_sums")) if rule.reductions else (None, None)
    lr_source = (("const float*", "lr_source"),) if variant else ()
    params = _TABLE_PARAMS + lr_source + tuple(
        (CTYPES[d], _argument_name(n, variant)) for n, d in rule.scalars
    )
    prepare = name("prepare") if variant else None  # it also counts steps: RMSprop has no values
    prepare_params = _PREPARE_PARAMS + tuple(("double", _argument_name(n, True)) for n in inputs)
    return KernelInfo(
        rule_name=rule.name,
        update=update,
        partial_sums=sums[0],
        tensor_sums=sums[1],
        kernels=(*sums, update) if rule.reductions else (update,),
        block=block,
        chunk=chunk,
        vec=vec,
        group=group,
        slots=tuple(s.name for s in rule.slots),
        scalars=rule.scalars,
        n_per_tensor=max(1, len(rule.per_tensor)),
        n_reductions=max(1, len(rule.reductions)),
        params=params,
        capturable=variant,
        prepare=prepare,
        prepare_inputs=inputs,
        prepare_block=PREPARE_BLOCK,
        prepare_params=prepare_params if prepare else (),
    )


def blocked(rule: UpdateRule) -> bool:
    """Whether `rule` has per-block values (8-bit state): per-block slots or block reductions.
    Its update kernel is then block-structured (`update_blocks.cu`): a block's elements stay with
    one group of threads, which reduce them and store the block's values once."""
    return bool(rule.block_reductions) or any(s.per_block for s in rule.slots)


def _prepare_inputs(rule: UpdateRule, formulas: Mapping[str, Expr]) -> tuple[str, ...]:
    """The scalars `formulas` read, sorted by name. ValueError unless the formulas are for
    per-tensor values of `rule` and cover all of them but `first` (derived from the step count),
    and read float64 scalars and `per_tensor("step", F64)` only."""
    names = rule.per_tensor_names
    unknown = sorted(set(formulas) - set(names))
    if unknown:
        raise ValueError(f"rule {rule.name} has no per-tensor value {', '.join(unknown)}: "
                         "a formula was given for it")
    missing = [n for n in names if n not in formulas and n != FIRST]
    if missing:
        raise ValueError(f"rule {rule.name}: no formula for the per-tensor value "
                         f"{', '.join(missing)}, which a capturable step computes on the device")
    inputs = set()
    for node in _reachable(list(formulas.values()), through_sums=True):
        if node.op is Op.SCALAR and node.dtype is DType.F64:
            inputs.add(str(node.arg))
        elif node.op in (Op.TENSOR, Op.SCALAR, Op.PER_TENSOR, Op.SUM) and not (
            node.op is Op.PER_TENSOR and node.arg == STEP and node.dtype is DType.F64
        ):
            raise ValueError(f"rule {rule.name}: a per-tensor formula reads float64 scalars and "
                             f"per_tensor({STEP!r}, float64) only, not {node!r}")
    return tuple(sorted(inputs))


# -- templates -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Templates:
    """The kernel skeletons, as text: `TEMPLATE_NAMES` in that order."""

    prelude: str
    partial_sums: str
    tensor_sums: str
    update: str
    prepare: str
    quantized: str  # helpers of blocked rules, included after the prelude
    update_blocks: str  # the update kernel of blocked rules

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Templates:
        """From the texts of `TEMPLATE_NAMES`, in that order."""
        return cls(*texts)


# -- lowering --------------------------------------------------------------------------------------
def _reachable(roots: Sequence[Expr], *, through_sums: bool) -> set[Expr]:
    """Nodes needed to compute `roots`; a SUM is a leaf unless `through_sums`."""
    seen: set[Expr] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op is not Op.SUM or through_sums:
            todo.extend(node.src)
    return seen


def _block_reductions(rule: UpdateRule) -> list[Expr]:
    """The block reductions the update kernel computes across threads: those of an operand
    uniform over the tensor are its magnitude, computed with the uniform values."""
    return [n for n in rule.block_reductions if n.elementwise]


class _Lowering:
    """The statements of one kernel: per-block (uniform) values and per-element values."""

    def __init__(self, rule: UpdateRule, needed: set[Expr]) -> None:
        self.rule = rule
        self.index = {n: i for i, n in enumerate(rule.nodes)}
        self.blocks = _block_reductions(rule)
        self.names: dict[Expr, str] = {}
        self.uniform: list[str] = []
        self.elementwise: list[str] = []
        self.statements: dict[Expr, str] = {}  # the elementwise ones, by node
        for node in rule.nodes:
            if node in needed:
                self._emit(node)

    def describe(self, node: Expr) -> str:
        """`node` as the rule's text writes it: `%N = op %A, %B : dtype`."""
        operands = ", ".join(f"%{self.index[s]}" for s in node.src)
        code_map = f" map {node.arg}" if node.op in CODED else ""
        return f"%{self.index[node]} = {node.op.value} {operands}{code_map} : {node.dtype}"

    def _emit(self, node: Expr) -> None:
        if node.op in LEAVES:
            self.names[node] = CUDA_OPS[node.op](node, ())
            return
        if node.op is Op.SUM:  # reduced before the element loop
            k = self.rule.reductions.index(node)
            self.names[node] = CUDA_OPS[Op.SUM](node, [f"sum_{k}"])
            return
        if node in self.blocks:  # reduced over the block's threads (update_blocks.cu)
            k = self.blocks.index(node)
            self.names[node] = CUDA_OPS[Op.BLOCK_ABSMAX](node, [f"absmax_{k}"])
            return
        # the largest magnitude over a block of a value uniform over the tensor: its magnitude
        op = Op.ABS if node.op is Op.BLOCK_ABSMAX else node.op
        expr = CUDA_OPS[op](node, [self.names[s] for s in node.src])
        name = f"v{self.index[node]}"
        self.names[node] = name
        line = f"const {CTYPES[node.dtype]} {name} = {expr};  // {self.describe(node)}"
        (self.elementwise if node.elementwise else self.uniform).append(line)
        if node.elementwise:
            self.statements[node] = line


def _expression(node: Expr, names: Mapping[Expr, str]) -> str:
    """A C expression for `node`: its name where it has one, else its op on its operands'."""
    if node in names:
        return names[node]
    return CUDA_OPS[node.op](node, [_expression(s, names) for s in node.src])


_FLOAT32_EXACT = frozenset({DType.F32, DType.F16, DType.BF16})
"""The dtypes whose every value is a float32 value."""


def _float32_factor(node: Expr) -> Expr | None:
    """The float64 `node` as a float32 expression of the same value, when it is a cast of a
    float32-or-narrower value, possibly negated or made absolute (exact in either width)."""
    if node.op is Op.CAST and node.src[0].dtype in _FLOAT32_EXACT:
        return node.src[0].cast(DType.F32)
    if node.op in (Op.NEG, Op.ABS):
        inner = _float32_factor(node.src[0])
        return None if inner is None else apply(node.op, inner)
    return None


def _in_float32(term: Expr) -> Expr | None:
    """The float64 term of a sum computed in float32, where that costs at most one rounding.

    Such a term is one float32-or-narrower value cast to float64, or the product of two (each
    possibly negated or made absolute): the value is exact in float32, and the product of two
    24-bit significands is exact in float64 and rounded once in float32 (relative error at most
    2^-24) unless it leaves float32's range, which `float32_run_ok` catches per run (the
    partial-sum template). Any other term keeps the rule's float64: a float64 operand (a float64
    parameter or scalar), a division, a longer product.
    """
    if term.op is Op.MUL:
        a, b = (_float32_factor(s) for s in term.src)
        return None if a is None or b is None else apply(Op.MUL, a, b)
    if term.op in (Op.NEG, Op.ABS):
        inner = _in_float32(term.src[0])
        return None if inner is None else apply(term.op, inner)
    return _float32_factor(term)


def _slot_reads(needed: set[Expr]) -> set[str]:
    return {str(n.arg) for n in needed if n.op is Op.TENSOR}


def _indent(lines: Sequence[str], depth: int) -> str:
    pad = "    " * depth
    return "\n".join(pad + line if line else "" for line in lines)


def _optional(lines: Sequence[str], depth: int) -> str:
    """A template field on lines of its own that may be empty: no blank line when it is."""
    return _indent(lines, depth) + "\n" if lines else ""


def _each_element(body: Sequence[str]) -> list[str]:
    """`body` for each of this thread's elements of the iteration: i + k * spacing, k < VEC,
    those before the end."""
    return ["#pragma unroll", "for (int k = 0; k < VEC; ++k) {",
            "    if (i + k * spacing < end) {", *(f"        {line}" for line in body), "    }", "}"]


def _pack_access(wide: Sequence[str], single: Sequence[str]) -> list[str]:
    """Moving the packs of an iteration: one wide access per slot for a whole aligned pack,
    else element by element."""
    return ["if (wide) {", *(f"    {line}" for line in wide), "} else {",
            *(f"    {line}" for line in _each_element(single)), "}"]


def _kernel_parts(
    rule: UpdateRule, info: KernelInfo, needed: set[Expr], written: Sequence[str], callee: str
) -> dict[str, str]:
    """The template fields both element kernels fill alike: the parameters, pointers and
    per-tensor values, the element lambda's parameters and its call on element k of the packs,
    the packs' loads and stores.

    A per-block slot is read element by element into a pack too (each element its block's
    value, at index >> QUANT_SHIFT), but takes no part in wide accesses; it is written once per
    block by the blocked update kernel, not through a pack."""
    reads = _slot_reads(needed)
    slots = [s for s in rule.slots if s.name in reads or s.name in written]
    packed = [s for s in slots if s.name in reads or not s.per_block]
    elements = [s for s in slots if not s.per_block]  # moved in wide accesses when aligned
    pointers = []
    for s in slots:
        col = info.slots.index(s.name)
        const = "" if s.name in written else "const "
        ctype = f"{const}{CTYPES[s.dtype]}"
        pointers.append(
            f"{ctype}* __restrict__ {c_name(s.name)}_ptr = reinterpret_cast<{ctype}*>("
            f"tensor_ptrs[(long long)tensor * {len(info.slots)} + {col}]);"
        )
    per_tensor = []
    for j, (name, dtype) in enumerate(rule.per_tensor):
        if any(n.op is Op.PER_TENSOR and n.arg == name for n in needed):
            value = f"per_tensor_values[(long long)tensor * {info.n_per_tensor} + {j}]"
            per_tensor.append(
                f"const {CTYPES[dtype]} {c_name(name)} = {cast(value, DType.F64, dtype)};"
            )
    params, args = _element_signature(
        [s for s in slots if s.name in reads], [s for s in elements if s.name in written],
        any(OPS[n.op].indexed for n in needed))
    loads = [f"Pack<{CTYPES[s.dtype]}, VEC> {c_name(s.name)}_v;" for s in packed]
    loaded = [c_name(s.name) for s in elements if s.name in reads]
    if loaded:
        loads += _pack_access([f"{x}_v = load_pack<VEC>({x}_ptr + i);" for x in loaded],
                              [f"{x}_v.v[k] = {x}_ptr[i + k * spacing];" for x in loaded])
    per_block = [c_name(s.name) for s in slots if s.per_block and s.name in reads]
    if per_block:
        loads.append(f"// Per-block slots: each element reads its block's value (index >> "
                     f"{QUANT_SHIFT}).")
        loads += _each_element([f"{x}_v.v[k] = {x}_ptr[(i + k * spacing) >> {QUANT_SHIFT}];"
                                for x in per_block])
    stored = [c_name(s.name) for s in elements if s.name in written]
    stores = _pack_access([f"store_pack({x}_ptr + i, {x}_v);" for x in stored],
                          [f"{x}_ptr[i + k * spacing] = {x}_v.v[k];" for x in stored])
    aligned = " && ".join(f"pack_aligned<VEC>({c_name(s.name)}_ptr)" for s in elements) or "true"
    return {
        "rule_name": rule.name,
        "block": str(info.block),
        "chunk": str(info.chunk),
        "vec": str(info.vec),
        "scalar_params": "".join(
            f",\n    {_declaration(t, n)}" for t, n in info.params[len(_TABLE_PARAMS):]
        ),
        "lr_source_doc": (
            "//   lr_source                         the learning rate on the device, or null: "
            f"{LR} is lr_arg * *lr_source, or lr_arg\n" if info.capturable else ""
        ),
        "slot_pointers": _indent(pointers + per_tensor, 1),
        "element_params": ", ".join(params),
        "element_args": ", ".join(args),
        "element_call": _indent([f"{callee}({', '.join(args)});"], 4),
        "load_packs": _indent(loads, 2),
        "store_packs": _indent(stores, 2) if stored else "",
        "aligned": aligned,
    }


def _element_signature(
    reads: Sequence[Slot],
    written: Sequence[Slot],
    indexed: bool,
    values: Sequence[tuple[str, str]] = (),
) -> tuple[list[str], list[str]]:
    """The parameters of an element lambda and its arguments for element k of the packs: the
    element's index when a random stream reads it, the values of the slots `reads`, other
    `values` (parameter, argument), references to the pack entries of the slots `written`."""
    params, args = [], []
    if indexed:  # a random stream: the element's index
        params.append("const long long index")
        args.append("i + k * spacing")
    for s in reads:
        params.append(f"const {CTYPES[s.dtype]} {c_name(s.name)}")
        args.append(f"{c_name(s.name)}_v.v[k]")
    for param, arg in values:
        params.append(param)
        args.append(arg)
    for s in written:
        params.append(f"{CTYPES[s.dtype]}& {c_name(s.name)}_out")
        args.append(f"{c_name(s.name)}_v.v[k]")
    return params, args


def _live_lr(info: KernelInfo, needed: set[Expr]) -> list[str]:
    """In a capturable kernel that uses the scalar lr: its definition from lr_arg and
    lr_source, computed in float64 and rounded once to lr's dtype."""
    lr = next((n for n in needed if n.op is Op.SCALAR and n.arg == LR), None)
    if not info.capturable or lr is None:
        return []
    live = cast(f"({cast('lr_arg', lr.dtype, DType.F64)} * (double)*lr_source)", DType.F64,
                lr.dtype)
    return [f"const {CTYPES[lr.dtype]} {c_name(LR)} = lr_source != nullptr ? {live} : lr_arg;"]


def _uniform_values(info: KernelInfo, low: _Lowering, needed: set[Expr]) -> str:
    return _indent(_live_lr(info, needed) + low.uniform, 1) or "    // (none)"


def _update_sums(rule: UpdateRule, info: KernelInfo, low: _Lowering) -> tuple[list[str], str]:
    """The update kernel's loads of the tensor's sums, and its comment line on chunk_partials."""
    sums = []
    if rule.reductions:
        sums = [
            f"// The tensor's sums: {info.tensor_sums} wrote them over the partials of its first "
            "chunk.",
            "const double* totals = chunk_partials + "
            f"(long long)(blockIdx.x - chunk.y) * {info.n_reductions};",
        ]
        sums += [f"const double sum_{k} = totals[{k}];  // %{low.index[total]} = sum, over the "
                 "whole tensor" for k, total in enumerate(rule.reductions)]
        doc = (f"//   chunk_partials[b * {info.n_reductions} + r]  b a tensor's first chunk: the "
               f"tensor's sums, by {info.tensor_sums}\n")
    else:
        doc = "//   chunk_partials                    unused (this rule has no reductions)\n"
    return sums, doc


def _render_update(rule: UpdateRule, info: KernelInfo, templates: Templates) -> str:
    roots = [e for _, e in rule.outputs]
    needed = _reachable(roots, through_sums=False)
    written = [name for name, _ in rule.outputs]
    low = _Lowering(rule, needed)
    parts = _kernel_parts(rule, info, needed, written, "update")
    body = list(low.elementwise)
    body += [f"{c_name(slot)}_out = {low.names[e]};  // {slot} <- %{low.index[e]}"
             for slot, e in rule.outputs]
    sums, doc = _update_sums(rule, info, low)
    return string.Template(templates.update).substitute(
        parts,
        kernel_name=info.update,
        n_slots=len(info.slots),
        slot_list=", ".join(info.slots),
        n_per_tensor_stride=info.n_per_tensor,
        partials_doc=doc,
        tensor_sums=_indent(sums, 1),
        uniform_values=_uniform_values(info, low, needed),
        element_body=_indent(body, 2),
    )


def _reach(roots: Sequence[Expr], stop: set[Expr]) -> set[Expr]:
    """The elementwise nodes computing `roots` reads, not looking past the nodes of `stop`
    (left out) nor into uniform ones (computed before the element loop)."""
    seen: set[Expr] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen or node in stop or not node.elementwise:
            continue
        seen.add(node)
        todo.extend(node.src)
    return seen


def _lambda(name: str, params: Sequence[str], body: Sequence[str]) -> list[str]:
    return [f"auto {name} = [&]({', '.join(params)}) {{", *(f"    {line}" for line in body), "};"]


def _render_update_blocks(rule: UpdateRule, info: KernelInfo, templates: Templates) -> str:
    """The update kernel of a blocked rule (`update_blocks.cu`). Each iteration of a thread:

    1. `early`, per element: every node that needs no block reduction; the outputs among them
       are stored in their packs, the values the rest needs are kept in registers, and each
       block reduction's operand folds into the thread's running maximum;
    2. the reductions over the group of threads holding the block (`group_max`), then the
       values that depend on the block alone (a scale's reciprocal), once per thread;
    3. `late`, per element: the nodes that need the reductions (the codes);
    4. the block's first thread stores the per-block outputs, at index i >> QUANT_SHIFT.
    """
    roots = [e for _, e in rule.outputs]
    needed = _reachable(roots, through_sums=False)
    written = [name for name, _ in rule.outputs]
    low = _Lowering(rule, needed)
    parts = _kernel_parts(rule, info, needed, written, "early")
    blocks = low.blocks
    waits = set(blocks)  # what needs a block reduction, the reductions included
    per_element = set()  # what differs between the elements of a block
    for n in rule.nodes:
        if n in blocks:
            continue
        if n.elementwise and any(s in waits for s in n.src):
            waits.add(n)
        if n.op is Op.TENSOR or OPS[n.op].indexed or any(s in per_element for s in n.src):
            per_element.add(n)
    given = set(blocks) | {n for n in waits if n not in per_element}  # known in the loop body
    per_block = {s.name for s in rule.slots if s.per_block}
    early_out = [(s, e) for s, e in rule.outputs if s not in per_block and e not in waits]
    late_out = [(s, e) for s, e in rule.outputs if s not in per_block and e in waits]
    early = _reach([e for _, e in early_out] + [r.src[0] for r in blocks], set())
    late = _reach([e for _, e in late_out], given | early)
    late_inputs = {s for n in late for s in n.src} | {e for _, e in late_out}
    kept = [n for n in rule.nodes if n in early and n.op is not Op.TENSOR
            and (n in late_inputs or any(r.src[0] is n for r in blocks))]

    def pack_value(node: Expr) -> str:
        """Element k's value of a node of the early part, in the loop body."""
        return f"{low.names[node]}_kept[k]" if node in kept else f"{low.names[node]}_v.v[k]"

    def outputs(pairs) -> list[str]:
        return [f"{c_name(slot)}_out = {low.names[e]};  // {slot} <- %{low.index[e]}"
                for slot, e in pairs]

    def reads(nodes) -> list[Slot]:
        return [s for s in rule.slots if any(n.op is Op.TENSOR and n.arg == s.name for n in nodes)]

    def indexed(nodes) -> bool:
        return any(OPS[n.op].indexed for n in nodes)

    lambdas, loop = [], []
    early_call, late_call = [], []
    if early_out or kept:
        params, args = _element_signature(reads(early), [rule.slot(s) for s, _ in early_out],
                                          indexed(early))
        params += [f"{CTYPES[n.dtype]}& {low.names[n]}_kept" for n in kept]
        args += [f"{low.names[n]}_kept[k]" for n in kept]
        body = [low.statements[n] for n in rule.nodes if n in early and n in low.statements]
        body += outputs(early_out)
        body += [f"{low.names[n]}_kept = {low.names[n]};" for n in kept]
        lambdas += ["// Before the block's reductions, per element: the outputs that do not need "
                    "them, and", "// the values that the reductions and the late part read.",
                    *_lambda("early", params, body)]
        early_call.append(f"early({', '.join(args)});")
    if late_out:
        values = [n for n in rule.nodes if n in late_inputs and n in early | given
                  and n.op is not Op.TENSOR]
        params, args = _element_signature(
            reads(late | early & late_inputs), [rule.slot(s) for s, _ in late_out], indexed(late),
            [(f"const {CTYPES[n.dtype]} {low.names[n]}",
              f"{low.names[n]}_kept[k]" if n in kept else low.names[n]) for n in values])
        body = [low.statements[n] for n in rule.nodes if n in late and n in low.statements]
        body += outputs(late_out)
        lambdas += ([""] if lambdas else []) + [
            "// After them, per element: the outputs that need the block's reductions.",
            *_lambda("late", params, body)]
        late_call.append(f"late({', '.join(args)});")
    if kept:
        loop.append("// The values the late part and the block's reductions read, in registers.")
        loop += [f"{CTYPES[n.dtype]} {low.names[n]}_kept[VEC];" for n in kept]
    if blocks:
        loop.append("// This thread's largest magnitudes (bits), of "
                    + ", ".join(low.describe(r) for r in blocks) + ".")
        loop.append(f"unsigned absmax_bits[{len(blocks)}] = {{}};")
        early_call += [f"absmax_bits[{k}] = fold_absmax(absmax_bits[{k}], {pack_value(r.src[0])});"
                       for k, r in enumerate(blocks)]
    if early_call:
        loop += _each_element(early_call)
    if blocks:
        loop += ["// Over each block's GROUP threads (then a barrier over the group).",
                 "group_max<GROUP, BLOCK>(absmax_bits, scratch);"]
        loop += [f"const float {low.names[r]} = __uint_as_float(absmax_bits[{k}]);  "
                 f"// {low.describe(r)}" for k, r in enumerate(blocks)]
    elif any(rule.slot(s).per_block for s in written):
        loop += ["// What the group read of its per-block values before their stores.",
                 "group_barrier<GROUP>();"]
    block_values = [low.statements[n] for n in rule.nodes if n in given and n not in blocks]
    if block_values:
        loop += ["// Values of the block alone, once per thread.", *block_values]
    if late_call:
        loop += _each_element(late_call)
    stores = []
    for slot, e in rule.outputs:
        if slot not in per_block:
            continue
        if e.elementwise and e not in given:  # from per-block loads: the thread's first element
            nodes = _reach([e], given)
            stores += [f"const {CTYPES[n.dtype]} {low.names[n]} = {low.names[n]}_v.v[0];"
                       for n in rule.nodes if n in nodes and n.op is Op.TENSOR]
            stores += [low.statements[n] for n in rule.nodes if n in nodes and n in low.statements]
        stores.append(f"{c_name(slot)}_ptr[i >> {QUANT_SHIFT}] = {low.names[e]};  "
                      f"// {slot} <- %{low.index[e]}, once per block")
    if stores:
        loop += ["// The block's first thread stores its per-block values.",
                 "if (threadIdx.x % GROUP == 0 && i < end) {", *(f"    {x}" for x in stores), "}"]
    scratch = ""
    if blocks:
        scratch = _optional(["// group_max's, for groups of several warps",
                             f"__shared__ unsigned scratch[{len(blocks)} * (BLOCK / 32)];"], 1)
    sums, doc = _update_sums(rule, info, low)
    return string.Template(templates.update_blocks).substitute(
        parts,
        kernel_name=info.update,
        group=info.group,
        n_slots=len(info.slots),
        slot_list=", ".join(info.slots),
        per_block_list=", ".join(s.name for s in rule.slots if s.per_block) or "none",
        n_per_tensor_stride=info.n_per_tensor,
        partials_doc=doc,
        tensor_sums=_indent(sums, 1),
        uniform_values=_uniform_values(info, low, needed),
        stage_lambdas=_indent(lambdas, 1),
        scratch=scratch,
        block_loop=_indent(loop, 2),
    )


def _render_partial_sums(rule: UpdateRule, info: KernelInfo, templates: Templates) -> str:
    terms = [total.src[0] for total in rule.reductions]
    in_float32 = [_in_float32(t) for t in terms]
    demoted = [k for k, term32 in enumerate(in_float32) if term32 is not None]
    fast_needed = _reachable([t if t32 is None else t32
                              for t32, t in zip(in_float32, terms, strict=True)], through_sums=True)
    exact_needed = _reachable([terms[k] for k in demoted], through_sums=True)
    needed = fast_needed | exact_needed
    fast, exact, low = (_Lowering(rule, n) for n in (fast_needed, exact_needed, needed))
    parts = _kernel_parts(rule, info, needed, [], "accumulate")
    accumulators, body = [], list(fast.elementwise)
    for k, (total, term, term32) in enumerate(zip(rule.reductions, terms, in_float32,
                                                  strict=True)):
        accumulators.append(f"double sum_{k} = 0.0;  // this thread's share of "
                            f"%{low.index[total]}")
        if term32 is None:
            body.append(f"sum_{k} += {fast.names[term]};")
        else:
            accumulators.append(f"float run_{k};  // this run's share of sum_{k}, in float32")
            body.append(f"run_{k} += {_expression(term32, fast.names)};  "
                        f"// {fast.describe(term)}, in float32")
    exact_terms, run_end = "", []
    if demoted:
        exact_body = exact.elementwise + [f"sum_{k} += {exact.names[terms[k]]};" for k in demoted]
        exact_terms = _optional([
            "",
            "// The float32 terms as the rule computes them, in float64: for a run whose float32",
            "// sum float32_run_ok refuses.",
            f"auto accumulate_exact = [&]({parts['element_params']}) {{",
            *(f"    {line}" for line in exact_body),
            "};",
        ], 1)
        run_end = [
            f"if ({' && '.join(f'float32_run_ok(run_{k})' for k in demoted)}) {{",
            *(f"    sum_{k} += (double)run_{k};" for k in demoted),
            "} else {",
            *(f"    {line}" for line in _each_element([
                f"accumulate_exact({parts['element_args']});"])),
            "}",
        ]
    block_sums = [f"sum_{k} = block_sum<BLOCK>(sum_{k}, scratch);"
                  for k in range(len(rule.reductions))]
    block_sums += ["if (threadIdx.x == 0) {"]
    block_sums += [f"    chunk_partials[(long long)blockIdx.x * {info.n_reductions} + {k}] = "
                   f"sum_{k};" for k in range(len(rule.reductions))]
    block_sums += ["}"]
    return string.Template(templates.partial_sums).substitute(
        parts,
        kernel_name=info.partial_sums,
        tensor_sums_kernel=info.tensor_sums,
        update_kernel=info.update,
        n_reductions=info.n_reductions,
        uniform_values=_uniform_values(info, low, needed),
        accumulators=_indent(accumulators, 1),
        element_body=_indent(body, 2),
        exact_terms=exact_terms,
        run_start=_optional([f"run_{k} = 0.0f;" for k in demoted], 2),
        run_end=_optional(run_end, 2),
        block_sums=_indent(block_sums, 1),
    )


def _render_tensor_sums(rule: UpdateRule, info: KernelInfo, templates: Templates) -> str:
    count = range(len(rule.reductions))
    chunk_sums = [f"double sum_{k} = 0.0;  // this thread's share of the partials of "
                  f"%{rule.nodes.index(total)}" for k, total in enumerate(rule.reductions)]
    chunk_sums += [
        "for (int c = threadIdx.x; c < n_chunks; c += BLOCK) {",
        "    const double* partials = chunk_partials + "
        f"(first_chunk + c) * {info.n_reductions};",
        *(f"    sum_{k} += partials[{k}];" for k in count),
        "}",
    ]
    totals = [f"sum_{k} = block_sum<BLOCK>(sum_{k}, scratch);" for k in count]
    totals += ["if (threadIdx.x == 0) {"]
    totals += [f"    chunk_partials[first_chunk * {info.n_reductions} + {k}] = sum_{k};"
               for k in count]
    totals += ["}"]
    return string.Template(templates.tensor_sums).substitute(
        rule_name=rule.name,
        kernel_name=info.tensor_sums,
        partial_sums_kernel=info.partial_sums,
        update_kernel=info.update,
        n_reductions=info.n_reductions,
        block=info.block,
        chunk=info.chunk,
        scalar_params="".join(
            f",\n    {_declaration(t, n)}" for t, n in info.params[len(_TABLE_PARAMS):]
        ),
        chunk_sums=_indent(chunk_sums, 1),
        totals=_indent(totals, 1),
    )


def _render_prepare(
    rule: UpdateRule, info: KernelInfo, formulas: Mapping[str, Expr], templates: Templates
) -> str:
    text, statements, names, index = ["//   (none)"], [], {}, {}
    if formulas:
        # the formulas as a rule of their own: numbered nodes, lowered by the same op table
        as_rule = UpdateRule(f"{rule.name}_formulas",
                             [Slot(n, e.dtype, written=True) for n, e in sorted(formulas.items())],
                             formulas)
        check_supported(as_rule, CUDA_OPS, "cuda")
        low = _Lowering(as_rule, set(as_rule.nodes))
        names, index = low.names, low.index
        text = [f"// {line}" for line in as_rule.text.splitlines()[1:]]
        if any(n.op is Op.PER_TENSOR for n in as_rule.nodes):
            statements.append(f"const double {c_name(STEP)} = (double)step_count;")
        if LR in info.prepare_inputs:
            statements.append(f"const double {c_name(LR)} = lr_source != nullptr ? "
                              "lr_arg * (double)*lr_source : lr_arg;")
        statements += low.uniform
    writes = []
    for j, name in enumerate(rule.per_tensor_names):
        target = f"per_tensor_values[(long long)tensor * {info.n_per_tensor} + {j}]"
        if name in formulas:
            e = formulas[name]
            writes.append(f"{target} = {cast(names[e], e.dtype, DType.F64)};  "
                          f"// {name} <- %{index[e]}")
        else:  # FIRST (describe refused any other name without a formula)
            writes.append(f"{target} = step_count == 1.0f ? 1.0 : 0.0;  // {name}: the "
                          "tensor's first step")
    return string.Template(templates.prepare).substitute(
        rule_name=rule.name,
        kernel_name=info.prepare,
        first_kernel=info.kernels[0],
        prepare_block=info.prepare_block,
        n_per_tensor_stride=info.n_per_tensor,
        per_tensor_list=", ".join(rule.per_tensor_names),
        formulas_text="\n".join(text),
        input_params="".join(
            f",\n    {_declaration(t, n)}" for t, n in info.prepare_params[len(_PREPARE_PARAMS):]
        ),
        formulas=_indent(statements, 1),
        writes=_indent(writes, 1),
    )


def _dtypes_used(rule: UpdateRule) -> set[DType]:
    used = {n.dtype for n in rule.nodes} | {s.dtype for s in rule.slots}
    return used | {d for _, d in rule.scalars} | {d for _, d in rule.per_tensor}


def render(
    rule: UpdateRule,
    templates: Templates,
    *,
    block: int = BLOCK,
    chunk: int = CHUNK,
    capturable: Mapping[str, Expr] | None = None,
) -> str:
    """The complete CUDA source of `rule`'s kernels (see the module docstring for the layout).

    `capturable`: None for the plain kernels; else the optimizer's per-tensor formulas
    (`Optimizer.tensor_formulas()`: float64 expressions of `per_tensor("step", F64)` and of
    float64 scalars, by per-tensor value; `{}` for an optimizer without any) for the capturable
    variant, whose kernel names end in `_capturable` (both variants may share a module). A
    per-tensor value named `first` without a formula is 1 on a tensor's first step, else 0; any
    other per-tensor value needs a formula (ValueError).

    The same rule always gives the same text, so the text can key a compile cache.
    """
    check_supported(rule, CUDA_OPS, "cuda")
    info = describe(rule, block=block, chunk=chunk, capturable=capturable)
    used = _dtypes_used(rule)
    head = [
        f"// Generated by stepjit: kernels of the update rule {rule.name} (key {rule.key})"
        f"{', capturable variant' if info.capturable else ''}.",
        "//",
        *(f"// {line}" for line in rule.text.splitlines()),
        "",
    ]
    if DType.F16 in used:
        head.append("#include <cuda_fp16.h>")
    if DType.BF16 in used:
        head.append("#include <cuda_bf16.h>")
    parts = ["\n".join(head), templates.prelude]
    if blocked(rule) or any(n.op in CODED for n in rule.nodes):
        parts.append(templates.quantized)
    if any(n.op is Op.ROUND_SR for n in rule.nodes):
        parts.append(_ROUND_SR_HELPER)
    if any(n.op is Op.ENCODE_SR for n in rule.nodes):
        parts.append(_CODE_STREAM_HELPER)
    if info.prepare:
        parts.append(_render_prepare(rule, info, capturable, templates))
    if rule.reductions:
        parts.append(_render_partial_sums(rule, info, templates))
        parts.append(_render_tensor_sums(rule, info, templates))
    parts.append((_render_update_blocks if blocked(rule) else _render_update)(
        rule, info, templates))
    return "\n".join(parts)
