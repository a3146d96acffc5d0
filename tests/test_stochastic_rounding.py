"""`stochastic_rounding=True`: bfloat16 parameters rounded without bias, reproducibly.

The rule's last rounding of the parameter becomes `round_sr` (`stepjit.ir.stochastic_round`):
16 random bits of (a per-tensor key, the element's index) added to the float32 pattern before
truncation. The key mixes the seed, the tensor and the step (`optim.optimizer.rounding_keys`),
so a run is reproducible from its seed, on every backend and thread count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cuda_host.harness import HostLibrary, compiler

import stepjit
from stepjit.ir import (
    DType,
    Slot,
    UpdateRule,
    evaluate,
    per_tensor,
    stochastic_round,
    tensor,
    with_stochastic_rounding,
)
from stepjit.optim import registry

pytest.importorskip("ml_dtypes", reason="bfloat16 numpy arrays need ml_dtypes")
BF16 = DType.BF16.to_numpy()
NAMES = sorted(registry.OPTIMIZERS)


def _sr_rule() -> UpdateRule:
    x = tensor("x", DType.F32)
    return UpdateRule("sr", [Slot("x", DType.F32), Slot("y", DType.BF16, True)],
                      {"y": stochastic_round(x, per_tensor("k", DType.F64))})


def _round(values: np.ndarray, key: float) -> np.ndarray:
    rule = _sr_rule()
    return evaluate(rule, {"x": values, "y": np.zeros(values.size, BF16)}, {}, {"k": key})["y"]


def test_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = np.float32(1.0 + 2**-9)  # a quarter of the way from 1 to the next bfloat16, 1 + 2**-7
    out = _round(np.full(200_000, x, np.float32), 42.0).astype(np.float64)
    assert set(np.unique(out)) == {1.0, 1.0 + 2**-7}
    p = np.mean(out > 1.0)
    assert abs(p - 0.25) < 5 * np.sqrt(0.25 * 0.75 / out.size)  # five standard deviations
    for value, low, high in [(-(1.0 + 2**-9), -1.0 - 2**-7, -1.0),  # negative: the magnitude
                             (np.float32(1.25 * 2**-133), 2**-133, 2**-132)]:  # subnormal
        out = _round(np.full(100_000, value, np.float32), 3.0).astype(np.float64)
        assert set(np.unique(out)) == {low, high}
        assert abs(out.mean() - float(value)) < 5 * (high - low) * 0.5 / np.sqrt(out.size)
    exact = np.array([1.5, -2.0, 0.0, -0.0], np.float32)  # representable: never moved
    np.testing.assert_array_equal(_round(exact, 7.0).astype(np.float32), exact)
    special = np.array([np.inf, -np.inf, np.nan], np.float32)  # to nearest
    got = _round(special, 7.0).astype(np.float32)
    assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2])


def test_the_key_picks_the_stream():
    x = np.full(1000, 1.0 + 2**-9, np.float32)
    a, b = _round(x, 1.0), _round(x, 1.0)
    assert a.tobytes() == b.tobytes() and a.tobytes() != _round(x, 2.0).tobytes()


@pytest.mark.skipif(compiler() is None, reason="no host C++ compiler (g++)")
def test_every_backend_draws_the_same_bits(tmp_path):
    from stepjit.runtime import cpu

    rule = _sr_rule()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(70_001) * 3).astype(np.float32)
    x[:5] = [np.nan, np.inf, -np.inf, -0.0, 3.4e38]
    want = _round(x, 987654321.0)
    backend = cpu.LLVMBackend()
    y = np.zeros(x.size, BF16)
    backend.bind(backend.compile(rule), [(x, y)], np.array([[987654321.0]]))(())
    assert y.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    lib = HostLibrary.start([rule], tmp_path, "sr").finish()  # the CUDA source, on the host
    y2 = np.zeros(x.size, BF16)
    lib.run(rule, [{"x": x, "y": y2}], np.array([[987654321.0]]), {})
    assert y2.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()


def _fit(storage: dict, dtype, steps=300):
    """A least-squares fit by SGD with momentum, small steps: the parameter's rounding
    decides whether it converges."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((256, 16)).astype(np.float32)
    b = a @ (4.0 + rng.standard_normal(16)).astype(np.float32)
    w = stepjit.Parameter(np.zeros(16, dtype))
    opt = stepjit.optim.SGD([w], lr=2e-3, momentum=0.9, **storage)
    for _ in range(steps):
        x = w.data.astype(np.float32)
        w.grad = (a.T @ (a @ x - b) / len(b)).astype(dtype)
        opt.step()
    return float(np.mean((a @ w.data.astype(np.float32) - b) ** 2))


def test_stochastic_rounding_trains_like_float32_where_rounding_to_nearest_stalls():
    full = _fit({}, np.float32)  # about 0.003, from 300
    nearest = _fit({}, BF16)  # about 2.4: its updates stop once below half a spacing
    stochastic = _fit({"stochastic_rounding": True}, BF16)  # about 0.006
    assert stochastic < 4 * full  # the float32 run's neighbourhood ...
    assert nearest > 100 * full  # ... which rounding to nearest never reaches


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_rounds_the_same_on_the_reference_and_llvm_backends(name):
    cls = registry.OPTIMIZERS[name]
    config = max(registry.structures(cls), key=lambda c: sum(bool(v) for v in c.values()))
    if "lr" in registry.hyperparameters(cls):
        config.setdefault("lr", 0.01)
    runs = []
    for backend in ("reference", "llvm"):
        rng = np.random.default_rng(3)
        params = [stepjit.Parameter(rng.standard_normal(s).astype(BF16)) for s in ((5, 3), (300,))]
        opt = cls(params, backend=backend, stochastic_rounding=True, rounding_seed=11, **config)
        for _ in range(3):
            for p in params:
                p.grad = rng.standard_normal(p.shape).astype(BF16)
            opt.step()
        runs.append(params)
    exact = not any(b.launch.rule.reductions for plan in opt._plans.values()
                    for b in plan.batches)
    for a, b in zip(*runs, strict=True):
        if exact:
            assert a.data.tobytes() == b.data.tobytes()
        else:  # the sums' order may differ in the last bit, and so a rounding decision
            np.testing.assert_allclose(a.data.astype(np.float32), b.data.astype(np.float32),
                                       rtol=2**-7, atol=1e-6)


SCRIPT = textwrap.dedent("""
    import hashlib, numpy as np, stepjit
    from stepjit.ir import DType
    bf16 = DType.BF16.to_numpy()
    rng = np.random.default_rng(0)
    w = stepjit.Parameter(rng.standard_normal(1 << 20).astype(bf16))
    opt = stepjit.optim.AdamW([w], lr=1e-3, stochastic_rounding=True, rounding_seed={seed})
    for _ in range(3):
        w.grad = rng.standard_normal(1 << 20).astype(bf16)
        opt.step()
    print(hashlib.sha256(w.data.tobytes()).hexdigest())
""")


def _digest(seed: int, threads: int) -> str:
    env = {**os.environ, "STEPJIT_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(seed=seed)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_a_run_is_reproducible_from_its_seed_whatever_the_thread_count():
    one, two = _digest(5, 1), _digest(5, 2)
    assert one == two
    assert _digest(6, 2) != one


def test_what_cannot_be_rounded_stochastically_is_refused():
    f32 = stepjit.Parameter(np.ones(3, np.float32))
    f32.grad = np.ones(3, np.float32)
    opt = stepjit.optim.SGD([f32], lr=0.1, stochastic_rounding=True)
    with pytest.raises(ValueError, match="param group 0: .*stochastic rounding is for "
                                         "bfloat16 parameters, the parameter is float32"):
        opt.step()
    assert (f32.data == 1).all()
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        stepjit.optim.SGD([f32], lr=0.1, stochastic_rounding="yes")
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="rounding_seed must be an integer"):
            stepjit.optim.SGD([f32], lr=0.1, stochastic_rounding=True, rounding_seed=seed)
    plain = UpdateRule("p", [Slot("param", DType.F16, True)],
                       {"param": tensor("param", DType.F16)})
    with pytest.raises(ValueError, match="for bfloat16 parameters"):
        with_stochastic_rounding(plain)


def test_the_torch_face_rounds_bfloat16_parameters_stochastically():
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    p = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    opt = st.SGD([p], lr=2**-9, stochastic_rounding=True, rounding_seed=3)
    p.grad = torch.ones_like(p)
    opt.step()  # 1 - 2**-9: half way between 1 and 1 - 2**-8 (the spacing below 1)
    values = p.detach().float()
    assert set(values.unique().tolist()) == {1.0, 1.0 - 2**-8}
    assert abs(float((values < 1).float().mean()) - 0.5) < 0.01  # half way: 2**-9 of 2**-8


def test_a_step_left_to_torch_refuses_stepjit_storage():
    # differentiable=True runs torch's implementation, which cannot keep compact state
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = st.Adam([p], lr=0.1, differentiable=True, stochastic_rounding=True)
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="stochastic_rounding=True.*must be torch's"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.bfloat16))


def test_a_resumed_adamw_continues_its_streams_exactly():
    # the keys come from each parameter's step count, which the checkpoint keeps
    rng = np.random.default_rng(8)
    start = rng.standard_normal(5000).astype(BF16)
    grads = [rng.standard_normal(5000).astype(BF16) for _ in range(4)]

    def make(data):
        w = stepjit.Parameter(data.copy())
        return w, stepjit.optim.AdamW([w], lr=1e-3, stochastic_rounding=True, rounding_seed=4)

    w, opt = make(start)
    for g in grads:
        w.grad = g
        opt.step()
    v, first = make(start)
    for g in grads[:2]:
        v.grad = g
        first.step()
    u, resumed = make(v.data)
    resumed.load_state_dict(first.state_dict())
    for g in grads[2:]:
        u.grad = g
        resumed.step()
    assert u.data.tobytes() == w.data.tobytes()
