"""The LLVM backend: op coverage, conversions, vectorization, safety, threads, tables."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

import stepjit
from stepjit.codegen import llvm as codegen
from stepjit.ir import DType, Op, Slot, UpdateRule, evaluate, maximum, minimum, tensor, where
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import cpu

ml_dtypes = pytest.importorskip("ml_dtypes")


@pytest.fixture(scope="module")
def backend() -> cpu.LLVMBackend:
    return cpu.LLVMBackend()


def run_rule(backend, rule, arrays, scalars=(), per_tensor=None):
    """Run `rule` once over one tensor (arrays in slot order); return the arrays."""
    pt = np.zeros((1, len(rule.per_tensor))) if per_tensor is None else per_tensor
    backend.bind(backend.compile(rule), [tuple(arrays)], pt)(tuple(scalars))
    return arrays


def test_every_op_has_an_llvm_lowering():
    assert set(codegen.LLVM_OPS) == set(Op)


SPECIAL = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-40, 3.0, -7.0])


@pytest.mark.parametrize("dtype", [DType.F32, DType.F64])
@pytest.mark.parametrize(
    "name,build",
    [
        ("add", lambda a, b: a + b),
        ("sub", lambda a, b: a - b),
        ("mul", lambda a, b: a * b),
        ("div", lambda a, b: a / b),
        ("neg", lambda a, b: -a),
        ("abs", lambda a, b: abs(a)),
        ("sqrt", lambda a, b: abs(a).sqrt()),
        ("max", lambda a, b: maximum(a, b)),
        ("min", lambda a, b: minimum(a, b)),
        ("where_lt", lambda a, b: where(a < b, a, b)),
        ("where_gt", lambda a, b: where(a > b, a * 2.0, b)),
        ("cast_roundtrip", lambda a, b: a.cast(DType.F16).cast(a.dtype)),
    ],
)
def test_op_matches_the_interpreter(backend, dtype, name, build):
    """Each op, on ordinary values and on zeros, infinities, NaN and denormals."""
    rng = np.random.default_rng(0)
    npd = dtype.to_numpy()
    a = np.concatenate([SPECIAL, rng.standard_normal(1000)]).astype(npd)
    b = np.concatenate([SPECIAL[::-1], rng.standard_normal(1000)]).astype(npd)
    expr = build(tensor("a", dtype), tensor("b", dtype))
    rule = UpdateRule(f"op_{name}", [Slot("a", dtype), Slot("b", dtype), Slot("out", dtype, True)],
                      {"out": expr})
    want = evaluate(rule, {"a": a, "b": b, "out": np.zeros_like(a)}, {})["out"]
    out = run_rule(backend, rule, [a, b, np.zeros_like(a)])[2]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_allclose(out, want, rtol=0, atol=0)


def test_sum_accumulates_in_float64(backend):
    """1 + 1e-8 * k summed in float32 would lose the small terms; float64 keeps them."""
    x = np.full(1 << 16, 1e-8, np.float32)
    x[0] = 1.0
    t = tensor("x", DType.F32)
    total = t.cast(DType.F64).sum()
    rule = UpdateRule("total", [Slot("x", DType.F32), Slot("out", DType.F64, True)],
                      {"out": total + tensor("out", DType.F64) * 0.0})
    out = run_rule(backend, rule, [x, np.zeros(x.size)])[1]
    want = np.sum(x.astype(np.float64))
    assert out[0] == pytest.approx(want, rel=1e-12)
    assert out[0] != np.float32(1.0) + np.float32(0)  # the tiny terms were not dropped


def _convert(backend, src: DType, dst: DType, x: np.ndarray) -> np.ndarray:
    rule = UpdateRule(f"cvt_{src}_{dst}", [Slot("x", src), Slot("y", dst, True)],
                      {"y": tensor("x", src).cast(dst)})
    return run_rule(backend, rule, [x, np.zeros(x.shape, dst.to_numpy())])[1]


def _float32_probe() -> np.ndarray:
    rng = np.random.default_rng(1)
    scaled = [rng.standard_normal(20000).astype(np.float32) * s for s in (1e-8, 1e-5, 1, 7e4)]
    edges = np.array([np.inf, -np.inf, 65504, 65519.99, 65520, 0.0, -0.0, 2.0**-25,
                      1.5 * 2.0**-24, 2.0**-14 * (1 - 2.0**-11), 3.4e38], np.float32)
    bits = np.arange(0, 2**32, 65537, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate(scaled + [edges, bits])


def _same_bits(got: np.ndarray, want: np.ndarray, as_float) -> None:
    nan = np.isnan(as_float(want))
    assert np.isnan(as_float(got))[nan].all()
    bits = {2: np.uint16, 4: np.uint32}[want.dtype.itemsize]
    np.testing.assert_array_equal(got.view(bits)[~nan], want.view(bits)[~nan])


@pytest.mark.parametrize("native", [True, False], ids=["f16c", "integer-code"])
def test_float16_conversions_are_exact(native):
    """Both the hardware path and the integer fallback (for CPUs without F16C) are bit-exact."""
    backend = cpu.LLVMBackend(f16_native=native)
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    _same_bits(_convert(backend, DType.F16, DType.F32, every_half),
               every_half.astype(np.float32), lambda a: a)
    x = _float32_probe()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    _same_bits(_convert(backend, DType.F32, DType.F16, x), want, lambda a: a)


def test_bfloat16_conversions_are_exact(backend):
    bf16 = ml_dtypes.bfloat16
    every = np.arange(1 << 16, dtype=np.uint16).view(bf16)
    _same_bits(_convert(backend, DType.BF16, DType.F32, every), every.astype(np.float32),
               lambda a: a)
    x = _float32_probe()
    with np.errstate(invalid="ignore"):
        want = x.astype(bf16)
    _same_bits(_convert(backend, DType.F32, DType.BF16, x), want,
               lambda a: a.astype(np.float32))


def test_bfloat16_parameters_step_like_the_reference():
    bf16 = ml_dtypes.bfloat16
    init = np.random.default_rng(2).standard_normal(999).astype(bf16)
    results = {}
    for name in ("reference", "llvm"):
        p = stepjit.Parameter(init.copy())
        opt = stepjit.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=1e-3, backend=name)
        g = np.random.default_rng(3).standard_normal(999).astype(bf16)
        for _ in range(5):
            p.grad = g
            opt.step()
        results[name] = (p.data.astype(np.float32), opt.state[p]["momentum_buffer"])
    assert results["llvm"][1].dtype == np.float32  # half types keep float32 state
    np.testing.assert_allclose(results["llvm"][1], results["reference"][1], rtol=1e-6)
    # one bfloat16 ulp at most: the fused multiply-add may round the last step differently
    ulp = np.spacing(np.abs(results["reference"][0]).astype(bf16)).astype(np.float32)
    assert np.all(np.abs(results["llvm"][0] - results["reference"][0]) <= ulp)


def test_kernels_are_vectorized_and_keep_nan_semantics():
    rule = sgd_rule(True, False, True, True, DType.F32, DType.F32)
    text = cpu.lower_text(rule)
    assert "noalias" in text
    assert not re.search(r"\b(fast|nnan|ninf)\b", text)
    optimized = str(cpu.optimize(text))
    assert re.search(r"<\d+ x float>", optimized), "the element loop was not vectorized"


def test_unresolved_symbols_are_refused_not_run(backend):
    """Object code calling a function the process lacks raises instead of crashing."""
    import llvmlite.binding as llvm

    text = """
    declare void @stepjit_no_such_function()
    define void @f() {
      call void @stepjit_no_such_function()
      ret void
    }"""
    mod = llvm.parse_assembly(text)
    obj = cpu._target_machine().emit_object(mod)
    assert "stepjit_no_such_function" in cpu.undefined_symbols(obj)
    rule = sgd_rule(False, False, False, False, DType.F32, DType.F32)
    with pytest.raises(cpu.CompileError, match="stepjit_no_such_function"):
        backend._safe(obj, rule, quiet=False)


def test_a_kernel_keeps_its_code_alive_after_its_backend_is_gone():
    """A bound kernel holds the engine its machine code lives in: dropping the backend that
    compiled it (a private one, not the process's) must not unmap the code under it."""
    import subprocess
    import sys

    script = """
import gc, numpy as np
from stepjit.ir import DType
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import cpu
rule = sgd_rule(False, False, False, False, DType.F32, DType.F32)
def bound():
    backend = cpu.LLVMBackend()  # the only reference: gone when this returns
    p, g = np.ones(1000, np.float32), np.full(1000, 2.0, np.float32)
    return backend.bind(backend.compile(rule), [(p, g)], np.zeros((1, len(rule.per_tensor)))), p
launch, p = bound()
gc.collect()
launch(tuple({"lr": 0.5, "scale": 1.0}[n] for n, _ in rule.scalars))
print(p[:3], float(p.sum()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0.0"  # 1 - 0.5 * 2 everywhere


def test_chunk_table_covers_every_element_once():
    numel = np.array([0, 1, cpu.CHUNK, cpu.CHUNK + 1, 3 * cpu.CHUNK - 5, 7], np.int64)
    chunks, tchunks = cpu.chunk_table(numel)
    for t, n in enumerate(numel):
        first, count = tchunks[t]
        rows = chunks[first : first + count]
        assert (rows[:, 0] == t).all()
        assert rows[0, 1] == 0 and rows[-1, 2] == n
        assert (rows[1:, 1] == rows[:-1, 2]).all()  # contiguous, no overlap
    parts = cpu._split(chunks, 3)
    assert parts[0][0] == 0 and parts[-1][1] == len(chunks)
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_threaded_launch_is_bitwise_identical(monkeypatch, clip):
    """Splitting across threads changes nothing, clipping included (sums add in chunk order)."""
    rng = np.random.default_rng(4)
    shapes = [(3 * cpu.CHUNK + 17,), (5,), (2 * cpu.CHUNK,)]
    data = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    out = []
    for parallel_min in (1 << 60, 1):
        monkeypatch.setattr(cpu, "PARALLEL_MIN", parallel_min)
        params = [stepjit.Parameter(d.copy()) for d in data]
        opt = stepjit.optim.SGD(params, lr=0.1, momentum=0.9, clip_norm=clip, backend="llvm")
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        launch = opt._plans[("step", 0)].batches[0].launch
        out.append(([p.data for p in params], len(launch.parts)))
    assert out[0][1] == 1 and out[1][1] == min(cpu.num_threads(), 3) or cpu.num_threads() == 1
    for a, b in zip(out[0][0], out[1][0]):
        np.testing.assert_array_equal(a, b)


def test_two_optimizers_in_two_threads(monkeypatch):
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 1)
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(70001).astype(np.float32) for _ in range(2)]
    grad = rng.standard_normal(70001).astype(np.float32)

    def train(p, opt, steps):
        for k in range(steps):
            opt.param_groups[0]["lr"] = 0.01 * (k + 1)
            p.grad = grad
            opt.step()

    def expected(x0):
        p = stepjit.Parameter(x0.copy())
        train(p, stepjit.optim.SGD([p], lr=0.01, momentum=0.9, backend="reference"), 20)
        return p.data

    params = [stepjit.Parameter(x.copy()) for x in init]
    opts = [stepjit.optim.SGD([p], lr=0.01, momentum=0.9, backend="llvm") for p in params]
    threads = [threading.Thread(target=train, args=(p, o, 20)) for p, o in zip(params, opts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, x0 in zip(params, init):
        np.testing.assert_allclose(p.data, expected(x0), rtol=1e-5, atol=1e-6)


def test_step_allocates_nothing_proportional_to_size():
    import tracemalloc

    n = 1 << 20
    p = stepjit.Parameter(np.zeros(n, np.float32))
    p.grad = np.ones(n, np.float32)
    opt = stepjit.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-4, backend="llvm")
    opt.step()
    tracemalloc.start()
    for k in range(5):
        opt.param_groups[0]["lr"] = 0.1 / (k + 1)
        opt.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < n  # a float32 copy would be 4n bytes


def test_two_reductions_in_one_pass(backend):
    """Two sums (LARS's ||p|| and ||g||) share one reduce pass and one partials row per chunk."""
    rng = np.random.default_rng(6)
    F = DType.F32
    a, b = tensor("a", F), tensor("b", F)
    na, nb = (a.cast(DType.F64) * a.cast(DType.F64)).sum(), b.cast(DType.F64).sum()
    rule = UpdateRule("two_sums", [Slot("a", F), Slot("b", F), Slot("out", F, True)],
                      {"out": a * (na / (nb * nb + 1.0)).cast(F)})
    x = rng.standard_normal(3 * cpu.CHUNK + 11).astype(np.float32)
    y = rng.standard_normal(x.size).astype(np.float32)
    want = evaluate(rule, {"a": x, "b": y, "out": np.zeros_like(x)}, {})["out"]
    out = run_rule(backend, rule, [x, y, np.zeros_like(x)])[2]
    np.testing.assert_allclose(out, want, rtol=1e-6)
