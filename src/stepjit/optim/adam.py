"""Adam and AdamW (with AMSGrad), with Dragon's gradient `scale` and per-tensor `clip_norm`."""

from __future__ import annotations

import functools
import numbers

import numpy as np

from ..ir import DType, Expr, Slot, UpdateRule, maximum, per_tensor, scalar, sqrt, tensor
from .optimizer import Optimizer, check_number, check_scale_and_clip
from .prologue import clips, decays, prologue, prologue_scalars
from .registry import register

F64 = DType.F64


def lerp(start: Expr, end: Expr, weight: Expr) -> Expr:
    """`start + weight * (end - start)`: torch's `start.lerp_(end, weight)` for weight < 0.5."""
    return start + weight * (end - start)


def check_betas(betas: object) -> None:
    """Raise unless `betas` is a pair of finite reals, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"Invalid beta parameter at index {i} of betas: {beta!r} "
                            "(must be a real number)")
        if not 0.0 <= beta < 1.0:  # also false for NaN
            raise ValueError(f"Invalid beta parameter at index {i} of betas: {beta} "
                             "(must be in [0, 1))")


def check_flag(name: str, value: object) -> None:
    """Raise TypeError unless `value` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (must be a bool)")


@functools.cache
def adam_rule(
    amsgrad: bool,
    decay: bool,
    decoupled_decay: bool,
    clip: bool,
    param_dtype: DType,
    grad_dtype: DType,
) -> UpdateRule:
    """The Adam update of one tensor, in torch's operation order.

    Scalars: lr and weight_decay (already times lr_mult and decay_mult), beta1, beta2, eps,
    scale, clip_norm. Per tensor, from the host in float64: `step_size = lr / (1 - beta1**t)`
    and `bias_correction2_sqrt = sqrt(1 - beta2**t)`, t being the tensor's step count.
    `decay` is L2 decay added to the gradient (Adam); `decoupled_decay` multiplies the parameter
    by `1 - lr * weight_decay` first (AdamW).
    """
    pro = prologue(param_dtype, grad_dtype, clip=clip, decay=decay)
    cty, p, g = pro.compute, pro.param, pro.grad
    if decoupled_decay:
        # torch computes 1 - lr * weight_decay in double, then rounds it once
        shrink = 1.0 - scalar("lr", F64) * pro.weight_decay
        p = p * shrink.cast(cty)
    # 1 - beta in double, rounded once (as torch's scalar arguments are)
    beta1, beta2 = scalar("beta1", F64), scalar("beta2", F64)
    one_minus_beta1 = (1.0 - beta1).cast(cty)
    one_minus_beta2 = (1.0 - beta2).cast(cty)

    m = lerp(tensor("exp_avg", cty), g, one_minus_beta1)
    v = beta2.cast(cty) * tensor("exp_avg_sq", cty) + (one_minus_beta2 * g) * g
    slots = [
        Slot("param", param_dtype, written=True),
        Slot("grad", grad_dtype),
        Slot("exp_avg", cty, written=True),
        Slot("exp_avg_sq", cty, written=True),
    ]
    outputs = {"exp_avg": m, "exp_avg_sq": v}
    if amsgrad:
        v = maximum(tensor("max_exp_avg_sq", cty), v)
        slots.append(Slot("max_exp_avg_sq", cty, written=True))
        outputs["max_exp_avg_sq"] = v
    bc2_sqrt = per_tensor("bias_correction2_sqrt", F64).cast(cty)
    step_size = per_tensor("step_size", F64).cast(cty)
    denom = sqrt(v) / bc2_sqrt + scalar("eps", cty)
    outputs["param"] = (p - (step_size * m) / denom).cast(param_dtype)
    name = "adamw" if decoupled_decay else "adam"
    name += "".join(
        f"_{term}" for term, on in (("amsgrad", amsgrad), ("decay", decay), ("clip", clip)) if on
    )
    return UpdateRule(f"{name}_{param_dtype}_{grad_dtype}", slots, outputs)


@register("adam")
class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) with AMSGrad and L2 or decoupled decay, as torch.optim.Adam.

    Per parameter with gradient `g`, in the compute type (float32 for half types), with `t` the
    tensor's own step count (this step included) and `lr`, `wd` already times `lr_mult`,
    `decay_mult`:

        g = scale * g
        if clip_norm > 0 and ||g|| > clip_norm:  g = g * clip_norm / ||g||   (per tensor)
        g = g + wd * p                           (weight decay, Adam)
        p = p * (1 - lr * wd)                    (decoupled weight decay, AdamW, instead)
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v)                    (amsgrad; the denominator then uses v_max)
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    The bias corrections are computed on the host in float64 and passed to the kernel per
    tensor: neither a schedule nor the step count compiles anything.

    State per parameter (torch's keys): `step`, `exp_avg` (m), `exp_avg_sq` (v) and, with
    amsgrad, `max_exp_avg_sq`; buffers in the compute type (half parameters keep float32 state).

    Arguments:
        params: iterable of Parameters, or of param-group dicts.
        lr: learning rate.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty (added to the gradient), >= 0.
        amsgrad: use the running maximum of v (Reddi et al., 2018).
        decoupled_weight_decay: decay the parameter directly, as AdamW does.
        scale: factor applied to every gradient first (for example 1 / loss_scale).
        clip_norm: when > 0, the L2 norm each gradient tensor is clipped to.
        **options: backend, capturable, state_dtype, master_weights, stochastic_rounding,
            rounding_seed (see `stepjit.optim.Optimizer`).

    Example:
        >>> import numpy as np, stepjit
        >>> w = stepjit.Parameter(np.ones(3))
        >>> opt = stepjit.optim.Adam([w], lr=0.1)
        >>> w.grad = np.array([1.0, -2.0, 0.0])   # the first step moves by lr * sign(g)
        >>> opt.step()
        >>> w.data
        array([0.9, 1.1, 1. ])
    """

    counts_steps = True
    unsigned_state = ("exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        scale: float = 1,
        clip_norm: float = 0,
        **options,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay, scale=scale, clip_norm=clip_norm,
        )
        super().__init__(params, defaults, **options)

    def check_group(self, group: dict) -> None:
        check_number("lr", group["lr"])
        check_betas(group["betas"])
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        check_scale_and_clip(group)
        check_flag("amsgrad", group["amsgrad"])
        check_flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    examples = {"amsgrad": (False, True), "weight_decay": (0.0, 0.01),
                "decoupled_weight_decay": (False, True), "clip_norm": (0.0, 1.0),
                "betas": ((0.8, 0.9),), "eps": (1e-3,), "scale": (0.5,)}

    def structure(self, group: dict) -> tuple:
        decay, decoupled = decays(group), group["decoupled_weight_decay"]
        return (group["amsgrad"], decay and not decoupled, decay and decoupled, clips(group))

    def rule(self, structure: tuple, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
        return adam_rule(*structure, param_dtype, grad_dtype)

    def scalars(self, group: dict) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return {
            **prologue_scalars(group),
            "beta1": float(beta1),
            "beta2": float(beta2),
            "eps": float(group["eps"]),
        }

    def tensor_values(self, group: dict, step: np.ndarray) -> dict[str, np.ndarray]:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = float(group["lr"]) * float(group["lr_mult"])
        return {
            "step_size": lr / (1.0 - np.power(beta1, step)),
            "bias_correction2_sqrt": np.sqrt(1.0 - np.power(beta2, step)),
        }

    def tensor_formulas(self) -> dict[str, Expr]:
        step, lr = per_tensor("step", F64), scalar("lr", F64)
        power = {b: (step * scalar(b, F64).log()).exp() for b in ("beta1", "beta2")}  # beta**t
        return {"step_size": lr / (1.0 - power["beta1"]),
                "bias_correction2_sqrt": sqrt(1.0 - power["beta2"])}


@register("adamw")
class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, as torch.optim.AdamW.

    The update is Adam's (see `Adam`) with the decay applied to the parameter, not the gradient,
    before the moment update:

        p = p * (1 - lr * weight_decay)
        m, v (, v_max) and p updated as in Adam, without the L2 term in g

    Arguments are Adam's, with `weight_decay` defaulting to 1e-2 and no `decoupled_weight_decay`
    (it is always on). State keys: `step`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` (amsgrad).

    Example:
        >>> import numpy as np, stepjit
        >>> w = stepjit.Parameter(np.ones(3, np.float32))
        >>> opt = stepjit.optim.AdamW([w], lr=0.1, weight_decay=0.5)
        >>> w.grad = np.ones(3, np.float32)
        >>> opt.step()
        >>> w.data
        array([0.85, 0.85, 0.85], dtype=float32)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        scale: float = 1,
        clip_norm: float = 0,
        **options,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True,
            scale=scale, clip_norm=clip_norm, **options,
        )
