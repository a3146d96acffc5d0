"""Dragon's gradient transforms, shared by every built-in rule.

Each rule starts from the same prologue: the gradient in the compute type, times `scale`,
clipped to `clip_norm` per tensor, plus L2 weight decay; the learning rate is `lr * lr_mult`.
The host side is shared too: the kernel arguments these need and the structure bits that turn
the clip and the decay on.

    g = prologue(param_dtype, grad_dtype, clip=True, decay=True)
    outputs = {"param": (g.param - g.lr * g.grad).cast(param_dtype)}
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import DType, Expr, scalar, tensor, where

F64 = DType.F64


def l2_norm(x: Expr) -> Expr:
    """||x||_2 over the tensor, summed in float64 (a reduction in the IR)."""
    x64 = x.cast(F64)
    return (x64 * x64).sum().sqrt()


@dataclass(frozen=True)
class Gradient:
    """The prologue's expressions, in the compute type unless said otherwise.

    Expressions a rule does not use cost nothing: only what its outputs reach is compiled.
    """

    param: Expr  # the parameter
    grad: Expr  # scale * g, clipped, plus weight_decay * decay_mult * p when decay is on
    clipped: Expr  # scale * g, clipped: the gradient before the decay term
    norm: Expr  # ||clipped|| in float64 (for a clipped tensor: ||scale * g|| * factor)
    compute: DType

    @property
    def lr(self) -> Expr:
        """`lr * lr_mult`, a kernel argument."""
        return scalar("lr", self.compute)

    @property
    def weight_decay(self) -> Expr:
        """`weight_decay * decay_mult` in float64, a kernel argument."""
        return scalar("weight_decay", F64)


def prologue(param_dtype: DType, grad_dtype: DType, *, clip: bool, decay: bool) -> Gradient:
    """The shared start of an update rule (see the module docstring).

    The clip norm is that of the scaled gradient, summed in float64; the factor
    `clip_norm / ||g||` applies only when the norm exceeds `clip_norm`.
    """
    cty = param_dtype.compute
    p = tensor("param", param_dtype).cast(cty)
    g = scalar("scale", cty) * tensor("grad", grad_dtype).cast(cty)
    norm = l2_norm(g)
    if clip:
        c = scalar("clip_norm", F64)
        factor = where(norm > c, c / norm, 1.0)
        g = g * factor.cast(cty)
        norm = norm * factor
    clipped = g
    if decay:
        g = g + scalar("weight_decay", F64).cast(cty) * p
    return Gradient(p, g, clipped, norm, cty)


def prologue_scalars(group: dict) -> dict[str, float]:
    """The kernel arguments of the prologue for `group`."""
    return {
        "lr": float(group["lr"]) * float(group["lr_mult"]),
        "weight_decay": float(group.get("weight_decay", 0.0)) * float(group["decay_mult"]),
        "scale": float(group["scale"]),
        "clip_norm": float(group["clip_norm"]),
    }


def decays(group: dict) -> bool:
    """Whether `group`'s weight decay is on (a structure bit)."""
    return group.get("weight_decay", 0.0) * group["decay_mult"] > 0


def clips(group: dict) -> bool:
    """Whether `group` clips its gradients (a structure bit)."""
    return group["clip_norm"] > 0
