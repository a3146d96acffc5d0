"""Adam and AdamW: torch.optim as an outside oracle, the float64 reference for what torch lacks
(scale, clip_norm, half precision), compile counts, bad input and state_dict round trips."""

from __future__ import annotations

import numpy as np
import pytest
from reference_family import ReferenceAdam, run_beside_reference, run_beside_torch

import stepjit
from stepjit.optim import Adam, AdamW

torch = pytest.importorskip("torch")

CLASSES = {"adam": (Adam, torch.optim.Adam, {}), "adamw": (AdamW, torch.optim.AdamW,
                                                           {"decoupled": True})}
ORACLE_CASES = [
    pytest.param(name, dict(lr=0.01, amsgrad=amsgrad, weight_decay=wd),
                 id=f"{name}-{'amsgrad' if amsgrad else 'plain'}-wd{wd}")
    for name in CLASSES for amsgrad in (False, True) for wd in (0.0, 0.05)
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, hyper", ORACLE_CASES)
def test_matches_torch(backend, name, hyper, dtype):
    cls, torch_cls, _ = CLASSES[name]
    opt, ref = run_beside_torch(backend, cls, torch_cls, hyper, dtype)
    assert opt.backend == backend
    if hyper["amsgrad"]:
        assert all("max_exp_avg_sq" in st for st in opt.state.values())


@pytest.mark.parametrize("name", CLASSES)
def test_betas_and_eps_edited_every_step_match_torch(backend, name):
    """The bias corrections use the current betas and each tensor's own step count, as torch's."""

    def schedule(t: int, group: dict) -> None:
        group["betas"] = (0.8 + 0.15 * np.sin(t) ** 2, 0.9 + 0.09 * np.cos(t) ** 2)
        group["eps"] = 10.0 ** -(4 + t % 5)

    cls, torch_cls, _ = CLASSES[name]
    hyper = dict(lr=0.02, amsgrad=True, weight_decay=0.01)
    run_beside_torch(backend, cls, torch_cls, hyper, "float64", schedule=schedule, steps=10)


REFERENCE_CASES = [
    pytest.param("adam", dict(scale=0.5, clip_norm=0.05), id="adam-scaled-clipped"),
    pytest.param("adam", dict(amsgrad=True, weight_decay=0.02, clip_norm=1e6),
                 id="adam-amsgrad-decay-clip-not-reached"),
    pytest.param("adamw", dict(amsgrad=True, weight_decay=0.05, scale=2.0, clip_norm=0.5),
                 id="adamw-amsgrad-scaled-clipped"),
    pytest.param("adamw", dict(betas=(0.5, 0.6), eps=1e-3, weight_decay=1e-2),
                 id="adamw-other-betas"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, hyper", REFERENCE_CASES)
def test_matches_float64_reference(backend, name, hyper, dtype):
    """scale, clip_norm and the multipliers (group 1: lr_mult 0.5, decay_mult 2), which torch
    does not have, against the float64 reference."""
    cls, _, extra = CLASSES[name]
    run_beside_reference(backend, cls, ReferenceAdam, dict(lr=0.01, **hyper), dtype,
                         ref_extra=extra, seed=1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name, hyper", REFERENCE_CASES[:3])
def test_half_per_step(backend, name, hyper, dtype):
    """Half parameters: within one ulp of the reference at every step; state stays float32."""
    cls, _, extra = CLASSES[name]
    opt, _ = run_beside_reference(backend, cls, ReferenceAdam, dict(lr=0.01, **hyper), dtype,
                                  ref_extra=extra, seed=2)
    for st in opt.state.values():
        for key, buf in st.items():
            assert key == "step" or buf.dtype == np.float32, key


def _params(rng, dtype=np.float32, shapes=((4, 3), (17,), (1,))):
    return [stepjit.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _new_grads(ps, rng):
    for p in ps:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)


@pytest.mark.parametrize("name", CLASSES)
def test_schedules_and_step_counts_compile_nothing(backend, name):
    rng = np.random.default_rng(3)
    ps = _params(rng)
    cls = CLASSES[name][0]
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr_mult": 0.5}], lr=0.01, amsgrad=True,
              weight_decay=1e-2, clip_norm=1.0, backend=backend)
    _new_grads(ps, rng)
    opt.step()
    stepjit.reset_cache_info()
    before = [p.data.copy() for p in ps]
    for _ in range(20):
        for g in opt.param_groups:
            g["lr"] = rng.uniform(1e-4, 1e-2)
            g["betas"] = (rng.uniform(0.0, 0.99), rng.uniform(0.5, 0.9999))
            g["eps"] = rng.uniform(1e-10, 1e-6)
            g["weight_decay"] = rng.uniform(1e-4, 1e-1)  # nonzero to nonzero
            g["clip_norm"] = rng.uniform(0.5, 5.0)
            g["scale"] = rng.uniform(0.1, 2.0)
        opt.param_groups[1]["lr_mult"] = rng.uniform(0.1, 2.0)
        for p in ps:
            p.grad[...] = rng.standard_normal(p.shape)
        opt.step()
    info = stepjit.cache_info()
    assert (info.compiles, info.disk_hits) == (0, 0)
    assert all(not np.array_equal(p.data, b) for p, b in zip(ps, before))
    assert all(int(opt.state[p]["step"]) == 21 for p in ps)


def test_bias_corrections_are_not_in_the_rule():
    """The rule names step_size and sqrt(bias_correction2) as per-tensor values; no numeric
    hyperparameter reaches its text, so every value shares one kernel."""
    a = stepjit.optim.rule_for("adam", "float32", betas=(0.9, 0.999), eps=1e-8, lr=1e-3)
    b = stepjit.optim.rule_for("adam", "float32", betas=(0.5, 0.25), eps=0.1, lr=0.5)
    assert a is b
    assert a.per_tensor_names == ("bias_correction2_sqrt", "step_size")
    assert {"beta1", "beta2", "eps"} <= set(a.scalar_names)
    for literal in ("0.9", "0.999", "1e-08"):
        assert literal not in a.text
    w = stepjit.optim.rule_for("adamw", "float32", weight_decay=0.1)
    assert w.name == "adamw_float32_float32" and "max_exp_avg_sq" not in w.text
    assert stepjit.optim.rule_for("adamw", "float32", weight_decay=0.0) is a


BAD = [
    ("lr", -0.1, ValueError, "lr"),
    ("lr", float("nan"), ValueError, "lr"),
    ("betas", (1.5, 0.999), ValueError, "index 0 of betas: 1.5"),
    ("betas", (0.9, 1.0), ValueError, "index 1 of betas: 1.0"),
    ("betas", (-0.1, 0.9), ValueError, "index 0 of betas"),
    ("betas", (0.9,), ValueError, "betas"),
    ("betas", (float("nan"), 0.9), ValueError, "index 0 of betas"),
    ("betas", ("0.9", 0.9), TypeError, "index 0 of betas"),
    ("eps", -1e-8, ValueError, "eps"),
    ("weight_decay", -0.01, ValueError, "weight_decay"),
    ("weight_decay", float("inf"), ValueError, "weight_decay"),
    ("scale", 0.0, ValueError, "scale"),
    ("clip_norm", -1.0, ValueError, "clip_norm"),
    ("amsgrad", 1, TypeError, "amsgrad"),
    ("lr_mult", -1.0, ValueError, "lr_mult"),
]


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("key, value, error, match", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_hyperparameter_raises_and_changes_nothing(backend, name, key, value, error, match):
    cls = CLASSES[name][0]
    rng = np.random.default_rng(5)
    ps = _params(rng)
    if key not in ("lr_mult",):
        with pytest.raises(error, match=match.replace("(", r"\(")):
            cls(ps, **{key: value}, backend=backend)
    opt = cls(ps, lr=0.01, amsgrad=True, backend=backend)
    for _ in range(2):
        _new_grads(ps, rng)
        opt.step()
    params = [p.data.copy() for p in ps]
    state = {p: {k: np.array(v, copy=True) for k, v in opt.state[p].items()} for p in ps}
    opt.param_groups[0][key] = value
    _new_grads(ps, rng)
    with pytest.raises(error, match=match.replace("(", r"\(")):
        opt.step()
    for p, before in zip(ps, params):
        np.testing.assert_array_equal(p.data, before)
        assert set(opt.state[p]) == set(state[p])
        for k, v in state[p].items():
            np.testing.assert_array_equal(opt.state[p][k], v, err_msg=k)


@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_round_trip_continues_identically(backend, name):
    cls = CLASSES[name][0]
    rng = np.random.default_rng(6)
    ps = _params(rng)
    hyper = dict(lr=0.01, amsgrad=True, weight_decay=0.05, backend=backend)
    opt = cls(ps, **hyper)
    for t in range(4):
        _new_grads(ps[:2] if t == 0 else ps, rng)  # parameter 2 starts a step late
        if t == 0:
            ps[2].grad = None
        opt.step()
    saved = opt.state_dict()
    assert saved["state"][0]["step"] == 4 and saved["state"][2]["step"] == 3
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert saved["param_groups"][0]["betas"] == (0.9, 0.999)

    qs = [stepjit.Parameter(p.data.copy()) for p in ps]
    opt2 = cls(qs, lr=0.5, backend=backend)  # other values: load_state_dict restores them
    opt2.load_state_dict(saved)
    for _ in range(4):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in ps]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g, g.copy()
        opt.step()
        opt2.step()
    for p, q in zip(ps, qs):
        np.testing.assert_array_equal(p.data, q.data)
        for key in opt.state[p]:
            np.testing.assert_array_equal(opt.state[p][key], opt2.state[q][key], err_msg=key)
    assert int(opt2.state[qs[0]]["step"]) == 8


def test_a_torch_checkpoint_with_maximize_loads_and_ascends_as_torch(backend):
    """torch's groups carry `maximize`: a checkpoint with True keeps ascending after loading
    (every optimizer against torch: test_family.py)."""
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ref = torch.optim.Adam([q], lr=0.01, maximize=True, foreach=False)
    p = stepjit.Parameter(np.zeros(3))
    opt = Adam([p], lr=0.01, backend=backend)
    opt.load_state_dict(ref.state_dict())
    g = np.array([1.0, -2.0, 0.5])
    for _ in range(3):
        q.grad, p.grad = torch.tensor(g), g.copy()
        ref.step()
        opt.step()
    np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12)
    assert (p.data * g > 0).all()  # ascended along the gradient
