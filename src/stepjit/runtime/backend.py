"""The interface every backend implements: compile a rule once, bind it to tensors, launch.

    kernel = backend.compile(rule)                      # cached by rule.key (+ target)
    launch = backend.bind(kernel, tensors, per_tensor)  # the table: built once, reused
    launch(scalars)                                     # one step over every bound tensor
    launch.set_per_tensor("first", 0.0)                 # read afresh at the next call
    launch.forget("grad")                               # let the gradients be freed
    launch.repoint("grad", rows, new_grads)             # new arrays, same tables
    launch.table_cells("grad", rows, nbytes)            # where a forgotten slot's addresses
                                                        # live (host tables: runtime.repoint)

The CUDA backend also compiles a capturable variant, `compile(rule, formulas=f)` with the
optimizer's `tensor_formulas()`, bound with `bind(..., steps=counts)` (a device array its kernels
advance) and given its inputs by `launch.set_inputs(scalars, lr_source)` before each call.

`tensors` is a list, one entry per tensor, of arrays in the rule's slot order, each already
checked by the caller against its parameter (shape, dtype, device, layout, overlaps); a launch
checks again only what keeps memory safe (each array spans the bytes the kernel touches).
`per_tensor` is a float64 array of shape (len(tensors), len(rule.per_tensor)). These methods are
the whole contract between an optimizer and a launch: nothing outside a backend touches a
launch's tables.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from ..ir import UpdateRule
from . import arrays


class Launch(abc.ABC):
    """A kernel bound to a fixed list of tensors."""

    def __init__(self, rule: UpdateRule, tensors: list[tuple], per_tensor: np.ndarray) -> None:
        if per_tensor.shape != (len(tensors), len(rule.per_tensor)):
            raise ValueError(f"{rule.name}: per_tensor has shape {per_tensor.shape}, expected "
                             f"{(len(tensors), len(rule.per_tensor))}")
        self.rule = rule
        self.per_tensor = per_tensor
        self.held = list(tensors)  # the tables hold raw addresses: keep the arrays alive

    @abc.abstractmethod
    def __call__(self, scalars: Sequence[float]) -> None:
        """Run the rule over every bound tensor; `scalars` in `rule.scalar_names` order."""

    def set_per_tensor(self, name: str, values) -> None:
        """Set per-tensor value `name` for the next calls: one value for every tensor, or one
        per tensor in binding order. A name the rule does not use is ignored."""
        names = self.rule.per_tensor_names
        if name in names:
            self.per_tensor[:, names.index(name)] = values

    can_repoint: bool = False
    """Whether `repoint` is supported (otherwise the caller binds a new launch)."""

    def table_cells(self, slot: str, rows: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """For a launch that does not hold `slot`'s arrays (`forget`): the host addresses of
        the table entries holding the pointers of `slot` at `rows`, for `runtime.repoint` to
        write new addresses of arrays of `nbytes` each (checked here, once) into; valid while
        the launch lives (a CUDA launch uploads its host table when it changed). None when a
        launch has no such table."""
        return None

    def set_scalars(self, scalars: Sequence[float]) -> None:
        """Set the kernel arguments (`rule.scalar_names` order) that `native_calls` run with."""
        raise NotImplementedError(f"{type(self).__name__} runs only through __call__")

    def native_calls(self) -> list[tuple[int, ...]] | None:
        """For a host launch: its passes as rows of 10 for `runtime.repoint` to run with the
        scalars and per-tensor values last set, valid while `calls_key()` is unchanged (see
        `Program`); None when a launch can only run through `__call__`."""
        return None

    def calls_key(self) -> object:
        """What `native_calls` depends on (for host launches: the team's size)."""
        return None

    def _hold(self, slot: str, rows: Sequence[int], tensors: Sequence,
              numel: Sequence[int]) -> int:
        """Check that each of `tensors` spans the bytes the kernel touches at its row (`numel`:
        the elements of each bound tensor), keep them alive in place of slot `slot`'s at `rows`
        (unless forgotten), and return the slot's index."""
        k = [s.name for s in self.rule.slots].index(slot)
        s = self.rule.slots[k]
        for j, a in zip(rows, tensors):
            want = s.length(int(numel[j])) * s.dtype.itemsize
            if arrays.numel(a) * arrays.itemsize(a) != want:
                raise ValueError(f"{self.rule.name}: tensor {j}, slot {slot}: "
                                 f"{arrays.numel(a) * arrays.itemsize(a)} bytes where the kernel "
                                 f"expects {want}")
        for j, a in zip(rows, tensors):
            held = self.held[j]
            if held[k] is not None:
                self.held[j] = held[:k] + (a,) + held[k + 1:]
        return k

    def forget(self, slot: str) -> None:
        """Stop holding references to the arrays of `slot` (their pointers stay in the table).

        The caller then guarantees, before every later call, that each pointer still addresses a
        live array of the same size and dtype (torch's gradients: see `optim.optimizer`), so that
        memory the launch no longer needs can be freed and reused between steps.
        """
        k = [s.name for s in self.rule.slots].index(slot)
        self.held = [t[:k] + (None,) + t[k + 1 :] for t in self.held]
        self.forgotten = self.forgotten | {slot}

    forgotten: frozenset = frozenset()
    """The slots whose arrays the launch does not hold (see `forget`)."""

    def _repoint_check(self, slot: str, rows: np.ndarray, nbytes: np.ndarray,
                       numel: np.ndarray) -> int:
        """The index of forgotten slot `slot`, once `nbytes` is checked against what the kernel
        touches at `rows` (`numel`: the elements of each bound tensor)."""
        if slot not in self.forgotten:
            raise ValueError(f"{self.rule.name}: slot {slot} holds its arrays: use repoint")
        k = [s.name for s in self.rule.slots].index(slot)
        s = self.rule.slots[k]
        want = s.length(numel[rows]) * s.dtype.itemsize
        bad = np.flatnonzero(nbytes != want)
        if len(bad):
            j = bad[0]
            raise ValueError(f"{self.rule.name}: tensor {rows[j]}, slot {slot}: {nbytes[j]} bytes "
                             f"where the kernel expects {want[j]}")
        return k


def expected_bytes(rule: UpdateRule, numel: np.ndarray) -> np.ndarray:
    """[tensor, slot]: the bytes the kernel touches in each slot of tensors of `numel` elements
    (a per-block slot holds one value per block)."""
    return np.stack([s.length(numel) * s.dtype.itemsize for s in rule.slots], axis=1).reshape(
        len(numel), len(rule.slots)).astype(np.int64)


def cells_of(table: np.ndarray, rows: np.ndarray, column: int) -> np.ndarray:
    """The addresses of `table[rows, column]` (a C-ordered host array): where `runtime.repoint`
    writes new entries."""
    width = table.shape[1] * table.itemsize
    return (table.ctypes.data + rows.astype(np.uint64) * width
            + column * table.itemsize).astype(np.uint64)


class Backend(abc.ABC):
    """Turns rules into launches for arrays of one kind (host, or one CUDA device)."""

    name: str

    @abc.abstractmethod
    def compile(self, rule: UpdateRule) -> object:
        """The compiled form of `rule`, from the cache when it is there."""

    @abc.abstractmethod
    def bind(self, kernel: object, tensors: list[tuple], per_tensor: np.ndarray) -> Launch:
        """A launch of `kernel` over `tensors` (contiguous arrays, in slot order)."""

    def settle(self) -> None:
        """Wait until the launches queued so far are done (for backends that run them
        asynchronously; the host backends have nothing to wait for)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
