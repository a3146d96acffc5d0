"""stepjit.torch's `torch.optim.Optimizer` face, with torch's own optimizers as the oracles.

Every test steps a stepjit.torch optimizer beside torch's class of the same name over an
identical model (or checks torch's behaviour directly: signatures, errors, hooks, GradScaler),
so what is compared is what a script that swaps `torch.optim` for `stepjit.torch` would see.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings

import pytest

torch = pytest.importorskip("torch")

from test_torch_interop import _model  # noqa: E402
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import stepjit  # noqa: E402
import stepjit.torch  # noqa: E402
from stepjit.ir import Slot, UpdateRule, scalar, tensor, where  # noqa: E402
from stepjit.optim import Optimizer as StepjitOptimizer  # noqa: E402
from stepjit.optim import check_number  # noqa: E402

FACES = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


# -- helpers --------------------------------------------------------------------------------------
def _batch(dtype=torch.float32, seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 2, generator=g).to(dtype)


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _train_step(model, opt, batch):
    """One step as a torch script takes it: torch's default zero_grad (set_to_none)."""
    opt.zero_grad()
    _loss(model, batch).backward()
    opt.step()


def _pair(name, cfg, dtype=torch.float32, make=_model, ref_cfg=None):
    """(torch model, torch.optim.<name>), (identical model, stepjit.torch.<name>)."""
    ref_model, our_model = make(dtype), make(dtype)
    # each its own copy of the arguments: a tensor lr must not be shared (a scheduler fills it)
    ref = getattr(torch.optim, name)(ref_model.parameters(),
                                     **copy.deepcopy(cfg if ref_cfg is None else ref_cfg))
    ours = getattr(stepjit.torch, name)(our_model.parameters(), **copy.deepcopy(cfg))
    return (ref_model, ref), (our_model, ours)


def _close(got, want, tol, what):
    # Rounding errors are relative to the tensor's scale, not to each element (one that ends
    # near zero through cancellation keeps the error of its neighbours): atol grows with it.
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    atol = max(tol["atol"], tol["rtol"] * scale)
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _assert_state_close(ours_state, ref_state, tol, what=""):
    assert set(ours_state) == set(ref_state), what
    for key, want in ref_state.items():
        got = ours_state[key]
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), f"{what} {key}"
            _close(got, want, tol, f"{what} {key}")
        else:
            assert got == pytest.approx(want), f"{what} {key}"


def _assert_match(ours, ref, tol=TOL[torch.float32]):
    """Parameters (and every state buffer, step counts included) of two (model, optimizer)."""
    (our_model, our_opt), (ref_model, ref_opt) = ours, ref
    for i, (p, q) in enumerate(zip(our_model.parameters(), ref_model.parameters())):
        if p.is_meta:  # no values to compare, and no state
            assert q.is_meta and p not in our_opt.state
            continue
        _close(p, q, tol, f"parameter {i}")
        _assert_state_close(our_opt.state.get(p, {}), ref_opt.state.get(q, {}), tol,
                            f"parameter {i}")


def _snapshot(model, opt):
    """Copies of every parameter and state value, for checking that nothing changed."""
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                 for k, v in opt.state.get(p, {}).items()}
             for i, p in enumerate(model.parameters())}
    return params, state


def _assert_unchanged(model, opt, snapshot):
    params, state = snapshot
    for i, (p, before) in enumerate(zip(model.parameters(), params)):
        assert torch.equal(p.detach(), before), f"parameter {i} changed"
        now = opt.state.get(p, {})
        assert set(now) == set(state[i]), f"parameter {i}: state keys changed"
        for k, v in state[i].items():
            assert torch.equal(torch.as_tensor(now[k]), torch.as_tensor(v)), f"{i} {k} changed"


def _through_file(obj):
    saved = io.BytesIO()
    torch.save(obj, saved)
    saved.seek(0)
    return torch.load(saved, weights_only=False)


def _cnn(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3),
                               torch.nn.Flatten(), torch.nn.Linear(8, 2)).to(
        dtype=dtype, memory_format=torch.channels_last)


# -- 1. step for step with torch ------------------------------------------------------------------
CONFIGS = [
    ("SGD", {}),  # torch's defaults, no lr given
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("SGD", dict(lr=0.1, weight_decay=1e-2, maximize=True, foreach=True)),
    ("Adam", {}),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-2, amsgrad=True)),
    ("Adam", dict(lr=1e-2, eps=1e-6, maximize=True, fused=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", {}),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("RMSprop", {}),
    ("RMSprop", dict(lr=1e-2, alpha=0.9, weight_decay=1e-2, momentum=0.9, centered=True)),
    ("RMSprop", dict(lr=1e-3, momentum=0.5, maximize=True)),
    ("Adagrad", {}),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=1e-2, initial_accumulator_value=0.1)),
    ("Adagrad", dict(lr=0.05, eps=1e-8, maximize=True)),
]


def _config_id(case):
    name, cfg = case
    return name + "-" + ("-".join(f"{k}={v}" for k, v in cfg.items()) or "defaults")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CONFIGS, ids=map(_config_id, CONFIGS))
def test_each_face_matches_torch_step_for_step(backend, case, dtype):
    name, cfg = case
    # foreach and fused change nothing in stepjit; torch's oracle runs its plain loop
    ref_cfg = {k: v for k, v in cfg.items() if k not in ("foreach", "fused")}
    ref, ours = _pair(name, {**cfg, "backend": backend}, dtype, ref_cfg=ref_cfg)
    assert isinstance(ours[1], torch.optim.Optimizer)
    assert ours[1].backend == backend
    batch = _batch(dtype)
    before = [p.detach().clone() for p in ours[0].parameters()]
    for _ in range(6):
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
        _assert_match(ours, ref, TOL[dtype])
        for g_ours, g_ref in zip(ours[1].param_groups, ref[1].param_groups):
            assert g_ours["lr"] == g_ref["lr"]
    assert all(not torch.equal(p, b) for p, b in zip(ours[0].parameters(), before))


# -- 2. signatures --------------------------------------------------------------------------------
EXTRAS = ["scale", "clip_norm", "process_group", "bucket_cap_mb", "backend"]


@pytest.mark.parametrize("name", FACES)
def test_signature_is_torchs_then_keyword_only_extras(name):
    theirs = list(inspect.signature(getattr(torch.optim, name).__init__).parameters.values())[1:]
    ours = list(inspect.signature(getattr(stepjit.torch, name)).parameters.values())
    head, tail = ours[: len(theirs)], ours[len(theirs):]
    assert [(p.name, p.kind, p.default) for p in head] == [
        (p.name, p.kind, p.default) for p in theirs]
    assert tail and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in tail)
    names = [p.name for p in tail]
    assert set(EXTRAS) <= set(names)
    defaults = {p.name: p.default for p in tail}
    assert (defaults["scale"], defaults["clip_norm"], defaults["process_group"],
            defaults["backend"]) == (1.0, 0.0, None, None)


@pytest.mark.parametrize("name, args", [
    ("RMSprop", (0.02, 0.9, 1e-6, 1e-3, 0.5, True)),  # ..., momentum, centered
    ("Adagrad", (0.05, 0.01, 1e-3, 0.2, 1e-9, False)),  # ..., eps, foreach
    ("SGD", (0.05, 0.9, 0.1, 1e-3, False)),
    ("Adam", (0.02, (0.8, 0.9), 1e-6, 1e-2, True)),  # ..., amsgrad
])
def test_positional_arguments_bind_as_in_torch(name, args):
    ref = getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], *args)
    ours = getattr(stepjit.torch, name)([torch.zeros(2, requires_grad=True)], *args)
    want = {k: v for k, v in ref.param_groups[0].items() if k != "params"}
    got = ours.param_groups[0]
    assert {k: got[k] for k in want} == want
    if name == "RMSprop":
        assert got["centered"] is True and got["momentum"] == 0.5


def test_lars_signature_ends_in_keyword_only_flags():
    params = inspect.signature(stepjit.torch.LARS).parameters
    assert next(iter(params)) == "params"
    kinds = [p.kind for p in params.values()]
    first_keyword = kinds.index(inspect.Parameter.KEYWORD_ONLY)
    assert all(k is inspect.Parameter.KEYWORD_ONLY for k in kinds[first_keyword:])
    keyword = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {"maximize", "foreach", "fused", "differentiable", "capturable", "process_group",
            "bucket_cap_mb", "backend"} <= keyword
    assert {"lr", "momentum", "weight_decay", "scale", "clip_norm"} <= set(params) - keyword


# -- 3. torch's argument errors -------------------------------------------------------------------
BAD_ARGUMENTS = [
    ("SGD", dict(lr=-1.0)),
    ("SGD", dict(lr=0.1, momentum=-0.5)),
    ("SGD", dict(lr=0.1, nesterov=True)),  # nesterov without momentum
    ("Adam", dict(betas=(1.5, 0.9))),
    ("Adam", dict(eps=-1.0)),
    ("Adam", dict(fused=True, foreach=True)),
    ("AdamW", dict(weight_decay=-0.1)),
    ("RMSprop", dict(alpha=-0.1)),
    ("Adagrad", dict(lr_decay=-1.0)),
]


@pytest.mark.parametrize("name, kwargs", BAD_ARGUMENTS,
                         ids=[f"{n}-{k}" for n, k in BAD_ARGUMENTS])
def test_torchs_argument_errors_come_out_and_nothing_is_built(monkeypatch, name, kwargs):
    built = []
    real = stepjit.torch.Optimizer._new_engine
    monkeypatch.setattr(stepjit.torch.Optimizer, "_new_engine",
                        lambda self: built.append(self) or real(self))
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(Exception) as want:
        getattr(torch.optim, name)([w], **kwargs)
    with pytest.raises(want.type) as got:
        getattr(stepjit.torch, name)([w], **kwargs)
    assert type(got.value) is want.type and str(got.value) == str(want.value)
    assert built == []


def test_params_none_with_a_bad_lr_raises_torchs_lr_error_first():
    with pytest.raises(ValueError, match="Invalid learning rate") as want:
        torch.optim.SGD(None, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid learning rate") as got:
        stepjit.torch.SGD(None, lr=-1.0)
    assert str(got.value) == str(want.value)
    with pytest.raises(Exception) as want:
        torch.optim.Adam(None)
    with pytest.raises(want.type):
        stepjit.torch.Adam(None)


# -- 4. a tensor lr --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg", [
    ("SGD", dict(momentum=0.9)), ("Adam", {}), ("AdamW", dict(weight_decay=0.1)),
    ("Adam", dict(betas=(torch.tensor(0.8), torch.tensor(0.95)))),  # tensor betas too
    ("RMSprop", {}), ("Adagrad", {})])
def test_tensor_lr_and_its_scheduler_match_torch(name, cfg):
    ref, ours = _pair(name, {**cfg, "lr": torch.tensor(0.02)})
    scheds = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
              for _, opt in (ref, ours)]
    batch = _batch()
    for _ in range(6):
        for (model, opt), sched in zip((ref, ours), scheds):
            _train_step(model, opt, batch)
            sched.step()
        _assert_match(ours, ref)
    lr = ours[1].param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    assert float(lr) == float(ref[1].param_groups[0]["lr"]) == pytest.approx(0.02 * 0.5**3)


# -- 5. frozen parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("name", FACES)
def test_frozen_parameters_are_untouched_and_the_rest_matches_torch(name):
    def frozen(dtype):
        model = _model(dtype)
        model[0].weight.requires_grad_(False)
        return model

    ref, ours = _pair(name, dict(lr=0.01, weight_decay=1e-2), make=frozen)
    weight = ours[0][0].weight.detach().clone()
    batch = _batch()
    for _ in range(4):
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
    assert torch.equal(ours[0][0].weight, weight)
    assert ours[0][0].weight.grad is None
    assert ours[1].state.get(ours[0][0].weight, {}) == {}  # nothing allocated for it
    for i, (p, q) in enumerate(zip(ours[0].parameters(), ref[0].parameters())):
        _close(p, q, TOL[torch.float32], f"parameter {i}")
        if p.requires_grad:
            _assert_state_close(ours[1].state[p], ref[1].state[q], TOL[torch.float32], str(i))


# -- 6. copies ------------------------------------------------------------------------------------
COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": _through_file,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name, cfg", [("Adam", dict(lr=1e-2, amsgrad=True)),
                                       ("SGD", dict(lr=0.1, momentum=0.9))])
def test_copies_keep_matching_torch_and_are_independent(how, name, cfg):
    ref, ours = _pair(name, cfg)
    batch = _batch()
    for _ in range(3):
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
    ref_copy, our_copy = COPIES[how](ref), COPIES[how](ours)
    assert type(our_copy[1]) is type(ours[1])
    assert our_copy[1].backend == ours[1].backend
    assert our_copy[1]._engine is not ours[1]._engine
    original = _snapshot(*ours)
    for _ in range(3):
        for model, opt in (ref_copy, our_copy):
            _train_step(model, opt, batch)
        _assert_match(our_copy, ref_copy)
    _assert_unchanged(*ours, original)  # the copy's steps wrote only the copy's memory
    for _ in range(2):  # and the original goes on as before
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
        _assert_match(ours, ref)
    copied = _snapshot(*our_copy)
    _train_step(*ours, batch)
    _assert_unchanged(*our_copy, copied)


# -- 7. state dicts -------------------------------------------------------------------------------
ROUND_TRIPS = [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
               ("Adam", dict(lr=1e-2, amsgrad=True)),
               ("AdamW", dict(lr=1e-2)),
               ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True)),
               ("Adagrad", dict(lr=0.1, lr_decay=0.01))]


@pytest.mark.parametrize("name, cfg", ROUND_TRIPS, ids=[n for n, _ in ROUND_TRIPS])
def test_state_dict_goes_stepjit_torch_stepjit_and_keeps_matching(name, cfg):
    ref, ours = _pair(name, cfg)
    batch = _batch()
    for _ in range(2):
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
    # stepjit -> torch's class
    model = copy.deepcopy(ours[0])
    theirs = (model, getattr(torch.optim, name)(model.parameters(), **cfg))
    theirs[1].load_state_dict(_through_file(ours[1].state_dict()))
    for _ in range(2):
        for model, opt in (ref, theirs):
            _train_step(model, opt, batch)
        _assert_match(theirs, ref)
    # torch's class -> stepjit
    model = copy.deepcopy(theirs[0])
    back = (model, getattr(stepjit.torch, name)(model.parameters(), **cfg))
    back[1].load_state_dict(_through_file(theirs[1].state_dict()))
    for _ in range(2):
        for model, opt in (ref, back):
            _train_step(model, opt, batch)
        _assert_match(back, ref)


@pytest.mark.parametrize("name, cfg", ROUND_TRIPS, ids=[n for n, _ in ROUND_TRIPS])
def test_load_state_dict_of_its_own_state_dict_is_exact(name, cfg):
    _, a = _pair(name, cfg)
    _, b = _pair(name, cfg)
    batch = _batch()
    for _ in range(2):
        for model, opt in (a, b):
            _train_step(model, opt, batch)
    b[1].load_state_dict(b[1].state_dict())
    for _ in range(3):
        for model, opt in (a, b):
            _train_step(model, opt, batch)
    _assert_match(b, a, dict(rtol=0, atol=0))
    sd_a, sd_b = a[1].state_dict(), b[1].state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]


def test_named_parameters_give_param_names_like_torch():
    ref_model, our_model = _model(), _model()
    ref = torch.optim.Adam(ref_model.named_parameters(), lr=1e-2)
    ours = stepjit.torch.Adam(our_model.named_parameters(), lr=1e-2)
    names = [n for n, _ in our_model.named_parameters()]
    assert ours.param_groups[0]["param_names"] == names
    batch = _batch()
    for _ in range(2):
        for model, opt in ((ref_model, ref), (our_model, ours)):
            _train_step(model, opt, batch)
    sd, want = ours.state_dict(), ref.state_dict()
    assert sd["param_groups"][0]["param_names"] == want["param_groups"][0]["param_names"] == names
    assert sorted(sd["state"]) == sorted(want["state"])
    _assert_match((our_model, ours), (ref_model, ref))
    # a named torch checkpoint loads into a named stepjit optimizer
    model = copy.deepcopy(ref_model)
    again = stepjit.torch.Adam(model.named_parameters(), lr=1e-2)
    again.load_state_dict(_through_file(ref.state_dict()))
    for _ in range(2):
        for m, opt in ((ref_model, ref), (model, again)):
            _train_step(m, opt, batch)
    _assert_match((model, again), (ref_model, ref))


# -- 8. hooks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["kernels", "differentiable", "not-dense"])
def test_step_hooks_run_once_per_step_with_and_without_closure(path):
    model = _model()
    if path == "not-dense":
        base = torch.randn(16, 6, 2)
        model[0].weight = torch.nn.Parameter(base[..., 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt = stepjit.torch.SGD(model.parameters(), lr=0.1,
                                differentiable=path == "differentiable")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    handles = [register_optimizer_step_pre_hook(
                   lambda o, args, kwargs: calls.append(("global pre", o))),
               register_optimizer_step_post_hook(
                   lambda o, args, kwargs: calls.append(("global post", o)))]
    try:
        batch = _batch()
        if path == "differentiable":  # its params are leaves: the step may not be recorded
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = torch.ones_like(p)
            opt.step()
        else:
            _train_step(model, opt, batch)
        assert [c for c, _ in calls] == ["global pre", "pre", "post", "global post"]
        assert all(o is opt for _, o in calls)
        calls.clear()

        def closure():
            calls.append(("closure", None))
            if path == "differentiable":
                return torch.tensor(1.5)
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert [c for c, _ in calls] == ["global pre", "pre", "closure", "post", "global post"]
        assert isinstance(loss, torch.Tensor)
    finally:
        for h in handles:
            h.remove()


def test_state_dict_hooks_run():
    model = _model()
    opt = stepjit.torch.Adam(model.parameters(), lr=1e-2)
    _train_step(model, opt, _batch())
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))

    def post(o, sd):
        calls.append("sd post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(post)

    def load_pre(o, sd):
        calls.append("load pre")
        sd = copy.deepcopy(sd)
        sd.pop("extra")
        sd["param_groups"][0]["lr"] = 0.5
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls == ["sd pre", "sd post", "load pre", "load post"]
    assert opt.param_groups[0]["lr"] == 0.5  # what the pre hook returned was loaded
    _train_step(model, opt, _batch())


# -- 9. torch.amp.GradScaler ----------------------------------------------------------------------
def _scaled_step(model, opt, scaler, batch, unscale=False, poison=False):
    opt.zero_grad()
    scaler.scale(_loss(model, batch)).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("inf")
    if unscale:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("unscale, maximize", [(False, False), (True, False), (False, True)],
                         ids=["in-kernel", "unscale_-and-clip", "in-kernel-maximize"])
def test_grad_scaler_matches_torch_and_skips_overflowed_steps(unscale, maximize):
    # weight decay: Adam's update would hardly change with gradients left scaled without it
    cfg = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=maximize)
    ref, ours = _pair("Adam", cfg, ref_cfg={**cfg, "fused": False})
    assert ours[1]._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    batch = _batch()
    for _ in range(3):
        for (model, opt), scaler in zip((ref, ours), scalers):
            _scaled_step(model, opt, scaler, batch, unscale)
        _assert_match(ours, ref)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**10
    before = _snapshot(*ours)
    for (model, opt), scaler in zip((ref, ours), scalers):
        _scaled_step(model, opt, scaler, batch, unscale, poison=True)
    _assert_unchanged(*ours, before)  # params and state, step counts included
    assert all(float(s["step"]) == 3 for s in ours[1].state.values())
    _assert_match(ours, ref)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9  # backed off
    for _ in range(2):
        for (model, opt), scaler in zip((ref, ours), scalers):
            _scaled_step(model, opt, scaler, batch, unscale)
        _assert_match(ours, ref)
    assert all(float(s["step"]) == 5 for s in ours[1].state.values())
    assert not hasattr(ours[1], "found_inf") and not hasattr(ours[1], "grad_scale")


# -- 10. differentiable=True ----------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg", [("SGD", dict(lr=0.1, momentum=0.9)),
                                       ("Adam", dict(lr=0.1, weight_decay=0.1)),
                                       ("AdamW", dict(lr=0.1)),
                                       ("RMSprop", dict(lr=0.01, momentum=0.9)),
                                       ("Adagrad", dict(lr=0.1))])
def test_differentiable_step_matches_torch_and_its_gradient(name, cfg):
    """The update is recorded by autograd: its result's gradient with respect to a tensor that
    the gradients were computed from is torch's."""
    results = []
    for make in (getattr(torch.optim, name), getattr(stepjit.torch, name)):
        x = torch.linspace(0.2, 1.0, 5, requires_grad=True)
        p = torch.linspace(0.5, 1.5, 5)  # a leaf that autograd may write into
        opt = make([p], differentiable=True, **cfg)
        for k in range(3):
            p.grad = x * (k + 2.0)
            opt.step()
        (dx,) = torch.autograd.grad(p.pow(2).sum(), x)
        results.append((p.detach(), dx, {k: v.detach() for k, v in opt.state[p].items()}))
    (p_ref, dx_ref, s_ref), (p_ours, dx_ours, s_ours) = results
    torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx_ours, dx_ref, rtol=0, atol=0)
    _assert_state_close(s_ours, s_ref, dict(rtol=0, atol=0))


def test_differentiable_accepts_non_leaf_parameters_like_torch():
    """torch.optim takes non-leaf tensors when differentiable=True (an unrolled inner loop
    optimizes `w.clone()` and differentiates through the steps to `w`)."""
    results = []
    for make in (torch.optim.SGD, stepjit.torch.SGD):
        w = torch.linspace(0.5, 1.5, 5, requires_grad=True)
        p = w.clone()
        p.grad = torch.ones(5)
        opt = make([p], lr=0.1, momentum=0.9, differentiable=True)
        opt.step()
        (dw,) = torch.autograd.grad(p.pow(2).sum(), w)
        results.append((p.detach(), dw))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_differentiable_with_stepjit_only_hyperparameters_is_refused():
    p = torch.ones(4)
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="clip_norm"):
        opt = stepjit.torch.SGD([p], lr=0.1, clip_norm=1.0, differentiable=True)
        opt.step()
    assert torch.equal(p, torch.ones(4))
    with pytest.raises(ValueError, match="differentiable"):
        stepjit.torch.LARS([torch.ones(4, requires_grad=True)], lr=0.1, differentiable=True)


# -- 11. parameters that are not dense ------------------------------------------------------------
@pytest.mark.parametrize("name, cfg", [("SGD", dict(lr=0.1, momentum=0.9)),
                                       ("Adam", dict(lr=1e-2))])
def test_a_parameter_that_is_not_dense_warns_and_matches_torch(name, cfg):
    def model_with_a_view(dtype):
        model = _model(dtype)
        base = torch.randn(16, 6, 2, generator=torch.Generator().manual_seed(3)).to(dtype)
        view = base[..., 0]  # gaps in memory; a leaf (base does not require grad)
        with torch.no_grad():
            view.copy_(model[0].weight)
        model[0].weight = torch.nn.Parameter(view)
        model.base = base  # what lies between its elements: must stay as it was
        return model

    ref_model, our_model = model_with_a_view(torch.float32), model_with_a_view(torch.float32)
    assert not our_model[0].weight.is_contiguous()
    ref = getattr(torch.optim, name)(ref_model.parameters(), **cfg)
    with pytest.warns(RuntimeWarning, match="parameter 0 has gaps or overlaps"):
        ours = getattr(stepjit.torch, name)(our_model.parameters(), **cfg)
    between = our_model.base[..., 1].clone()
    ptr = our_model[0].weight.data_ptr()
    batch = _batch()
    for _ in range(4):
        for model, opt in ((ref_model, ref), (our_model, ours)):
            _train_step(model, opt, batch)
        _assert_match((our_model, ours), (ref_model, ref))
    assert our_model[0].weight.data_ptr() == ptr
    assert torch.equal(our_model.base[..., 1], between)


# -- 12. complex parameters, sparse gradients -----------------------------------------------------
@pytest.mark.parametrize("name", FACES)
def test_complex_parameter_is_refused_by_name(name):
    real = torch.zeros(3, requires_grad=True)
    cplx = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="param group 0, parameter 1: complex"):
        getattr(stepjit.torch, name)([real, cplx])


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_sparse_gradient_is_refused_at_step_and_nothing_changes(name):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Linear(3, 1)
    opt = getattr(stepjit.torch, name)([*emb.parameters(), *dense.parameters()], lr=0.1)
    dense(emb(torch.tensor([1, 2]))).sum().backward()
    assert emb.weight.grad.is_sparse
    before = [p.detach().clone() for p in (*emb.parameters(), *dense.parameters())]
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    for p, b in zip((*emb.parameters(), *dense.parameters()), before):
        assert torch.equal(p, b)
    assert all(not s for s in opt.state.values())


# -- 13. channels_last ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg", [("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
                                       ("AdamW", dict(lr=1e-2))])
def test_channels_last_cnn_steps_in_place_and_matches_torch(name, cfg):
    ref, ours = _pair(name, cfg, make=_cnn)
    convs = [p for p in ours[0].parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last)
                         and not p.is_contiguous() for p in convs)
    ptrs = [p.data_ptr() for p in ours[0].parameters()]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    batch = (x, torch.randn(4, 2, generator=g))

    def step(model, opt):
        opt.zero_grad()
        (model(batch[0]) - batch[1]).pow(2).mean().backward()
        opt.step()

    for _ in range(4):
        step(*ref)
        step(*ours)
        _assert_match(ours, ref)
    assert [p.data_ptr() for p in ours[0].parameters()] == ptrs
    for p in ours[0].parameters():
        for key, buf in ours[1].state[p].items():
            if key != "step":
                assert buf.stride() == p.stride(), key  # state in the parameter's layout


# -- 14. new gradients: the fast path, and what it refuses ---------------------------------------
@pytest.mark.parametrize("lr", [1e-2, torch.tensor(1e-2)], ids=["float-lr", "tensor-lr"])
def test_set_to_none_loop_keeps_the_launch_table_and_compiles_nothing(monkeypatch, lr):
    ref, ours = _pair("Adam", dict(lr=lr, weight_decay=1e-2))
    batch = _batch()
    for model, opt in (ref, ours):
        _train_step(model, opt, batch)
    engine = ours[1]._engine
    plan = engine._plans[("step", 0)]
    staged = []  # each step: the whole step in one native call, or the bulk re-pointing
    real, real_fast = type(engine)._stage_moved, type(engine)._step_fast

    def stage_moved(self, plan, addresses):
        staged.append(real(self, plan, addresses))
        return staged[-1]

    def step_fast(self, settings):
        done = real_fast(self, settings)
        if done:
            staged.append("one native call")
        return done

    monkeypatch.setattr(type(engine), "_stage_moved", stage_moved)
    monkeypatch.setattr(type(engine), "_step_fast", step_fast)
    stepjit.reset_cache_info()
    kept = []
    for _ in range(5):
        kept.append([p.grad for p in ours[0].parameters()])  # new gradients: new addresses
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
        _assert_match(ours, ref)
        assert ours[1]._engine._plans[("step", 0)] is plan
    info = stepjit.cache_info()
    assert (info.compiles, info.disk_hits, info.memory_hits) == (0, 0, 0)  # not even looked up
    assert len(staged) == 5 and all(s is not None for s in staged)  # re-pointed in bulk
    assert staged[-1] == "one native call"  # small launches: the steady state's whole step


def test_the_one_call_step_follows_edits_and_refuses_bad_values_like_the_full_path():
    """In the steady state (a step in one native call), an edited lr, a term turned on and an
    invalid value behave as in the full path: matching torch, and an error with nothing
    changed."""
    ref, ours = _pair("SGD", dict(lr=0.05, momentum=0.9))
    batch = _batch()
    for _ in range(3):
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
    assert ours[1]._engine._fast is not None
    for edit in ({"lr": 0.01}, {"weight_decay": 0.1}, {"nesterov": True}):
        for model, opt in (ref, ours):
            opt.param_groups[0].update(edit)
            _train_step(model, opt, batch)
        _assert_match(ours, ref)
    before = [p.detach().clone() for p in ours[0].parameters()]
    ours[1].param_groups[0]["lr"] = -1.0
    ours[1].zero_grad()
    _loss(ours[0], batch).backward()
    with pytest.raises(ValueError, match="lr"):
        ours[1].step()
    for p, q in zip(ours[0].parameters(), before):
        assert torch.equal(p, q)


def test_the_one_call_step_runs_large_launches_on_torchs_team_and_follows_its_size():
    """A model with launches large enough for torch's OpenMP team steps in one native call too
    (the team called from native code), and matches torch when the team's size changes."""
    from stepjit.runtime import cpu

    def make(dtype):
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(6, 512), torch.nn.ReLU(),
                                   torch.nn.Linear(512, 1200), torch.nn.ReLU(),
                                   torch.nn.Linear(1200, 2)).to(dtype)

    assert sum(p.numel() for p in make(torch.float32).parameters()) > cpu.PARALLEL_MIN
    threads = torch.get_num_threads()
    ref, ours = _pair("AdamW", dict(lr=1e-3), make=make)
    batch = _batch()
    try:
        for n in (2, 2, 2, 1, 1, 2):
            torch.set_num_threads(n)
            for model, opt in (ref, ours):
                _train_step(model, opt, batch)
            _assert_match(ours, ref)
        engine = ours[1]._engine
        assert engine._fast is not None and engine._fast_holds()
        launch = engine._plans[("step", 0)].batches[0].launch
        assert launch.calls_key() == (cpu._team_threads() or 0) and launch.team.threads == 2
    finally:
        torch.set_num_threads(threads)


def _two_of_a_shape():
    torch.manual_seed(5)
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
                                  + [torch.nn.Parameter(torch.randn(7))])


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_gradients_assigned_by_hand_match_torch():
    ref, ours = _pair("SGD", dict(lr=0.1, momentum=0.9), make=lambda _: _two_of_a_shape())
    for k in range(4):
        _set_grads(ref[0].parameters(), k)
        for p, q in zip(ours[0].parameters(), ref[0].parameters()):
            p.grad = q.grad.detach().clone()
        ref[1].step()
        ours[1].step()
        _assert_match(ours, ref)


@pytest.mark.parametrize("bad", ["alias", "transposed"])
def test_a_gradient_that_cannot_be_stepped_is_refused_and_nothing_changes(bad):
    ref, ours = _pair("SGD", dict(lr=0.1, momentum=0.9), make=lambda _: _two_of_a_shape())
    for model, opt in (ref, ours):
        _set_grads(model.parameters(), 0)
        opt.step()
    a, b, c = ours[0].parameters()
    before = _snapshot(*ours)
    _set_grads(ours[0].parameters(), 1)
    if bad == "alias":
        a.grad = b.data  # another parameter's memory, which the step writes
        with pytest.raises(ValueError, match="overlap in memory") as err:
            ours[1].step()
        assert "parameter 0 (gradient)" in str(err.value)
    else:
        a.grad = torch.randn(3, 4).t()  # dense, the parameter's shape, other strides
        with pytest.raises(ValueError, match="parameter 0: the gradient is laid out differently"):
            ours[1].step()
    _assert_unchanged(*ours, before)
    # the optimizer is unharmed: with proper gradients it goes on as torch does
    for model, opt in (ref, ours):
        _set_grads(model.parameters(), 2)
        opt.step()
    _assert_match(ours, ref)


def test_replaced_data_is_picked_up_and_matches_torch():
    ref, ours = _pair("Adam", dict(lr=1e-2), make=lambda _: _two_of_a_shape())
    for model, opt in (ref, ours):
        _set_grads(model.parameters(), 0)
        opt.step()
    for model in (ref[0], ours[0]):
        a, b, _ = model.parameters()
        a.data = a.data.clone()  # elsewhere in memory
        b.data = torch.full_like(b.data, 0.25)  # new values
    old = [p.detach().clone() for p in ours[0].parameters()]
    for k in range(1, 4):
        for model, opt in (ref, ours):
            _set_grads(model.parameters(), k)
            opt.step()
        _assert_match(ours, ref)
    assert all(not torch.equal(p, o) for p, o in zip(ours[0].parameters(), old))


# -- 15. a user's optimizer -----------------------------------------------------------------------
class Lion(StepjitOptimizer):
    """README's Lion: c = b1 m + (1 - b1) g;  p -= lr (sign(c) + wd p);  m = b2 m + (1 - b2) g."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, backend=None):
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        super().__init__(params, defaults, backend=backend)

    def check_group(self, group):
        check_number("lr", group["lr"])
        for i, beta in enumerate(group["betas"]):
            check_number(f"betas[{i}]", beta, maximum=1.0)

    def structure(self, group):
        return ()

    def rule(self, structure, param_dtype, grad_dtype):
        t = param_dtype.compute
        p, g = tensor("param", param_dtype).cast(t), tensor("grad", grad_dtype).cast(t)
        m = tensor("exp_avg", t)
        b1, b2, lr, wd = (scalar(name, t) for name in ("beta1", "beta2", "lr", "weight_decay"))
        c = b1 * m + (1.0 - b1) * g
        sign = where(c > 0, 1.0, where(c < 0, -1.0, c * 0.0))
        slots = [Slot("param", param_dtype, written=True), Slot("grad", grad_dtype),
                 Slot("exp_avg", t, written=True)]
        outputs = {"param": (p - lr * (sign + wd * p)).cast(param_dtype),
                   "exp_avg": b2 * m + (1.0 - b2) * g}
        return UpdateRule(f"test_face_lion_{param_dtype}_{grad_dtype}", slots, outputs)

    def scalars(self, group):
        (b1, b2), wd = group["betas"], group["weight_decay"] * group["decay_mult"]
        return {"lr": group["lr"] * group["lr_mult"], "beta1": b1, "beta2": b2, "weight_decay": wd}


def _lion_torch(p, m, g, lr, betas, wd):
    """One Lion step in float64 torch: (new p, new m)."""
    c = betas[0] * m + (1.0 - betas[0]) * g
    return p - lr * (torch.sign(c) + wd * p), betas[1] * m + (1.0 - betas[1]) * g


def test_optimizer_for_a_user_optimizer_is_a_torch_optimizer():
    LionT = stepjit.torch.optimizer_for(Lion)  # noqa: N806
    assert stepjit.torch.optimizer_for(Lion) is LionT
    assert issubclass(LionT, torch.optim.Optimizer) and LionT.engine is Lion
    names = list(inspect.signature(LionT).parameters)
    assert names[:4] == ["params", "lr", "betas", "weight_decay"]
    model = _model()
    opt = LionT(model.parameters(), lr=0.01, weight_decay=0.1)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    want = [p.detach().double().clone() for p in model.parameters()]
    m = [torch.zeros_like(w) for w in want]
    batch = _batch()
    for k in range(4):
        opt.zero_grad()
        _loss(model, batch).backward()
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(0.01 * 0.5**k)
        for i, p in enumerate(model.parameters()):
            want[i], m[i] = _lion_torch(want[i], m[i], p.grad.double(), lr, (0.9, 0.99), 0.1)
        opt.step()
        sched.step()
        for i, p in enumerate(model.parameters()):
            torch.testing.assert_close(p.double(), want[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m[i], rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("face", ["Lion", "LARS"])
def test_copies_of_faces_without_a_torch_class_step_as_the_original_and_keep_its_class(how,
                                                                                       face):
    cls = stepjit.torch.optimizer_for(Lion) if face == "Lion" else stepjit.torch.LARS
    model = _model()
    opt = cls(model.parameters(), lr=0.01, weight_decay=0.1)
    batch = _batch()
    _train_step(model, opt, batch)
    model2, opt2 = COPIES[how]((model, opt))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(2):
        for mod, o in ((model, opt), (model2, opt2)):
            _train_step(mod, o, batch)
    _assert_match((model2, opt2), (model, opt), dict(rtol=0, atol=0))
    assert type(opt2).__name__ == face
    assert isinstance(opt2, cls)  # the class a script holds, not another made like it


# -- 16. the meta device --------------------------------------------------------------------------
def test_meta_parameters_are_accepted_until_a_step_needs_them():
    lazy = torch.nn.Linear(4, 2, device="meta")
    opt = stepjit.torch.SGD(lazy.parameters(), lr=0.1)
    assert opt.backend == "deferred"
    lazy.weight.grad = torch.ones_like(lazy.weight)
    with pytest.raises(RuntimeError, match="meta"):
        opt.step()


def test_meta_parameters_without_gradients_do_not_block_real_ones():
    def with_meta(dtype):
        model = _model(dtype)
        model.frozen = torch.nn.Parameter(torch.empty(5, device="meta"), requires_grad=False)
        model.unused = torch.nn.Parameter(torch.empty(3, device="meta"))
        return model

    ref, ours = _pair("SGD", dict(lr=0.1, momentum=0.9), make=with_meta)
    batch = _batch()
    for _ in range(3):
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
        _assert_match(ours, ref)
    assert ours[1].backend in ("llvm", "reference")  # chosen by the real ones
    assert ours[0].frozen.device.type == "meta" and ours[0].frozen not in ours[1].state


# -- 17. groups added later -----------------------------------------------------------------------
def test_add_param_group_refuses_complex_and_steps_a_valid_group_like_torch():
    def split(dtype):
        return _model(dtype)

    models = [split(torch.float32), split(torch.float32)]
    ref = (models[0], torch.optim.Adam(models[0][0].parameters(), lr=1e-2))
    ours = (models[1], stepjit.torch.Adam(models[1][0].parameters(), lr=1e-2))
    batch = _batch()
    for model, opt in (ref, ours):
        _train_step(model, opt, batch)
    cplx = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="param group 1, parameter 0: complex"):
        ours[1].add_param_group({"params": [cplx]})
    assert len(ours[1].param_groups) == 1
    for model, opt in (ref, ours):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 5e-3,
                             "weight_decay": 0.1})
    assert ours[1].param_groups[1]["betas"] == (0.9, 0.999)  # the defaults filled in
    for _ in range(3):
        for model, opt in (ref, ours):
            _train_step(model, opt, batch)
        _assert_match(ours, ref)


def test_a_removed_groups_memory_does_not_hide_an_overlap_from_the_fast_checks():
    """After a group is popped and its memory taken by a larger parameter, a gradient aliasing
    that parameter is refused in the steady state as on a fresh optimizer."""
    storage = torch.zeros(1000)
    a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(storage[0:200])
    opt = stepjit.torch.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    for _ in range(2):
        a.grad, b.grad = torch.ones(5), torch.ones(200)
        opt.step()
    opt.param_groups.pop()
    c = torch.nn.Parameter(storage)
    opt.param_groups[0]["params"].append(c)
    for _ in range(3):
        a.grad, c.grad = torch.ones(5), torch.ones(1000)
        opt.step()
    before = a.detach().clone(), c.detach().clone()
    a.grad = storage[500:505]  # the memory of c, which the step writes
    with pytest.raises(ValueError, match="overlap in memory"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(c, before[1])


def test_a_sparse_gradient_after_warm_steps_is_named_and_changes_nothing():
    p, q = torch.zeros(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True)
    opt = stepjit.torch.SGD([p, q], lr=0.1, momentum=0.9)
    for _ in range(3):
        p.grad, q.grad = torch.ones(4, 3), torch.ones(5)
        opt.step()
    before = p.detach().clone(), q.detach().clone()
    p.grad, q.grad = torch.ones(4, 3).to_sparse(), torch.ones(5)
    with pytest.raises(ValueError, match="parameter 0: gradient: layout torch.sparse_coo"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])


def test_a_lazily_negated_tensor_is_refused_not_read_as_its_memory():
    """torch's negative bit: the memory of x.conj().imag holds -x; stepjit reads memory, so
    such a tensor is refused (as a parameter, and as a gradient in the steady state)."""
    neg = torch.complex(torch.zeros(3), torch.ones(3)).conj().imag
    assert neg.is_neg()
    with pytest.raises(ValueError, match="negative bit"):
        stepjit.torch.SGD([torch.nn.Parameter(neg.detach())], lr=0.1)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = stepjit.torch.SGD([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    before = p.detach().clone()
    p.grad = neg
    with pytest.raises(ValueError, match="negative bit"):
        opt.step()
    assert torch.equal(p, before)


# -- capturable ------------------------------------------------------------------------------------
class _CudaLookingScalar(torch.Tensor):
    """A host scalar that says it is on a CUDA device (what a capturable step reads live)."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_capturable_is_kept_by_copies_and_pickles():
    p = torch.nn.Parameter(torch.ones(3))
    opt = stepjit.torch.Adam([p], lr=1e-3, capturable=True)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin._engine.capturable
    assert not stepjit.torch.Adam([p], lr=1e-3)._engine.capturable


def test_a_cuda_looking_lr_is_a_number_when_steps_are_not_captured():
    # on the CPU a capturable optimizer's steps are ordinary ones: a CUDA lr is read as its
    # value, never as the 1.0 factor a captured kernel multiplies the device value by
    p = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(1e-3).as_subclass(_CudaLookingScalar)
    opt = stepjit.torch.SGD([p], lr=lr, capturable=True)
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 1e-3))
