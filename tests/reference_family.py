"""Independent float64 implementations of Adam/AdamW, RMSprop and LARS, written without the IR.

Plain numpy, one tensor at a time, term by term as docs/optimizers.md states them. Each reference
holds one parameter group: `params[i]` (float64) and `state[i]` (a dict with torch's keys, empty
until the tensor's first step). Tests may overwrite both between steps (`load`) to compare one
step at a time from a backend's current values, as the half-precision tests do.

Each step also records, per element, `magnitude[i]`: the largest magnitude among the parameter,
the update and the terms the update combined. A lower-precision compute type makes rounding
errors proportional to it (used for bfloat16's one-ulp tolerance, as in `reference.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Reference:
    """What every reference shares: parameters, state, scaling and clipping, skipped tensors."""

    params: list[np.ndarray]
    lr: float
    weight_decay: float = 0.0
    scale: float = 1.0
    clip_norm: float = 0.0
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    state: list[dict] = field(default_factory=list)
    magnitude: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = [np.array(p, dtype=np.float64) for p in self.params]
        self.state = [{} for _ in self.params]
        self.magnitude = [np.abs(p) for p in self.params]

    @property
    def lr_eff(self) -> float:
        return self.lr * self.lr_mult

    @property
    def wd_eff(self) -> float:
        return self.weight_decay * self.decay_mult

    def load(self, params: Sequence[np.ndarray], states: Sequence[dict]) -> None:
        """Continue from these parameters and states (arrays are copied to float64)."""
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.state = [
            {k: (int(v) if k == "step" else np.array(v, dtype=np.float64)) for k, v in s.items()}
            for s in states
        ]

    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        """One step; `grads[i]` None means parameter i has no gradient and is skipped."""
        assert len(grads) == len(self.params)
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            with np.errstate(all="ignore"):
                g = self.scale * np.asarray(grad, dtype=np.float64)
                if self.clip_norm > 0:
                    norm = np.sqrt(np.sum(g * g))
                    if norm > self.clip_norm:
                        g = g * (self.clip_norm / norm)
                p = self.params[i]
                new_p, terms = self._update(i, p, g)
                magnitude = np.maximum(np.abs(p), np.abs(new_p - p))
                for term in terms:
                    magnitude = np.maximum(magnitude, np.abs(term))
                self.magnitude[i] = magnitude
                self.params[i] = new_p

    def _update(self, i: int, p: np.ndarray, g: np.ndarray):
        """Tensor i's new value, and the terms (each as it enters the parameter) it combined;
        `self.state[i]` is updated in place."""
        raise NotImplementedError


@dataclass
class ReferenceAdam(_Reference):
    """Adam, or AdamW with `decoupled=True`; `amsgrad` keeps the running maximum of v."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    decoupled: bool = False

    def _update(self, i, p, g):
        st = self.state[i]
        beta1, beta2 = self.betas
        lr, wd = self.lr_eff, self.wd_eff
        if not st:
            st.update(step=0, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p))
            if self.amsgrad:
                st["max_exp_avg_sq"] = np.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        terms = []
        if wd > 0 and self.decoupled:
            terms.append(lr * wd * p)
            p = p * (1.0 - lr * wd)
        elif wd > 0:
            g = g + wd * p
        st["exp_avg"] = beta1 * st["exp_avg"] + (1.0 - beta1) * g
        st["exp_avg_sq"] = beta2 * st["exp_avg_sq"] + (1.0 - beta2) * g * g
        v = st["exp_avg_sq"]
        if self.amsgrad:
            st["max_exp_avg_sq"] = np.maximum(st["max_exp_avg_sq"], v)
            v = st["max_exp_avg_sq"]
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        denom = np.sqrt(v) / np.sqrt(bias_correction2) + self.eps
        u = (lr / bias_correction1) * st["exp_avg"] / denom
        terms.append(u)
        return p - u, terms


@dataclass
class ReferenceRMSprop(_Reference):
    """RMSprop, centered or not, with or without momentum (buffers start at zero)."""

    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False

    def _update(self, i, p, g):
        st = self.state[i]
        alpha, lr, wd = self.alpha, self.lr_eff, self.wd_eff
        if not st:
            st.update(step=0, square_avg=np.zeros_like(p))
            if self.momentum > 0:
                st["momentum_buffer"] = np.zeros_like(p)
            if self.centered:
                st["grad_avg"] = np.zeros_like(p)
        st["step"] += 1
        if wd > 0:
            g = g + wd * p
        st["square_avg"] = alpha * st["square_avg"] + (1.0 - alpha) * g * g
        if self.centered:
            st["grad_avg"] = alpha * st["grad_avg"] + (1.0 - alpha) * g
            avg = np.sqrt(st["square_avg"] - st["grad_avg"] ** 2) + self.eps
        else:
            avg = np.sqrt(st["square_avg"]) + self.eps
        if self.momentum > 0:
            terms = [lr * self.momentum * st["momentum_buffer"], lr * g / avg]
            st["momentum_buffer"] = self.momentum * st["momentum_buffer"] + g / avg
            u = lr * st["momentum_buffer"]
        else:
            terms = []
            u = lr * g / avg
        return p - u, terms


@dataclass
class ReferenceLARS(_Reference):
    """LARS: the trust ratio from the parameter's and the (scaled, clipped) gradient's norms."""

    momentum: float = 0.0
    trust_coef: float = 0.001
    # tensor index -> the ratio of its last step (tests check the edge cases with it)
    ratios: dict = field(default_factory=dict)

    def _update(self, i, p, g):
        st = self.state[i]
        lr, wd = self.lr_eff, self.wd_eff
        p_norm = np.sqrt(np.sum(p * p))
        g_norm = np.sqrt(np.sum(g * g))
        if p_norm > 0 and g_norm > 0:
            ratio = self.trust_coef * p_norm / (g_norm + wd * p_norm)
        else:
            ratio = 1.0
        self.ratios[i] = ratio
        terms = [lr * ratio * g, lr * ratio * wd * p]
        g = (g + wd * p) * ratio
        if self.momentum > 0:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.copy()
            else:
                terms.append(lr * self.momentum * st["momentum_buffer"])
                st["momentum_buffer"] = self.momentum * st["momentum_buffer"] + g
            u = lr * st["momentum_buffer"]
        else:
            u = lr * g
        return p - u, terms


# -- running an optimizer beside its reference ---------------------------------------------------
SHAPES = [(3, 5, 2), (7,), (1,), (1001,), (0,)]
LAYOUT = (SHAPES[:3], SHAPES[3:])  # group 0, group 1
MULT = {"lr_mult": 0.5, "decay_mult": 2.0}
RTOL = {"float64": 1e-12, "float32": 1e-5}
HALF = ("float16", "bfloat16")


def missing(t: int, gi: int, i: int) -> bool:
    """Group 0's (7,) tensor has no gradient on steps 0, 4, 7 (its first step is step 1);
    group 1's (1001,) tensor has none on step 5."""
    return (gi, i) == (0, 1) and t in (0, 4, 7) or (gi, i) == (1, 0) and t == 5


def close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    """Relative `rtol`, with an absolute part of `rtol` times the tensor's scale (at least 1):
    inputs are O(1), so an element that ends near zero carries rounding errors of that size."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def within_one_ulp(got: np.ndarray, ref: np.ndarray, what: str, magnitude=None) -> None:
    """A half-precision `got` is within one ulp of `ref` rounded to its type; `magnitude` adds the
    float32 compute error (a few float32 ulps of the largest term), which bfloat16 needs."""
    ref_rounded = ref.astype(got.dtype).astype(np.float64)
    ulp = np.abs(np.spacing(ref.astype(got.dtype))).astype(np.float64)
    if magnitude is not None:
        ulp = ulp + 4 * float(np.finfo(np.float32).eps) * magnitude
    err = np.abs(got.astype(np.float64) - ref_rounded)
    bad = ~(err <= ulp)
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements are more than one "
                             f"ulp off: got {got[bad][:5]}, reference {ref[bad][:5]}")


def opt_state(opt, p) -> dict:
    """A parameter's state in the optimizer, as numpy arrays (step as an int)."""
    return {
        k: (int(float(v)) if k == "step" else np.asarray(v))
        for k, v in opt.state.get(p, {}).items()
    }


def run_beside_reference(
    backend: str,
    make_opt,
    reference: type[_Reference],
    hyper: dict,
    dtype: str,
    *,
    ref_extra: dict | None = None,
    groups: Sequence[dict] = ({}, MULT),
    layout: Sequence[Sequence[tuple]] = LAYOUT,
    steps: int = 10,
    seed: int = 0,
    skip=missing,
):
    """Step `make_opt(groups, **hyper, backend=...)` and a `reference(**hyper, **ref_extra)` per
    group side by side, the learning rate changed before every step and some gradients missing.

    float32 / float64 are compared at the end (parameters and every state buffer, step counts
    exactly). Half types are compared at every step from the same start: the reference first
    loads the optimizer's parameters and state, then each parameter must be within one ulp.
    Returns the optimizer and the references.
    """
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    per_step = dtype in HALF
    rng = np.random.default_rng(seed)
    from stepjit import Parameter

    params = [[Parameter(rng.standard_normal(s).astype(np_dtype)) for s in shapes]
              for shapes in layout]
    opt = make_opt([{"params": ps, **over} for ps, over in zip(params, groups)], **hyper,
                   backend=backend)
    refs = [reference([p.data for p in ps], **hyper, **(ref_extra or {}), **over)
            for ps, over in zip(params, groups)]
    for t in range(steps):
        for gi, (group, ref) in enumerate(zip(opt.param_groups, refs)):
            lr = hyper["lr"] * (1.0 + 0.5 * np.sin(1.3 * t + 0.4)) * (1.0 - 0.1 * gi)
            group["lr"] = ref.lr = lr
        for gi, (ps, ref) in enumerate(zip(params, refs)):
            grads = []
            for i, p in enumerate(ps):
                p.grad = None if skip(t, gi, i) else rng.standard_normal(p.shape).astype(np_dtype)
                grads.append(p.grad)
            if per_step:
                ref.load([p.data for p in ps], [opt_state(opt, p) for p in ps])
            ref.step(grads)
        before = [[p.data.copy() for p in ps] for ps in params]
        opt.step()
        for gi, (ps, ref) in enumerate(zip(params, refs)):
            for i, p in enumerate(ps):
                what = f"step {t}, group {gi}, parameter {i} {p.shape}"
                if p.grad is None:
                    np.testing.assert_array_equal(p.data, before[gi][i], err_msg=what)
                if per_step:
                    magnitude = ref.magnitude[i] if dtype == "bfloat16" else None
                    within_one_ulp(p.data, ref.params[i], what, magnitude)
                    _compare_state(opt, p, ref, i, what, 1e-5)
    if not per_step:
        for gi, (ps, ref) in enumerate(zip(params, refs)):
            for i, p in enumerate(ps):
                what = f"group {gi}, parameter {i} {p.shape}"
                assert p.data.dtype == np_dtype, what
                close(p.data, ref.params[i], RTOL[dtype], what)
                _compare_state(opt, p, ref, i, what, RTOL[dtype])
    return opt, refs


def _compare_state(opt, p, ref: _Reference, i: int, what: str, rtol: float) -> None:
    mine, theirs = opt_state(opt, p), ref.state[i]
    assert set(mine) == set(theirs), f"{what}: state keys {sorted(mine)} != {sorted(theirs)}"
    compute = np.float64 if p.data.dtype == np.float64 else np.float32
    for key, want in theirs.items():
        if key == "step":
            assert mine[key] == want, f"{what}: step {mine[key]} != {want}"
            continue
        assert mine[key].dtype == compute, f"{what}: {key} is {mine[key].dtype}"
        close(mine[key], want, rtol, f"{what} {key}")


def run_beside_torch(backend: str, make_opt, make_torch, hyper: dict, dtype: str, *,
                     steps: int = 12, seed: int = 7, schedule=None):
    """Step a stepjit optimizer and a torch.optim one (`make_torch(groups, **hyper,
    foreach=False)`) on the same gradients for `steps` steps; compare parameters and every state
    buffer, `step` included.

    Two groups; the second has lr_mult=0.5 and decay_mult=2, which torch gets as its lr and
    weight_decay directly. The learning rate changes before every step; `schedule(t, group)` may
    edit more hyperparameters (it is applied to both optimizers' groups). Parameter 1 has no
    gradient on steps 0, 3 and 8: both optimizers skip it.
    """
    import torch

    import stepjit

    np_dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np_dtype) for s in SHAPES]
    mine = [stepjit.Parameter(a.copy()) for a in init]
    theirs = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    opt = make_opt([{"params": mine[:3]}, {"params": mine[3:], **MULT}], **hyper,
                   backend=backend)
    wd = hyper.get("weight_decay", None)
    second = {} if wd is None else {"weight_decay": wd * MULT["decay_mult"]}
    ref = make_torch([{"params": theirs[:3]}, {"params": theirs[3:], **second}], **hyper,
                     foreach=False)
    for t in range(steps):
        lr = hyper["lr"] * (1.0 + 0.5 * np.cos(0.9 * t))
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = ref.param_groups[0]["lr"] = lr
        ref.param_groups[1]["lr"] = lr * MULT["lr_mult"]
        if schedule is not None:
            for group in (*opt.param_groups, *ref.param_groups):
                schedule(t, group)
        for i, (p, q) in enumerate(zip(mine, theirs)):
            if i == 1 and t in (0, 3, 8):
                p.grad, q.grad = None, None
                continue
            g = rng.standard_normal(p.shape).astype(np_dtype)
            p.grad, q.grad = g, torch.from_numpy(g.copy())
        opt.step()
        ref.step()

    rtol = RTOL[dtype]
    for i, (p, q) in enumerate(zip(mine, theirs)):
        what = f"parameter {i} {p.shape}"
        assert p.data.dtype == np_dtype, what
        close(p.data, q.detach().numpy(), rtol, what)
        want = {k: v for k, v in ref.state.get(q, {}).items()}
        got = opt_state(opt, p)
        assert set(got) == set(want), f"{what}: state keys {sorted(got)} != {sorted(want)}"
        for key, value in want.items():
            if key == "step":
                assert got[key] == int(value.item()), f"{what}: step {got[key]} != {value}"
            else:
                assert got[key].dtype == np_dtype, f"{what} {key}"
                close(got[key], value.numpy(), rtol, f"{what} {key}")
    return opt, ref
