"""Every rule the library can generate, for the CUDA codegen, compile and harness tests."""

from __future__ import annotations

import itertools

from stepjit.ir import DType, UpdateRule
from stepjit.optim.adam import adam_rule
from stepjit.optim.lars import lars_rule
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.rmsprop import rmsprop_rule
from stepjit.optim.sgd import sgd_rule

FLOATS = (DType.F16, DType.BF16, DType.F32, DType.F64)

# (momentum, nesterov): nesterov needs momentum
MOMENTUM_MODES = ((False, False), (True, False), (True, True))


def sgd_rules() -> list[UpdateRule]:
    """All valid SGD configurations x parameter dtypes x gradient dtypes."""
    return [
        sgd_rule(momentum, nesterov, decay, clip, pd, gd)
        for (momentum, nesterov), decay, clip, pd, gd in itertools.product(
            MOMENTUM_MODES, (False, True), (False, True), FLOATS, FLOATS
        )
    ]


def accumulate_rules() -> list[UpdateRule]:
    """accumulate_grad(): every compute dtype (of every param dtype) x gradient dtype."""
    computes = sorted({d.compute for d in FLOATS}, key=lambda d: d.value)
    return [_accumulate_rule(c, g) for c in computes for g in FLOATS]


def zero_rules() -> list[UpdateRule]:
    """zero_grad(): every gradient dtype."""
    return [_zero_rule(g) for g in FLOATS]


def family_rules() -> list[UpdateRule]:
    """Adam/AdamW, RMSprop and LARS: every structure x parameter dtype (gradient of the same)."""
    flags = (False, True)
    # Adam: weight decay is off, coupled (L2) or decoupled (AdamW): never both
    decays = ((False, False), (True, False), (False, True))
    rules = [adam_rule(ams, l2, decoupled, clip, d, d)
             for ams, (l2, decoupled), clip, d in itertools.product(flags, decays, flags, FLOATS)]
    rules += [rmsprop_rule(*terms, d, d)
              for *terms, d in itertools.product(flags, flags, flags, flags, FLOATS)]
    rules += [lars_rule(*terms, d, d)
              for *terms, d in itertools.product(flags, flags, flags, FLOATS)]
    return rules


def all_rules() -> list[UpdateRule]:
    """Every kernel the library can generate today."""
    return sgd_rules() + family_rules() + accumulate_rules() + zero_rules()
