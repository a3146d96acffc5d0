"""Optimizers: the `Optimizer` base class, the built-in optimizers, and their registry.

Every module of this package is imported here, so a built-in optimizer is one file: a class
decorated with `@register("name")` (see `registry`). `OPTIMIZERS` maps each name to its class;
`rule_for` gives the update rule one of them compiles for a configuration, without any tensor.
"""

from __future__ import annotations

import importlib
import pkgutil

from .optimizer import Optimizer, check_number, float32_state, required
from .registry import OPTIMIZERS, register, resolve, rule_for

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

globals().update({cls.__name__: cls for cls in OPTIMIZERS.values()})

__all__ = ["OPTIMIZERS", "Optimizer", "check_number", "float32_state", "register", "required",
           "resolve", "rule_for"]
__all__ += sorted(cls.__name__ for cls in OPTIMIZERS.values())
