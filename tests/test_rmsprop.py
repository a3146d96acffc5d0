"""RMSprop: torch.optim.RMSprop as an outside oracle, the float64 reference for what torch lacks
(scale, clip_norm, half precision), compile counts, bad input and state_dict round trips."""

from __future__ import annotations

import numpy as np
import pytest
from reference_family import ReferenceRMSprop, run_beside_reference, run_beside_torch

import stepjit
from stepjit.optim import RMSprop

torch = pytest.importorskip("torch")

ORACLE_CASES = [
    pytest.param(dict(lr=0.01, momentum=mu, centered=centered, weight_decay=wd),
                 id=f"mu{mu}-{'centered' if centered else 'plain'}-wd{wd}")
    for mu in (0.0, 0.9) for centered in (False, True) for wd in (0.0, 0.05)
    if wd == 0.0 or (mu and centered)
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", ORACLE_CASES)
def test_matches_torch(backend, hyper, dtype):
    opt, _ = run_beside_torch(backend, RMSprop, torch.optim.RMSprop, hyper, dtype)
    keys = set.union(*(set(st) for st in opt.state.values()))
    assert ("momentum_buffer" in keys) == (hyper["momentum"] > 0)
    assert ("grad_avg" in keys) == hyper["centered"]


def test_alpha_momentum_eps_edited_every_step_match_torch(backend):
    def schedule(t: int, group: dict) -> None:
        group["alpha"] = 0.8 + 0.19 * np.sin(t) ** 2
        group["momentum"] = 0.5 + 0.4 * np.cos(t) ** 2
        group["eps"] = 10.0 ** -(3 + t % 4)

    hyper = dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)
    run_beside_torch(backend, RMSprop, torch.optim.RMSprop, hyper, "float64", schedule=schedule,
                     steps=10)


REFERENCE_CASES = [
    pytest.param(dict(scale=0.5, clip_norm=0.05), id="scaled-clipped"),
    pytest.param(dict(momentum=0.9, centered=True, weight_decay=0.02, clip_norm=1e6),
                 id="momentum-centered-decay-clip-not-reached"),
    pytest.param(dict(momentum=0.5, alpha=0.9, eps=1e-3, scale=2.0, clip_norm=0.5),
                 id="momentum-scaled-clipped"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", REFERENCE_CASES)
def test_matches_float64_reference(backend, hyper, dtype):
    run_beside_reference(backend, RMSprop, ReferenceRMSprop, dict(lr=0.01, **hyper), dtype,
                         seed=1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("hyper", REFERENCE_CASES)
def test_half_per_step(backend, hyper, dtype):
    opt, _ = run_beside_reference(backend, RMSprop, ReferenceRMSprop, dict(lr=0.01, **hyper),
                                  dtype, seed=2)
    for st in opt.state.values():
        for key, buf in st.items():
            assert key == "step" or buf.dtype == np.float32, key


def _params(rng, dtype=np.float32, shapes=((4, 3), (17,), (1,))):
    return [stepjit.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _new_grads(ps, rng):
    for p in ps:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)


def test_structure_is_the_terms_not_the_values():
    rule_for = stepjit.optim.rule_for
    a = rule_for("rmsprop", "float32", alpha=0.9, eps=1e-3, momentum=0.5)
    assert a is rule_for("rmsprop", "float32", alpha=0.5, eps=1e-8, momentum=0.99)
    assert a.name == "rmsprop_momentum_float32_float32"
    assert rule_for("rmsprop", "float32", centered=True).name == "rmsprop_centered_float32_float32"
    assert "momentum_buffer" not in rule_for("rmsprop", "float32").text


BAD = [
    ("lr", -0.1, ValueError, "lr"),
    ("alpha", -0.5, ValueError, "alpha"),
    ("alpha", 1.5, ValueError, "alpha"),
    ("eps", -1e-8, ValueError, "eps"),
    ("weight_decay", -0.01, ValueError, "weight_decay"),
    ("momentum", -0.9, ValueError, "momentum"),
    ("momentum", float("nan"), ValueError, "momentum"),
    ("centered", "yes", TypeError, "centered"),
    ("scale", -1.0, ValueError, "scale"),
    ("clip_norm", -1.0, ValueError, "clip_norm"),
]


@pytest.mark.parametrize("key, value, error, match", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_hyperparameter_raises_and_changes_nothing(backend, key, value, error, match):
    rng = np.random.default_rng(5)
    ps = _params(rng)
    with pytest.raises(error, match=match):
        RMSprop(ps, **{key: value}, backend=backend)
    opt = RMSprop(ps, lr=0.01, momentum=0.9, centered=True, backend=backend)
    for _ in range(2):
        _new_grads(ps, rng)
        opt.step()
    params = [p.data.copy() for p in ps]
    state = {p: {k: np.array(v, copy=True) for k, v in opt.state[p].items()} for p in ps}
    opt.param_groups[0][key] = value
    _new_grads(ps, rng)
    with pytest.raises(error, match=match):
        opt.step()
    for p, before in zip(ps, params):
        np.testing.assert_array_equal(p.data, before)
        for k, v in state[p].items():
            np.testing.assert_array_equal(opt.state[p][k], v, err_msg=k)
