"""What holds for every registered optimizer, as one table over the registry.

A new optimizer (one file under src/stepjit/optim with `@register`) is tested here without an
edit: every structure its `examples` reach against the reference backend, against torch.optim
where torch has the class, compile counts under schedules, state_dict round trips and bad input.
Optimizer-specific behaviour stays in the per-optimizer files.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_family import run_beside_torch

import stepjit
from stepjit.optim import registry
from stepjit.optim.optimizer import required

NAMES = sorted(registry.OPTIMIZERS)
SHAPES = ((5, 3), (33,), (1,))


def configs(name: str) -> list:
    """(name, hyperparameters) for every structure of the optimizer, with an id."""
    cls = registry.OPTIMIZERS[name]
    out = []
    for config in registry.structures(cls):
        on = "-".join(f"{k}={v}" for k, v in config.items() if v and v is not True) or "plain"
        flags = "-".join(k for k, v in config.items() if v is True)
        out.append(pytest.param(name, config, id=f"{name}-{on}{'-' + flags if flags else ''}"))
    return out


ALL_STRUCTURES = [p for name in NAMES for p in configs(name)]


def _with_lr(cls, config: dict, lr: float = 0.01) -> dict:
    hyper = dict(config)
    if "lr" in registry.hyperparameters(cls):
        hyper.setdefault("lr", lr)
    return hyper


def _params(rng, dtype) -> list[stepjit.Parameter]:
    return [stepjit.Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def _feed(ps, rng) -> None:
    for p in ps:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)


def _state_bytes(opt) -> list[bytes]:
    return [np.asarray(v).tobytes() for st in opt.state.values() for v in st.values()]


def test_every_optimizer_is_registered_with_structures():
    assert {"sgd", "adam", "adamw", "rmsprop", "lars", "adagrad"} <= set(NAMES)
    for name in NAMES:
        cls = registry.OPTIMIZERS[name]
        found = registry.structures(cls)
        assert len(found) >= 2, f"{name}: its examples reach one structure only"
        opts = [registry.configure(cls, **c) for c in found]
        keys = {o.structure(o.param_groups[0]) for o in opts}
        assert len(keys) == len(found), f"{name}: two examples share a structure"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, config", ALL_STRUCTURES)
def test_every_structure_matches_the_reference_backend(name, config, dtype):
    """The compiled kernel of every structure steps as the IR interpreter does."""
    cls = registry.OPTIMIZERS[name]
    hyper = _with_lr(cls, config)
    rng = np.random.default_rng(3)
    mine, ref = _params(rng, dtype), None
    ref = [stepjit.Parameter(p.data.copy()) for p in mine]
    a = cls(mine, backend="llvm", **hyper)
    b = cls(ref, backend="reference", **hyper)
    for _ in range(3):
        _feed(mine, rng)
        for p, q in zip(mine, ref):
            q.grad = p.grad.copy()
        a.step()
        b.step()
    rtol, atol = (1e-12, 1e-14) if dtype == "float64" else (2e-5, 1e-6)
    for p, q in zip(mine, ref):
        np.testing.assert_allclose(p.data, q.data, rtol=rtol, atol=atol)
    assert sorted(map(len, a.state.values())) == sorted(map(len, b.state.values()))


def _torch_cases() -> list:
    torch = pytest.importorskip("torch")
    cases = []
    for param in ALL_STRUCTURES:
        name, config = param.values
        cls = registry.OPTIMIZERS[name]
        torch_cls = getattr(torch.optim, cls.__name__, None)
        if torch_cls is None or config.get("clip_norm", 0):
            continue  # torch has no such optimizer, or no per-tensor clip
        hyper = {k: v for k, v in config.items() if k not in ("scale", "clip_norm")}
        cases.append(pytest.param(name, hyper, id=param.id.replace("-scale=0.5", "")))
    return cases


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, config", _torch_cases())
def test_every_structure_torch_has_matches_torch(backend, name, config, dtype):
    """torch.optim as an outside oracle: parameters and every state buffer, `step` included,
    with a changing learning rate, skipped parameters and per-group multipliers."""
    import torch

    cls = registry.OPTIMIZERS[name]
    run_beside_torch(backend, cls, getattr(torch.optim, cls.__name__), _with_lr(cls, config),
                     dtype)


def _scaled(group: dict, factor: float) -> None:
    """Change every positive numeric hyperparameter of `group` without changing its structure."""
    for key, value in group.items():
        if key == "betas":
            group[key] = tuple(b * factor for b in value)
        elif isinstance(value, float | int) and not isinstance(value, bool) and value > 0:
            group[key] = value * factor


@pytest.mark.parametrize("name, config", ALL_STRUCTURES)
def test_schedules_and_a_second_optimizer_compile_nothing(backend, name, config):
    cls = registry.OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    ps = _params(rng, np.float32)
    opt = cls(ps, backend=backend, **_with_lr(cls, config))
    _feed(ps, rng)
    opt.step()
    stepjit.reset_cache_info()
    for _ in range(3):
        _scaled(opt.param_groups[0], 0.9)
        _feed(ps, rng)
        opt.step()
    twin = cls(_params(rng, np.float32), backend=backend, **_with_lr(cls, config))
    _feed(twin.param_groups[0]["params"], rng)
    twin.step()
    assert stepjit.cache_info().compiles == 0


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(backend, name):
    cls = registry.OPTIMIZERS[name]
    config = registry.structures(cls)[-1]  # the most terms on
    rng = np.random.default_rng(1)
    ps = _params(rng, np.float32)
    opt = cls(ps, backend=backend, **_with_lr(cls, config))
    for _ in range(2):
        _feed(ps, rng)
        opt.step()
    copies = [stepjit.Parameter(p.data.copy()) for p in ps]
    other = cls(copies, backend=backend, **_with_lr(cls, {}, lr=0.5))
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(2):
        _feed(ps, rng)
        for p, q in zip(ps, copies):
            q.grad = p.grad.copy()
        opt.step()
        other.step()
    assert [p.data.tobytes() for p in ps] == [q.data.tobytes() for q in copies]
    assert _state_bytes(opt) == _state_bytes(other)


def _numeric_hyperparameters() -> list:
    out = []
    for name in NAMES:
        for key, default in registry.hyperparameters(registry.OPTIMIZERS[name]).items():
            if default is required or (isinstance(default, int | float)
                                       and not isinstance(default, bool)):
                out.append(pytest.param(name, key, id=f"{name}-{key}"))
    return out


@pytest.mark.parametrize("name, key", _numeric_hyperparameters())
def test_a_negative_or_nan_hyperparameter_is_named(name, key):
    cls = registry.OPTIMIZERS[name]
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=key):
            cls([stepjit.Parameter(np.ones(2, np.float32))], backend="reference",
                **_with_lr(cls, {key: bad}))
    p = stepjit.Parameter(np.ones(2, np.float32))
    p.grad = np.ones(2, np.float32)
    opt = cls([p], backend="reference", **_with_lr(cls, {}))
    opt.param_groups[0][key] = -1.0  # edited between steps: caught at step(), nothing changes
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert np.all(p.data == 1) and not opt.state


@pytest.mark.parametrize("name, config", _torch_cases())
def test_a_torch_checkpoint_continues_like_torch(backend, name, config):
    """torch.optim's state dict (its state keys, its `step`) loads, and the next steps follow
    torch's: step counts and per-tensor values continue from the checkpoint."""
    import torch

    cls = registry.OPTIMIZERS[name]
    hyper = _with_lr(cls, config)
    rng = np.random.default_rng(9)
    init = rng.standard_normal((5, 4))
    q = torch.nn.Parameter(torch.from_numpy(init.copy()))
    ref = getattr(torch.optim, cls.__name__)([q], **hyper, foreach=False)
    for _ in range(3):
        q.grad = torch.from_numpy(rng.standard_normal(init.shape))
        ref.step()
    p = stepjit.Parameter(q.detach().numpy().copy())
    opt = cls([p], backend=backend, **hyper)
    opt.load_state_dict(ref.state_dict())
    for _ in range(3):
        g = rng.standard_normal(init.shape)
        p.grad, q.grad = g, torch.from_numpy(g.copy())
        opt.step()
        ref.step()
    np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-12)
    for key, value in ref.state[q].items():
        if key == "step":
            assert int(opt.state[p]["step"]) == int(value) == 6
        else:
            np.testing.assert_allclose(opt.state[p][key], value.numpy(), rtol=1e-12,
                                       atol=1e-14, err_msg=key)
