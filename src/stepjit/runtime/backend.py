"""The interface every backend implements: compile a rule once, bind it to tensors, launch.

    kernel = backend.compile(rule)                      # cached by rule.key (+ target)
    launch = backend.bind(kernel, tensors, per_tensor)  # the table: built once, reused
    launch(scalars)                                     # one step over every bound tensor

`tensors` is a list, one entry per tensor, of arrays in the rule's slot order; `per_tensor` is a
float64 array of shape (len(tensors), len(rule.per_tensor)) that the launch reads afresh at every
call, so the optimizer can flip a per-tensor flag without rebuilding the table.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from ..ir import UpdateRule


class Launch(abc.ABC):
    """A kernel bound to a fixed list of tensors."""

    rule: UpdateRule
    per_tensor: np.ndarray

    @abc.abstractmethod
    def __call__(self, scalars: Sequence[float]) -> None:
        """Run the rule over every bound tensor; `scalars` in `rule.scalar_names` order."""

    def set_per_tensor(self, name: str, values) -> None:
        """Set per-tensor value `name` for the next calls: one value for every tensor, or one
        per tensor in binding order. A name the rule does not use is ignored."""
        names = self.rule.per_tensor_names
        if name in names:
            self.per_tensor[:, names.index(name)] = values

    def forget(self, slot: str) -> None:
        """Stop holding references to the arrays of `slot` (their pointers stay in the table).

        The caller then guarantees, before every later call, that each pointer still addresses a
        live array of the same size and dtype (torch's gradients: see `optim.optimizer`), so that
        memory the launch no longer needs can be freed and reused between steps.
        """
        k = [s.name for s in self.rule.slots].index(slot)
        self._held = [t[:k] + (None,) + t[k + 1 :] for t in self._held]


class Backend(abc.ABC):
    """Turns rules into launches for arrays of one kind (host, or one CUDA device)."""

    name: str

    @abc.abstractmethod
    def compile(self, rule: UpdateRule) -> object:
        """The compiled form of `rule`, from the cache when it is there."""

    @abc.abstractmethod
    def bind(self, kernel: object, tensors: list[tuple], per_tensor: np.ndarray) -> Launch:
        """A launch of `kernel` over `tensors` (contiguous arrays, in slot order)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
