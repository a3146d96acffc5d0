"""Large CPU launches run on torch's OpenMP team once torch is imported (`runtime/omp.py`), and
on stepjit's own pool otherwise: the same bits either way, no OpenMP without torch, and a forked
child falls back to the pool instead of hanging in its parent's team."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from forking import run_forked

import stepjit
import stepjit.optim
from stepjit.runtime import cpu, omp

torch = pytest.importorskip("torch")
if not omp.available():
    pytest.skip("libgomp's symbols are not global in this process", allow_module_level=True)

SHAPES = [(3 * cpu.CHUNK + 17,), (5,), (20 * cpu.CHUNK,), (cpu.CHUNK,)]  # > PARALLEL_MIN in all
LLVM = dict(backend="llvm")
OPTIMIZERS = {
    "sgd-momentum": lambda ps: stepjit.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                 **LLVM),
    "sgd-clip": lambda ps: stepjit.optim.SGD(ps, lr=0.1, momentum=0.9, clip_norm=1.0, **LLVM),
    "adam": lambda ps: stepjit.optim.Adam(ps, lr=1e-3, weight_decay=1e-2, **LLVM),
    "lars": lambda ps: stepjit.optim.LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, **LLVM),
}


@pytest.fixture
def two_threads(monkeypatch):
    """Two threads for stepjit and torch, whatever this machine has; the choice of threads
    re-read from the environment."""
    monkeypatch.setenv("STEPJIT_NUM_THREADS", "2")
    monkeypatch.delenv("STEPJIT_THREADS_BACKEND", raising=False)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    _forget_settings()
    yield
    torch.set_num_threads(torch_threads)
    _forget_settings()


def _forget_settings() -> None:
    cpu.num_threads.cache_clear()
    cpu.threads_backend.cache_clear()
    cpu._pool.cache_clear()


@pytest.fixture
def team_calls(monkeypatch) -> list[int]:
    """The team size of every launch that went through GOMP_parallel."""
    calls: list[int] = []
    run = omp.run

    def counting(work, threads):
        calls.append(threads)
        run(work, threads)

    monkeypatch.setattr(omp, "run", counting)
    return calls


def _train(make, shapes=SHAPES, steps=3):
    """Parameters after `steps` steps of the optimizer `make` builds, and the first launch."""
    rng = np.random.default_rng(7)
    params = [stepjit.Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = make(params)
    assert opt.backend == "llvm"
    for k in range(steps):
        for p, g in zip(params, grads):
            p.grad = g * (k + 1)
        opt.step()
    return [p.data for p in params], opt._plans[("step", 0)].batches[0].launch


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_team_and_pool_give_identical_bits(monkeypatch, two_threads, team_calls, name):
    results = {}
    for backend in ("pool", "omp"):
        monkeypatch.setenv("STEPJIT_THREADS_BACKEND", backend)
        cpu.threads_backend.cache_clear()
        before = len(team_calls)
        results[backend], launch = _train(OPTIMIZERS[name])
        assert (len(team_calls) > before) == (backend == "omp")
    passes = 2 if launch.kernel.reduce is not None else 1  # a reduce pass, then the update
    assert team_calls == [2] * 3 * passes
    assert len(launch.parts) == 2
    # the team sweeps memory together: parts of about TEAM_PART elements, taken in turn
    sizes = [int((launch._chunks[lo:hi, 2] - launch._chunks[lo:hi, 1]).sum())
             for lo, hi in launch.team.parts]
    assert len(sizes) % 2 == 0 and len(sizes) >= 2
    assert max(sizes) <= cpu.TEAM_PART + cpu.CHUNK or len(sizes) == 2
    for a, b in zip(results["pool"], results["omp"]):
        np.testing.assert_array_equal(a, b)


def test_with_torch_imported_a_large_launch_runs_on_the_team(two_threads, team_calls):
    _, launch = _train(OPTIMIZERS["sgd-momentum"], steps=2)
    assert team_calls == [2, 2]
    assert launch.team.threads == 2 and cpu._pool.cache_info().currsize == 0


def test_a_small_launch_or_a_team_of_one_never_calls_openmp(two_threads, team_calls):
    small = [(cpu.PARALLEL_MIN - 1,)]
    data, launch = _train(OPTIMIZERS["sgd-clip"], shapes=small)
    assert launch.team is None
    torch.set_num_threads(1)  # restored by two_threads
    one, launch = _train(OPTIMIZERS["sgd-clip"])
    assert launch.team.threads == 1
    assert team_calls == []
    torch.set_num_threads(2)
    two, _ = _train(OPTIMIZERS["sgd-clip"])
    assert team_calls == [2] * 6
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_the_split_follows_torchs_thread_count(two_threads, team_calls):
    rng = np.random.default_rng(3)
    p = stepjit.Parameter(rng.standard_normal(24 * cpu.CHUNK).astype(np.float32))
    opt = stepjit.optim.SGD([p], lr=0.1, momentum=0.9, backend="llvm")
    p.grad = np.ones_like(p.data)
    opt.step()
    launch = opt._plans[("step", 0)].batches[0].launch
    assert launch.team.threads == 2
    torch.set_num_threads(1)
    opt.step()
    assert launch.team.threads == 1 and team_calls == [2]


def test_a_bad_threads_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("STEPJIT_THREADS_BACKEND", "gomp")
    cpu.threads_backend.cache_clear()
    try:
        with pytest.raises(ValueError, match="STEPJIT_THREADS_BACKEND='gomp'"):
            _train(OPTIMIZERS["sgd-momentum"], steps=1)
    finally:
        monkeypatch.delenv("STEPJIT_THREADS_BACKEND")
        cpu.threads_backend.cache_clear()


NUMPY_ONLY = """
import sys
import numpy as np
import stepjit, stepjit.optim
from stepjit.runtime import cpu, omp

omp.run = None  # any use of the team fails loudly
p = stepjit.Parameter(np.ones(4 * cpu.PARALLEL_MIN, np.float32))
p.grad = np.ones_like(p.data)
opt = stepjit.optim.SGD([p], lr=0.5, momentum=0.9, clip_norm=1e9, backend="llvm")
opt.step()
opt.step()
launch = opt._plans[("step", 0)].batches[0].launch
assert "torch" not in sys.modules
assert omp._runtime.cache_info().misses == 0, "OpenMP was looked up"
assert launch.team is None and len(launch.parts) == 2 and cpu._pool.cache_info().currsize == 1
print(float(p.data.sum()))
"""


def test_without_torch_openmp_is_never_touched():
    env = {k: v for k, v in os.environ.items() if k != "STEPJIT_THREADS_BACKEND"}
    env["STEPJIT_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", NUMPY_ONLY], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    # two steps of ones: 1 - 0.5 * 1, then - 0.5 * (0.9 + 1)
    assert float(out.stdout) == pytest.approx(4 * cpu.PARALLEL_MIN * -0.45, rel=1e-5)


def _child_step(n: int, conn) -> None:
    calls = []
    run = omp.run
    omp.run = lambda work, threads: (calls.append(threads), run(work, threads))
    p = stepjit.Parameter(np.ones(n, np.float32))
    p.grad = np.ones(n, np.float32)
    stepjit.optim.SGD([p], lr=0.25, momentum=0.9, clip_norm=1e9, backend="llvm").step()
    conn.send((float(p.data.sum()), calls))


def test_a_forked_child_steps_after_the_parent_used_the_team(two_threads, team_calls):
    n = 4 * cpu.PARALLEL_MIN
    _train(OPTIMIZERS["sgd-clip"], steps=1)
    assert team_calls, "the parent did not use the team"
    total, child_calls = run_forked(_child_step, n)
    assert total == n * 0.75 and child_calls == []


SMALL_TEAM = """
import numpy as np, torch, stepjit, stepjit.optim
from stepjit.runtime import cpu, omp

calls = []
run = omp.run
omp.run = lambda work, threads: (calls.append(threads), run(work, threads))
torch.set_num_threads(2)
out = []
for backend in ("omp", "pool"):
    cpu.os.environ["STEPJIT_THREADS_BACKEND"] = backend
    cpu.threads_backend.cache_clear()
    p = stepjit.Parameter(np.linspace(-1, 1, 4 * cpu.PARALLEL_MIN, dtype=np.float32))
    p.grad = np.cos(p.data)
    stepjit.optim.SGD([p], lr=0.5, momentum=0.9, clip_norm=1.0, backend="llvm").step()
    out.append(p.data)
assert calls == [2, 2], calls
assert np.array_equal(out[0], out[1])
"""


def test_every_part_runs_on_a_smaller_team_than_asked_for():
    """OMP_THREAD_LIMIT=1: GOMP_parallel runs one thread where two were asked for; that thread
    runs both parts."""
    env = {**os.environ, "OMP_THREAD_LIMIT": "1", "STEPJIT_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", SMALL_TEAM], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
