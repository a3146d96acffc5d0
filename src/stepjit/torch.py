"""torch interop: `stepjit.torch.SGD`, a `torch.optim.Optimizer` whose step runs stepjit's kernels.

    model = torch.nn.Linear(10, 1)
    opt = stepjit.torch.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)   # no recompilation

Parameters are updated in place through their data pointers (CPU tensors with the LLVM backend,
CUDA tensors with the CUDA backend); nothing is copied. `state_dict()` has torch.optim.SGD's
layout (`momentum_buffer`), so checkpoints move between this class and `torch.optim.SGD` both
ways. With `process_group=`, `step()` first averages the gradients over the group with
`torch.distributed.all_reduce`, in buckets, as Dragon's optimizer did with its process group.

Importing this module imports torch; `import stepjit` alone never does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from . import optim as _optim
from .optim.optimizer import required

__all__ = ["SGD"]


class SGD(torch.optim.Optimizer):
    """Dragon's SGD (see `stepjit.optim.SGD` for the math) as a `torch.optim.Optimizer`.

    Arguments are those of `stepjit.optim.SGD`, plus:
        process_group: a `torch.distributed` process group; gradients are averaged over it
            before every update (`None`: no communication).
        bucket_cap_mb: the largest all-reduce, in MiB of gradients.
        backend: "llvm", "cuda" or "reference"; default: where the tensors live.
    Per-group `lr_mult` and `decay_mult` work as in `stepjit.optim.SGD`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = required,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        scale: float = 1,
        clip_norm: float = 0,
        *,
        process_group: object | None = None,
        bucket_cap_mb: float = 25.0,
        backend: str | None = None,
    ) -> None:
        if lr is required:
            raise ValueError("parameter 'lr' is required (none given)")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, scale=scale, clip_norm=clip_norm, lr_mult=1.0, decay_mult=1.0,
        )
        super().__init__(params, defaults)
        self.process_group = process_group
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self._engine = _optim.SGD.over(self.param_groups, self.state, backend=backend)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim.SGD checkpoint lacks Dragon's keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @property
    def backend(self) -> str:
        """The stepjit backend running the update: 'llvm', 'cuda' or 'reference'."""
        return self._engine.backend

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Average the gradients over `process_group` (if any), then update every parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.process_group is not None:
            self.average_gradients()
        self._engine.share(self.param_groups, self.state)
        self._engine.step()
        return loss

    def accumulate_grad(self) -> None:
        """Dragon's gradient accumulation: see `stepjit.optim.Optimizer.accumulate_grad`."""
        self._engine.share(self.param_groups, self.state)
        self._engine.accumulate_grad()

    @torch.no_grad()
    def average_gradients(self) -> None:
        """All-reduce (mean) every gradient over `process_group`, a bucket at a time.

        Every rank must hold gradients for the same parameters, as with DistributedDataParallel.
        """
        group = self.process_group
        world = dist.get_world_size(group)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        for bucket in _buckets(grads, self.bucket_cap_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(grads: list, cap: int) -> list[list]:
    """Consecutive gradients of one dtype and device, at most `cap` bytes a bucket."""
    buckets: list[list] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        last = buckets[-1] if buckets else None
        if (last is None or last[0].dtype != g.dtype or last[0].device != g.device
                or size + nbytes > cap):
            buckets.append([g])
            size = nbytes
        else:
            last.append(g)
            size += nbytes
    return buckets
