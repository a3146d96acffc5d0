"""The numpy evaluator of the IR: runs the definition of every op (`ops.OPS[op].definition`).

Every compiled backend is tested against this file. It evaluates one tensor at a time, in the
dtypes the rule names (float32 arithmetic stays float32, unless an op's definition says
otherwise), rounding each result to its node's dtype, so it is the `reference` backend too.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .dtypes import DType, rounded
from .expr import Expr
from .ops import CODED, OPS, QUANT_BLOCK, Kind, Op
from .rule import UpdateRule


def _typed(value, dtype: DType):
    """`value` as a numpy scalar or array of exactly `dtype` (`dtypes.rounded`)."""
    return rounded(value, dtype)


def _leaf(node: Expr, rule: UpdateRule, arrays, scalars, per_tensor, numel: int):
    """The value a leaf reads from the inputs of `evaluate`."""
    if node.op is Op.TENSOR:
        if rule.slot(node.arg).per_block:  # each element reads its block's value
            return np.repeat(arrays[node.arg], QUANT_BLOCK)[:numel]
        return arrays[node.arg]
    inputs = {Op.SCALAR: scalars, Op.PER_TENSOR: per_tensor}.get(node.op)
    return _typed(node.arg if inputs is None else inputs[node.arg], node.dtype)


def evaluate(
    rule: UpdateRule,
    arrays: Mapping[str, np.ndarray],
    scalars: Mapping[str, float],
    per_tensor: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate `rule` over one tensor: `arrays` maps slot names to 1-D arrays, of the tensor's
    size (per-block slots: one value per block, `Slot.length`).

    Returns a fresh array per written slot, in the slot's dtype; nothing is written in place.
    """
    per_tensor = per_tensor or {}
    numel = arrays[rule.numel_slot.name].size if arrays else 0
    values: dict[Expr, object] = {}
    with np.errstate(all="ignore"):
        for n in rule.nodes:
            info = OPS[n.op]
            if info.kind is Kind.LEAF:
                v = _leaf(n, rule, arrays, scalars, per_tensor, numel)
            else:
                operands = [values[s] for s in n.src]
                if info.indexed:
                    operands.append(np.arange(numel, dtype=np.uint64))
                if info.kind in (Kind.REDUCE, Kind.BLOCK):
                    operands = [np.broadcast_to(x, (numel,)) for x in operands]
                if n.op in CODED:
                    operands.insert(0, n.arg)
                v = _typed(info.definition(*operands), n.dtype)
            values[n] = v
    out = {}
    for slot, e in rule.outputs:
        v = np.broadcast_to(values[e], (numel,))
        if rule.slot(slot).per_block:  # the same over each block: its first element's
            v = v[::QUANT_BLOCK]
        out[slot] = v.astype(e.dtype.to_numpy(), copy=True)
    return out
