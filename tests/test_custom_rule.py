"""User-defined optimizers: a subclass of Optimizer with a rule runs on every backend.

Three optimizers defined here only through the subclass interface, each checked against an
implementation that does not use the IR: Lion (a state buffer, scalars, sign written with
`where`), Adagrad (step counts and a per-tensor value computed on the host; torch.optim.Adagrad
is its oracle) and normalized gradient descent (a reduction). Also: the optimizer registry and
`rule_for`, and the examples of docs/optimizers.md.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest

import stepjit
from stepjit.ir import DType, Slot, UpdateRule, per_tensor, scalar, sqrt, tensor, where
from stepjit.optim import OPTIMIZERS, Optimizer, check_number, rule_for

ROOT = Path(__file__).resolve().parents[1]
F64 = DType.F64


# -- Lion: a buffer, scalars, a sign -------------------------------------------------------------
@functools.cache
def lion_rule(decay: bool, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
    t = param_dtype.compute
    p, g = tensor("param", param_dtype).cast(t), tensor("grad", grad_dtype).cast(t)
    m = tensor("exp_avg", t)
    beta1, beta2 = scalar("beta1", t), scalar("beta2", t)
    c = beta1 * m + (1.0 - beta1) * g
    sign = where(c > 0, 1.0, where(c < 0, -1.0, c * 0.0))
    u = sign + scalar("weight_decay", t) * p if decay else sign
    slots = [Slot("param", param_dtype, written=True), Slot("grad", grad_dtype),
             Slot("exp_avg", t, written=True)]
    outputs = {"param": (p - scalar("lr", t) * u).cast(param_dtype),
               "exp_avg": beta2 * m + (1.0 - beta2) * g}
    return UpdateRule(f"test_lion{'_decay' * decay}_{param_dtype}_{grad_dtype}", slots, outputs)


class Lion(Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, backend=None):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults, backend=backend)

    def check_group(self, group):
        check_number("lr", group["lr"])
        check_number("weight_decay", group["weight_decay"])
        for i, beta in enumerate(group["betas"]):
            check_number(f"betas[{i}]", beta, maximum=1.0)

    def structure(self, group):
        return (group["weight_decay"] * group["decay_mult"] > 0,)

    def rule(self, structure, param_dtype, grad_dtype):
        return lion_rule(*structure, param_dtype, grad_dtype)

    def scalars(self, group):
        beta1, beta2 = group["betas"]
        return {"lr": group["lr"] * group["lr_mult"], "beta1": beta1, "beta2": beta2,
                "weight_decay": group["weight_decay"] * group["decay_mult"]}


def lion_numpy(p, m, g, lr, betas, wd):
    """One Lion step in float64 numpy: (new p, new m)."""
    c = betas[0] * m + (1.0 - betas[0]) * g
    return p - lr * (np.sign(c) + wd * p), betas[1] * m + (1.0 - betas[1]) * g


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lion_matches_numpy(backend, dtype, wd):
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (257,), (1,), (0,), (5,)]
    ps = [stepjit.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    opt = Lion([{"params": ps[:3]}, {"params": ps[3:], "lr_mult": 0.5, "decay_mult": 2.0}],
               lr=0.01, weight_decay=wd, backend=backend)
    ref_p = [p.data.astype(np.float64) for p in ps]
    ref_m = [np.zeros(p.shape) for p in ps]
    for t in range(10):
        lr, betas = 0.01 * (1 + 0.5 * np.sin(t)), (0.8 + 0.1 * np.cos(t), 0.99)
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr, betas
        for i, p in enumerate(ps):
            if i == 0 and t in (2, 5):  # skipped: neither it nor its buffer changes
                p.grad = None
                continue
            # parameter 4's gradient is zero on its first step: sign(0) = 0, only decay moves it
            g = np.zeros(p.shape) if (i == 4 and t == 0) else rng.standard_normal(p.shape)
            p.grad = g.astype(dtype)
            mult = (1.0, 1.0) if i < 3 else (0.5, 2.0)
            ref_p[i], ref_m[i] = lion_numpy(ref_p[i], ref_m[i], p.grad.astype(np.float64),
                                            lr * mult[0], betas, wd * mult[1])
        opt.step()
        if t == 0:
            np.testing.assert_allclose(ps[4].data, ref_p[4], rtol=1e-6)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for i, p in enumerate(ps):
        assert p.data.dtype == dtype
        np.testing.assert_allclose(p.data, ref_p[i], rtol=rtol, atol=rtol, err_msg=f"param {i}")
        np.testing.assert_allclose(opt.state[p]["exp_avg"], ref_m[i], rtol=rtol, atol=rtol,
                                   err_msg=f"exp_avg {i}")


def test_lion_half_parameters_keep_float32_state(backend):
    rng = np.random.default_rng(2)
    p = stepjit.Parameter(rng.standard_normal(33).astype(np.float16))
    opt = Lion([p], lr=0.01, weight_decay=0.1, backend=backend)
    for _ in range(3):
        before = p.data.astype(np.float64)
        m = np.array(opt.state.get(p, {}).get("exp_avg", np.zeros(33)), dtype=np.float64)
        p.grad = rng.standard_normal(33).astype(np.float16)
        want, _ = lion_numpy(before, m, p.grad.astype(np.float64), 0.01, (0.9, 0.99), 0.1)
        opt.step()
        ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(p.data.astype(np.float64) - want.astype(np.float16)) <= ulp)
    assert opt.state[p]["exp_avg"].dtype == np.float32


def test_lion_nan_gradient_stays_in_its_element(backend):
    p = stepjit.Parameter(np.ones(4))
    opt = Lion([p], lr=0.1, backend=backend)
    p.grad = np.array([1.0, np.nan, -1.0, 0.0])
    opt.step()
    np.testing.assert_array_equal(np.isnan(p.data), [False, True, False, False])
    np.testing.assert_allclose(p.data[[0, 2, 3]], [0.9, 1.1, 1.0])


# -- Adagrad: step counts and a per-tensor value from the host -----------------------------------
@functools.cache
def adagrad_rule(decay: bool, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
    t = param_dtype.compute
    p, g = tensor("param", param_dtype).cast(t), tensor("grad", grad_dtype).cast(t)
    if decay:
        g = g + scalar("weight_decay", t) * p
    s = tensor("sum", t) + g * g
    clr = per_tensor("clr", F64).cast(t)
    new_p = p - (clr * g) / (sqrt(s) + scalar("eps", t))
    slots = [Slot("param", param_dtype, written=True), Slot("grad", grad_dtype),
             Slot("sum", t, written=True)]
    return UpdateRule(f"test_adagrad{'_decay' * decay}_{param_dtype}_{grad_dtype}", slots,
                      {"param": new_p.cast(param_dtype), "sum": s})


class Adagrad(Optimizer):
    counts_steps = True

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, *,
                 backend=None):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults, backend=backend)

    def check_group(self, group):
        for name in ("lr", "lr_decay", "weight_decay", "eps"):
            check_number(name, group[name])

    def structure(self, group):
        return (group["weight_decay"] > 0,)

    def rule(self, structure, param_dtype, grad_dtype):
        return adagrad_rule(*structure, param_dtype, grad_dtype)

    def scalars(self, group):
        return {"weight_decay": group["weight_decay"], "eps": group["eps"]}

    def tensor_values(self, group, step):
        return {"clr": group["lr"] / (1.0 + (step - 1.0) * group["lr_decay"])}


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adagrad_matches_torch(backend, wd):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(s) for s in ((4, 3), (9,), (1,))]
    mine = [stepjit.Parameter(a.copy()) for a in init]
    theirs = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    opt = Adagrad(mine, lr=0.1, lr_decay=0.05, weight_decay=wd, backend=backend)
    ref = torch.optim.Adagrad(theirs, lr=0.1, lr_decay=0.05, weight_decay=wd, foreach=False)
    for t in range(10):
        lr = 0.1 * (1 + 0.5 * np.cos(t))
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        for i, (p, q) in enumerate(zip(mine, theirs)):
            if i == 1 and t in (0, 6):
                p.grad, q.grad = None, None
                continue
            g = rng.standard_normal(p.shape)
            p.grad, q.grad = g, torch.from_numpy(g.copy())
        opt.step()
        ref.step()
    for p, q in zip(mine, theirs):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(opt.state[p]["sum"], ref.state[q]["sum"].numpy(), rtol=1e-12)
        assert int(opt.state[p]["step"]) == int(ref.state[q]["step"].item())
    assert int(opt.state[mine[1]]["step"]) == 8


# -- normalized gradient descent: a reduction ------------------------------------------------------
@functools.cache
def normalized_rule(param_dtype: DType, grad_dtype: DType) -> UpdateRule:
    t = param_dtype.compute
    p, g = tensor("param", param_dtype).cast(t), tensor("grad", grad_dtype).cast(t)
    g64 = g.cast(F64)
    norm = (g64 * g64).sum().sqrt()
    new_p = p - scalar("lr", t) * g / (norm + scalar("eps", F64)).cast(t)
    return UpdateRule(f"test_normalized_{param_dtype}_{grad_dtype}",
                      [Slot("param", param_dtype, written=True), Slot("grad", grad_dtype)],
                      {"param": new_p.cast(param_dtype)})


class NormalizedGD(Optimizer):
    def __init__(self, params, lr, eps=1e-12, *, backend=None):
        super().__init__(params, dict(lr=lr, eps=eps), backend=backend)

    def structure(self, group):
        return ()

    def rule(self, structure, param_dtype, grad_dtype):
        return normalized_rule(param_dtype, grad_dtype)

    def scalars(self, group):
        return {"lr": group["lr"] * group["lr_mult"], "eps": group["eps"]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalized_gd_matches_numpy(backend, dtype):
    rng = np.random.default_rng(4)
    ps = [stepjit.Parameter(rng.standard_normal(s).astype(dtype))
          for s in ((5000,), (3, 3), (0,), (2,))]
    opt = NormalizedGD(ps, lr=0.3, backend=backend)
    ref = [p.data.astype(np.float64) for p in ps]
    for _ in range(5):
        for i, p in enumerate(ps):
            g = rng.standard_normal(p.shape) * (0.0 if i == 3 else 10.0)
            p.grad = g.astype(dtype)
            ref[i] = ref[i] - 0.3 * g / (np.sqrt(np.sum(g * g)) + 1e-12)
        opt.step()
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for p, want in zip(ps, ref):
        np.testing.assert_allclose(p.data, want, rtol=rtol, atol=rtol)
    # one reduction: the norm is computed once per tensor, in float64
    assert len(normalized_rule(DType.from_numpy(dtype), DType.from_numpy(dtype)).reductions) == 1


# -- compile counts --------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    pytest.param(lambda ps, b: Lion(ps, lr=0.1, weight_decay=0.1, backend=b), id="lion"),
    pytest.param(lambda ps, b: Adagrad(ps, lr=0.1, lr_decay=0.1, backend=b), id="adagrad"),
    pytest.param(lambda ps, b: NormalizedGD(ps, lr=0.1, backend=b), id="normalized"),
])
def test_custom_optimizers_compile_once(backend, make):
    rng = np.random.default_rng(5)
    ps = [stepjit.Parameter(rng.standard_normal(s).astype(np.float32)) for s in ((7,), (2, 3))]
    opt = make(ps, backend)
    for p in ps:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    opt.step()
    stepjit.reset_cache_info()
    for _ in range(10):
        opt.param_groups[0]["lr"] = rng.uniform(0.01, 0.1)
        for p in ps:
            p.grad[...] = rng.standard_normal(p.shape)
        opt.step()
    info = stepjit.cache_info()
    assert (info.compiles, info.disk_hits) == (0, 0)


def test_custom_bad_hyperparameter_changes_nothing(backend):
    p = stepjit.Parameter(np.ones(3))
    with pytest.raises(ValueError, match="betas"):
        Lion([p], betas=(0.9, 1.5), backend=backend)
    opt = Lion([p], lr=0.1, backend=backend)
    opt.param_groups[0]["lr"] = -1.0
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    np.testing.assert_array_equal(p.data, np.ones(3))
    assert p not in opt.state


# -- the registry and rule_for ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_rule_for_every_optimizer(name, dtype):
    rule = rule_for(name, dtype)
    assert isinstance(rule, UpdateRule)
    assert rule.name.startswith(name) and rule.name.endswith(f"_{dtype}_{dtype}")
    assert rule.slot("param").dtype is DType(dtype)
    state = [s for s in rule.slots if s.name not in ("param", "grad")]
    assert all(s.dtype is DType(dtype).compute for s in state)
    mixed = rule_for(name, dtype, grad_dtype="float32")
    assert mixed.slot("grad").dtype is DType.F32


def test_rule_for_checks_its_input():
    with pytest.raises(ValueError, match="unknown optimizer 'adadelta'"):
        rule_for("adadelta", "float32")
    with pytest.raises(ValueError, match="cannot load optimizer 'no_such_module:Lion'"):
        rule_for("no_such_module:Lion", "float32")
    with pytest.raises(ValueError, match="eps"):
        rule_for("adam", "float32", eps=-1.0)
    with pytest.raises(TypeError):
        rule_for("rmsprop", "float32", betas=(0.9, 0.9))
    assert "amsgrad" in rule_for("adam", "float32", amsgrad=True).name
    assert rule_for("sgd", "float32", momentum=0.9).name == "sgd_momentum_float32_float32"


def test_docs_examples_run(capsys):
    """The examples of docs/optimizers.md run as written, and print what they say."""
    text = (ROOT / "docs" / "optimizers.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(examples) == 3
    for code in examples:
        exec(compile(code, "docs/optimizers.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert "[0.85 1.05 0.95 0.85]" in out
    assert "rule lion_decay_float32_float32" in out
    assert "[0.3232233 0.3232233 0.3232233] 2" in out
    assert "sum %" in out
