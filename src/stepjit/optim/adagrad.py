"""Adagrad (Duchi, Hazan & Singer, 2011), as torch.optim.Adagrad, with Dragon's `scale` and
`clip_norm`."""

from __future__ import annotations

import functools

import numpy as np

from ..ir import DType, Expr, Slot, UpdateRule, per_tensor, scalar, sqrt, tensor
from .optimizer import Optimizer, check_number, check_scale_and_clip
from .prologue import clips, decays, prologue, prologue_scalars
from .registry import register


@functools.cache
def adagrad_rule(decay: bool, clip: bool, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
    """The Adagrad update of one tensor, in torch's operation order.

    Scalars: the prologue's (lr unused: the per-tensor `clr` replaces it), eps. Per tensor, from
    the host in float64: `clr = lr / (1 + (t - 1) * lr_decay)`, t the tensor's step count.
    """
    pro = prologue(param_dtype, grad_dtype, clip=clip, decay=decay)
    cty, g = pro.compute, pro.grad
    state_sum = tensor("sum", cty) + g * g
    clr = per_tensor("clr", DType.F64).cast(cty)
    std = sqrt(state_sum) + scalar("eps", cty)
    slots = [
        Slot("param", param_dtype, written=True),
        Slot("grad", grad_dtype),
        Slot("sum", cty, written=True, init="initial_accumulator_value"),
    ]
    outputs = {"sum": state_sum, "param": (pro.param - clr * (g / std)).cast(param_dtype)}
    name = "adagrad" + "".join(f"_{t}" for t, on in (("decay", decay), ("clip", clip)) if on)
    return UpdateRule(f"{name}_{param_dtype}_{grad_dtype}", slots, outputs)


@register("adagrad")
class Adagrad(Optimizer):
    r"""Adagrad: each element's step shrinks with the sum of its squared gradients.

    Per parameter with gradient `g`, in the compute type (float32 for half types), with `t` the
    tensor's own step count (this step included) and `lr`, `wd` already times `lr_mult`,
    `decay_mult`:

        g = scale * g
        if clip_norm > 0 and ||g|| > clip_norm:  g = g * clip_norm / ||g||   (per tensor)
        g = g + wd * p
        clr = lr / (1 + (t - 1) * lr_decay)      (on the host, float64, per tensor)
        s = s + g * g                            (s starts at initial_accumulator_value)
        p = p - clr * g / (sqrt(s) + eps)

    State per parameter (torch's keys): `step`, `sum` (s, in the compute type).

    Arguments:
        params: iterable of Parameters, or of param-group dicts.
        lr: learning rate.
        lr_decay: learning rate decay, >= 0.
        weight_decay: L2 penalty (added to the gradient), >= 0.
        initial_accumulator_value: the value `sum` starts at, >= 0.
        eps: added to the denominator, >= 0.
        scale: factor applied to every gradient first (for example 1 / loss_scale).
        clip_norm: when > 0, the L2 norm each gradient tensor is clipped to.
        **options: backend, capturable, state_dtype, master_weights, stochastic_rounding,
            rounding_seed (see `stepjit.optim.Optimizer`).

    Example:
        >>> import numpy as np, stepjit
        >>> w = stepjit.Parameter(np.ones(2))
        >>> opt = stepjit.optim.Adagrad([w], lr=0.5, eps=0.0)
        >>> w.grad = np.array([2.0, -4.0])     # the first step moves by lr * sign(g)
        >>> opt.step()
        >>> w.data
        array([0.5, 1.5])
    """

    counts_steps = True
    unsigned_state = ("sum",)
    examples = {"weight_decay": (0.0, 0.01), "clip_norm": (0.0, 1.0), "lr_decay": (0.1,),
                "initial_accumulator_value": (0.5,), "eps": (1e-3,), "scale": (0.5,)}

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        *,
        scale: float = 1,
        clip_norm: float = 0,
        **options,
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, scale=scale,
            clip_norm=clip_norm,
        )
        super().__init__(params, defaults, **options)

    def check_group(self, group: dict) -> None:
        check_number("lr", group["lr"])
        check_number("lr_decay", group["lr_decay"])
        check_number("weight_decay", group["weight_decay"])
        check_number("initial_accumulator_value", group["initial_accumulator_value"])
        check_number("eps", group["eps"])
        check_scale_and_clip(group)

    def structure(self, group: dict) -> tuple:
        return (decays(group), clips(group))

    def rule(self, structure: tuple, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
        return adagrad_rule(*structure, param_dtype, grad_dtype)

    def scalars(self, group: dict) -> dict[str, float]:
        # lr_decay is no kernel argument: it enters through the per-tensor clr alone
        return {**prologue_scalars(group), "eps": float(group["eps"]),
                "lr_decay": float(group["lr_decay"])}

    def tensor_values(self, group: dict, step: np.ndarray) -> dict[str, np.ndarray]:
        lr = float(group["lr"]) * float(group["lr_mult"])
        return {"clr": lr / (1.0 + (step - 1.0) * float(group["lr_decay"]))}

    def tensor_formulas(self) -> dict[str, Expr]:
        step = per_tensor("step", DType.F64)
        lr, lr_decay = scalar("lr", DType.F64), scalar("lr_decay", DType.F64)
        return {"clr": lr / (1.0 + (step - 1.0) * lr_decay)}
