"""LARS against its float64 reference: per-tensor norms, the trust ratio and its zero-norm edge
cases, momentum, decay, scale and clipping; compile counts and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from reference_family import ReferenceLARS, close, run_beside_reference

import stepjit
from stepjit.optim import LARS


def _cases():
    for mu, wd, (scale, clip) in itertools.product(
        (0.0, 0.9), (0.0, 0.01), ((1.0, 0.0), (0.5, 0.05), (2.0, 1e6))
    ):
        name = f"mu{mu}-wd{wd}-s{scale}-c{clip}"
        yield pytest.param(dict(momentum=mu, weight_decay=wd, scale=scale, clip_norm=clip),
                           id=name)


CASES = list(_cases())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", CASES)
def test_matches_float64_reference(backend, hyper, dtype):
    run_beside_reference(backend, LARS, ReferenceLARS, dict(lr=0.5, trust_coef=0.02, **hyper),
                         dtype, seed=1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("hyper", CASES[1::2])
def test_half_per_step(backend, hyper, dtype):
    opt, _ = run_beside_reference(backend, LARS, ReferenceLARS,
                                  dict(lr=0.5, trust_coef=0.02, **hyper), dtype, seed=2)
    for st in opt.state.values():
        assert all(buf.dtype == np.float32 for buf in st.values())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_zero_norms_give_ratio_one(backend, momentum, weight_decay):
    """A zero parameter, a zero gradient or an empty tensor: the ratio is 1, not 0 or NaN."""
    zero_p = stepjit.Parameter(np.zeros(6))
    zero_g = stepjit.Parameter(np.linspace(-1.0, 1.0, 6))
    empty = stepjit.Parameter(np.zeros(0))
    normal = stepjit.Parameter(np.full(4, 3.0))
    ps = [zero_p, zero_g, empty, normal]
    opt = LARS(ps, lr=0.5, momentum=momentum, trust_coef=0.01, weight_decay=weight_decay,
               backend=backend)
    ref = ReferenceLARS([p.data for p in ps], lr=0.5, momentum=momentum, trust_coef=0.01,
                        weight_decay=weight_decay)
    for t in range(3):
        grads = [np.full(6, 0.25 * (t + 1)), np.zeros(6), np.zeros(0), np.full(4, 0.5)]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
        if t == 0:
            assert ref.ratios[0] == ref.ratios[1] == ref.ratios[2] == 1.0
            # ratio 1: the parameter moves by lr * (g + wd * p) exactly
            np.testing.assert_allclose(zero_p.data, -0.5 * grads[0], rtol=1e-15)
            np.testing.assert_allclose(zero_g.data, ref.params[1], rtol=1e-15)
            # ||p|| = 6, ||g|| = 1: ratio 0.01 * 6 / (1 + 6 wd)
            assert ref.ratios[3] == pytest.approx(0.06 / (1.0 + 6.0 * weight_decay))
        for i, p in enumerate(ps):
            assert np.all(np.isfinite(p.data))
            close(p.data, ref.params[i], 1e-12, f"step {t}, parameter {i}")


def test_norms_are_two_reductions_of_one_pass():
    """||p|| and ||g|| are both sums of the one rule (a single reduction pass per tensor); with
    clipping the clipped norm reuses the unclipped sum instead of adding a third."""
    rule_for = stepjit.optim.rule_for
    for hyper in ({}, {"clip_norm": 1.0}, {"clip_norm": 1.0, "weight_decay": 0.1, "momentum": 0.9}):
        rule = rule_for("lars", "float32", **hyper)
        assert len(rule.reductions) == 2, rule.text
    assert rule.name == "lars_momentum_decay_clip_float32_float32"
    assert rule_for("lars", "float32", trust_coef=0.5) is rule_for("lars", "float32")


BAD = [
    ("lr", -0.1, "lr"),
    ("momentum", -0.5, "momentum"),
    ("trust_coef", -0.001, "trust_coef"),
    ("trust_coef", float("inf"), "trust_coef"),
    ("weight_decay", -1.0, "weight_decay"),
    ("scale", 0.0, "scale"),
    ("clip_norm", -2.0, "clip_norm"),
]


@pytest.mark.parametrize("key, value, match", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_hyperparameter_raises_and_changes_nothing(backend, key, value, match):
    rng = np.random.default_rng(5)
    ps = [stepjit.Parameter(rng.standard_normal(s)) for s in ((3,), (2, 2))]
    with pytest.raises(ValueError, match=match):
        LARS(ps, **{"lr": 0.1, key: value}, backend=backend)
    opt = LARS(ps, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        for p in ps:
            p.grad = rng.standard_normal(p.shape)
        opt.step()
    params = [p.data.copy() for p in ps]
    buffers = [opt.state[p]["momentum_buffer"].copy() for p in ps]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    for p, before, buf in zip(ps, params, buffers):
        np.testing.assert_array_equal(p.data, before)
        np.testing.assert_array_equal(opt.state[p]["momentum_buffer"], buf)


def test_lr_is_required():
    with pytest.raises(ValueError, match="lr"):
        LARS([stepjit.Parameter(np.zeros(2))])
