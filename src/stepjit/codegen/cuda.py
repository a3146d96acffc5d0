"""Lowering of an update rule to CUDA C: a table {op: C expression} and kernel skeletons.

    source = render(rule, templates)   # the complete .cu text: prelude, partial sums, update
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

followed by the rule's scalars in `rule.scalars` order, each in its own dtype. A rule with
reductions has two kernels, launched in this order over the same arguments: `partial_sums`
(one partial per chunk) and `update` (every block of a tensor adds that tensor's partials in
the same fixed order, so the result is deterministic and needs no atomics).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..ir import OPS, DType, Expr, Op, UpdateRule
from ..ir.ops import LEAVES
from . import check_supported

BLOCK = 512
"""Threads per block."""

CHUNK = 65536
"""Elements per chunk: one block updates one chunk of one tensor."""

CTYPES: dict[DType, str] = {
    DType.F32: "float",
    DType.F64: "double",
    DType.F16: "__half",
    DType.BF16: "__nv_bfloat16",
    DType.BOOL: "bool",
}
"""The C type of each IR dtype."""

TEMPLATE_NAMES = ("prelude.cuh", "partial_sums.cu", "update.cu")

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
    # bfloat16 (ml_dtypes rounds through float32): round-to-nearest-even on the bit pattern
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
    """C code converting the value `x` from `src` to `dst`, rounding as numpy's astype does."""
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
    # bfloat16: from float64 through float32, as the reference interpreter (ml_dtypes) does
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
    # the tensor's total: reduced before the element loop; its operand is the total's name
    Op.SUM: lambda n, a: a[0],
}
"""How each op is written in CUDA C: `emitter(node, operand_expressions) -> expression`."""


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
    tensor_ptrs tensor_numel chunk_table per_tensor_values chunk_partials chunk tensor numel
    begin end i k aligned update accumulate scratch first_chunk n_chunks c""".split()
)


def c_name(name: str) -> str:
    """The C identifier of an IR name (slot, scalar or per-tensor value)."""
    if name in _RESERVED or re.fullmatch(r"(v|sum_)\d+", name) or name.startswith("__"):
        return f"{name}_arg"
    return name


# -- kernel description ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelInfo:
    """What a launcher needs to know about the kernels `render(rule)` produces."""

    rule_name: str
    update: str  # name of the update kernel
    partial_sums: str | None  # name of the partial-sum kernel, when the rule has reductions
    block: int  # threads per block
    chunk: int  # elements per chunk (one block per chunk)
    vec: int  # elements per thread per wide access
    slots: tuple[str, ...]  # columns of tensor_ptrs
    scalars: tuple[tuple[str, DType], ...]  # trailing kernel arguments, in order
    n_per_tensor: int  # columns of per_tensor_values (at least 1)
    n_reductions: int  # columns of chunk_partials (at least 1)
    params: tuple[tuple[str, str], ...]  # (C type, name) of the update kernel's parameters


def describe(rule: UpdateRule, *, block: int = BLOCK, chunk: int = CHUNK) -> KernelInfo:
    """Names, geometry and parameters of the kernels of `rule`."""
    if block % 32 or not 32 <= block <= 1024:
        raise ValueError(f"block must be a multiple of 32 in [32, 1024], got {block}")
    widest = max((s.dtype.itemsize for s in rule.slots), default=4)
    vec = max(1, 16 // widest)
    if chunk <= 0 or chunk % vec:
        raise ValueError(f"chunk must be a positive multiple of {vec}, got {chunk}")
    params = (
        ("const unsigned long long*", "tensor_ptrs"),
        ("const long long*", "tensor_numel"),
        ("const int2*", "chunk_table"),
        ("const double*", "per_tensor_values"),
        ("const double*", "chunk_partials"),
    ) + tuple((CTYPES[d], c_name(n)) for n, d in rule.scalars)
    return KernelInfo(
        rule_name=rule.name,
        update=f"{rule.name}_update",
        partial_sums=f"{rule.name}_partial_sums" if rule.reductions else None,
        block=block,
        chunk=chunk,
        vec=vec,
        slots=tuple(s.name for s in rule.slots),
        scalars=rule.scalars,
        n_per_tensor=max(1, len(rule.per_tensor)),
        n_reductions=max(1, len(rule.reductions)),
        params=params,
    )


# -- templates -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Templates:
    """The kernel skeletons, as text: `TEMPLATE_NAMES` in that order."""

    prelude: str
    partial_sums: str
    update: str

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


class _Lowering:
    """The statements of one kernel: per-block (uniform) values and per-element values."""

    def __init__(self, rule: UpdateRule, needed: set[Expr]) -> None:
        self.rule = rule
        self.index = {n: i for i, n in enumerate(rule.nodes)}
        self.names: dict[Expr, str] = {}
        self.uniform: list[str] = []
        self.elementwise: list[str] = []
        for node in rule.nodes:
            if node in needed:
                self._emit(node)

    def _describe(self, node: Expr) -> str:
        operands = ", ".join(f"%{self.index[s]}" for s in node.src)
        return f"%{self.index[node]} = {node.op.value} {operands} : {node.dtype}"

    def _emit(self, node: Expr) -> None:
        if node.op in LEAVES:
            self.names[node] = CUDA_OPS[node.op](node, ())
            return
        if node.op is Op.SUM:  # reduced before the element loop
            k = self.rule.reductions.index(node)
            self.names[node] = CUDA_OPS[Op.SUM](node, [f"sum_{k}"])
            return
        expr = CUDA_OPS[node.op](node, [self.names[s] for s in node.src])
        name = f"v{self.index[node]}"
        self.names[node] = name
        line = f"const {CTYPES[node.dtype]} {name} = {expr};  // {self._describe(node)}"
        (self.elementwise if node.elementwise else self.uniform).append(line)


def _slot_reads(needed: set[Expr]) -> set[str]:
    return {str(n.arg) for n in needed if n.op is Op.TENSOR}


def _indent(lines: Sequence[str], depth: int) -> str:
    pad = "    " * depth
    return "\n".join(pad + line if line else "" for line in lines)


def _kernel_parts(
    rule: UpdateRule, info: KernelInfo, needed: set[Expr], written: Sequence[str], callee: str
) -> tuple[dict[str, str], _Lowering]:
    """The template fields shared by both kernels: pointers, values, element lambda, loops."""
    low = _Lowering(rule, needed)
    reads = _slot_reads(needed)
    slots = [s for s in rule.slots if s.name in reads or s.name in written]
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
    params, args_pack, args_elem = [], [], []
    for s in slots:
        if s.name in reads:
            params.append(f"const {CTYPES[s.dtype]} {c_name(s.name)}")
            args_pack.append(f"{c_name(s.name)}_v.v[k]")
            args_elem.append(f"{c_name(s.name)}_ptr[i + k]")
    for s in slots:
        if s.name in written:
            params.append(f"{CTYPES[s.dtype]}& {c_name(s.name)}_out")
            args_pack.append(f"{c_name(s.name)}_v.v[k]")
            args_elem.append(f"{c_name(s.name)}_ptr[i + k]")
    pack_body = []
    for s in slots:
        const = "" if s.name in written else "const "
        decl = f"{const}Pack<{CTYPES[s.dtype]}, VEC> {c_name(s.name)}_v"
        if s.name in reads:
            pack_body.append(f"{decl} = load_pack<VEC>({c_name(s.name)}_ptr + i);")
        else:
            pack_body.append(f"{decl};")
    pack_body += ["#pragma unroll", "for (int k = 0; k < VEC; ++k) {",
                  f"    {callee}({', '.join(args_pack)});", "}"]
    pack_body += [f"store_pack({c_name(s)}_ptr + i, {c_name(s)}_v);" for s in written]
    aligned = " && ".join(f"pack_aligned<VEC>({c_name(s.name)}_ptr)" for s in slots) or "true"
    parts = {
        "rule_name": rule.name,
        "block": str(info.block),
        "chunk": str(info.chunk),
        "vec": str(info.vec),
        "scalar_params": "".join(
            f",\n    const {CTYPES[d]} {c_name(n)}" for n, d in rule.scalars
        ),
        "slot_pointers": _indent(pointers + per_tensor, 1),
        "uniform_values": _indent(low.uniform, 1) or "    // (none)",
        "element_params": ", ".join(params),
        "pack_body": _indent(pack_body, 3),
        "element_call": _indent([f"{callee}({', '.join(args_elem)});"], 4),
        "aligned": aligned,
    }
    return parts, low


def _render_update(rule: UpdateRule, info: KernelInfo, templates: Templates) -> str:
    roots = [e for _, e in rule.outputs]
    needed = _reachable(roots, through_sums=False)
    written = [name for name, _ in rule.outputs]
    parts, low = _kernel_parts(rule, info, needed, written, "update")
    body = list(low.elementwise)
    body += [f"{c_name(slot)}_out = {low.names[e]};  // {slot} <- %{low.index[e]}"
             for slot, e in rule.outputs]
    sums = []
    if rule.reductions:
        sums = [
            "// The tensor's sums: every block of this tensor adds the same per-chunk partials",
            "// in the same order, so every block (and every run) gets the same bits.",
            "__shared__ double scratch[BLOCK / 32 + 1];",
            "const int first_chunk = blockIdx.x - chunk.y;",
            "const int n_chunks = (int)((numel + CHUNK - 1) / CHUNK);",
        ]
        for k, total in enumerate(rule.reductions):
            sums += [
                f"double sum_{k} = 0.0;  // %{low.index[total]} = sum, over the whole tensor",
                "for (int c = threadIdx.x; c < n_chunks; c += BLOCK) {",
                f"    sum_{k} += chunk_partials[(long long)(first_chunk + c) * "
                f"{info.n_reductions} + {k}];",
                "}",
                f"sum_{k} = block_sum<BLOCK>(sum_{k}, scratch);",
            ]
        doc = (f"//   chunk_partials[b * {info.n_reductions} + r]  partial sums written by "
               f"{info.partial_sums}\n")
    else:
        doc = "//   chunk_partials                    unused (this rule has no reductions)\n"
    return string.Template(templates.update).substitute(
        parts,
        kernel_name=info.update,
        n_slots=len(info.slots),
        slot_list=", ".join(info.slots),
        n_per_tensor_stride=info.n_per_tensor,
        partials_doc=doc,
        tensor_sums=_indent(sums, 1),
        element_body=_indent(body, 2),
    )


def _render_partial_sums(rule: UpdateRule, info: KernelInfo, templates: Templates) -> str:
    terms = [total.src[0] for total in rule.reductions]
    needed = _reachable(terms, through_sums=True)
    parts, low = _kernel_parts(rule, info, needed, [], "accumulate")
    body = list(low.elementwise)
    body += [f"sum_{k} += {low.names[t]};" for k, t in enumerate(terms)]
    accumulators = [
        f"double sum_{k} = 0.0;  // this thread's share of %{low.index[total]}"
        for k, total in enumerate(rule.reductions)
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
        update_kernel=info.update,
        n_reductions=info.n_reductions,
        accumulators=_indent(accumulators, 1),
        element_body=_indent(body, 2),
        block_sums=_indent(block_sums, 1),
    )


def _dtypes_used(rule: UpdateRule) -> set[DType]:
    used = {n.dtype for n in rule.nodes} | {s.dtype for s in rule.slots}
    return used | {d for _, d in rule.scalars} | {d for _, d in rule.per_tensor}


def render(rule: UpdateRule, templates: Templates, *, block: int = BLOCK,
           chunk: int = CHUNK) -> str:
    """The complete CUDA source of `rule`'s kernels (see the module docstring for the layout).

    The same rule always gives the same text, so the text can key a compile cache.
    """
    check_supported(rule, CUDA_OPS, "cuda")
    info = describe(rule, block=block, chunk=chunk)
    used = _dtypes_used(rule)
    head = [
        f"// Generated by stepjit: kernels of the update rule {rule.name} (key {rule.key}).",
        "//",
        *(f"// {line}" for line in rule.text.splitlines()),
        "",
    ]
    if DType.F16 in used:
        head.append("#include <cuda_fp16.h>")
    if DType.BF16 in used:
        head.append("#include <cuda_bf16.h>")
    parts = ["\n".join(head), templates.prelude]
    if rule.reductions:
        parts.append(_render_partial_sums(rule, info, templates))
    parts.append(_render_update(rule, info, templates))
    return "\n".join(parts)
