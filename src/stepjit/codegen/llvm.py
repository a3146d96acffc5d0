"""Lower an UpdateRule to LLVM IR with llvmlite.ir. Pure: no compiler calls, no I/O.

Every kernel has one C signature, so the runtime calls any rule the same way:

    void kernel(void **ptrs,        // [n_tensors][n_slots] data pointers
                int64_t *chunks,    // [n_chunks][3]: tensor index, first element, end element
                int64_t *tchunks,   // [n_tensors][2]: first chunk of the tensor, chunk count
                double *partials,   // [n_chunks][n_reductions]: per-chunk sums
                double *per_tensor, // [n_tensors][n_per_tensor]
                double *scalars,    // [n_scalars], in rule.scalar_names order
                int64_t c0, int64_t c1)  // the chunks this call processes

A rule with reductions gets two kernels: `..._reduce` writes the partial sums of its chunks, and
`..._update` (run after every chunk's reduce is done) adds its tensor's partials in chunk order,
so the sums are deterministic whatever the threading. The element loop of each kernel is a
separate function whose pointer arguments are `noalias`, which lets LLVM vectorize it without
runtime alias checks. Floating-point instructions carry `contract` (fused multiply-add allowed)
and reduction sums `reassoc`; never `fast`, `nnan` or `ninf`, which would delete NaN handling.

exp, log and tanh are LLVM intrinsics, which the code generator turns into calls of the C
library's expf, logf, tanhf, exp, log and tanh (`LIBM_SYMBOLS`): the runtime resolves those
names for the JIT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llvmlite import ir

from ..ir import OPS, DType, Expr, Op, UpdateRule
from ..ir.ops import CODE_MAPS, HASH32, QUANT_BLOCK, RANDOM_MIX, WEYL32
from . import check_supported

I1, I8, I16, I32, I64 = (ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32),
                         ir.IntType(64))
F32, F64, HALF = ir.FloatType(), ir.DoubleType(), ir.HalfType()
PTR = ir.PointerType()
KERNEL_TYPE = ir.FunctionType(ir.VoidType(), [PTR] * 6 + [I64, I64])

CONTRACT = ("contract",)
REASSOC = ("reassoc", "contract")


def kernel_names(rule: UpdateRule) -> tuple[str, str | None]:
    """(update kernel symbol, reduce kernel symbol or None)."""
    base = f"stepjit_{rule.name}_{rule.key[:8]}"
    return f"{base}_update", (f"{base}_reduce" if rule.reductions else None)


# -- value representation ---------------------------------------------------------------------
def value_type(dtype: DType, f16_native: bool) -> ir.Type:
    """How a value of `dtype` is held in registers (and in memory)."""
    if dtype is DType.F16:
        return HALF if f16_native else I16
    return {DType.BOOL: I1, DType.BF16: I16, DType.F32: F32, DType.F64: F64, DType.U8: I8}[dtype]


@dataclass
class _Ctx:
    """Where emitters find their builder, the module and the values computed so far."""

    builder: ir.IRBuilder
    f16_native: bool
    values: dict[Expr, ir.Value] = field(default_factory=dict)
    slots: dict[str, ir.Value] = field(default_factory=dict)  # slot name -> data pointer
    index: ir.Value | None = None  # the element index inside an element loop
    weyl: ir.Value | None = None  # index * WEYL32 (i32), where the loop carries it
    per_block: frozenset = frozenset()  # slots holding one value per block (read at index >> 8)
    labels: dict[Expr, str] = field(default_factory=dict)  # node -> "v7.mul"

    @property
    def module(self) -> ir.Module:
        return self.builder.module

    def intrinsic(self, name: str, ty: ir.Type) -> ir.Function:
        return self.module.declare_intrinsic(name, [ty])

    # conversions between a dtype's register form and float32/float64
    def widen(self, v: ir.Value, dtype: DType) -> ir.Value:
        """A float or double holding `v` exactly (half types become float)."""
        b = self.builder
        if dtype is DType.F16:
            return b.fpext(v, F32) if self.f16_native else _soft_half_to_float(b, v)
        if dtype is DType.BF16:
            return b.bitcast(b.shl(b.zext(v, I32), I32(16)), F32)
        if dtype is DType.BOOL:
            return b.uitofp(v, F32)
        return v

    def narrow(self, v: ir.Value, dtype: DType) -> ir.Value:
        """`v` (a float or double) rounded to nearest-even into `dtype`."""
        b = self.builder
        # double -> half goes through float (LLVM has no libcall-free direct path): rounded to
        # odd for float16, which then rounds once in all, as numpy does; bfloat16 rounds twice,
        # as torch does (ir.dtypes.rounded)
        if dtype is DType.F16 and v.type == F64:
            v = _double_to_float_round_to_odd(b, v)
        if dtype is DType.BF16 and v.type == F64:
            v = b.fptrunc(v, F32)
        if dtype is DType.F16:
            return b.fptrunc(v, HALF) if self.f16_native else _soft_float_to_half(b, v)
        if dtype is DType.BF16:
            return _float_to_bfloat(b, v)
        if dtype is DType.BOOL:
            return b.fcmp_unordered("!=", v, ir.Constant(v.type, 0.0))
        if dtype is DType.F32 and v.type == F64:
            return b.fptrunc(v, F32)
        if dtype is DType.F64 and v.type == F32:
            return b.fpext(v, F64)
        return v


# -- emitters: one per op ------------------------------------------------------------------------
def _arith(fn: Callable[[_Ctx, list[ir.Value]], ir.Value]):
    """An emitter computing in float/double; half operands are widened and the result rounded."""

    def emit(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
        srcs = node.src
        if any(s.dtype.is_half for s in srcs):
            wide = [ctx.widen(v, s.dtype) for v, s in zip(ops, srcs)]
            return ctx.narrow(fn(ctx, wide), node.dtype) if node.dtype.is_half else fn(ctx, wide)
        return fn(ctx, ops)

    return emit


def _nan_propagating(pred: str):
    def fn(ctx: _Ctx, ops: list[ir.Value]) -> ir.Value:
        b, (x, y) = ctx.builder, ops
        picked = b.select(b.fcmp_ordered(pred, x, y), x, y)
        either_nan = b.fcmp_unordered("uno", x, y)
        return b.select(either_nan, b.fadd(x, y), picked)  # x + y is NaN when either is

    return fn


def _external(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
    raise KeyError(f"{node.op.value} {node.arg}: not provided to this function")  # pragma: no cover


def _load(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
    ty = value_type(node.dtype, ctx.f16_native)
    index = ctx.index
    if node.arg in ctx.per_block:
        index = ctx.builder.lshr(index, I64(QUANT_BLOCK.bit_length() - 1))
    ptr = ctx.builder.gep(ctx.slots[node.arg], [index], inbounds=True, source_etype=ty)
    return ctx.builder.load(ptr, typ=ty, align=node.dtype.itemsize)


def _const(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
    if node.dtype is DType.BOOL:
        return I1(int(bool(node.arg)))
    if node.dtype.is_half:
        wide = F64 if node.dtype is DType.F16 else F32  # rounded as the interpreter rounds
        return ctx.narrow(ir.Constant(wide, node.arg), node.dtype)
    return ir.Constant(value_type(node.dtype, ctx.f16_native), node.arg)


def _cast(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
    return ctx.narrow(ctx.widen(ops[0], node.src[0].dtype), node.dtype)


def _intrinsic(name: str) -> Callable[[_Ctx, list[ir.Value]], ir.Value]:
    """A call of the LLVM intrinsic `name` (overloaded on its operand's type)."""
    return lambda ctx, ops: ctx.builder.call(ctx.intrinsic(name, ops[0].type), ops)


def _i64(value: int) -> ir.Constant:
    """A 64-bit constant from its unsigned value (LLVM spells i64 constants signed)."""
    return I64(value - (1 << 64) if value >= 1 << 63 else value)


def _random_bits16(ctx: _Ctx, key: ir.Value) -> ir.Value:
    """16 random bits (an i32) of the element: `ops.random_bits16(key, index)`."""
    b = ctx.builder
    z = b.add(b.mul(b.fptoui(key, I64), _i64(int(RANDOM_MIX[0]))), ctx.index)
    z = b.mul(b.xor(z, b.lshr(z, I64(30))), _i64(int(RANDOM_MIX[1])))
    z = b.mul(b.xor(z, b.lshr(z, I64(27))), _i64(int(RANDOM_MIX[2])))
    z = b.xor(z, b.lshr(z, I64(31)))
    return b.trunc(b.lshr(z, I64(48)), I32)


def _code_stream(ctx: _Ctx, key: ir.Value) -> ir.Value:
    """32 random bits (an i32) of the element: `ops.code_stream(key, index)` (the key's hash
    is loop-invariant: LLVM computes it once per tensor)."""
    b = ctx.builder
    x = b.trunc(b.fptoui(key, I64), I32)
    x = b.mul(b.xor(x, b.lshr(x, I32(16))), _i32(int(HASH32[0])))
    x = b.mul(b.xor(x, b.lshr(x, I32(15))), _i32(int(HASH32[1])))
    x = b.xor(x, b.lshr(x, I32(16)))
    weyl = ctx.weyl if ctx.weyl is not None else b.mul(b.trunc(ctx.index, I32), _i32(int(WEYL32)))
    return b.add(x, weyl)


def _i32(value: int) -> ir.Constant:
    """A 32-bit constant from its unsigned value."""
    return I32(value - (1 << 32) if value >= 1 << 31 else value)


def _round_sr(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
    """float32 to bfloat16 bits, stochastically (`ops.random_bits16`, `OPS[Op.ROUND_SR]`)."""
    b, (x, key) = ctx.builder, ops
    bits = b.bitcast(x, I32)
    up = b.trunc(b.lshr(b.add(bits, _random_bits16(ctx, key)), I32(16)), I16)
    special = b.icmp_unsigned("==", b.and_(bits, I32(0x7F800000)), I32(0x7F800000))
    return b.select(special, _float_to_bfloat(b, x), up)


def _decode(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
    """A code's float32 value (`ops.CodeMap.decode`), without a branch or a float32 subnormal.
    A signed map with bias 15 is the top of a half (sign, 4 of its 5 exponent bits, 3 of its
    10 fraction bits): with F16C, one conversion (which ignores denormals-are-zero). Else t,
    the code's magnitude bits moved into float32's exponent and fraction with the exponent
    rebiased one binade up, is twice the value of a normal code; of a subnormal code, t is
    2 * 2**-B (B the bias) plus twice its value. The value is min(t / 2, t - 2**(1 - B)),
    both exact (t / 2 as an exponent decrement); a signed map's sign bit is then copied."""
    b, cm = ctx.builder, CODE_MAPS[node.arg]
    if cm.signed and (cm.exponent, cm.fraction) == (4, 3) and ctx.f16_native:
        h = b.and_(b.shl(b.sext(ops[0], I16), I16(7)), I16(0xBFFF - 0x10000))
        return b.fpext(b.bitcast(h, HALF), F32)
    c = b.sext(ops[0], I32) if cm.signed else b.zext(ops[0], I32)
    field = b.shl(c, I32(23 - cm.fraction))
    if cm.signed:
        field = b.and_(field, I32(0x7F << (23 - cm.fraction)))
    t = b.add(field, I32((128 - cm.bias) << 23))
    subnormal = b.fsub(b.bitcast(t, F32), ir.Constant(F32, 2.0 ** (1 - cm.bias)))
    normal = b.bitcast(b.sub(t, I32(1 << 23)), F32)
    value = b.select(b.fcmp_ordered("<", subnormal, normal), subnormal, normal)
    if cm.signed:  # c is sign-extended: its sign bit is the code's
        value = b.bitcast(b.or_(b.bitcast(value, I32), b.and_(c, I32(-(2**31)))), F32)
    return value


def _encode(ctx: _Ctx, node: Expr, ops: list[ir.Value]) -> ir.Value:
    """The code of a float32 in a code map: to nearest-even (ENCODE, `CodeMap.encode`), as
    float to half conversion rounds (`_soft_float_to_half`), or stochastically (ENCODE_SR,
    `CodeMap.encode_stochastic`, whose recipe this is: a NaN or an infinity falls out of the
    maxima as 2**(B + 1), 1's code)."""
    b, cm, x = ctx.builder, CODE_MAPS[node.arg], ops[0]
    zero = ir.Constant(F32, 0.0)
    if cm.signed:
        a = b.call(ctx.intrinsic("llvm.fabs", F32), [x])
    else:  # negative values give 0; NaN stays NaN
        a = b.select(b.fcmp_ordered("<", x, zero), zero, x)
    if node.op is Op.ENCODE_SR:
        top = ir.Constant(F32, 2.0 ** (cm.bias + 1))
        # a * 2**B is exact: fused or not (fmuladd: no libm call where there is no FMA), the
        # sum is rounded once
        fmuladd = ctx.module.declare_intrinsic("llvm.fmuladd", [F32],
                                               ir.FunctionType(F32, [F32] * 3))
        first = b.call(fmuladd, [a, ir.Constant(F32, 2.0**cm.bias), ir.Constant(F32, 2.0)])
        second = b.bitcast(b.add(b.bitcast(a, I32), I32((cm.bias + 1) << 23)), F32)
        w = b.select(b.fcmp_ordered(">", second, first), second, first)  # NaN: first's NaN
        w = b.select(b.fcmp_ordered("<", w, top), w, top)  # NaN, infinity, above 1: 2**(B + 1)
        shift = 23 - cm.fraction
        random = b.and_(_code_stream(ctx, ops[1]), I32((1 << shift) - 1))
        w_bits = b.add(b.bitcast(w, I32), random)
        code = b.sub(b.lshr(w_bits, I32(shift)), I32(0x40000000 >> shift))  # less 2.0's bits
    else:
        one = ir.Constant(F32, 1.0)
        a = b.select(b.fcmp_ordered("<=", a, one), a, one)  # NaN: 1
        bits = b.bitcast(a, I32)
        shift = 23 - cm.fraction
        rebias = ((cm.bias - 127) << 23) % 2**32 - 2**32  # as a signed i32 constant
        odd = b.and_(b.lshr(bits, I32(shift)), I32(1))
        normal = b.lshr(b.add(bits, b.add(I32(rebias + (1 << (shift - 1)) - 1), odd)),
                        I32(shift))
        magic = ir.Constant(F32, 2.0 ** (1 - cm.bias - cm.fraction + 23))
        tiny = b.sub(b.bitcast(b.fadd(a, magic), I32), b.bitcast(magic, I32))
        smallest_normal = ir.Constant(F32, 2.0 ** (1 - cm.bias))
        code = b.select(b.fcmp_ordered("<", a, smallest_normal), tiny, normal)
    if cm.signed:  # x < 0 (not -0, nor NaN) sets the sign bit
        code = b.or_(code, b.select(b.fcmp_ordered("<", x, zero), I32(0x80), I32(0)))
    return b.trunc(code, I8)


LLVM_OPS: dict[Op, Callable[[_Ctx, Expr, list[ir.Value]], ir.Value]] = {
    Op.TENSOR: _load,
    Op.SCALAR: _external,  # loaded from the scalars array at kernel entry
    Op.PER_TENSOR: _external,  # loaded from the per-tensor table for each chunk
    Op.SUM: _external,  # added up from the partials for each chunk
    # the block loop's running maximum (`_block_function`); of a uniform value, its magnitude
    Op.BLOCK_ABSMAX: _arith(_intrinsic("llvm.fabs")),
    Op.ENCODE: _encode,
    Op.ENCODE_SR: _encode,
    Op.DECODE: _decode,
    Op.CONST: _const,
    Op.CAST: _cast,
    Op.ROUND_SR: _round_sr,
    Op.NEG: _arith(lambda c, o: c.builder.fneg(o[0])),
    Op.SQRT: _arith(_intrinsic("llvm.sqrt")),
    Op.ABS: _arith(_intrinsic("llvm.fabs")),
    Op.EXP: _arith(_intrinsic("llvm.exp")),
    Op.LOG: _arith(_intrinsic("llvm.log")),
    Op.TANH: _arith(_intrinsic("llvm.tanh")),
    Op.ADD: _arith(lambda c, o: c.builder.fadd(*o, flags=CONTRACT)),
    Op.SUB: _arith(lambda c, o: c.builder.fsub(*o, flags=CONTRACT)),
    Op.MUL: _arith(lambda c, o: c.builder.fmul(*o, flags=CONTRACT)),
    Op.DIV: _arith(lambda c, o: c.builder.fdiv(*o, flags=CONTRACT)),
    Op.MAX: _arith(_nan_propagating(">")),
    Op.MIN: _arith(_nan_propagating("<")),
    Op.CMPLT: _arith(lambda c, o: c.builder.fcmp_ordered("<", *o)),
    Op.WHERE: lambda c, n, o: c.builder.select(*o),
}
"""How each op is lowered: `emitter(context, node, operand values) -> value`."""

LIBM_SYMBOLS: tuple[str, ...] = tuple(
    name for info in OPS.values() if info.libm for name in (info.libm + "f", info.libm)
)
"""C library functions that lowered intrinsics may call (float and double versions)."""


def _emit(ctx: _Ctx, nodes: list[Expr]) -> None:
    for n in nodes:
        if n not in ctx.values:
            v = LLVM_OPS[n.op](ctx, n, [ctx.values[s] for s in n.src])
            if isinstance(v, ir.Instruction) and v.name.startswith(".") and n in ctx.labels:
                v.name = ctx.labels[n]  # the rule's node number, as in its text dump
            ctx.values[n] = v


# -- the kernel skeletons ------------------------------------------------------------------------
def lower(rule: UpdateRule, *, f16_native: bool = True) -> ir.Module:
    """An LLVM module holding the rule's kernels (see the module docstring for the ABI).

    `f16_native`: the target converts half precision in hardware (x86 F16C). Without it, half
    conversions are emitted as integer code, because the library calls LLVM would otherwise
    emit are not available to the JIT.
    """
    check_supported(rule, LLVM_OPS, "llvm")
    module = ir.Module(name=rule.name)
    module.triple = ""  # set by the runtime from the target machine
    update_name, reduce_name = kernel_names(rule)
    out_exprs = [e for _, e in rule.outputs]
    if rule.reductions:
        sources = [r.src[0] for r in rule.reductions]
        body = _element_function(module, rule, f"{reduce_name}_body", sources, f16_native, True)
        _chunk_kernel(module, rule, reduce_name, body, sources, f16_native, reduce=True)
    if blocked(rule):
        body = _block_function(module, rule, f"{update_name}_body", f16_native)
    else:
        body = _element_function(module, rule, f"{update_name}_body", out_exprs, f16_native, False)
    _chunk_kernel(module, rule, update_name, body, out_exprs, f16_native, reduce=False)
    return module


def _labels(rule: UpdateRule) -> dict[Expr, str]:
    return {n: f"v{i}.{n.op.value}" for i, n in enumerate(rule.nodes)}


def _reachable_elementwise(roots: list[Expr]) -> tuple[list[Expr], list[Expr]]:
    """(elementwise nodes needed by roots, in order; uniform values they read)."""
    needed: set[Expr] = set()
    todo = [r for r in roots if r.elementwise]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(s for s in n.src if s.elementwise)
    inputs = {s for n in needed for s in n.src if not s.elementwise}
    inputs |= {r for r in roots if not r.elementwise}
    return needed, inputs


def _element_function(module, rule, name, roots, f16_native, reduce) -> ir.Function:
    """The element loop: (slot pointers..., uniform inputs..., begin, end[, partials out])."""
    needed, inputs = _reachable_elementwise(roots)
    order = [n for n in rule.nodes if n in needed]
    uniform = [n for n in rule.nodes if n in inputs]
    slots = [s for s in rule.slots if any(n.op is Op.TENSOR and n.arg == s.name for n in order)
             or (not reduce and s.written)]
    arg_types = [PTR] * len(slots) + [value_type(u.dtype, f16_native) for u in uniform] + [I64, I64]
    if reduce:
        arg_types.append(PTR)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), name=name)
    fn.linkage = "internal"
    for a, s in zip(fn.args, slots):
        a.add_attribute("noalias")
        a.name = s.name
    for a, u in zip(fn.args[len(slots):], uniform):
        a.name = u.arg if u.op in (Op.SCALAR, Op.PER_TENSOR) else _labels(rule)[u]
    fn.args[len(slots) + len(uniform)].name = "begin"
    fn.args[len(slots) + len(uniform) + 1].name = "end"
    fn.uniform_inputs = uniform  # read by _chunk_kernel to pass the right values
    fn.slot_names = [s.name for s in slots]

    entry = fn.append_basic_block("entry")
    loop = fn.append_basic_block("loop")
    done = fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    begin, end = fn.args[-3:-1] if reduce else fn.args[-2:]
    b.cbranch(b.icmp_signed("<", begin, end), loop, done)

    b.position_at_end(loop)
    i = b.phi(I64, name="i")
    i.add_incoming(begin, entry)
    sums = []
    if reduce:  # loop-carried accumulators: phis must open the block
        for r in range(len(roots)):
            acc = b.phi(F64, name=f"sum{r}")
            acc.add_incoming(ir.Constant(F64, 0.0), entry)
            sums.append(acc)
    ctx = _Ctx(b, f16_native, index=i, labels=_labels(rule), per_block=_per_block(rule))
    ctx.slots = dict(zip(fn.slot_names, fn.args))
    ctx.values.update(zip(uniform, fn.args[len(slots):]))
    _emit(ctx, order)
    accs = []
    if reduce:
        for acc, root in zip(sums, roots):
            accs.append((acc, b.fadd(acc, ctx.values[root], flags=REASSOC)))
    else:
        for slot, e in rule.outputs:
            ty = value_type(e.dtype, f16_native)
            ptr = b.gep(ctx.slots[slot], [i], inbounds=True, source_etype=ty)
            b.store(ctx.values[e], ptr, align=e.dtype.itemsize)
    nxt = b.add(i, I64(1), name="i.next")
    i.add_incoming(nxt, b.block)
    for acc, new in accs:
        acc.add_incoming(new, b.block)
    b.cbranch(b.icmp_signed("<", nxt, end), loop, done)

    b.position_at_end(done)
    if reduce:
        out = fn.args[-1]
        totals = []
        for _, new in accs:  # every phi before the first store: phis must open the block
            total = b.phi(F64)
            total.add_incoming(ir.Constant(F64, 0.0), entry)
            total.add_incoming(new, loop)
            totals.append(total)
        for r, total in enumerate(totals):
            b.store(total, b.gep(out, [I64(r)], source_etype=F64), align=8)
    b.ret_void()
    return fn


def blocked(rule: UpdateRule) -> bool:
    """Whether the update runs block by block (`_block_function`): the rule reduces elements
    over blocks, or writes a per-block slot, which its elements read as it was before the
    step."""
    return (any(r.elementwise for r in rule.block_reductions)
            or any(s.per_block and s.written for s in rule.slots))


def _per_block(rule: UpdateRule) -> frozenset:
    return frozenset(s.name for s in rule.slots if s.per_block)


def _block_function(module, rule, name, f16_native) -> ir.Function:
    """The element loop of a rule with block reductions (8-bit state), one block of
    QUANT_BLOCK elements at a time, in two passes over the block (its values stay in cache):

    1. only what the block reductions' operands need (an optimizer's new state): each operand
       folds into its running maximum, and the values pass 2 reads are kept in a stack buffer
       of one block (outputs computed here are stored here);
    2. everything else: the codes, which need the block's maxima (value / block maximum), and
       what needs none (the parameter's update, with its divisions and square roots, which
       then run beside the encoding's integer work instead of before it: 15% faster for
       AdamW than computing them in pass 1); outputs are stored, and the per-block outputs
       once, at index block >> 8.

    The maximum of magnitudes is an unsigned maximum of their bits (sign cleared), which a
    NaN wins: both loops vectorize. Chunks begin at multiples of QUANT_BLOCK in their tensor.
    """
    blocks = [r for r in rule.block_reductions if r.elementwise]  # else: uniform, its magnitude
    per_block = _per_block(rule)
    outputs = [(slot, e) for slot, e in rule.outputs if slot not in per_block]
    block_outputs = [(slot, e) for slot, e in rule.outputs if slot in per_block]
    needed, inputs = _reachable_elementwise([e for _, e in rule.outputs])
    early, _ = _reachable_elementwise([r.src[0] for r in blocks])  # what the maxima need
    late = needed - early - set(blocks)  # the rest waits for pass 2, to run beside the encoding
    late_or_block = late | set(blocks)
    uniform = [n for n in rule.nodes if n in inputs and n not in blocks]
    kept = [n for n in rule.nodes if n in early and any(n in s.src for s in late)]

    slots = list(rule.slots)
    arg_types = [PTR] * len(slots) + [value_type(u.dtype, f16_native) for u in uniform] + [I64, I64]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), name=name)
    fn.linkage = "internal"
    for a, s in zip(fn.args, slots):
        a.add_attribute("noalias")
        a.name = s.name
    labels = _labels(rule)
    for a, u in zip(fn.args[len(slots):], uniform):
        a.name = u.arg if u.op in (Op.SCALAR, Op.PER_TENSOR) else labels[u]
    begin, end = fn.args[-2:]
    begin.name, end.name = "begin", "end"
    fn.uniform_inputs = uniform
    fn.slot_names = [s.name for s in slots]
    slot_args = dict(zip(fn.slot_names, fn.args))
    uniform_values = dict(zip(uniform, fn.args[len(slots):]))

    entry = fn.append_basic_block("entry")
    block = fn.append_basic_block("block")
    first = fn.append_basic_block("first")
    middle = fn.append_basic_block("middle")
    second = fn.append_basic_block("second")
    next_block = fn.append_basic_block("next_block")
    done = fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    buffers = {n: b.alloca(value_type(n.dtype, f16_native), size=I64(QUANT_BLOCK),
                           name=f"kept.{labels[n]}") for n in kept}
    b.cbranch(b.icmp_signed("<", begin, end), block, done)

    def store(ctx, slot, value, index, dtype):
        ty = value_type(dtype, f16_native)
        ptr = ctx.builder.gep(slot_args[slot], [index], inbounds=True, source_etype=ty)
        ctx.builder.store(value, ptr, align=dtype.itemsize)

    def kept_at(builder, n, offset):
        return builder.gep(buffers[n], [offset], inbounds=True,
                           source_etype=value_type(n.dtype, f16_native))

    b.position_at_end(block)
    start = b.phi(I64, name="block.start")
    start.add_incoming(begin, entry)
    stop = b.add(start, I64(QUANT_BLOCK))
    stop = b.select(b.icmp_signed("<", stop, end), stop, end, name="block.end")
    weyl_start = b.mul(b.trunc(start, I32), _i32(int(WEYL32)))
    # the block's values of per-block slots (its scales), read once
    bctx = _Ctx(b, f16_native, index=start, labels=labels, per_block=per_block)
    bctx.slots = slot_args
    block_loads = [n for n in rule.nodes if n.op is Op.TENSOR and n.arg in per_block]
    _emit(bctx, block_loads)
    b.branch(first)

    # pass 1
    b.position_at_end(first)
    i = b.phi(I64, name="i")
    i.add_incoming(start, block)
    maxima = []
    for _ in blocks:  # loop-carried maxima: phis must open the block
        m = b.phi(I32, name="absmax.bits")
        m.add_incoming(I32(0), block)
        maxima.append(m)
    ctx = _Ctx(b, f16_native, index=i, labels=labels, per_block=per_block)
    ctx.slots = slot_args
    ctx.values.update(uniform_values)
    ctx.values.update(bctx.values)
    _emit(ctx, [n for n in rule.nodes if n in early])
    for slot, e in outputs:
        if e not in late_or_block:
            store(ctx, slot, ctx.values[e], i, e.dtype)
    offset = b.sub(i, start)
    for n in kept:
        b.store(ctx.values[n], kept_at(b, n, offset))
    new_maxima = []
    for m, r in zip(maxima, blocks):
        bits = b.and_(b.bitcast(ctx.values[r.src[0]], I32), I32(0x7FFFFFFF))
        new = b.select(b.icmp_unsigned(">", bits, m), bits, m)
        m.add_incoming(new, first)
        new_maxima.append(new)
    i_next = b.add(i, I64(1))
    i.add_incoming(i_next, first)
    b.cbranch(b.icmp_signed("<", i_next, stop), first, middle)

    # the block's reductions, and what is stored once per block
    b.position_at_end(middle)
    reduced = {r: b.bitcast(m, F32, name=labels[r]) for r, m in zip(blocks, new_maxima)}
    mctx = _Ctx(b, f16_native, index=start, labels=labels, per_block=per_block)
    mctx.slots = slot_args
    mctx.values.update(uniform_values)
    mctx.values.update(bctx.values)
    mctx.values.update(reduced)
    index = b.lshr(start, I64(QUANT_BLOCK.bit_length() - 1))
    for slot, e in block_outputs:  # from the reductions and per-block loads only (UpdateRule)
        needed, todo = set(), [e]
        while todo:
            n = todo.pop()
            if n.elementwise and n not in reduced and n not in needed:
                needed.add(n)
                todo.extend(n.src)
        _emit(mctx, [n for n in rule.nodes if n in needed])
        store(mctx, slot, mctx.values[e], index, e.dtype)
    b.branch(second)

    # pass 2
    b.position_at_end(second)
    j = b.phi(I64, name="j")
    j.add_incoming(start, middle)
    weyl = b.phi(I32, name="j.weyl")  # j * WEYL32, an induction: one addition per vector
    weyl.add_incoming(weyl_start, middle)
    lctx = _Ctx(b, f16_native, index=j, weyl=weyl, labels=labels, per_block=per_block)
    lctx.slots = slot_args
    lctx.values.update(uniform_values)
    lctx.values.update(bctx.values)
    lctx.values.update(reduced)
    offset = b.sub(j, start)
    for n in kept:
        lctx.values[n] = b.load(kept_at(b, n, offset), typ=value_type(n.dtype, f16_native))
    _emit(lctx, [n for n in rule.nodes if n in late])
    for slot, e in outputs:
        if e in late_or_block:
            store(lctx, slot, lctx.values[e], j, e.dtype)
    j_next = b.add(j, I64(1))
    j.add_incoming(j_next, second)
    weyl.add_incoming(b.add(weyl, _i32(int(WEYL32))), second)
    b.cbranch(b.icmp_signed("<", j_next, stop), second, next_block)

    b.position_at_end(next_block)
    start.add_incoming(stop, next_block)
    b.cbranch(b.icmp_signed("<", stop, end), block, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


def _chunk_kernel(module, rule, name, body, roots, f16_native, reduce) -> ir.Function:
    """The exported kernel: for each chunk, load its tensor's table row and call the body."""
    fn = ir.Function(module, KERNEL_TYPE, name=name)
    ptrs, chunks, tchunks, partials, per_tensor, scalars, c0, c1 = fn.args
    for a, nm in zip(fn.args, ("ptrs", "chunks", "tchunks", "partials", "per_tensor", "scalars",
                               "c0", "c1")):
        a.name = nm
    entry = fn.append_basic_block("entry")
    loop = fn.append_basic_block("chunk")
    done = fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    ctx = _Ctx(b, f16_native)

    def load_at(base, index, ty):
        return b.load(b.gep(base, [index], source_etype=ty), typ=ty)

    for k, (sname, dtype) in enumerate(rule.scalars):
        node = Expr(Op.SCALAR, dtype, arg=sname)
        ctx.values[node] = v = ctx.narrow(load_at(scalars, I64(k), F64), dtype)
        v.name = sname
    b.cbranch(b.icmp_signed("<", c0, c1), loop, done)

    b.position_at_end(loop)
    c = b.phi(I64, name="c")
    c.add_incoming(c0, entry)
    row = b.mul(c, I64(3))
    t = load_at(chunks, row, I64)
    begin = load_at(chunks, b.add(row, I64(1)), I64)
    end = load_at(chunks, b.add(row, I64(2)), I64)
    n_slots, n_pt, n_red = len(rule.slots), len(rule.per_tensor), len(rule.reductions)
    slot_ptr = {
        s.name: load_at(ptrs, b.add(b.mul(t, I64(n_slots)), I64(k)), PTR)
        for k, s in enumerate(rule.slots)
    }
    chunk_values = dict(ctx.values)
    for k, (pname, dtype) in enumerate(rule.per_tensor):
        raw = load_at(per_tensor, b.add(b.mul(t, I64(n_pt)), I64(k)), F64)
        chunk_values[Expr(Op.PER_TENSOR, dtype, arg=pname)] = v = ctx.narrow(raw, dtype)
        v.name = pname
    if n_red and not reduce:
        chunk_values.update(zip(rule.reductions, _sum_partials(b, fn, tchunks, partials, t, n_red)))
    cctx = _Ctx(b, f16_native, values=chunk_values, labels=_labels(rule))
    # uniform nodes the body needs, computed once per chunk
    wanted = [n for n in rule.nodes if not n.elementwise and n.op is not Op.TENSOR]
    needed = set(body.uniform_inputs)
    closure = set()
    todo = list(needed)
    while todo:
        n = todo.pop()
        if n not in closure:
            closure.add(n)
            todo.extend(n.src)
    _emit(cctx, [n for n in wanted if n in closure])
    args = [slot_ptr[s] for s in body.slot_names] + [cctx.values[u] for u in body.uniform_inputs]
    args += [begin, end]
    if reduce:
        args.append(b.gep(partials, [b.mul(c, I64(n_red))], source_etype=F64))
    b.call(body, args)
    nxt = b.add(c, I64(1))
    c.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, c1), loop, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


def _sum_partials(b: ir.IRBuilder, fn, tchunks, partials, t, n_red) -> list[ir.Value]:
    """Each reduction of tensor t: its chunks' partial sums added in chunk order."""
    first = b.load(b.gep(tchunks, [b.mul(t, I64(2))], source_etype=I64), typ=I64)
    count = b.load(b.gep(tchunks, [b.add(b.mul(t, I64(2)), I64(1))], source_etype=I64), typ=I64)
    stop = b.add(first, count)
    head = b.block
    loop = fn.append_basic_block("partials")
    after = fn.append_basic_block("partials.done")
    b.cbranch(b.icmp_signed("<", first, stop), loop, after)
    b.position_at_end(loop)
    k = b.phi(I64)
    k.add_incoming(first, head)
    phis = []
    for _ in range(n_red):  # every phi before the first load: phis must open the block
        acc = b.phi(F64)
        acc.add_incoming(ir.Constant(F64, 0.0), head)
        phis.append(acc)
    accs = []
    for r, acc in enumerate(phis):
        part = b.load(b.gep(partials, [b.add(b.mul(k, I64(n_red)), I64(r))], source_etype=F64),
                      typ=F64)
        accs.append((acc, b.fadd(acc, part)))  # no reassoc: chunk order, deterministic
    nxt = b.add(k, I64(1))
    k.add_incoming(nxt, loop)
    for acc, new in accs:
        acc.add_incoming(new, loop)
    b.cbranch(b.icmp_signed("<", nxt, stop), loop, after)
    b.position_at_end(after)
    sums = []
    for _, new in accs:
        s = b.phi(F64)
        s.add_incoming(ir.Constant(F64, 0.0), head)
        s.add_incoming(new, loop)
        sums.append(s)
    return sums


# -- half and bfloat16 conversions as integer code (no library calls) -----------------------------
def _double_to_float_round_to_odd(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """double -> float, truncated, with the last bit set when anything was dropped. Rounding the
    result to nearest-even in a format two or more bits narrower (float16) equals rounding `v`
    there directly. Infinities and NaN pass; overflow gives the largest float."""
    t = b.fptrunc(v, F32)
    back = b.fpext(t, F64)
    fabs = b.module.declare_intrinsic("llvm.fabs", [F64])
    away = b.fcmp_ordered(">", b.call(fabs, [back]), b.call(fabs, [v]))  # rounded up in size
    bits = b.bitcast(t, I32)
    bits = b.select(away, b.sub(bits, I32(1)), bits)  # one step back toward zero
    inexact = b.fcmp_ordered("!=", back, v)
    return b.bitcast(b.select(inexact, b.or_(bits, I32(1)), bits), F32)


def _float_to_bfloat(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN."""
    bits = b.bitcast(v, I32)
    lsb = b.and_(b.lshr(bits, I32(16)), I32(1))
    rounded = b.lshr(b.add(bits, b.add(I32(0x7FFF), lsb)), I32(16))
    quiet_nan = b.or_(b.lshr(bits, I32(16)), I32(0x40))
    is_nan = b.fcmp_unordered("uno", v, v)
    return b.trunc(b.select(is_nan, quiet_nan, rounded), I16)


def _soft_half_to_float(b: ir.IRBuilder, h: ir.Value) -> ir.Value:
    """IEEE half bits -> float, exactly (normals, subnormals, inf, NaN)."""
    x = b.zext(h, I32)
    sign = b.shl(b.and_(x, I32(0x8000)), I32(16))
    exp = b.and_(b.lshr(x, I32(10)), I32(0x1F))
    mant = b.and_(x, I32(0x3FF))
    normal = b.or_(b.shl(b.add(exp, I32(112)), I32(23)), b.shl(mant, I32(13)))
    special = b.or_(I32(0x7F800000), b.shl(mant, I32(13)))
    subnormal = b.bitcast(b.fmul(b.uitofp(mant, F32), ir.Constant(F32, 2.0**-24)), I32)
    mag = b.select(b.icmp_unsigned("==", exp, I32(0x1F)), special,
                   b.select(b.icmp_unsigned("==", exp, I32(0)), subnormal, normal))
    return b.bitcast(b.or_(sign, mag), F32)


def _soft_float_to_half(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """float -> IEEE half bits, round to nearest even (overflow to inf, subnormals, NaN)."""
    x = b.bitcast(v, I32)
    sign = b.and_(b.lshr(x, I32(16)), I32(0x8000))
    ax = b.and_(x, I32(0x7FFFFFFF))
    # normal range: rebias the exponent and round the 13 dropped bits to nearest even
    odd = b.and_(b.lshr(ax, I32(13)), I32(1))
    normal = b.lshr(b.add(ax, b.add(I32(((15 - 127) << 23) + 0xFFF), odd)), I32(13))
    # below the smallest normal half: adding 0.5 rounds to a multiple of 2**-24 in hardware
    tiny = b.sub(b.bitcast(b.fadd(b.bitcast(ax, F32), ir.Constant(F32, 0.5)), I32),
                 I32(0x3F000000))
    mag = b.select(b.icmp_unsigned("<", ax, I32(0x38800000)), tiny, normal)
    mag = b.select(b.icmp_unsigned(">=", ax, I32(0x477FF000)), I32(0x7C00), mag)
    mag = b.select(b.icmp_unsigned(">", ax, I32(0x7F800000)), I32(0x7E00), mag)
    return b.trunc(b.or_(sign, mag), I16)
