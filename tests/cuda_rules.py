"""Every rule the library can generate, for the CUDA codegen, compile and harness tests.

The optimizers' rules come from the registry: every registered optimizer, every structure its
`examples` reach (`registry.structures`), so that a new optimizer module is compiled and run here
without an edit to the tests; so do their rules with 8-bit state (`state_dtype="int8"`) and the
per-tensor formulas of their capturable variants (`Optimizer.tensor_formulas`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from stepjit.ir import DType, Expr, UpdateRule, quantized
from stepjit.optim import OPTIMIZERS, registry, rule_for
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule

FLOATS = (DType.F16, DType.BF16, DType.F32, DType.F64)
SAME = [(d, d) for d in FLOATS]
MIXED = [(p, g) for p, g in itertools.product(FLOATS, FLOATS) if p is not g]
"""(parameter dtype, gradient dtype) pairs."""


@dataclass(frozen=True)
class Case:
    """One rule of a registered optimizer, with kernel arguments that configuration passes."""

    optimizer: str
    config: tuple  # (hyperparameter, value) pairs, from `registry.structures`
    rule: UpdateRule
    scalars: tuple  # (scalar name, value) pairs, from `registry.example_scalars`

    @property
    def formulas(self) -> dict[str, Expr]:
        """The formulas of the rule's capturable variant (see `tensor_formulas`)."""
        return tensor_formulas(self.optimizer)


def tensor_formulas(optimizer: str) -> dict[str, Expr]:
    """The per-tensor formulas of the registered `optimizer`: `Optimizer.tensor_formulas` is an
    instance method that reads nothing of the instance, called here on a placeholder one."""
    return registry.configure(OPTIMIZERS[optimizer]).tensor_formulas()


def optimizer_cases(every_dtype: bool = True) -> list[Case]:
    """Every structure of every registered optimizer. every_dtype: for every parameter dtype
    (gradient of the same), and once more with another gradient dtype (the mixed pairs in turn);
    else once, the 16 dtype pairs in turn. A rule two optimizers share is listed once."""
    cases: dict[str, Case] = {}
    turn = itertools.count()
    for name, cls in OPTIMIZERS.items():
        for config in registry.structures(cls):
            scalars = tuple(registry.example_scalars(cls, config).items())
            i = next(turn)
            pairs = [*SAME, MIXED[i % len(MIXED)]] if every_dtype else [(SAME + MIXED)[i % 16]]
            for param, grad in pairs:
                rule = rule_for(name, str(param), grad_dtype=str(grad), **config)
                cases.setdefault(rule.key, Case(name, tuple(config.items()), rule, scalars))
    return list(cases.values())


def int8_cases() -> list[Case]:
    """8-bit state (`state_dtype="int8"`: codes and one scale per block of 256 elements, updated
    by the block-structured kernel): every structure of every registered optimizer that keeps
    state, the parameter dtypes in turn (float64, float32 and half parameters give blocks of
    128, 64 and 32 threads). Their codes round stochastically: no capturable variant."""
    cases: dict[str, Case] = {}
    turn = itertools.count()
    for name, cls in OPTIMIZERS.items():
        for config in registry.structures(cls):
            dtype = FLOATS[next(turn) % len(FLOATS)]
            rule = rule_for(name, str(dtype), state_dtype="int8", **config)
            if any(s.per_block for s in rule.slots):
                scalars = tuple(registry.example_scalars(cls, config).items())
                cases.setdefault(rule.key, Case(name, tuple(config.items()), rule, scalars))
    return list(cases.values())


def nearest_int8(optimizer: str, rule: UpdateRule) -> UpdateRule:
    """`rule` of the registered `optimizer` (float state) with its state in 8 bits as
    `state_dtype="int8"` keeps it, but its codes rounded to nearest (`ir.quantized(key=None)`):
    a rule with a capturable variant."""
    unsigned = OPTIMIZERS[optimizer].unsigned_state
    maps = {s.name: "unsigned" if s.name in unsigned else "signed"
            for s in rule.slots[2:] if s.written}
    return quantized(rule, maps, f"{rule.name}_int8_nearest", key=None)


def has_capturable_variant(rule: UpdateRule) -> bool:
    """Whether `rule` has a capturable variant: not when a per-tensor value comes from the host
    at every step (the keys of stochastic rounding, of parameters or of 8-bit codes)."""
    return "rounding_key" not in rule.per_tensor_names


def optimizer_rules() -> list[UpdateRule]:
    """The rules of `optimizer_cases()`."""
    return [case.rule for case in optimizer_cases()]


def accumulate_rules() -> list[UpdateRule]:
    """accumulate_grad(): every compute dtype (of every param dtype) x gradient dtype."""
    computes = sorted({d.compute for d in FLOATS}, key=lambda d: d.value)
    return [_accumulate_rule(c, g) for c in computes for g in FLOATS]


def zero_rules() -> list[UpdateRule]:
    """zero_grad(): every gradient dtype."""
    return [_zero_rule(g) for g in FLOATS]


def all_rules() -> list[UpdateRule]:
    """Every kernel the library can generate today (8-bit state included)."""
    return (optimizer_rules() + [case.rule for case in int8_cases()] + accumulate_rules()
            + zero_rules())


def capturable_rules() -> list[tuple[UpdateRule, dict[str, Expr]]]:
    """Every rule of `all_rules()` that has a capturable variant, with the formulas of that
    variant ({} for the accumulate and zero rules, whose only per-tensor value is the `first`
    flag)."""
    formulas = {case.rule.key: case.formulas for case in optimizer_cases()}
    return [(rule, formulas.get(rule.key, {})) for rule in all_rules()
            if has_capturable_variant(rule)]


def compact_rules() -> list[tuple[UpdateRule, dict[str, Expr]]]:
    """Rules with compact state (`state_dtype`), master copies (`master_weights`) and
    stochastic rounding, with their optimizers' formulas: bfloat16 and 8-bit state beside half,
    float32 and float64 parameters, a float32 copy of half parameters, rounding keys, with and
    without a reduction (stochastically rounded rules have no capturable variant: their keys
    come from the host; 8-bit state rounded to nearest has one)."""
    configs = [("adamw", "bfloat16", dict(state_dtype="bfloat16", master_weights=True,
                                          clip_norm=1.0)),
               ("sgd", "float16", dict(momentum=0.9, master_weights=True)),
               ("rmsprop", "float32", dict(state_dtype="bfloat16", centered=True)),
               ("adagrad", "bfloat16", dict(master_weights=True)),
               ("adamw", "bfloat16", dict(stochastic_rounding=True, state_dtype="bfloat16")),
               ("sgd", "bfloat16", dict(momentum=0.9, stochastic_rounding=True, clip_norm=1.0)),
               ("adamw", "bfloat16", dict(state_dtype="int8", master_weights=True,
                                          clip_norm=1.0)),
               ("sgd", "float16", dict(momentum=0.9, state_dtype="int8")),
               ("rmsprop", "float64", dict(state_dtype="int8", centered=True, momentum=0.5)),
               ("adagrad", "float32", dict(state_dtype="int8"))]
    rules = [(rule_for(name, dtype, **config), tensor_formulas(name))
             for name, dtype, config in configs]
    adam = nearest_int8("adam", rule_for("adam", "float32", clip_norm=1.0))
    return rules + [(adam, tensor_formulas("adam"))]
