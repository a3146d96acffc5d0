"""UpdateRule: the whole per-element update of one kind of tensor, as named inputs and outputs.

A rule has tensor *slots* (param, grad, state buffers; each with a storage dtype and whether the
rule writes it), group *scalars* (hyperparameters, passed at every launch), *per-tensor* values
(held in the launch table) and *outputs* (slot name -> expression, stored in the slot's dtype).

Everything a backend needs is derived here once: the nodes in evaluation order, the reductions,
the argument lists in ABI order, and the structural `key`. The key is a hash of the rule's
canonical text, which names operations, dtypes and literals but never a hyperparameter's value:
two optimizers whose configurations have the same structure share compiled kernels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .dtypes import DType
from .expr import Expr, block_absmax, decode, encode, encode_stochastic
from .ops import CODED, LEAVES, OPS, QUANT_BLOCK, Kind, Op


@dataclass(frozen=True)
class Slot:
    """A tensor the rule reads and/or writes, one element at a time.

    `init` is where a state buffer starts (every slot but `param` and `grad` is one): a number,
    the name of a group hyperparameter whose value fills it (Adagrad's
    `initial_accumulator_value`), or "param": a copy of the parameter's values (a master copy,
    `with_master`). It never reaches a kernel: buffers are filled when created.
    """

    name: str
    dtype: DType
    written: bool = False
    init: float | str = 0.0
    code_map: str | None = None
    """For 8-bit state: the code map (`ops.CODE_MAPS`) of this uint8 slot's codes, whose
    scales are slot `scales_of(name)`."""
    per_block: bool = False
    """One value per block of `ops.QUANT_BLOCK` elements (8-bit state's scales): the slot
    holds ceil(numel / QUANT_BLOCK) values, each element reads its block's."""

    def length(self, numel: int):
        """How many values the slot holds for a tensor of `numel` elements (numbers or arrays)."""
        return -(-numel // QUANT_BLOCK) if self.per_block else numel


def scales_of(name: str) -> str:
    """The name of the slot holding the block scales of 8-bit slot `name`."""
    return f"{name}_absmax"


class UpdateRule:
    """An immutable, validated update rule. Build one with `UpdateRule(name, slots, outputs)`."""

    def __init__(self, name: str, slots: Sequence[Slot], outputs: Mapping[str, Expr]) -> None:
        if not name.isidentifier():
            raise ValueError(f"rule name must be an identifier, got {name!r}")
        self.name = name
        self.slots: tuple[Slot, ...] = tuple(slots)
        by_name = {s.name: s for s in self.slots}
        if len(by_name) != len(self.slots):
            raise ValueError(f"rule {name}: duplicate slot names")
        for out, e in outputs.items():
            slot = by_name.get(out)
            if slot is None or not slot.written:
                raise ValueError(f"rule {name}: output {out!r} is not a written slot")
            if e.dtype is not slot.dtype:
                raise TypeError(f"rule {name}: output {out!r} is {e.dtype}, slot is {slot.dtype}")
        missing = [s.name for s in self.slots if s.written and s.name not in outputs]
        if missing:
            raise ValueError(f"rule {name}: written slots without an output: {missing}")
        # outputs in slot order, so that the rule's text does not depend on dict order
        self.outputs: tuple[tuple[str, Expr], ...] = tuple(
            (s.name, outputs[s.name]) for s in self.slots if s.written
        )
        self.nodes: tuple[Expr, ...] = _toposort([e for _, e in self.outputs])

        scalars: dict[str, DType] = {}
        per_tensor: dict[str, DType] = {}
        for n in self.nodes:
            if n.op is Op.TENSOR:
                slot = by_name.get(n.arg)
                if slot is None or slot.dtype is not n.dtype:
                    raise TypeError(f"rule {name}: load of {n.arg}:{n.dtype} matches no slot")
            elif n.op in (Op.SCALAR, Op.PER_TENSOR):
                table = scalars if n.op is Op.SCALAR else per_tensor
                if table.setdefault(n.arg, n.dtype) is not n.dtype:
                    raise TypeError(f"rule {name}: {n.arg} used with two dtypes")
        # ABI order: sorted by name, so adding a term never reorders unrelated arguments
        self.scalars: tuple[tuple[str, DType], ...] = tuple(sorted(scalars.items()))
        self.per_tensor: tuple[tuple[str, DType], ...] = tuple(sorted(per_tensor.items()))
        self.scalar_names: tuple[str, ...] = tuple(n for n, _ in self.scalars)
        self.per_tensor_names: tuple[str, ...] = tuple(n for n, _ in self.per_tensor)
        self.reductions: tuple[Expr, ...] = tuple(n for n in self.nodes if n.op is Op.SUM)
        self.block_reductions: tuple[Expr, ...] = tuple(
            n for n in self.nodes if OPS[n.op].kind is Kind.BLOCK)
        for out, e in self.outputs:
            if by_name[out].per_block and not _block_uniform(e, by_name):
                raise ValueError(f"rule {name}: output {out!r} holds one value per block, but "
                                 "its expression differs between the elements of a block "
                                 "(it must read elements only through block reductions)")
        for r in self.reductions:
            if any(OPS[n.op].kind is Kind.BLOCK for n in _toposort([r])):
                raise ValueError(f"rule {name}: a sum may not read a block reduction")
        self.text = self._render()
        self.key = hashlib.sha256(self.text.encode()).hexdigest()[:20]


    @property
    def numel_slot(self) -> Slot:
        """The first slot holding one value per element (its size is the tensor's)."""
        return next(s for s in self.slots if not s.per_block)

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def _render(self) -> str:
        ids: dict[int, str] = {}
        lines = [
            f"rule {self.name}("
            + ", ".join(f"{s.name}: {s.dtype}{' inout' if s.written else ''}"
                        f"{f' codes {s.code_map}' if s.code_map else ''}"
                        f"{' per-block' if s.per_block else ''}" for s in self.slots)
            + ")"
        ]
        if self.scalars:
            lines.append("  scalars    " + ", ".join(f"{n}: {d}" for n, d in self.scalars))
        if self.per_tensor:
            lines.append("  per-tensor " + ", ".join(f"{n}: {d}" for n, d in self.per_tensor))
        for i, n in enumerate(self.nodes):
            ids[id(n)] = f"%{i}"
            if n.op is Op.CONST:
                rhs = f"const {n.arg!r}"
            elif n.op in LEAVES:
                rhs = f"{n.op.value} {n.arg}"
            elif n.op is Op.CAST:
                rhs = f"cast {ids[id(n.src[0])]}"
            elif n.op in CODED:
                rhs = f"{n.op.value} {ids[id(n.src[0])]} map {n.arg}"
            else:
                rhs = f"{n.op.value} " + ", ".join(ids[id(s)] for s in n.src)
            scope = "" if n.elementwise or n.op in LEAVES else "  (per tensor)"
            lines.append(f"  %{i:<3}= {rhs} : {n.dtype}{scope}")
        for slot, e in self.outputs:
            lines.append(f"  {slot} <- {ids[id(e)]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"<UpdateRule {self.name} key={self.key}>"


def _block_uniform(root: Expr, slots: Mapping[str, Slot]) -> bool:
    """Whether `root` is the same for every element of a block: it reads elements only through
    block reductions and per-block slots."""
    seen, todo = set(), [root]
    while todo:
        e = todo.pop()
        if id(e) in seen or not e.elementwise or OPS[e.op].kind is Kind.BLOCK:
            continue
        seen.add(id(e))
        if OPS[e.op].indexed or (e.op is Op.TENSOR and not slots[e.arg].per_block):
            return False
        todo.extend(e.src)
    return True


def _toposort(roots: Sequence[Expr]) -> tuple[Expr, ...]:
    """Nodes reachable from `roots`, each after its operands, in a deterministic order."""
    order: list[Expr] = []
    done: set[int] = set()
    stack: list[tuple[Expr, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            order.append(node)
        else:
            stack.append((node, True))
            stack.extend((s, False) for s in reversed(node.src) if id(s) not in done)
    return tuple(order)


def stored_as(rule: UpdateRule, dtypes: Mapping[str, DType], name: str) -> UpdateRule:
    """`rule` with the slots named in `dtypes` kept in those dtypes instead: each load is
    converted to the dtype the rule computes it in, and each output rounded to the storage
    dtype (to nearest even) as it is stored. The arithmetic is unchanged; only what memory
    holds is (compact optimizer state). `name` names the new rule."""
    by_name = {s.name: s for s in rule.slots}
    unknown = sorted(set(dtypes) - set(by_name))
    if unknown:
        raise ValueError(f"rule {rule.name} has no slot {', '.join(unknown)}")
    done: dict[int, Expr] = {}
    for node in rule.nodes:  # operands first: each node rebuilt over rebuilt operands
        if node.op is Op.TENSOR and node.arg in dtypes:
            new = Expr(Op.TENSOR, dtypes[node.arg], arg=node.arg).cast(node.dtype)
        elif node.op in LEAVES:
            new = node
        else:
            new = Expr(node.op, node.dtype, tuple(done[id(s)] for s in node.src), node.arg)
        done[id(node)] = new
    slots = [Slot(s.name, dtypes.get(s.name, s.dtype), s.written, s.init, s.code_map,
                  s.per_block) for s in rule.slots]
    outputs = {slot: done[id(e)].cast(dtypes.get(slot, e.dtype)) for slot, e in rule.outputs}
    return UpdateRule(name, slots, outputs)


def with_master(rule: UpdateRule, name: str = "master") -> UpdateRule:
    """`rule` keeping its parameter in a copy of the compute type, slot `name` (a state buffer
    that starts as the parameter's values): every use of the parameter reads the copy, the copy
    takes the unrounded new value, and the parameter the same value rounded as before. For half
    parameters: the update is not lost to the parameter's rounding step after step.

    The parameter's new value must be a rounding of a wider value (`x.cast(param dtype)`, as
    every rule built from `optim.prologue` has it); anything else is a ValueError."""
    param = rule.slot("param")
    if not param.dtype.is_half:
        raise ValueError(f"rule {rule.name}: a master copy is for half parameters, the "
                         f"parameter is {param.dtype}")
    compute = param.dtype.compute
    master = Expr(Op.TENSOR, compute, arg=name)
    done: dict[int, Expr] = {}
    for node in rule.nodes:
        src = node.src[0] if node.src else None
        if (node.op is Op.CAST and src.op is Op.TENSOR and src.arg == "param"
                and not node.dtype.is_half and node.dtype is not DType.BOOL):
            new = master.cast(node.dtype)  # the parameter widened: the copy (itself in float32)
        elif node.op is Op.TENSOR and node.arg == "param":
            new = master.cast(param.dtype)  # the half value itself: the copy's rounding
        elif node.op in LEAVES:
            new = node
        else:
            new = Expr(node.op, node.dtype, tuple(done[id(s)] for s in node.src), node.arg)
        done[id(node)] = new
    outputs = {slot: done[id(e)] for slot, e in rule.outputs}
    final = outputs["param"]
    if not (final.op is Op.CAST and final.src[0].dtype in (DType.F32, DType.F64)):
        raise ValueError(f"rule {rule.name}: the parameter's new value is not a rounding of a "
                         f"float32 or float64 value ({final.op.value} ...), so a master copy "
                         "would keep nothing the parameter loses")
    outputs[name] = final.src[0].cast(compute)
    slots = [*rule.slots, Slot(name, compute, written=True, init="param")]
    return UpdateRule(f"{rule.name}_master", slots, outputs)


def with_stochastic_rounding(rule: UpdateRule, key: str = "rounding_key") -> UpdateRule:
    """`rule` with its bfloat16 parameter rounded stochastically (`stochastic_round`) from the
    float32 value it was rounded to nearest from, keyed by the per-tensor float64 value `key`
    (a new integer every step gives new rounding decisions)."""
    param = rule.slot("param")
    final = dict(rule.outputs)["param"]
    if param.dtype is not DType.BF16:
        raise ValueError(f"rule {rule.name}: stochastic rounding is for bfloat16 parameters, "
                         f"the parameter is {param.dtype}")
    if not (final.op is Op.CAST and final.src[0].dtype in (DType.F32, DType.F64)):
        raise ValueError(f"rule {rule.name}: the parameter's new value is not a rounding of a "
                         f"float32 or float64 value ({final.op.value} ...)")
    value = final.src[0].cast(DType.F32)
    outputs = {**dict(rule.outputs),
               "param": Expr(Op.ROUND_SR, DType.BF16, (value, Expr(Op.PER_TENSOR, DType.F64,
                                                                    arg=key)))}
    return UpdateRule(f"{rule.name}_sr", rule.slots, outputs)


def quantized(rule: UpdateRule, code_maps: Mapping[str, str], name: str,
              key: str | None = "rounding_key") -> UpdateRule:
    """`rule` with the state slots named in `code_maps` kept in 8 bits: each becomes a uint8
    slot of codes in its code map (`ops.CODE_MAPS`) and a float32 slot `scales_of(slot)` of one
    scale per block of `ops.QUANT_BLOCK` elements. A load decodes (code value times its block's
    scale); an output is computed as before, in float32, and stored as its block's largest
    magnitude (the new scale) and each element's code of value * (1 / scale) (a reciprocal per
    block: a division per element would cost more than the bytes saved).

    Codes are rounded stochastically from the per-tensor float64 value `key` (each slot draws
    its own stream: key + its position), or to nearest when `key` is None. Rounded to nearest,
    an average such as Adam's second moment, which moves by 0.1% of itself per step, moves by
    less than half a code and stays where it is; stochastic rounding keeps it unbiased.
    `name` names the new rule."""
    by_name = {s.name: s for s in rule.slots}
    for slot_name in code_maps:
        slot = by_name.get(slot_name)
        if slot is None:
            raise ValueError(f"rule {rule.name} has no slot {slot_name}")
        if slot.name in ("param", "grad") or slot.per_block or slot.code_map:
            raise ValueError(f"rule {rule.name}: slot {slot_name} cannot be kept in 8 bits")
        if not slot.dtype.is_float:
            raise ValueError(f"rule {rule.name}: slot {slot_name} is {slot.dtype}, not a float")
    done: dict[int, Expr] = {}
    for node in rule.nodes:
        if node.op is Op.TENSOR and node.arg in code_maps:
            codes = Expr(Op.TENSOR, DType.U8, arg=node.arg)
            scale = Expr(Op.TENSOR, DType.F32, arg=scales_of(node.arg))
            new = (decode(codes, code_maps[node.arg]) * scale).cast(node.dtype)
        elif node.op in LEAVES:
            new = node
        else:
            new = Expr(node.op, node.dtype, tuple(done[id(s)] for s in node.src), node.arg)
        done[id(node)] = new
    slots: list[Slot] = []
    outputs: dict[str, Expr] = {}
    for s in rule.slots:
        if s.name not in code_maps:
            slots.append(s)
            continue
        slots.append(Slot(s.name, DType.U8, s.written, s.init, code_map=code_maps[s.name]))
        slots.append(Slot(scales_of(s.name), DType.F32, s.written, s.init, per_block=True))
    for k, (slot, e) in enumerate(rule.outputs):
        value = done[id(e)]
        if slot in code_maps:
            value = value.cast(DType.F32)
            scale = block_absmax(value)
            ratio = value * (1.0 / scale)
            if key is None:
                outputs[slot] = encode(ratio, code_maps[slot])
            else:
                stream = Expr(Op.PER_TENSOR, DType.F64, arg=key) + float(k + 1)
                outputs[slot] = encode_stochastic(ratio, stream, code_maps[slot])
            outputs[scales_of(slot)] = scale
        else:
            outputs[slot] = value
    return UpdateRule(name, slots, outputs)
