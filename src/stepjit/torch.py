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

import time
import warnings
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
        bucket_cap_mb: the largest all-reduce, in MiB of gradients: consecutive gradients of one
            dtype and device are averaged together through a flat buffer of at most this size (a
            bigger gradient gets one of its own) that the optimizer keeps from step to step: one
            extra copy of the gradients in all.
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
        self._flat_grads: list[torch.Tensor] = []  # the all-reduce buffer of each bucket
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
        Each bucket is copied into a flat buffer that this optimizer keeps from step to step; all
        buckets are reduced at once (asynchronously, every handle waited on) and the means are
        copied back, so every `.grad` keeps its identity, dtype and layout.

        The backend is never handed a temporary nor a `.grad`, and on return it holds none of the
        buffers: a communication thread that lets go of a tensor Python can see takes the GIL
        (torch 2.13 decrefs the Python object as the last C++ reference goes, whoever else holds
        it; older torch when it frees the tensor), and once the interpreter has begun to exit,
        that aborts the process ("terminate called without an active exception", torch/gloo).
        """
        group = self.process_group
        world = dist.get_world_size(group)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        buckets = _buckets(grads, self.bucket_cap_bytes)
        flats = [self._flat_buffer(k, bucket) for k, bucket in enumerate(buckets)]
        for flat, bucket in zip(flats, buckets):
            torch.cat([g.reshape(-1) for g in bucket], out=flat)
        works = [dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
                 for flat in flats]
        while works:  # drop each handle once waited on: a live handle holds its tensor
            works.pop().wait()
        for flat, bucket in zip(flats, buckets):
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self._flat_grads = flats
        _wait_until_released(flats)

    def _flat_buffer(self, k: int, bucket: list) -> torch.Tensor:
        """The all-reduce buffer of bucket `k`: last step's when it still fits, else a new one."""
        numel = sum(g.numel() for g in bucket)
        if k < len(self._flat_grads):
            flat = self._flat_grads[k]
            if (flat.numel() == numel and flat.dtype == bucket[0].dtype
                    and flat.device == bucket[0].device):
                return flat
        return torch.empty(numel, dtype=bucket[0].dtype, device=bucket[0].device)


def _wait_until_released(tensors: list, timeout: float = 5.0) -> None:
    """Sleep (GIL released) until nothing but their Python objects holds these CPU tensors.

    gloo's thread lets go of a completed all-reduce, and so of its tensors, a little after the
    handle completes. CUDA tensors are not waited for: NCCL's watchdog thread lets go of its
    work only every so often. Without `Tensor._use_count` (torch < 2.3) this returns at once.
    """
    held = [t for t in tensors if t.device.type == "cpu" and hasattr(t, "_use_count")]
    delay, deadline = 1e-5, time.monotonic() + timeout
    while any(t._use_count() > 1 for t in held):
        if time.monotonic() > deadline:
            warnings.warn(f"the process group still holds gradient buffers {timeout} s after "
                          "their all-reduce completed", RuntimeWarning, stacklevel=3)
            return
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)


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
