"""Parameter: an array the optimizer updates in place, and its gradient."""

from __future__ import annotations

import collections
import itertools
import weakref

from .runtime import arrays

_generation = itertools.count(1)
_current = [0]
_recent: collections.deque = collections.deque(maxlen=4096)  # (generation, weakref to Parameter)


def generation() -> int:
    """A number that changes whenever any Parameter's `.data` or `.grad` is reassigned.

    Optimizers cache their launch tables (pointers, sizes) and rebuild them only when this moves,
    so steady-state steps do no per-tensor work in Python. Writing into the arrays in place
    (`p.grad[...] = g`, `zero_grad()`) keeps the tables valid.
    """
    return _current[0]


def _bump(param: Parameter | None = None) -> None:
    _current[0] = next(_generation)
    if param is not None:
        _recent.append((_current[0], weakref.ref(param)))


def changed_since(seen: int) -> list[Parameter] | None:
    """The Parameters whose `.data` or `.grad` was assigned after generation `seen`, or None
    when that is too long ago to tell (an optimizer then rebuilds its tables)."""
    if seen == _current[0]:
        return []
    found, logged = {}, 0
    for gen, ref in reversed(_recent):
        if gen <= seen:
            break
        logged += 1
        p = ref()
        if p is not None:
            found[id(p)] = p
    if logged != _current[0] - seen:  # a change the log does not name (or has forgotten)
        return None
    return list(found.values())


class Parameter:
    """A trainable array: `.data` is updated in place by `step()`, `.grad` is read.

    `data` is a numpy array (host, LLVM backend) or a CuPy array (CUDA backend). It is never
    copied: the optimizer writes the new values into the same memory.
    """

    __slots__ = ("_data", "_grad", "__weakref__")

    def __init__(self, data) -> None:
        if not arrays.is_array(data) or arrays.is_parameter(data):
            raise TypeError(  # a torch tensor is a parameter itself: pass it to the optimizer
                f"Parameter needs a numpy or cupy array, got {arrays.type_name(data)}"
            )
        self._data = data
        self._grad = None  # no bump: a new Parameter joins an optimizer by add_param_group

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value) -> None:
        if not arrays.is_array(value):
            raise TypeError(f"Parameter.data must be an array, got {arrays.type_name(value)}")
        if value is not self._data:  # `p.data -= x` assigns the same array back
            self._data = value
            _bump(self)

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value) -> None:
        if value is not None and not arrays.is_array(value):
            raise TypeError(
                f"Parameter.grad must be an array or None, got {arrays.type_name(value)}"
            )
        if value is not self._grad:  # `p.grad += g` assigns the same array back
            self._grad = value
            _bump(self)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def size(self) -> int:
        return int(self._data.size)

    def __repr__(self) -> str:
        grad = "None" if self._grad is None else f"{tuple(self._grad.shape)}"
        return (
            f"Parameter(shape={self.shape}, dtype={self.dtype}, "
            f"device={arrays.device(self._data)}, grad={grad})"
        )
