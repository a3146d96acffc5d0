"""LARS: SGD with a layer-wise trust ratio from per-tensor norms (You, Gitman & Ginsburg, 2017)."""

from __future__ import annotations

import functools

from ..ir import DType, Slot, UpdateRule, per_tensor, scalar, tensor, where
from .optimizer import Optimizer, check_number, check_scale_and_clip, required
from .prologue import clips, decays, l2_norm, prologue, prologue_scalars
from .registry import register

F64 = DType.F64


@functools.cache
def lars_rule(
    momentum: bool,
    decay: bool,
    clip: bool,
    param_dtype: DType,
    grad_dtype: DType,
) -> UpdateRule:
    """The LARS update of one tensor.

    Both norms are reductions of the same pass over the tensor (the gradient's before clipping:
    the clipped norm is `n * factor`). The ratio is computed once per tensor in float64.
    Scalars: lr and weight_decay (already times lr_mult and decay_mult), momentum, trust_coef,
    scale, clip_norm. Per tensor: `first`, true on a buffer's first step.
    """
    pro = prologue(param_dtype, grad_dtype, clip=clip, decay=decay)
    cty, p, g, g_norm = pro.compute, pro.param, pro.grad, pro.norm
    p_norm = l2_norm(p)
    denom = g_norm + pro.weight_decay * p_norm if decay else g_norm
    trust = scalar("trust_coef", F64) * p_norm / denom
    ratio = where(p_norm > 0, where(g_norm > 0, trust, 1.0), 1.0)
    g = g * ratio.cast(cty)
    lr = pro.lr
    slots = [Slot("param", param_dtype, written=True), Slot("grad", grad_dtype)]
    outputs = {}
    if momentum:
        buf = tensor("momentum_buffer", cty)
        b = where(per_tensor("first", DType.BOOL), g, scalar("momentum", cty) * buf + g)
        slots.append(Slot("momentum_buffer", cty, written=True))
        outputs["momentum_buffer"] = b
        u = lr * b
    else:
        u = lr * g
    outputs["param"] = (p - u).cast(param_dtype)
    name = "lars" + "".join(
        f"_{term}" for term, on in (("momentum", momentum), ("decay", decay), ("clip", clip)) if on
    )
    return UpdateRule(f"{name}_{param_dtype}_{grad_dtype}", slots, outputs)


@register("lars")
class LARS(Optimizer):
    r"""LARS: SGD with momentum whose step is scaled per tensor by a trust ratio.

    Per parameter with gradient `g`, in the compute type (float32 for half types), with `lr`,
    `wd` already times `lr_mult`, `decay_mult`, and norms over this tensor alone, summed in
    float64:

        g = scale * g
        if clip_norm > 0 and ||g|| > clip_norm:  g = g * clip_norm / ||g||
        ratio = trust_coef * ||p|| / (||g|| + wd * ||p||)   if ||p|| > 0 and ||g|| > 0, else 1
        g = (g + wd * p) * ratio
        b = g on the tensor's first step, else momentum * b + g      (momentum > 0)
        p = p - lr * b        (momentum > 0; p - lr * g without momentum)

    `||g||` is the norm of the scaled and clipped gradient, before the decay term. Both norms
    come from one pass over the tensor; the ratio is computed once per tensor in float64. A
    norm that is not > 0 (zero, or NaN) gives ratio 1; NaN gradient elements still make NaN.

    State per parameter: `momentum_buffer` (with momentum, in the compute type).

    Arguments:
        params: iterable of Parameters, or of param-group dicts.
        lr: learning rate (required).
        momentum: momentum factor, >= 0.
        trust_coef: the trust coefficient (eta in the paper), >= 0.
        weight_decay: L2 penalty, >= 0; it enters the ratio's denominator too.
        scale: factor applied to every gradient first (for example 1 / loss_scale).
        clip_norm: when > 0, the L2 norm each gradient tensor is clipped to.
        **options: backend, capturable, state_dtype, master_weights, stochastic_rounding,
            rounding_seed (see `stepjit.optim.Optimizer`).

    Example:
        >>> import numpy as np, stepjit
        >>> w = stepjit.Parameter(np.full(4, 3.0))
        >>> opt = stepjit.optim.LARS([w], lr=1.0, trust_coef=0.01)
        >>> w.grad = np.full(4, 0.5)           # ||w|| = 6, ||g|| = 1: ratio 0.06
        >>> opt.step()
        >>> w.data
        array([2.97, 2.97, 2.97, 2.97])
    """

    def __init__(
        self,
        params,
        lr: float = required,
        momentum: float = 0,
        trust_coef: float = 0.001,
        weight_decay: float = 0,
        *,
        scale: float = 1,
        clip_norm: float = 0,
        **options,
    ) -> None:
        if lr is required:
            raise ValueError("parameter 'lr' is required (none given)")
        defaults = dict(
            lr=lr, momentum=momentum, trust_coef=trust_coef, weight_decay=weight_decay,
            scale=scale, clip_norm=clip_norm,
        )
        super().__init__(params, defaults, **options)

    def check_group(self, group: dict) -> None:
        check_number("lr", group["lr"])
        check_number("momentum", group["momentum"])
        check_number("trust_coef", group["trust_coef"])
        check_number("weight_decay", group["weight_decay"])
        check_scale_and_clip(group)

    examples = {"momentum": (0.0, 0.9), "weight_decay": (0.0, 0.01), "clip_norm": (0.0, 1.0),
                "trust_coef": (0.02,), "scale": (0.5,)}

    def structure(self, group: dict) -> tuple:
        return (group["momentum"] > 0, decays(group), clips(group))

    def rule(self, structure: tuple, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
        return lars_rule(*structure, param_dtype, grad_dtype)

    def scalars(self, group: dict) -> dict[str, float]:
        return {
            **prologue_scalars(group),
            "momentum": float(group["momentum"]),
            "trust_coef": float(group["trust_coef"]),
        }
