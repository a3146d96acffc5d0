"""The reference backend: the IR's numpy interpreter, one tensor at a time.

Slow by design and obviously right: it is what the compiled backends are measured against,
and what runs when no compiler can be used.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ..ir import UpdateRule, evaluate
from . import arrays, cache
from .backend import Backend, Launch


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self) -> None:
        self._rules: dict[str, UpdateRule] = {}

    def compile(self, rule: UpdateRule) -> UpdateRule:
        if rule.key in self._rules:
            cache.record(memory_hits=1)
        else:
            t0 = time.perf_counter()
            self._rules[rule.key] = rule
            cache.record(compiles=1, seconds=time.perf_counter() - t0)
        return self._rules[rule.key]

    def bind(self, kernel: UpdateRule, tensors: list[tuple], per_tensor: np.ndarray) -> Launch:
        return _ReferenceLaunch(kernel, tensors, per_tensor)


class _ReferenceLaunch(Launch):
    def __init__(self, rule: UpdateRule, tensors: list[tuple], per_tensor: np.ndarray) -> None:
        super().__init__(rule, tensors, per_tensor)
        names = [s.name for s in rule.slots]
        self._views = [
            dict(zip(names, (arrays.flat(arrays.host_view(a)) for a in t))) for t in tensors
        ]

    can_repoint = True

    def repoint(self, slot: str, rows: Sequence[int], tensors: Sequence) -> None:
        self._hold(slot, rows, tensors, [len(next(iter(v.values()))) for v in self._views])
        for j, a in zip(rows, tensors):
            self._views[j][slot] = arrays.flat(arrays.host_view(a))

    def forget(self, slot: str) -> None:
        """The interpreter works through numpy views, which keep their arrays alive."""

    def __call__(self, scalars: Sequence[float]) -> None:
        named = dict(zip(self.rule.scalar_names, scalars))
        pt_names = self.rule.per_tensor_names
        for views, pt in zip(self._views, self.per_tensor):
            out = evaluate(self.rule, views, named, dict(zip(pt_names, pt)))
            for slot, value in out.items():
                np.copyto(views[slot], value)
