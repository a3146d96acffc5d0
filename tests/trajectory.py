"""Run a stepjit SGD and the float64 reference side by side and compare them.

Used by the table of configurations and by the property tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
from reference import ReferenceSGD, assert_matches, assert_within_one_ulp

import stepjit

HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@dataclass
class Setup:
    """Hyperparameters, the groups' shapes, and when a gradient is missing."""

    lr: float = 0.05
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    scale: float = 1.0
    clip_norm: float = 0.0
    # one dict of overrides per group (for example {"lr_mult": 0.5, "decay_mult": 2.0})
    groups: Sequence[dict] = ({},)
    # shapes of the parameters, one list per group
    shapes: Sequence[Sequence[tuple[int, ...]]] = (((7,),),)
    dtype: object = np.float32
    grad_dtype: object | None = None  # None: the parameter's dtype
    steps: int = 10
    # (step, group, index) -> True when that parameter has no gradient at that step
    missing: Callable[[int, int, int], bool] = lambda t, gi, i: False
    # step -> learning rate of group 0 (group k gets lr * (1 - 0.1 k))
    lr_at: Callable[[int], float] | None = None
    seed: int = 0
    defaults: dict = field(init=False)

    def __post_init__(self) -> None:
        self.defaults = dict(
            lr=self.lr, momentum=self.momentum, dampening=self.dampening,
            weight_decay=self.weight_decay, nesterov=self.nesterov, scale=self.scale,
            clip_norm=self.clip_norm,
        )

    def group_lr(self, t: int, gi: int) -> float:
        base = self.lr_at(t) if self.lr_at else self.lr * (1.0 + 0.5 * np.sin(1.3 * t + 0.4))
        return base * (1.0 - 0.1 * gi)


def run_and_compare(backend: str, setup: Setup) -> stepjit.optim.SGD:
    """Step a stepjit SGD and the reference `setup.steps` times; assert they agree.

    float32 and float64 are compared at the end of the trajectory. Half types are compared at
    every step from the same starting point: before each step the reference takes the optimizer's
    current parameters and (float32) buffers, and afterwards each parameter must be within one
    ulp of the reference rounded to the half type.
    """
    rng = np.random.default_rng(setup.seed)
    dtype = np.dtype(setup.dtype)
    grad_dtype = np.dtype(setup.grad_dtype or setup.dtype)
    per_step = dtype in HALF

    params = [
        [stepjit.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
        for shapes in setup.shapes
    ]
    groups = [{"params": ps, **over} for ps, over in zip(params, setup.groups)]
    opt = stepjit.optim.SGD(groups, **setup.defaults, backend=backend)
    refs = [
        ReferenceSGD([p.data for p in ps], **{**setup.defaults, **over})
        for ps, over in zip(params, setup.groups)
    ]

    for t in range(setup.steps):
        for gi, (group, ref) in enumerate(zip(opt.param_groups, refs)):
            group["lr"] = ref.lr = setup.group_lr(t, gi)
        for gi, (ps, ref) in enumerate(zip(params, refs)):
            grads = []
            for i, p in enumerate(ps):
                if setup.missing(t, gi, i):
                    p.grad = None
                else:
                    p.grad = rng.standard_normal(p.shape).astype(grad_dtype)
                grads.append(p.grad)
            if per_step:
                ref.load([p.data for p in ps], [_buffer(opt, p) for p in ps])
            ref.step(grads)
        before = [[p.data.copy() for p in ps] for ps in params]
        opt.step()
        for gi, (ps, ref) in enumerate(zip(params, refs)):
            for i, p in enumerate(ps):
                what = f"step {t}, group {gi}, parameter {i} {p.shape}"
                if p.grad is None:
                    np.testing.assert_array_equal(p.data, before[gi][i], err_msg=what)
                if per_step:
                    # float16: exactly within one ulp; bfloat16: plus the float32 compute error
                    magnitude = ref.magnitude[i] if dtype != np.float16 else None
                    assert_within_one_ulp(p.data, ref.params[i], what, magnitude)
                    _check_buffer(opt, p, ref, i, what)
    if not per_step:
        for gi, (ps, ref) in enumerate(zip(params, refs)):
            for i, p in enumerate(ps):
                what = f"group {gi}, parameter {i} {p.shape}"
                assert p.data.dtype == dtype, what
                assert_matches(p.data, ref.params[i], ref.param_scale[i], what)
                _check_buffer(opt, p, ref, i, what)
    return opt


def _buffer(opt, p) -> np.ndarray | None:
    return opt.state.get(p, {}).get("momentum_buffer")


def _check_buffer(opt, p, ref: ReferenceSGD, i: int, what: str) -> None:
    buf = _buffer(opt, p)
    if ref.buffers[i] is None:
        assert buf is None, f"{what}: a momentum buffer exists where the reference has none"
        return
    assert buf is not None, f"{what}: no momentum buffer"
    compute = np.float64 if p.data.dtype == np.float64 else np.float32
    assert buf.dtype == compute, f"{what}: buffer dtype {buf.dtype}"
    assert buf.shape == p.shape, what
    assert_matches(buf, ref.buffers[i], ref.buffer_scale[i], f"{what} momentum_buffer")
