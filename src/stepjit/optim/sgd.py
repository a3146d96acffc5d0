"""SGD with momentum, Nesterov, dampening, weight decay, gradient scaling and per-tensor clip."""

from __future__ import annotations

import functools

from ..ir import DType, Slot, UpdateRule, per_tensor, scalar, tensor, where
from .optimizer import Optimizer, check_number, check_scale_and_clip, required
from .prologue import clips, decays, prologue, prologue_scalars
from .registry import register


@functools.cache
def sgd_rule(
    momentum: bool,
    nesterov: bool,
    weight_decay: bool,
    clip: bool,
    param_dtype: DType,
    grad_dtype: DType,
) -> UpdateRule:
    """The SGD update of one tensor, term by term as in the semantics.

    Scalars (kernel arguments): the prologue's (lr, weight_decay, scale, clip_norm), momentum,
    dampening. Per tensor: `first`, true on a buffer's first step.
    """
    pro = prologue(param_dtype, grad_dtype, clip=clip, decay=weight_decay)
    cty, g = pro.compute, pro.grad
    slots = [Slot("param", param_dtype, written=True), Slot("grad", grad_dtype)]
    outputs = {}
    if momentum:
        mu, d = scalar("momentum", cty), scalar("dampening", cty)
        buf = tensor("momentum_buffer", cty)
        b = where(per_tensor("first", DType.BOOL), g, mu * buf + (1.0 - d) * g)
        slots.append(Slot("momentum_buffer", cty, written=True))
        outputs["momentum_buffer"] = b
        u = pro.lr * (g + mu * b) if nesterov else pro.lr * b
    else:
        u = pro.lr * g
    outputs["param"] = (pro.param - u).cast(param_dtype)
    name = "sgd" + "".join(
        f"_{term}" for term, on in
        (("momentum", momentum and not nesterov), ("nesterov", nesterov),
         ("decay", weight_decay), ("clip", clip)) if on
    )
    return UpdateRule(f"{name}_{param_dtype}_{grad_dtype}", slots, outputs)


@register("sgd")
class SGD(Optimizer):
    r"""Stochastic gradient descent: vanilla, momentum (Polyak) or Nesterov.

    Per parameter with gradient `g`, in the compute type (float32 for half types):

        g = scale * g
        if clip_norm > 0 and ||g|| > clip_norm:  g = g * clip_norm / ||g||   (per tensor)
        g = g + weight_decay * decay_mult * p
        b = g on the first step, else momentum * b + (1 - dampening) * g
        p = p - lr * lr_mult * (g | b | g + momentum * b)   (vanilla | momentum | nesterov)

    Arguments:
        params: iterable of Parameters, or of param-group dicts.
        lr: learning rate (required).
        momentum, dampening, weight_decay, nesterov: as in torch.optim.SGD.
        scale: factor applied to every gradient first (for example 1 / loss_scale).
        clip_norm: when > 0, the L2 norm each gradient tensor is clipped to.
        **options: backend, capturable, state_dtype, master_weights, stochastic_rounding,
            rounding_seed (see `stepjit.optim.Optimizer`).

    Example:
        >>> import numpy as np, stepjit
        >>> w = stepjit.Parameter(np.ones(3, np.float32))
        >>> opt = stepjit.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = np.ones(3, np.float32)
        >>> opt.step()
        >>> w.data
        array([0.9, 0.9, 0.9], dtype=float32)
    """

    def __init__(
        self,
        params,
        lr: float = required,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        scale: float = 1,
        clip_norm: float = 0,
        **options,
    ) -> None:
        if lr is required:
            raise ValueError("parameter 'lr' is required (none given)")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, scale=scale, clip_norm=clip_norm,
        )
        super().__init__(params, defaults, **options)

    def check_group(self, group: dict) -> None:
        check_number("lr", group["lr"])
        check_number("momentum", group["momentum"])
        check_number("dampening", group["dampening"], maximum=1.0)
        check_number("weight_decay", group["weight_decay"])
        check_scale_and_clip(group)
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"Invalid nesterov: {group['nesterov']!r} (must be a bool)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "Nesterov momentum requires momentum > 0 and dampening = 0 "
                f"(got momentum={group['momentum']}, dampening={group['dampening']})"
            )

    examples = {"momentum": (0.0, 0.9), "dampening": (0.0, 0.25), "nesterov": (False, True),
                "weight_decay": (0.0, 0.01), "clip_norm": (0.0, 1.0), "scale": (0.5,)}

    def structure(self, group: dict) -> tuple:
        return (group["momentum"] > 0, group["nesterov"], decays(group), clips(group))

    def rule(self, structure: tuple, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
        return sgd_rule(*structure, param_dtype, grad_dtype)

    def scalars(self, group: dict) -> dict[str, float]:
        return {
            **prologue_scalars(group),
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
        }
