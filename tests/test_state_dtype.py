"""`state_dtype=`: state buffers kept in another dtype than the one the update computes in.

The rule is rewritten once (`stepjit.ir.stored_as`): each state load converted to the compute
type, each stored value rounded to the storage type. So every optimizer, a user's included,
gets compact state from one place, on every backend, and the backends agree bit for bit as they
do on any rule.
"""

from __future__ import annotations

import numpy as np
import pytest

import stepjit
from stepjit.ir import DType, Slot, UpdateRule, evaluate, scalar, stored_as, tensor, with_master
from stepjit.optim import registry

pytest.importorskip("ml_dtypes", reason="bfloat16 numpy arrays need ml_dtypes")
BF16 = DType.BF16.to_numpy()
NAMES = sorted(registry.OPTIMIZERS)


def _config(name: str) -> dict:
    """The optimizer's largest structure (the most terms on), with an lr."""
    cls = registry.OPTIMIZERS[name]
    config = max(registry.structures(cls), key=lambda c: sum(bool(v) for v in c.values()))
    if "lr" in registry.hyperparameters(cls):
        config.setdefault("lr", 0.01)
    return config


def _run(name, config, backend, state_dtype, steps=4, seed=0, sizes=((5, 3), (300,))):
    rng = np.random.default_rng(seed)
    params = [stepjit.Parameter(rng.standard_normal(s).astype(np.float32)) for s in sizes]
    opt = registry.OPTIMIZERS[name](params, backend=backend, state_dtype=state_dtype, **config)
    for _ in range(steps):
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        opt.step()
    return opt, params


def test_stored_as_rounds_what_is_stored_and_computes_as_before():
    x, m = tensor("x", DType.F32), tensor("m", DType.F32)
    new_m = m * scalar("mu", DType.F32) + x
    rule = UpdateRule("r", [Slot("x", DType.F32, True), Slot("m", DType.F32, True)],
                      {"m": new_m, "x": x - new_m})
    compact = stored_as(rule, {"m": DType.BF16}, "r_state_bfloat16")
    assert compact.slot("m").dtype is DType.BF16 and compact.slot("x").dtype is DType.F32
    xs = np.array([0.1, -3.0, 1e-3], np.float32)
    ms = np.array([1.0 + 2**-10, 2.5, -7.0], np.float32)
    out = evaluate(compact, {"x": xs, "m": ms.astype(BF16)}, {"mu": 0.9}, {})
    m32 = ms.astype(BF16).astype(np.float32) * np.float32(0.9) + xs  # from the stored value
    np.testing.assert_array_equal(out["m"], m32.astype(BF16))  # rounded once, to nearest
    np.testing.assert_array_equal(out["x"], xs - m32)  # the update used the unrounded value
    with pytest.raises(ValueError, match="has no slot nope"):
        stored_as(rule, {"nope": DType.BF16}, "r2")


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_keeps_bfloat16_state_and_the_backends_agree(name):
    config = _config(name)
    opt, params = _run(name, config, "llvm", "bfloat16")
    ref_opt, ref = _run(name, config, "reference", "bfloat16")
    buffers = {k: v for st in opt.state.values() for k, v in st.items() if k != "step"}
    assert buffers and all(v.dtype == BF16 for v in buffers.values())
    exact = not any(b.launch.rule.reductions for plan in opt._plans.values()
                    for b in plan.batches)
    for p, r in zip(params, ref, strict=True):
        if exact:  # the same rule on both backends: the same bits
            np.testing.assert_array_equal(p.data, r.data)
        else:
            np.testing.assert_allclose(p.data, r.data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_state_follows_the_float32_trajectory_closely(name):
    config = _config(name)
    _, compact = _run(name, config, "llvm", "bfloat16", steps=10)
    _, full = _run(name, config, "llvm", None, steps=10)
    for p, f in zip(compact, full, strict=True):
        start = _run(name, config, "llvm", None, steps=0)[1]
        moved = np.abs(f.data - start[compact.index(p)].data).max()
        # bfloat16 keeps 8 significant bits: the state's rounding moves the trajectory by a
        # small fraction of how far the parameters travelled
        assert np.abs(p.data - f.data).max() <= 0.05 * moved + 1e-7


def test_a_least_squares_fit_with_bfloat16_state_reaches_the_same_loss():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((256, 32)).astype(np.float32)
    b = a @ rng.standard_normal(32).astype(np.float32) + 0.01 * rng.standard_normal(256)
    losses = {}
    for state_dtype in (None, "bfloat16"):
        w = stepjit.Parameter(np.zeros(32, np.float32))
        opt = stepjit.optim.AdamW([w], lr=0.05, state_dtype=state_dtype)
        for _ in range(300):
            residual = a @ w.data - b
            w.grad = (a.T @ residual / len(b)).astype(np.float32)
            opt.step()
        losses[state_dtype] = float(np.mean((a @ w.data - b) ** 2))
    start = float(np.mean(b**2))
    # within 2 % of the float32 state's progress (near the noise floor, round-to-nearest
    # bfloat16 moments make the last steps noisier: the final losses differ by more than that)
    assert start - losses["bfloat16"] >= 0.98 * (start - losses[None])


def test_the_storage_type_is_structural_and_compiled_once():
    stepjit.reset_cache_info()
    _run("adamw", {"lr": 0.01}, "llvm", "bfloat16", steps=2)
    first = stepjit.cache_info()
    _run("adamw", {"lr": 0.02}, "llvm", "bfloat16", steps=2, seed=1)
    again = stepjit.cache_info()
    assert again.compiles == first.compiles and again.disk_hits == first.disk_hits
    opt, _ = _run("adamw", {"lr": 0.01}, "llvm", None, steps=1)
    rules = {b.launch.rule.name for plan in opt._plans.values() for b in plan.batches}
    assert rules == {"adamw_float32_float32"}  # float32 state: the rule as it was


def test_checkpoints_convert_between_storage_types():
    opt, params = _run("adam", {"lr": 0.01}, "llvm", None, steps=3)
    saved = opt.state_dict()
    compact = stepjit.optim.Adam(params, lr=0.01, state_dtype="bfloat16")
    compact.load_state_dict(saved)  # float32 buffers: rounded to bfloat16 at the next step
    for p in params:
        p.grad = np.zeros(p.shape, np.float32)
    compact.step()
    for i, p in enumerate(params):
        st = compact.state[p]
        assert st["exp_avg"].dtype == BF16 and float(st["step"]) == 4.0
        m = saved["state"][i]["exp_avg"].astype(BF16).astype(np.float32)  # as loaded
        want = (m + np.float32(1.0 - 0.9) * (np.float32(0.0) - m)).astype(BF16)  # one step, g=0
        np.testing.assert_array_equal(st["exp_avg"], want)
    back = stepjit.optim.Adam(params, lr=0.01)
    back.load_state_dict(compact.state_dict())  # and back to the compute type
    back.step()
    assert all(back.state[p]["exp_avg"].dtype == np.float32 for p in params)


def test_the_torch_face_keeps_bfloat16_state_that_torch_can_load():
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    p = torch.nn.Parameter(torch.ones(5))
    opt = st.AdamW([p], lr=0.1, state_dtype="bfloat16")
    p.grad = torch.ones(5)
    opt.step()
    state = opt.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["step"].dtype == torch.float32
    twin = torch.optim.AdamW([torch.nn.Parameter(torch.ones(5))], lr=0.1)
    twin.load_state_dict(opt.state_dict())  # torch casts the buffers to the parameter's dtype
    assert twin.state_dict()["state"][0]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("bad", ["int4", "float16", 8, "BFloat16"])
def test_an_unknown_state_dtype_is_named(bad):
    w = stepjit.Parameter(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=f"unknown state_dtype {bad!r}"):
        stepjit.optim.SGD([w], lr=0.1, momentum=0.9, state_dtype=bad)
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    with pytest.raises(ValueError, match=f"unknown state_dtype {bad!r}"):
        st.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, state_dtype=bad)


# -- master weights ----------------------------------------------------------------------------
def test_with_master_reads_and_writes_the_copy():
    rule = stepjit.optim.rule_for("sgd", "bfloat16", lr=0.1, momentum=0.9)
    master_rule = with_master(rule)
    assert master_rule.slot("master").dtype is DType.F32 and master_rule.slot("master").init \
        == "param"
    master = np.array([1.0, 1.0 + 2**-12, -3.0], np.float32)  # between bfloat16 values
    views = {"param": master.astype(BF16), "grad": np.ones(3, BF16),
             "momentum_buffer": np.zeros(3, np.float32), "master": master}
    out = evaluate(master_rule, views, {"lr": 1e-3, "momentum": 0.9, "dampening": 0.0,
                                        "scale": 1.0}, {"first": True})
    want = master - np.float32(1e-3) * np.float32(1.0)
    np.testing.assert_array_equal(out["master"], want)  # from the copy, not the rounded param
    np.testing.assert_array_equal(out["param"], want.astype(BF16))
    with pytest.raises(ValueError, match="for half parameters"):
        with_master(stepjit.optim.rule_for("sgd", "float32", lr=0.1))


@pytest.mark.parametrize("name", NAMES)
def test_master_weights_train_as_float32_parameters_do(name):
    # the master copy follows the float32 trajectory bit for bit; the parameter is its rounding
    config = _config(name)
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype(BF16) for s in ((5, 3), (300,))]
    grads = [[rng.standard_normal(s.shape).astype(BF16) for s in start] for _ in range(5)]
    cls = registry.OPTIMIZERS[name]
    half = [stepjit.Parameter(s.copy()) for s in start]
    full = [stepjit.Parameter(s.astype(np.float32)) for s in start]
    opt_half = cls(half, backend="llvm", master_weights=True, **config)
    opt_full = cls(full, backend="llvm", **config)
    for step in grads:
        for h, f, g in zip(half, full, step, strict=True):
            h.grad, f.grad = g, g.astype(np.float32)
        opt_half.step()
        opt_full.step()
    for h, f in zip(half, full, strict=True):
        master = opt_half.state[h]["master"]
        if not any(b.launch.rule.reductions for plan in opt_half._plans.values()
                   for b in plan.batches):
            np.testing.assert_array_equal(master, f.data)
        else:  # a norm summed over other dtypes' values in another order
            np.testing.assert_allclose(master, f.data, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(h.data, master.astype(BF16))


def test_without_master_weights_small_updates_are_lost_to_rounding():
    # bfloat16 parameters that round to nearest every step stop moving once lr * g is below
    # half their spacing: the same fit with a master copy gets measurably further
    rng = np.random.default_rng(1)
    a = rng.standard_normal((256, 16)).astype(np.float32)
    b = a @ (4.0 + rng.standard_normal(16)).astype(np.float32)
    losses = {}
    for master in (False, True):
        w = stepjit.Parameter(np.zeros(16, BF16))
        opt = stepjit.optim.SGD([w], lr=2e-3, momentum=0.9, master_weights=master)
        for _ in range(400):
            x = w.data.astype(np.float32)
            w.grad = (a.T @ (a @ x - b) / len(b)).astype(BF16)
            opt.step()
        losses[master] = float(np.mean((a @ w.data.astype(np.float32) - b) ** 2))
    assert losses[True] < 0.5 * losses[False]


def test_master_weights_on_the_torch_face_and_bad_values():
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = st.SGD([p], lr=2**-12, master_weights=True)
    for _ in range(3):
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, torch.full((4,), 1.0 - 3 * 2**-12), rtol=0, atol=0)
    assert torch.equal(p.detach(), master.bfloat16())  # still 1.0: below half its spacing
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="master_weights must be a bool"):
        stepjit.optim.SGD([stepjit.Parameter(np.ones(2, np.float32))], lr=0.1,
                          master_weights="yes")
    w = stepjit.Parameter(np.ones(2, np.float32))  # float32 parameters need no copy
    w.grad = np.ones(2, np.float32)
    f32 = stepjit.optim.SGD([w], lr=0.1, master_weights=True)
    f32.step()
    assert "master" not in f32.state.get(w, {})


def test_float32_state_widens_compact_buffers_for_export():
    opt, params = _run("adamw", {"lr": 0.01}, "llvm", "bfloat16", steps=2)
    saved = opt.state_dict()
    wide = stepjit.optim.float32_state(saved)
    for i in saved["state"]:
        for name, value in saved["state"][i].items():
            out = wide["state"][i][name]
            if name == "step":
                assert out is value
            else:
                assert out.dtype == np.float32
                np.testing.assert_array_equal(out, value.astype(np.float32))
    assert wide["param_groups"] is saved["param_groups"]
    assert saved["state"][0]["exp_avg"].dtype == BF16  # the original is unchanged
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    p = torch.nn.Parameter(torch.ones(3))
    face = st.Adam([p], lr=0.1, state_dtype="bfloat16")
    p.grad = torch.ones(3)
    face.step()
    state = stepjit.optim.float32_state(face.state_dict())["state"][0]
    assert state["exp_avg"].dtype == torch.float32 and state["step"].dtype == torch.float32


def test_a_checkpoint_without_a_master_copy_keeps_its_momentum():
    # the copy is made from the parameter; the loaded momentum is no first step
    rng = np.random.default_rng(2)
    start = rng.standard_normal(8).astype(BF16)
    grads = [rng.standard_normal(8).astype(BF16) for _ in range(5)]
    plain = stepjit.Parameter(start.copy())
    opt = stepjit.optim.SGD([plain], lr=0.01, momentum=0.9)
    for g in grads[:3]:
        plain.grad = g
        opt.step()
    resumed = stepjit.Parameter(plain.data.copy())
    master = stepjit.optim.SGD([resumed], lr=0.01, momentum=0.9, master_weights=True)
    master.load_state_dict(opt.state_dict())
    twin = stepjit.Parameter(plain.data.astype(np.float32))  # float32 from the same point
    ref = stepjit.optim.SGD([twin], lr=0.01, momentum=0.9)
    ref.load_state_dict(opt.state_dict())
    for g in grads[3:]:
        resumed.grad, twin.grad = g, g.astype(np.float32)
        master.step()
        ref.step()
    np.testing.assert_array_equal(master.state[resumed]["master"], twin.data)


def test_a_stale_master_copy_starts_again_from_the_parameter():
    w = stepjit.Parameter(np.ones(4, BF16))
    opt = stepjit.optim.SGD([w], lr=2**-12, master_weights=True)
    w.grad = np.ones(4, BF16)
    opt.step()
    w.data = np.full(4, 3.0, BF16)  # new weights loaded into the parameter
    w.grad = np.zeros(4, BF16)
    opt.step()
    np.testing.assert_array_equal(w.data, np.full(4, 3.0, BF16))
    np.testing.assert_array_equal(opt.state[w]["master"], np.full(4, 3.0, np.float32))


def test_the_torch_face_keeps_float32_state_of_half_parameters_through_checkpoints():
    torch = pytest.importorskip("torch")
    import copy

    import stepjit.torch as st

    def run(opt, p, steps):
        for _ in range(steps):
            p.grad = torch.ones(4, dtype=torch.bfloat16)
            opt.step()

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = st.SGD([p], lr=2**-12, momentum=0.5, master_weights=True)
    run(opt, p, 3)
    copy.deepcopy(opt)  # the copy is no autograd leaf's history: deep copies work
    q = torch.nn.Parameter(p.detach().clone())
    resumed = st.SGD([q], lr=2**-12, momentum=0.5, master_weights=True)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state[q]["master"].dtype == torch.float32  # not rounded to bfloat16
    assert resumed.state[q]["momentum_buffer"].dtype == torch.float32
    run(opt, p, 3)
    run(resumed, q, 3)
    assert torch.equal(resumed.state[q]["master"], opt.state[p]["master"])


def test_with_master_refuses_a_rule_it_cannot_keep_precise():
    p = tensor("param", DType.BF16)
    rule = UpdateRule("odd", [Slot("param", DType.BF16, True)], {"param": p * p})
    with pytest.raises(ValueError, match="not a rounding of a float32 or float64 value"):
        with_master(rule)
    wide = tensor("param", DType.BF16).cast(DType.F64)
    via64 = UpdateRule("via64", [Slot("param", DType.BF16, True)],
                       {"param": (wide - 2.0**-12).cast(DType.BF16)})
    kept = with_master(via64)  # read through float64: the copy, widened
    out = evaluate(kept, {"param": np.ones(2, BF16), "master": np.ones(2, np.float32)}, {}, {})
    np.testing.assert_array_equal(out["master"], np.float32(1 - 2.0**-12))
