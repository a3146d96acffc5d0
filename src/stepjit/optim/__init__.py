"""Optimizers: the `Optimizer` base class and the optimizers built on it."""

from .optimizer import Optimizer, required
from .sgd import SGD

__all__ = ["SGD", "Optimizer", "required"]
