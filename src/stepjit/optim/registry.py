"""Every optimizer by name, and what the tools need to know about one without any tensor.

A built-in optimizer is one module of this package whose class is decorated with
`@register("name")`: the package imports every module, so the command line (`stepjit dump`,
`stepjit bench`), the golden files, the CUDA compile tests and the host harness find it without
another edit. A user's optimizer class is reached as "package.module:Class".

What a class declares, and where the tools read it:
- its hyperparameters: the keyword arguments of `__init__` and their defaults (`hyperparameters`);
- its structure space: `examples`, values of each hyperparameter that together turn every term
  on and off (`structures` enumerates the distinct structures they reach);
- its kernel arguments: `scalars(group)`.
"""

from __future__ import annotations

import importlib
import inspect
import itertools

import numpy as np

from ..ir import DType, UpdateRule
from ..parameter import Parameter
from .optimizer import Optimizer, Storage, required

OPTIMIZERS: dict[str, type[Optimizer]] = {}
"""Every built-in optimizer by its lower-case name."""

_NOT_HYPERPARAMETERS = ("self", "params", "backend", "capturable", "state_dtype",
                        "master_weights", "stochastic_rounding", "rounding_seed")


def register(name: str):
    """Class decorator: make a built-in optimizer known as `name`."""

    def add(cls: type[Optimizer]) -> type[Optimizer]:
        if name in OPTIMIZERS and OPTIMIZERS[name] is not cls:
            raise ValueError(f"two optimizers are registered as {name!r}")
        OPTIMIZERS[name] = cls
        return cls

    return add


def resolve(spec: str | type) -> type[Optimizer]:
    """An optimizer class from a registered name, a "module:Class" path, or the class itself."""
    if isinstance(spec, type):
        cls = spec
    elif spec in OPTIMIZERS:
        return OPTIMIZERS[spec]
    elif ":" in spec:
        module, _, qualname = spec.partition(":")
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load optimizer {spec!r}: {exc}") from None
    else:
        raise ValueError(f"unknown optimizer {spec!r}; choose one of {', '.join(OPTIMIZERS)} "
                         "or give a class as package.module:Class")
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise ValueError(f"{spec!r} is not a subclass of stepjit.optim.Optimizer")
    return cls


def hyperparameters(cls: type[Optimizer]) -> dict[str, object]:
    """The hyperparameters of `cls`, by name, with their defaults (`required` when none)."""
    found = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in _NOT_HYPERPARAMETERS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        found[p.name] = required if p.default is p.empty else p.default
    return found


def _placeholder(value: object) -> object:
    return 0.01 if value is required else value


def configure(cls: type[Optimizer], param_dtype: str = "float32", **values) -> Optimizer:
    """An optimizer of `cls` over one placeholder parameter on the reference backend: its
    hyperparameters are checked as they would be (ValueError, TypeError) and nothing compiles.
    A required hyperparameter left out gets a placeholder: no value changes a rule."""
    for name, default in hyperparameters(cls).items():
        if default is required:
            values.setdefault(name, _placeholder(default))
    try:
        dummy = np.zeros(1, DType(param_dtype).to_numpy())
    except TypeError:  # bfloat16 without ml_dtypes: the structure does not depend on it
        dummy = np.zeros(1, np.float32)
    return cls([Parameter(dummy)], backend="reference", **values)


def rule_for(
    name: str | type, dtype: str, *, grad_dtype: str | None = None,
    state_dtype: str | None = None, master_weights: bool = False,
    stochastic_rounding: bool = False, **hyperparameters
) -> UpdateRule:
    """The update rule optimizer `name` (see `resolve`) uses for `dtype` parameters (and
    `grad_dtype` gradients, default `dtype`, state buffers kept in `state_dtype`, with a master
    copy for `master_weights`, rounded stochastically for `stochastic_rounding`) under
    `hyperparameters` (its constructor's keyword arguments, checked as the optimizer checks
    them). Nothing is compiled."""
    cls = resolve(name)
    param_dtype, grad = DType(dtype), DType(grad_dtype or dtype)
    if not param_dtype.is_float or not grad.is_float:
        raise ValueError(f"rule_for needs float dtypes, got {dtype!r} and {grad_dtype!r}")
    opt = configure(cls, dtype, **hyperparameters)
    opt._store_as(Storage(state_dtype, master_weights, stochastic_rounding))
    return opt._stored(opt.rule(opt.structure(opt.param_groups[0]), param_dtype, grad))


def structures(cls: type[Optimizer]) -> list[dict]:
    """Hyperparameter settings of `cls`, one per distinct structure its `examples` reach (for
    each structure, the last valid combination, so that later example values are exercised)."""
    names = [n for n in cls.examples if n in hyperparameters(cls)]  # a subclass may take fewer
    found: dict[tuple, dict] = {}
    for values in itertools.product(*(cls.examples[n] for n in names)):
        config = dict(zip(names, values))
        try:
            opt = configure(cls, **config)
        except (ValueError, TypeError):
            continue  # a combination the optimizer refuses (nesterov without momentum, ...)
        found[opt.structure(opt.param_groups[0])] = config
    return list(found.values())


def example_scalars(cls: type[Optimizer], config: dict) -> dict[str, float]:
    """The kernel arguments of `cls` under hyperparameters `config` (defaults elsewhere)."""
    opt = configure(cls, **config)
    return opt.scalars(opt.param_groups[0])
