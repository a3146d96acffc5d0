"""Kernels are compiled once per configuration structure: editing hyperparameters between steps
(a schedule) compiles nothing, a second optimizer of the same structure reuses the kernels, and a
structural change compiles a new one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import stepjit


def _params(rng, dtype=np.float32, shapes=((4, 3), (17,), (1,))):
    return [stepjit.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _new_grads(ps, rng):
    for p in ps:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)


def _counts():
    info = stepjit.cache_info()
    return info.compiles, info.disk_hits


@pytest.mark.parametrize("in_place", [False, True], ids=["new-grad-arrays", "grads-in-place"])
def test_schedules_compile_nothing(backend, in_place):
    rng = np.random.default_rng(10 + in_place)
    ps = _params(rng)
    opt = stepjit.optim.SGD(
        [{"params": ps[:2]}, {"params": ps[2:], "lr_mult": 0.5}], lr=0.1, momentum=0.9,
        dampening=0.1, weight_decay=1e-3, clip_norm=1.0, scale=1.0, backend=backend,
    )
    _new_grads(ps, rng)
    opt.step()
    stepjit.reset_cache_info()
    assert _counts() == (0, 0)
    before = [p.data.copy() for p in ps]
    # random values: a kernel wrongly specialized on a value cannot have been cached by a test
    # that ran earlier with the same schedule
    for _ in range(20):
        for g in opt.param_groups:
            g["lr"] = rng.uniform(1e-3, 0.1)
            g["momentum"] = rng.uniform(0.1, 0.99)  # nonzero to nonzero
            g["dampening"] = rng.uniform(0.0, 1.0)
            g["weight_decay"] = rng.uniform(1e-4, 1e-2)
            g["clip_norm"] = rng.uniform(0.5, 5.0)
            g["scale"] = rng.uniform(0.1, 2.0)
        opt.param_groups[1]["lr_mult"] = rng.uniform(0.1, 2.0)
        if in_place:
            for p in ps:
                p.grad[...] = rng.standard_normal(p.shape)
        else:
            _new_grads(ps, rng)
        opt.step()
    assert _counts() == (0, 0)
    assert all(not np.array_equal(p.data, b) for p, b in zip(ps, before))


def test_accumulation_and_zero_grad_compile_once(backend):
    rng = np.random.default_rng(1)
    ps = _params(rng, np.float64)
    opt = stepjit.optim.SGD(ps, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        _new_grads(ps, rng)
        opt.accumulate_grad()
        opt.zero_grad()
        opt.step()
    stepjit.reset_cache_info()
    for _ in range(10):
        opt.param_groups[0]["lr"] = rng.uniform(1e-3, 0.1)
        opt.param_groups[0]["momentum"] = rng.uniform(0.1, 0.99)
        for _ in range(3):
            _new_grads(ps, rng)
            opt.accumulate_grad()
            opt.zero_grad()
        opt.step()
    assert _counts() == (0, 0)


def test_second_optimizer_of_the_same_structure_compiles_nothing(backend):
    rng = np.random.default_rng(2)
    hyper = dict(momentum=0.9, nesterov=True, weight_decay=1e-2, clip_norm=0.5)
    first = _params(rng)
    opt = stepjit.optim.SGD(first, lr=0.1, **hyper, backend=backend)
    _new_grads(first, rng)
    opt.step()
    stepjit.reset_cache_info()
    # other parameters of the same dtype (other shapes, other count), other values
    other = _params(rng, shapes=((1001,), (2, 2, 2)))
    opt2 = stepjit.optim.SGD(
        other, lr=0.3, **{**hyper, "momentum": rng.uniform(0.1, 0.99)}, backend=backend
    )
    for _ in range(3):
        _new_grads(other, rng)
        opt2.step()
    assert _counts() == (0, 0)


# A structural change must compile. Kernels stay cached for the whole process (and on disk),
# so whether a given structure is new depends on what ran before; this part runs in a fresh
# interpreter with an empty cache directory.
_STRUCTURE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import stepjit

    backend = sys.argv[1]
    rng = np.random.default_rng(0)
    out = {}

    def step(opt, ps):
        for p in ps:
            p.grad = rng.standard_normal(p.shape).astype(p.dtype)
        opt.step()

    def compiles():
        return stepjit.cache_info().compiles

    ps = [stepjit.Parameter(rng.standard_normal(8).astype(np.float32))]
    opt = stepjit.optim.SGD(ps, lr=0.1, momentum=0.9, backend=backend)
    c = compiles(); step(opt, ps); out["first"] = compiles() - c
    c = compiles(); step(opt, ps); out["again"] = compiles() - c
    opt.param_groups[0]["nesterov"] = True
    c = compiles(); step(opt, ps); out["nesterov_on"] = compiles() - c
    opt.param_groups[0]["weight_decay"] = 1e-2
    c = compiles(); step(opt, ps); out["decay_on"] = compiles() - c
    opt.param_groups[0]["nesterov"] = False
    opt.param_groups[0]["weight_decay"] = 0.0
    c = compiles(); step(opt, ps); out["back_to_first"] = compiles() - c
    qs = [stepjit.Parameter(rng.standard_normal(8).astype(np.float64))]
    opt.add_param_group({"params": qs})
    c = compiles(); step(opt, ps + qs); out["new_dtype"] = compiles() - c
    print(json.dumps(out))
    """
)


def test_structural_change_compiles(backend, tmp_path):
    env = {**os.environ, "STEPJIT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", _STRUCTURE_SCRIPT, backend],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["first"] >= 1
    assert out["again"] == 0
    assert out["nesterov_on"] >= 1
    assert out["decay_on"] >= 1
    assert out["back_to_first"] == 0
    assert out["new_dtype"] >= 1


def test_structural_change_reaches_the_compiler(backend):
    """In this process: a structural change asks the backend for another kernel (compiled now,
    or found where an earlier test left it)."""
    rng = np.random.default_rng(3)
    ps = _params(rng)
    opt = stepjit.optim.SGD(ps, lr=0.1, momentum=0.9, backend=backend)
    _new_grads(ps, rng)
    opt.step()
    stepjit.reset_cache_info()
    opt.param_groups[0]["nesterov"] = True
    _new_grads(ps, rng)
    opt.step()
    info = stepjit.cache_info()
    assert info.compiles + info.memory_hits + info.disk_hits >= 1
