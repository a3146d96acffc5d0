"""Lowerings of the IR to source text: LLVM IR for the CPU, CUDA C for NVIDIA GPUs.

Pure functions from an UpdateRule to text; no compiler is called here. Each backend spells the
ops in a table {op: emitter}; a rule using an op its table lacks is refused before lowering.
"""

from __future__ import annotations

from collections.abc import Container

from ..ir import Op, UpdateRule


class UnsupportedOp(NotImplementedError):
    """A rule uses an op that a backend cannot lower."""


def check_supported(rule: UpdateRule, table: Container[Op], backend: str) -> None:
    """Raise `UnsupportedOp` naming the ops of `rule` missing from `backend`'s `table`."""
    missing = sorted({n.op.value for n in rule.nodes if n.op not in table})
    if missing:
        raise UnsupportedOp(f"rule {rule.name}: the {backend} backend cannot lower "
                            f"{', '.join(missing)}")
