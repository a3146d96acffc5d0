"""Optimizers: the `Optimizer` base class and the optimizers built on it.

`OPTIMIZERS` names every built-in optimizer (the names the `stepjit` command accepts), and
`rule_for` gives the update rule one of them compiles for a configuration, without any tensor.
"""

from __future__ import annotations

import inspect

import numpy as np

from ..ir import DType, UpdateRule
from ..parameter import Parameter
from .adam import Adam, AdamW
from .lars import LARS
from .optimizer import Optimizer, check_number, required
from .rmsprop import RMSprop
from .sgd import SGD

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "adam": Adam,
    "adamw": AdamW,
    "rmsprop": RMSprop,
    "lars": LARS,
}
"""Every built-in optimizer by its lower-case name."""


def rule_for(
    name: str, dtype: str, *, grad_dtype: str | None = None, **hyperparameters
) -> UpdateRule:
    """The update rule optimizer `name` uses for `dtype` parameters (and `grad_dtype` gradients,
    default `dtype`) under `hyperparameters` (its constructor's keyword arguments).

    The hyperparameters are checked as the optimizer checks them (ValueError or TypeError with
    its message); a required `lr` left out gets a placeholder, as no value changes the rule.
    Nothing is compiled.
    """
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    param_dtype = DType(dtype)
    grad = DType(grad_dtype or dtype)
    if not param_dtype.is_float or not grad.is_float:
        raise ValueError(f"rule_for needs float dtypes, got {dtype!r} and {grad_dtype!r}")
    lr = inspect.signature(cls.__init__).parameters.get("lr")
    if lr is not None and lr.default is required:
        hyperparameters.setdefault("lr", 0.01)
    try:
        dummy = np.zeros(1, param_dtype.to_numpy())
    except TypeError:  # bfloat16 without ml_dtypes: the structure does not depend on it
        dummy = np.zeros(1, np.float32)
    opt = cls([Parameter(dummy)], backend="reference", **hyperparameters)
    group = opt.param_groups[0]
    return opt.rule(opt.structure(group), param_dtype, grad)


__all__ = [
    "LARS",
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "AdamW",
    "Optimizer",
    "RMSprop",
    "check_number",
    "required",
    "rule_for",
]
