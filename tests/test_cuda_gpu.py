"""The CUDA backend end to end: SGD on CuPy parameters against the reference and CPU backends,
and every torch face on CUDA tensors against torch.optim (side streams, CUDA graphs with a
capturable step and a tensor learning rate, misaligned views, more than 512 chunks, two devices).

Tests marked `gpu` need a CUDA device and skip without one; the others check the errors a user
gets when the CUDA backend cannot be used, and run anywhere. `tools/gpu_check.py` runs them all
in one prepared GPU run, beside larger checks and the benchmarks.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stepjit
from stepjit.ir import DType
from stepjit.optim import SGD

F16, BF16, F32, F64 = DType.F16, DType.BF16, DType.F32, DType.F64


def _no_device_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "no CUDA device (CuPy is not installed)"
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, or a driver too old for this CuPy
        return "no CUDA device"
    return None if count > 0 else "no CUDA device"


@pytest.fixture
def cp():
    """CuPy, on a machine with a CUDA device; otherwise the test is skipped."""
    reason = _no_device_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    return cupy


# -- errors, anywhere ------------------------------------------------------------------------------
def test_cuda_backend_on_numpy_arrays_is_a_clear_error():
    w = stepjit.Parameter(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="backend 'cuda' needs CuPy arrays"):
        SGD([w], lr=0.1, backend="cuda")
    assert (w.data == 0).all() and w.grad is None


def test_cuda_backend_without_cupy_says_so(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cupy" else real(name, *a))
    w = stepjit.Parameter(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="CuPy is not installed"):
        SGD([w], lr=0.1, backend="cuda")


def test_backend_constructor_without_a_device_raises_a_clear_error():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed")
    if _no_device_reason() is None:
        pytest.skip("a CUDA device is present")
    from stepjit.runtime.gpu import CUDABackend

    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        CUDABackend(0)


# -- helpers ---------------------------------------------------------------------------------------
CONFIGS = [
    # momentum, nesterov, weight_decay, clip_norm, dampening, param dtype, grad dtype
    (0.0, False, 0.0, 0.0, 0.0, F32, F32),
    (0.9, False, 1e-2, 0.0, 0.1, F32, F32),
    (0.9, True, 1e-2, 0.0, 0.0, F64, F64),
    (0.9, False, 0.0, 0.0, 0.0, F16, F16),
    (0.8, True, 1e-3, 0.0, 0.0, BF16, F32),
    (0.9, False, 1e-2, 1.0, 0.0, F32, F32),
    (0.9, True, 0.0, 0.5, 0.0, F16, BF16),
    (0.0, False, 1e-2, 2.0, 0.0, F64, F16),
]
SIZES = [1000, 3, 70_000, 1, 140_007, 257]


def _arrays(sizes, dtype: DType, rng, scale=1.0):
    return [(rng.standard_normal(n) * scale).astype(dtype.to_numpy()) for n in sizes]


def _run(config, backend: str, to_device, steps: int = 10, sizes=SIZES, seed: int = 0):
    """Params and momentum buffers (as numpy) after `steps` SGD steps with a changing lr."""
    mu, nesterov, wd, clip, damp, pd, gd = config
    for d in {pd, gd}:
        try:
            to_device(np.zeros(1, d.to_numpy()))
        except (TypeError, ValueError) as exc:
            pytest.skip(f"{d} arrays are not supported here: {exc}")
    rng = np.random.default_rng(seed)
    params = [stepjit.Parameter(to_device(a)) for a in _arrays(sizes, pd, rng)]
    grads = [[to_device(a) for a in _arrays(sizes, gd, rng, 0.3)] for _ in range(steps)]
    opt = SGD(params, lr=0.1, momentum=mu, dampening=damp, weight_decay=wd, nesterov=nesterov,
              clip_norm=clip, scale=0.5, backend=backend)
    for step in range(steps):
        opt.param_groups[0]["lr"] = 0.1 / (1 + step)  # a schedule: compiles nothing new
        for p, g in zip(params, grads[step], strict=True):
            p.grad = g
        opt.step()
    host = _to_host
    buffers = [host(opt.state[p]["momentum_buffer"]) if mu else None for p in params]
    return [host(p.data) for p in params], buffers


def _to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _assert_close(a, b, dtype: DType, *, exact: bool):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if exact:
        assert a.tobytes() == b.tobytes() or np.array_equal(a64, b64, equal_nan=True)
        return
    if dtype.is_half:  # one ulp per step: compare in float32 with a 10-ulp margin
        eps = 2.0**-10 if dtype is F16 else 2.0**-7
        np.testing.assert_allclose(a64, b64, rtol=10 * eps, atol=10 * eps * np.abs(b64).max())
    else:
        rtol = 1e-12 if dtype is F64 else 1e-5
        np.testing.assert_allclose(a64, b64, rtol=rtol, atol=rtol * np.abs(b64).max())


# -- on the GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_backend_is_chosen_from_the_arrays(cp):
    w = stepjit.Parameter(cp.zeros(4, cp.float32))
    assert SGD([w], lr=0.1).backend == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c[5]}-{c[6]}-mu{c[0]}-clip{c[3]}"
                                                 for c in CONFIGS])
def test_sgd_matches_the_reference_backend(cp, config):
    """Without clipping every operation rounds as the interpreter: identical bits. With
    clipping, the norm's float64 sum runs in another order: SEMANTICS tolerances."""
    gpu_params, gpu_bufs = _run(config, None, cp.asarray)
    ref_params, ref_bufs = _run(config, "reference", np.asarray)
    exact = config[3] == 0.0
    for a, b in zip(gpu_params, ref_params, strict=True):
        _assert_close(a, b, config[5], exact=exact)
    for a, b in zip(gpu_bufs, ref_bufs, strict=True):
        if a is not None:
            _assert_close(a, b, config[5].compute, exact=exact)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS[1:3] + CONFIGS[5:6])
def test_sgd_matches_the_cpu_backend(cp, config):
    try:
        stepjit.runtime.select_backend("llvm", {"cpu"})
    except Exception as exc:  # the LLVM backend is not available in this build
        pytest.skip(f"LLVM backend unavailable: {exc}")
    gpu_params, _ = _run(config, None, cp.asarray)
    cpu_params, _ = _run(config, "llvm", np.asarray)
    for a, b in zip(gpu_params, cpu_params, strict=True):
        _assert_close(a, b, config[5], exact=False)


@pytest.mark.gpu
def test_clip_is_deterministic(cp):
    config = (0.9, False, 1e-2, 1.0, 0.0, F32, F32)
    sizes = [3_000_017, 65_536, 5]
    first = _run(config, None, cp.asarray, steps=3, sizes=sizes)[0]
    second = _run(config, None, cp.asarray, steps=3, sizes=sizes)[0]
    for a, b in zip(first, second, strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.gpu
def test_one_compile_per_structure_and_disk_cache_across_processes(cp):
    stepjit.reset_cache_info()
    w = stepjit.Parameter(cp.ones(100, cp.float32))
    opt = SGD([w], lr=0.1, momentum=0.9)
    w.grad = cp.ones(100, cp.float32)
    opt.step()
    info = stepjit.cache_info()
    assert info.compiles + info.disk_hits == 1 and info.compile_seconds > 0
    for lr in (0.2, 0.3):  # new hyperparameter values: no new kernel
        opt.param_groups[0]["lr"] = lr
        opt.step()
    assert stepjit.cache_info().compiles + stepjit.cache_info().disk_hits == 1
    v = stepjit.Parameter(cp.ones(5, cp.float32))
    v.grad = cp.ones(5, cp.float32)
    SGD([v], lr=1.0, momentum=0.5).step()
    assert stepjit.cache_info().memory_hits >= 1
    script = (
        "import cupy as cp, stepjit\n"
        "w = stepjit.Parameter(cp.ones(100, cp.float32))\n"
        "opt = stepjit.optim.SGD([w], lr=0.1, momentum=0.9)\n"
        "w.grad = cp.ones(100, cp.float32)\nopt.step()\n"
        "i = stepjit.cache_info()\nprint(i.compiles, i.disk_hits)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=os.environ.copy()).stdout.split()
    assert out == ["0", "1"]


@pytest.mark.gpu
def test_gradient_accumulation_and_zero_grad(cp):
    """The example of the semantics: x = 1, lr 0.1, twice three accumulated gradients of 1."""
    x = stepjit.Parameter(cp.ones(1, cp.float32))
    opt = SGD([x], lr=0.1)
    for _ in range(2):
        for _ in range(3):
            x.grad = cp.ones(1, cp.float32)
            opt.accumulate_grad()
        opt.step()
    np.testing.assert_allclose(x.data.get(), [0.4], rtol=1e-6)
    x.grad = cp.full(7, 3.0, cp.float32)[:1]
    opt.zero_grad()
    assert float(x.grad[0]) == 0.0


@pytest.mark.gpu
def test_denormals_are_kept(cp):
    tiny = np.float32(1e-40)
    w = stepjit.Parameter(cp.full(1000, 2 * tiny, cp.float32))
    w.grad = cp.full(1000, tiny, cp.float32)
    SGD([w], lr=1.0).step()
    assert (w.data.get() == tiny).all()


@pytest.mark.gpu
def test_steps_can_be_captured_in_a_cuda_graph(cp):
    """No host synchronization in a steady-state step: it can be captured and replayed."""
    config = (0.9, False, 1e-2, 1.0, 0.0, F32, F32)
    w_ref = stepjit.Parameter(np.linspace(-1, 1, 5000).astype(np.float32))
    w = stepjit.Parameter(cp.asarray(w_ref.data))
    g = np.linspace(2, -3, 5000).astype(np.float32)
    w_ref.grad, w.grad = g, cp.asarray(g)
    kw = dict(lr=0.1, momentum=config[0], weight_decay=config[2], clip_norm=config[3])
    opt, ref = SGD([w], **kw), SGD([w_ref], backend="reference", **kw)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        opt.step()
        opt.step()  # the first two steps upload the per-tensor `first` flags
        stream.synchronize()
        stream.begin_capture()
        opt.step()
        graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream)
        stream.synchronize()
    for _ in range(5):
        ref.step()
    _assert_close(w.data.get(), w_ref.data, F32, exact=False)


@pytest.mark.gpu
def test_many_small_tensors_and_a_stream(cp):
    config = (0.9, False, 1e-2, 1.0, 0.0, F32, F32)
    sizes = [1000] * 200
    with cp.cuda.Stream(non_blocking=True):
        gpu_params, _ = _run(config, None, cp.asarray, steps=3, sizes=sizes)
    ref_params, _ = _run(config, "reference", np.asarray, steps=3, sizes=sizes)
    for a, b in zip(gpu_params, ref_params, strict=True):
        _assert_close(a, b, F32, exact=False)


@pytest.mark.gpu
def test_cupy_parameter_with_numpy_gradient_is_rejected(cp):
    w = stepjit.Parameter(cp.ones(10, cp.float32))
    opt = SGD([w], lr=0.1, momentum=0.9)
    w.grad = np.ones(10, np.float32)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0: gradient is on cpu"):
        opt.step()
    assert (w.data.get() == 1).all() and not opt.state


@pytest.mark.gpu
def test_parameters_on_two_devices_are_rejected(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    a = stepjit.Parameter(cp.ones(3, cp.float32))
    with cp.cuda.Device(1):
        b = stepjit.Parameter(cp.ones(3, cp.float32))
    with pytest.raises(ValueError, match="several devices"):
        SGD([a, b], lr=0.1)


@pytest.mark.gpu
def test_bind_rejects_arrays_the_kernel_cannot_use(cp):
    from stepjit.optim.sgd import sgd_rule
    from stepjit.runtime.gpu import CUDABackend

    backend = CUDABackend(0)
    kernel = backend.compile(sgd_rule(False, False, False, False, F32, F32))
    good = (cp.ones(4, cp.float32), cp.ones(4, cp.float32))
    backend.bind(kernel, [good], np.zeros((1, 0)))
    for bad, match in (((cp.ones(4, cp.float64), good[1]), "dtype"),
                       ((np.ones(4, np.float32), good[1]), "CuPy array"),
                       ((good[0], cp.ones(5, cp.float32)), "elements")):
        with pytest.raises(ValueError, match=match):
            backend.bind(kernel, [good, bad], np.zeros((2, 0)))
    launch = backend.bind(kernel, [good], np.zeros((1, 0)))
    with pytest.raises(ValueError, match="scalars"):
        launch((0.1,))  # the rule takes lr and scale


# -- the torch face on CUDA tensors ----------------------------------------------------------------
# The checks of tools/gpu_check.py (side streams, freed tables, CUDA graphs, misaligned views, more
# than 512 chunks) run here at small sizes: one definition of each, used by both.
ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _gpu_check():
    """tools/gpu_check.py as a module (the one tests/test_gpu_check.py loaded, if any)."""
    path = ROOT / "tools" / "gpu_check.py"
    loaded = sys.modules.get("gpu_check")
    if loaded is not None and Path(loaded.__file__).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_cuda(cp):
    """torch, on a machine where both CuPy and torch see a CUDA device; otherwise a skip."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA device (a CPU build?)")
    import stepjit.torch  # noqa: F401

    return torch


def _assert_rows(rows):
    """No FAIL among the rows of a gpu_check check (each names what went wrong)."""
    assert rows
    bad = [r for r in rows if r["result"] == "FAIL"]
    assert not bad, "\n\n".join(f"{r['check']}: {r['figure']}\n{r.get('error', '')}"
                                for r in bad)


FACE_CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=1e-2)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=1e-3)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.1)),
]


def _face_case_id(case):
    name, cfg = case
    return "-".join([name, *(k for k in cfg if k != "lr")])


def _step_beside_torch(torch, name, cfg, dtype, device="cuda", steps=6, seed=0):
    """A stepjit.torch optimizer and torch.optim's, over copies of the same tensors on `device`,
    stepped with the same gradients (one tensor without a gradient at some steps) and a learning
    rate changed every step; (ours, ours_opt, ref, ref_opt)."""
    gc = _gpu_check()
    face, torch_class = gc._faces(name)
    gen = torch.Generator(device=device).manual_seed(seed)
    init = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in gc.SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt, ref_opt = face(ours, **cfg), torch_class(ref, **cfg, foreach=False)
    assert opt.backend == "cuda"
    for k in range(steps):
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = cfg["lr"] * (1 + 0.5 * np.cos(k))
        for i, (p, q) in enumerate(zip(ours, ref)):
            if i == 1 and k in (0, 3):  # no gradient at this step: both skip the tensor
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, device=device, dtype=dtype, generator=gen)
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    torch.cuda.synchronize(device)
    return ours, opt, ref, ref_opt


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", FACE_CASES, ids=_face_case_id)
def test_torch_face_on_cuda_tensors_matches_torch(torch_cuda, case, dtype):
    name, cfg = case
    ours, opt, ref, ref_opt = _step_beside_torch(torch_cuda, name, cfg,
                                                 getattr(torch_cuda, dtype))
    rtol = 1e-5 if dtype == "float32" else 1e-12
    worst, where = _gpu_check().compare_optimizers(ours, opt, ref, ref_opt, rtol=rtol)
    assert worst <= 1, f"{where}: {worst:.3g} x the tolerance"


@pytest.mark.gpu
def test_lars_on_cuda_tensors_matches_the_cpu_backend(torch_cuda):
    torch = torch_cuda
    cfg = dict(lr=0.1, momentum=0.9, trust_coef=0.01, weight_decay=1e-4, clip_norm=2.0)
    gen = torch.Generator().manual_seed(1)
    shapes = _gpu_check().SHAPES
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    runs = []
    for device in ("cuda", "cpu"):
        params = [torch.nn.Parameter(t.to(device, copy=True)) for t in init]
        opt = stepjit.torch.LARS(params, **cfg)
        assert opt.backend == ("cuda" if device == "cuda" else "llvm")
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(device, copy=True)
            opt.step()
        runs.append((params, opt))
    worst, where = _gpu_check().compare_optimizers(*runs[0], *runs[1])
    assert worst <= 1, f"{where}: {worst:.3g} x the tolerance"


@pytest.mark.gpu
def test_torch_side_stream_right_after_tables_are_rebuilt(torch_cuda):
    _assert_rows(_gpu_check().check_stream())


@pytest.mark.gpu
def test_tables_rebuilt_while_a_busy_stream_still_reads_the_old_ones(torch_cuda):
    _assert_rows(_gpu_check().check_free(rounds=30))


@pytest.mark.gpu
@pytest.mark.parametrize("key", ["SGD", "Adam", "RMSprop", "AdamW-amsgrad", "Adam-amsgrad-wd"])
def test_capturable_step_in_a_cuda_graph_follows_an_lr_schedule(torch_cuda, key):
    assert key in _gpu_check().GRAPH_CONFIGS
    _assert_rows(_gpu_check().check_graph(key))


@pytest.mark.gpu
def test_views_at_odd_offsets_give_the_bits_of_aligned_copies(torch_cuda):
    _assert_rows(_gpu_check().check_misaligned())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["SGD", "LARS"])
def test_more_than_512_chunks_with_reductions(torch_cuda, name):
    gc = _gpu_check()
    configs = [c for c in gc.MANY_CHUNKS_CONFIGS if c[0] == name]
    _assert_rows(gc.check_many_chunks(numel=512 * 65536 + 3, configs=configs, steps=2))


@pytest.mark.gpu
def test_torch_optimizers_on_two_devices_step_in_turn(torch_cuda):
    """One optimizer per device, stepped in turn while device 0 stays current."""
    torch = torch_cuda
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    assert torch.cuda.current_device() == 0
    for name, cfg in (("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=0.01))):
        for device in ("cuda:1", "cuda:0"):
            ours, opt, ref, ref_opt = _step_beside_torch(torch, name, cfg, torch.float32,
                                                         device=device, steps=3)
            assert all(p.device == torch.device(device) for p in ours)
            worst, where = _gpu_check().compare_optimizers(ours, opt, ref, ref_opt)
            assert worst <= 1, f"{name} on {device}, {where}: {worst:.3g} x the tolerance"
        assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_torch_parameters_on_two_devices_are_refused(torch_cuda):
    torch = torch_cuda
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    a = torch.nn.Parameter(torch.ones(3, device="cuda:0"))
    b = torch.nn.Parameter(torch.ones(3, device="cuda:1"))
    with pytest.raises(ValueError, match="several devices"):
        stepjit.torch.SGD([a, b], lr=0.1)
