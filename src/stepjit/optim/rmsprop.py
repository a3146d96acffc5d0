"""RMSprop (centered or not, with momentum), with Dragon's gradient `scale` and `clip_norm`."""

from __future__ import annotations

import functools

from ..ir import DType, Slot, UpdateRule, scalar, sqrt, tensor
from .adam import check_flag, lerp
from .optimizer import Optimizer, check_number, check_scale_and_clip
from .prologue import clips, decays, prologue, prologue_scalars
from .registry import register

F64 = DType.F64


@functools.cache
def rmsprop_rule(
    momentum: bool,
    centered: bool,
    decay: bool,
    clip: bool,
    param_dtype: DType,
    grad_dtype: DType,
) -> UpdateRule:
    """The RMSprop update of one tensor, in torch's operation order.

    Scalars: lr and weight_decay (already times lr_mult and decay_mult), alpha, eps, momentum,
    scale, clip_norm.
    """
    pro = prologue(param_dtype, grad_dtype, clip=clip, decay=decay)
    cty, p, g = pro.compute, pro.param, pro.grad
    # 1 - alpha in double, rounded once (as torch's scalar argument is)
    alpha = scalar("alpha", F64)
    one_minus_alpha = (1.0 - alpha).cast(cty)
    sq = alpha.cast(cty) * tensor("square_avg", cty) + (one_minus_alpha * g) * g
    slots = [
        Slot("param", param_dtype, written=True),
        Slot("grad", grad_dtype),
        Slot("square_avg", cty, written=True),
    ]
    outputs = {"square_avg": sq}
    if centered:
        ga = lerp(tensor("grad_avg", cty), g, one_minus_alpha)
        slots.append(Slot("grad_avg", cty, written=True))
        outputs["grad_avg"] = ga
        avg = sqrt(sq - ga * ga)
    else:
        avg = sqrt(sq)
    avg = avg + scalar("eps", cty)
    lr = pro.lr
    if momentum:
        buf = scalar("momentum", cty) * tensor("momentum_buffer", cty) + g / avg
        slots.append(Slot("momentum_buffer", cty, written=True))
        outputs["momentum_buffer"] = buf
        new_p = p - lr * buf
    else:
        new_p = p - (lr * g) / avg
    outputs["param"] = new_p.cast(param_dtype)
    name = "rmsprop" + "".join(
        f"_{term}" for term, on in
        (("momentum", momentum), ("centered", centered), ("decay", decay), ("clip", clip)) if on
    )
    return UpdateRule(f"{name}_{param_dtype}_{grad_dtype}", slots, outputs)


@register("rmsprop")
class RMSprop(Optimizer):
    r"""RMSprop (Hinton, 2012), centered (Graves, 2013) or not, as torch.optim.RMSprop.

    Per parameter with gradient `g`, in the compute type (float32 for half types), with `lr`,
    `wd` already times `lr_mult`, `decay_mult`:

        g = scale * g
        if clip_norm > 0 and ||g|| > clip_norm:  g = g * clip_norm / ||g||   (per tensor)
        g = g + wd * p
        s = alpha * s + (1 - alpha) * g * g
        a = a + (1 - alpha) * (g - a)            (centered)
        d = sqrt(s - a * a) + eps                (centered; else sqrt(s) + eps)
        b = momentum * b + g / d;  p = p - lr * b     (momentum > 0)
        p = p - lr * g / d                            (momentum == 0)

    Buffers start at zero (so the first momentum step is `b = g / d`).

    State per parameter (torch's keys): `step`, `square_avg` (s), `momentum_buffer` (b, when
    momentum > 0), `grad_avg` (a, when centered); buffers in the compute type.

    Arguments:
        params: iterable of Parameters, or of param-group dicts.
        lr: learning rate.
        alpha: smoothing constant of the averages, in [0, 1].
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty (added to the gradient), >= 0.
        momentum: momentum factor, >= 0.
        centered: normalize by the estimated variance of the gradient rather than its second
            moment.
        scale: factor applied to every gradient first (for example 1 / loss_scale).
        clip_norm: when > 0, the L2 norm each gradient tensor is clipped to.
        **options: backend, capturable, state_dtype, master_weights, stochastic_rounding,
            rounding_seed (see `stepjit.optim.Optimizer`).

    Example:
        >>> import numpy as np, stepjit
        >>> w = stepjit.Parameter(np.ones(3, np.float64))
        >>> opt = stepjit.optim.RMSprop([w], lr=0.01, alpha=0.75, eps=0.0)
        >>> w.grad = np.full(3, 2.0)
        >>> opt.step()
        >>> w.data
        array([0.98, 0.98, 0.98])
    """

    counts_steps = True
    unsigned_state = ("square_avg",)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        *,
        scale: float = 1,
        clip_norm: float = 0,
        **options,
    ) -> None:
        defaults = dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, scale=scale, clip_norm=clip_norm,
        )
        super().__init__(params, defaults, **options)

    def check_group(self, group: dict) -> None:
        check_number("lr", group["lr"])
        check_number("alpha", group["alpha"], maximum=1.0)
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        check_number("momentum", group["momentum"])
        check_scale_and_clip(group)
        check_flag("centered", group["centered"])

    examples = {"momentum": (0.0, 0.5), "centered": (False, True), "weight_decay": (0.0, 0.01),
                "clip_norm": (0.0, 1.0), "alpha": (0.9,), "eps": (1e-3,), "scale": (0.5,)}

    def structure(self, group: dict) -> tuple:
        return (group["momentum"] > 0, group["centered"], decays(group), clips(group))

    def rule(self, structure: tuple, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
        return rmsprop_rule(*structure, param_dtype, grad_dtype)

    def scalars(self, group: dict) -> dict[str, float]:
        return {
            **prologue_scalars(group),
            "alpha": float(group["alpha"]),
            "eps": float(group["eps"]),
            "momentum": float(group["momentum"]),
        }
