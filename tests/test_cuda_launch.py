"""The CUDA backend's control flow without a GPU: SGD on a stand-in CuPy (`fake_cupy`).

The stand-in keeps arrays in host memory and runs each kernel the backend launches through the
host harness (the same generated source, compiled by g++), and it models streams, events and the
stream-ordered memory pool: an access that nothing orders after the last conflicting one fails
the test. Everything else is the real code path: backend selection, NVRTC compilation and the
disk cache, table building and uploads, the per-tensor `first` flag, scalar packing in ABI
order, the launches per group, the streams they run on. What it cannot show is how the real
device runs the code (see test_cuda_gpu.py for that).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import types

import numpy as np
import pytest
from cuda_host.harness import HostLibrary, compiler
from fake_cupy import FakeArray, Model, StreamRace, install

import stepjit
from stepjit.ir import DType, evaluate
from stepjit.optim.adam import adam_rule
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import arrays, select

gpu = pytest.importorskip("stepjit.runtime.gpu")
F16, F32, F64 = DType.F16, DType.F32, DType.F64

ADAM = adam_rule(False, False, False, False, F32, F32)
RMSPROP = stepjit.optim.rule_for("rmsprop", "float32")  # counts steps, no per-tensor values
COMPACT = dict(momentum=0.9, weight_decay=1e-2, state_dtype="bfloat16", master_weights=True)
SGD_COMPACT = stepjit.optim.rule_for("sgd", "bfloat16", **COMPACT)  # bfloat16 state, a copy
SGD_SR = stepjit.optim.rule_for("sgd", "bfloat16", momentum=0.9, stochastic_rounding=True)
ADAM_INT8 = stepjit.optim.rule_for("adam", "float32", state_dtype="int8")  # codes and scales


def _formulas(cls) -> dict:
    """An optimizer class's per-tensor formulas (they do not depend on the parameters)."""
    return cls([stepjit.Parameter(np.zeros(1, np.float32))], backend="reference").tensor_formulas()


RULES = [
    sgd_rule(True, False, True, False, F32, F32),
    sgd_rule(True, False, True, True, F32, F32),
    sgd_rule(True, True, False, True, F16, F32),
    sgd_rule(False, False, False, False, F32, F32),
    _accumulate_rule(F32, F32),
    _zero_rule(F32),
    ADAM,
    (sgd_rule(True, False, True, False, F32, F32), {}),  # capturable variants
    (ADAM, _formulas(stepjit.optim.Adam)),
    (RMSPROP, {}),
    SGD_COMPACT,
    (SGD_COMPACT, {}),
    SGD_SR,
    ADAM_INT8,
]


def _skip_reason() -> str | None:
    if compiler() is None:
        return "no host C++ compiler (g++)"
    try:
        gpu.nvrtc_version()
    except Exception as exc:
        return f"NVRTC is not available: {exc}"
    return None


pytestmark = pytest.mark.skipif(bool(_skip_reason()), reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return HostLibrary.start(RULES, tmp_path_factory.mktemp("launch"), "launch").finish()


@pytest.fixture
def fake(host_lib, monkeypatch):
    """Install the stand-in CuPy; yields the list of kernel launches."""
    from cupy.cuda import nvrtc

    model = Model()
    cp = install(model, host_lib, RULES, nvrtc)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cp.cuda)
    select._instance.cache_clear()
    FakeArray.uploads.clear()
    yield model.kernels
    select._instance.cache_clear()


def _run(make, steps, config, sizes, seed=0, backend=None):
    mu, wd, clip, nesterov, pd = config
    rng = np.random.default_rng(seed)
    params = [stepjit.Parameter(make(rng.standard_normal(n).astype(pd))) for n in sizes]
    opt = stepjit.optim.SGD(params, lr=0.1, momentum=mu, weight_decay=wd, clip_norm=clip,
                            nesterov=nesterov, scale=0.5, backend=backend)
    grads = [[make((rng.standard_normal(n) * 0.3).astype(np.float32)) for n in sizes]
             for _ in range(steps)]
    for step in range(steps):
        opt.param_groups[0]["lr"] = 0.1 / (1 + step)
        for p, g in zip(params, grads[step], strict=True):
            p.grad = g
        opt.step()
    return opt, params


CONFIGS = [(0.9, 1e-2, 0.0, False, np.float32), (0.9, 1e-2, 1.0, False, np.float32),
           (0.9, 0.0, 0.5, True, np.float16)]


@pytest.mark.parametrize("config", CONFIGS, ids=["momentum-decay", "clip", "nesterov-clip-f16"])
def test_sgd_through_the_cuda_backend_matches_the_reference(fake, config):
    sizes = [1000, 70_000, 3, 140_007]
    opt, params = _run(FakeArray, 4, config, sizes)
    assert opt.backend == "cuda"
    _, ref = _run(np.asarray, 4, config, sizes, backend="reference")
    exact = config[2] == 0.0  # no clip: the same bits as the interpreter
    for p, r in zip(params, ref, strict=True):
        if exact:
            assert p.data.get().tobytes() == r.data.tobytes()
        else:
            tol = 1e-5 if config[4] is np.float32 else 2e-3
            np.testing.assert_allclose(p.data.get(), r.data, rtol=tol, atol=tol)
    clip = config[2] > 0
    update = [n for n in fake if n.endswith("_update")]
    partial = [n for n in fake if n.endswith("_partial_sums")]
    assert len(update) == 4 and len(partial) == (4 if clip else 0)  # one group, 4 steps
    if clip:  # the partial sums, their per-tensor totals, then the update
        assert all(fake[i].endswith("_partial_sums") for i in range(0, 12, 3))


def test_uploads_only_when_tables_or_flags_change(fake):
    config = CONFIGS[0]
    rng = np.random.default_rng(1)
    params = [stepjit.Parameter(FakeArray(rng.standard_normal(100).astype(np.float32)))
              for _ in range(3)]
    opt = stepjit.optim.SGD(params, lr=0.1, momentum=config[0], weight_decay=config[1])
    for p in params:
        p.grad = FakeArray(np.ones(100, np.float32))
    counts = []
    for _ in range(5):
        before = len(FakeArray.uploads)
        opt.step()
        counts.append(len(FakeArray.uploads) - before)
    # step 1: pointer, size and chunk tables + first flags; step 2: flags cleared; then nothing
    assert counts == [4, 1, 0, 0, 0]
    assert stepjit.cache_info().compiles + stepjit.cache_info().disk_hits >= 1


def test_accumulate_and_zero_grad(fake):
    x = stepjit.Parameter(FakeArray(np.ones(10, np.float32)))
    opt = stepjit.optim.SGD([x], lr=0.1)
    for _ in range(2):
        for _ in range(3):
            x.grad = FakeArray(np.ones(10, np.float32))
            opt.accumulate_grad()
        opt.step()
    np.testing.assert_allclose(x.data.get(), 0.4, rtol=1e-6)
    opt.zero_grad()
    assert (x.grad.get() == 0).all()
    assert any(n.startswith("accumulate") for n in fake) and "zero_float32_update" in fake


def test_memory_cache_per_structure(fake):
    stepjit.reset_cache_info()
    for _ in range(2):
        _run(FakeArray, 1, CONFIGS[0], [10])
    info = stepjit.cache_info()
    assert info.compiles + info.disk_hits == 1 and info.memory_hits == 1


# -- streams ---------------------------------------------------------------------------------------
class TorchLike(FakeArray):
    """A CUDA torch tensor as the CUDA backend sees one: launches on it run on torch's current
    stream (the `torch_stream` fixture says which), held ones get `record_stream`."""

    def record_stream(self, stream) -> None:
        self.recorded.append(stream.cuda_stream)

    recorded: list


class _TorchAdapter(arrays._Cupy):
    name = "torch"


@pytest.fixture
def torch_streams(fake, monkeypatch):
    """The stand-in device with torch in it: returns (model, cupy, set_torch_stream)."""
    cp = sys.modules["cupy"]
    model = FakeArray.model
    current = [model.null]
    cuda = types.SimpleNamespace(
        current_stream=lambda device: types.SimpleNamespace(cuda_stream=current[0].ptr))
    monkeypatch.setattr(arrays, "_torch", lambda: types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(arrays._ADAPTERS, TorchLike, _TorchAdapter())
    monkeypatch.setattr(gpu, "_EXTERNAL", {})  # stream handles of this stand-in device only

    def use(stream) -> None:
        current[0] = stream

    return model, cp, use


MOMENTUM = RULES[0]  # SGD with momentum and weight decay: a per-tensor `first` flag


def _tensors(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        arrays_ = [rng.standard_normal(n).astype(np.float32) for _ in MOMENTUM.slots]
        t = tuple(TorchLike(a) for a in arrays_)
        for a in t:
            a.recorded = []
        out.append(t)
    return out


def _reference(tensors, scalars, first=True):
    """What one step computes, by the interpreter, on host copies."""
    named = dict(zip(MOMENTUM.scalar_names, scalars))
    out = []
    for t in tensors:
        views = {s.name: a.host().copy() for s, a in zip(MOMENTUM.slots, t)}
        out.append(evaluate(MOMENTUM, views, named, {"first": first}))
    return out


SCALARS = (0.1, 0.01, 0.9, 0.0, 1.0)


def _launch(sizes, seed=0):
    backend = gpu.CUDABackend(0)
    tensors = _tensors(sizes, seed)
    launch = backend.bind(backend.compile(MOMENTUM), tensors, np.ones((len(sizes), 1)))
    return launch, tensors


def test_tables_are_uploaded_on_the_stream_the_kernels_run_on(torch_streams):
    # torch's current stream is a side stream (the warm-up torch asks for before capturing a
    # graph) while CuPy's is the null stream: the first launch must read uploaded tables
    model, cp, use_torch_stream = torch_streams
    side = cp.new_stream()
    use_torch_stream(side)
    launch, tensors = _launch([1000, 70_000])
    scalars = tuple(np.float32(v) for v in SCALARS[: len(MOMENTUM.scalars)])
    expected = _reference(tensors, scalars)
    launch(SCALARS[: len(MOMENTUM.scalars)])
    side.synchronize()
    for t, want in zip(tensors, expected):
        for slot, a in zip(MOMENTUM.slots, t):
            if slot.written:
                np.testing.assert_array_equal(a.get(), want[slot.name])


def test_table_memory_is_not_reused_under_a_kernel_of_another_stream(torch_streams):
    # a launch on torch's side stream is dropped (a rebuild); the next bind of the same sizes
    # gets its memory back from the pool and rewrites it while the first kernel may still run
    model, cp, use_torch_stream = torch_streams
    side = cp.new_stream()
    use_torch_stream(side)
    first, _ = _launch([1000, 3000])
    first(SCALARS[: len(MOMENTUM.scalars)])
    del first
    second, _ = _launch([1000, 3000], seed=1)
    second(SCALARS[: len(MOMENTUM.scalars)])
    assert model.kernels.count(MOMENTUM.name + "_update") == 2


def test_a_launch_moved_to_another_stream_orders_reuse_of_its_memory(torch_streams):
    # bound on a side stream, then run on the default stream after it (torch's protocol after
    # a warm-up), then dropped: its memory returns to the side stream's pool, and a launch bound
    # there next must not overwrite it before the default stream's kernel is done
    model, cp, use_torch_stream = torch_streams
    side, default = cp.new_stream(), cp.new_stream()
    use_torch_stream(side)
    first, tensors = _launch([1000, 3000])
    first(SCALARS[: len(MOMENTUM.scalars)])
    default.wait_event(side.record())
    use_torch_stream(default)
    first(SCALARS[: len(MOMENTUM.scalars)])
    assert all(a.recorded == [default.ptr] for t in tensors for a in t)  # held: recorded
    del first
    gc.collect()
    # whoever allocates next, on any stream, may write the memory at once: the tables came
    # from the side stream's pool, and the side stream now waits for the default one
    for stream in (model.null, side):
        with stream:
            for _ in range(8):
                cp.zeros(10, np.float32)
    use_torch_stream(side)
    second, _ = _launch([1000, 3000], seed=1)
    second(SCALARS[: len(MOMENTUM.scalars)])


def test_the_stream_model_fails_unordered_access(torch_streams):
    # the model itself: a kernel on one stream, then a write on another with no event between
    model, cp, use_torch_stream = torch_streams
    a, b = cp.new_stream(), cp.new_stream()
    use_torch_stream(a)
    launch, tensors = _launch([100])
    launch(SCALARS[: len(MOMENTUM.scalars)])
    with b, pytest.raises(StreamRace, match="nothing orders the two"):
        tensors[0][0][:10] = 0.0  # the parameter, written on b while a's kernel may run
    with b:
        b.wait_event(a.record())
        tensors[0][0][:10] = 0.0  # ordered now


def test_cupy_steps_on_alternating_streams_are_ordered(fake):
    # a CuPy optimizer stepped under one stream, then another, with no synchronization: each
    # launch waits for the last one of the other stream, so the steps run in program order
    cp = sys.modules["cupy"]
    a, b = cp.new_stream(), cp.new_stream()
    opt, params = None, None
    rng = np.random.default_rng(3)
    data = [rng.standard_normal(n).astype(np.float32) for n in (100, 5000)]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in (100, 5000)] for _ in range(4)]
    params = [stepjit.Parameter(FakeArray(d.copy())) for d in data]
    ref = [stepjit.Parameter(d.copy()) for d in data]
    opt = stepjit.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    ref_opt = stepjit.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=1e-2,
                                backend="reference")
    for step, stream in enumerate([a, b, a, b]):
        with stream:
            for p, r, g in zip(params, ref, grads[step], strict=True):
                p.grad, r.grad = FakeArray(g), g
            opt.step()
        ref_opt.step()
    b.synchronize()
    for p, r in zip(params, ref, strict=True):
        np.testing.assert_array_equal(p.data.get(), r.data)


# -- capturable steps ------------------------------------------------------------------------------
SCHEDULE = [0.01 * (1 + np.cos(np.pi * k / 12)) / 2 + 1e-3 for k in range(12)]


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_a_captured_step_replays_with_the_current_lr_and_step_count(fake, name):
    # warm-up steps, one step captured, then replays with a schedule written into a device lr
    # between them and new gradient values copied into the same gradient arrays: the replays
    # must follow the schedule and count steps, as eager steps of the reference do
    cp = sys.modules["cupy"]
    model = FakeArray.model
    cls = getattr(stepjit.optim, name)
    config = {"SGD": dict(momentum=0.9, weight_decay=1e-2), "Adam": {}, "RMSprop": {}}[name]
    sizes = (1000, 70_000, 3)
    rng = np.random.default_rng(5)
    data = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(15)]
    stream = cp.new_stream()
    params = [stepjit.Parameter(FakeArray(d.copy())) for d in data]
    with stream:
        static = [cp.zeros(n, np.float32) for n in sizes]
        lr = cp.zeros((), np.float32)
    for p, g in zip(params, static, strict=True):
        p.grad = g
    opt = cls(params, lr=1.0, capturable=True, **config)  # lr: the device value's factor
    ref = [stepjit.Parameter(d.copy()) for d in data]
    ref_opt = cls(ref, lr=0.0, backend="reference", **config)
    graph = None
    for k in range(15):
        rate = np.float32(0.01 if k < 3 else SCHEDULE[k - 3])
        with stream:
            lr[...] = rate
            for g, new in zip(static, grads[k], strict=True):
                g[...] = new
            if k < 3:
                opt.step(lr_sources=[lr])
            else:
                if graph is None:
                    with model.capture(stream) as graph:
                        opt.step(lr_sources=[lr])
                graph.replay()
        for r, new in zip(ref, grads[k], strict=True):
            r.grad = new
        ref_opt.param_groups[0]["lr"] = float(rate)
        ref_opt.step()
    stream.synchronize()
    tol = 1e-6 if name == "Adam" else 0  # Adam's bias corrections: exp and log on the device
    for p, r in zip(params, ref, strict=True):
        np.testing.assert_allclose(p.data.get(), r.data, rtol=tol, atol=tol)
    if name != "SGD":
        assert [float(opt.state[p]["step"].get()) for p in params] == [15.0] * 3
    captured = [n for n in model.kernels if n.endswith("_capturable")]
    assert captured and all(n.endswith("_capturable") for n in model.kernels if "sgd" in n
                            or "adam" in n)


def _parameter_on_a_stream(n: int):
    """(cupy, the model, a new stream, a float32 Parameter of n zeros with a zero gradient,
    both made on that stream)."""
    cp = sys.modules["cupy"]
    stream = cp.new_stream()
    with stream:
        w = stepjit.Parameter(cp.zeros(n, np.float32))
        w.grad = cp.zeros(n, np.float32)
    return cp, FakeArray.model, stream, w


def test_a_capturable_step_may_not_allocate_or_synchronize_once_built(fake):
    # the stand-in fails any allocation, copy or query during capture: a first step (tables
    # to build) cannot be captured, a later one can
    cp, model, stream, w = _parameter_on_a_stream(100)
    opt = stepjit.optim.Adam([w], lr=1e-3, capturable=True)
    with pytest.raises(AssertionError, match="during graph capture"), model.capture(stream):
        opt.step()
    with stream:
        opt.step()
    with model.capture(stream) as graph:
        opt.step()
    assert len(graph.launches) == 2  # the per-tensor values, then the update


def test_gradient_addresses_written_into_the_host_table_are_uploaded(torch_streams):
    # torch's new gradients every step: `runtime.repoint` writes their addresses into the cells
    # `table_cells` gives; the next call uploads the address table, and only when it changed
    model, cp, use_torch_stream = torch_streams
    launch, tensors = _launch([1000, 3000])
    launch.forget("grad")
    scalars = SCALARS[: len(MOMENTUM.scalars)]
    launch(scalars)
    k = [s.name for s in MOMENTUM.slots].index("grad")
    new = [TorchLike(np.full(n, 2.0, np.float32)) for n in (1000, 3000)]
    cells = launch.table_cells("grad", np.arange(2), np.array([4000, 12000], np.uint64))
    for cell, g in zip(cells, new, strict=True):
        ctypes.c_uint64.from_address(int(cell)).value = g.data.ptr
    moved = [tuple(g if i == k else a for i, a in enumerate(t)) for t, g in zip(tensors, new)]
    expected = _reference(moved, tuple(np.float32(v) for v in scalars), first=False)
    before = len(FakeArray.uploads)
    launch.set_per_tensor("first", 0.0)
    launch(scalars)
    assert FakeArray.uploads[before:] == [MOMENTUM.slots.__len__() * 8 * 2, 2 * 8]
    for t, want in zip(tensors, expected):
        np.testing.assert_array_equal(t[0].get(), want["param"])
    launch(scalars)  # nothing changed: nothing uploaded
    assert len(FakeArray.uploads) == before + 2
    with pytest.raises(ValueError, match="bytes where the kernel expects"):
        launch.table_cells("grad", np.arange(2), np.array([4000, 4], np.uint64))


def _captured_sgd(cp, model, stream, sizes=(300, 5000)):
    """A capturable SGD with momentum over CuPy arrays, three steps warmed up on `stream`."""
    with stream:
        params = [stepjit.Parameter(cp.zeros(n, np.float32)) for n in sizes]
        for p in params:
            p.grad = cp.zeros(p.data.shape, np.float32)
            p.grad[...] = 1.0
    opt = stepjit.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, capturable=True)
    with stream:
        for _ in range(3):
            opt.step()
    return opt, params


def test_gradients_made_anew_for_the_capture_are_copied_by_the_graph(fake):
    # torch's whole-network recipe: zero_grad(set_to_none=True), then backward inside the
    # capture makes new gradients; the captured step copies their addresses from a buffer only
    # the graph reads, and an eager step afterwards uploads the table again
    cp = sys.modules["cupy"]
    model = FakeArray.model
    stream = cp.new_stream()
    opt, params = _captured_sgd(cp, model, stream)
    with stream:  # where the state is: the reference starts from it
        ref = [stepjit.Parameter(p.data.get()) for p in params]
        momentum = {i: {"momentum_buffer": opt.state[p]["momentum_buffer"].get()}
                    for i, p in enumerate(params)}
    ref_opt = stepjit.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=1e-2, backend="reference")
    ref_opt.load_state_dict({"state": momentum, "param_groups": ref_opt.state_dict()[
        "param_groups"]})
    with stream:
        static = [cp.zeros(p.data.shape, np.float32) for p in params]
    for p, g in zip(params, static, strict=True):
        p.grad = g
    with model.capture(stream) as graph:
        opt.step()
    assert len(graph.nodes) == 3  # the address table's copy, the prepare kernel, the update
    rng = np.random.default_rng(0)
    for _ in range(3):
        values = [rng.standard_normal(g.shape).astype(np.float32) for g in static]
        with stream:
            for g, v in zip(static, values, strict=True):
                g[...] = v
            graph.replay()
        for r, v in zip(ref, values, strict=True):
            r.grad = v
        ref_opt.step()
    with stream:
        opt.step()  # eager, same gradients: the table the graph copied is uploaded for it too
    ref_opt.step()
    stream.synchronize()
    for p, r in zip(params, ref, strict=True):
        np.testing.assert_array_equal(p.data.get(), r.data)


def test_a_capture_needs_capturable_steps(fake):
    cp, model, stream, w = _parameter_on_a_stream(10)
    opt = stepjit.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-2)
    with stream:
        opt.step()
    with pytest.raises(RuntimeError, match="needs capturable=True"), model.capture(stream):
        opt.step()


def test_a_graph_replays_after_its_optimizer_is_gone(fake):
    # the graph holds the tables' addresses: they stay allocated (a replay of freed memory
    # fails in the stand-in)
    cp = sys.modules["cupy"]
    model = FakeArray.model
    stream = cp.new_stream()
    opt, params = _captured_sgd(cp, model, stream)
    with model.capture(stream) as graph:
        opt.step()
    del opt
    gc.collect()
    graph.replay()


def test_device_lr_is_checked_before_anything_runs(fake):
    cp = sys.modules["cupy"]
    stream = cp.new_stream()
    with stream:
        a = stepjit.Parameter(cp.zeros(10, np.float32))
        b = stepjit.Parameter(cp.zeros(10, np.float32))
        a.grad, b.grad = cp.zeros(10, np.float32), cp.zeros(10, np.float32)
        lr32, lr64 = cp.zeros((), np.float32), cp.zeros((), np.float64)
    opt = stepjit.optim.Adam([{"params": [a]}, {"params": [b]}], lr=1.0, capturable=True)
    with stream, pytest.raises(ValueError, match="param group 1: the device lr must be one "
                                                 "float32 element"):
        opt.step(lr_sources=[lr32, lr64])
    assert "step" not in opt.state.get(a, {})  # group 0 did not step either
    plain = stepjit.optim.Adam([a], lr=1.0)
    with stream, pytest.raises(ValueError, match="read only by capturable steps"):
        plain.step(lr_sources=[lr32])


def test_a_rebuilt_launch_is_ordered_after_the_stream_of_the_last(fake):
    # a step on stream a, then the parameter list edited (the tables are built anew) and a
    # step on stream b: the new launch waits for a's kernels before it touches the parameters
    cp = sys.modules["cupy"]
    a, b = cp.new_stream(), cp.new_stream()
    with a:
        params = [stepjit.Parameter(cp.zeros(100, np.float32)) for _ in range(3)]
        for p in params:
            p.grad = cp.zeros(100, np.float32)
    opt = stepjit.optim.SGD(params[:2], lr=0.1, momentum=0.9, weight_decay=1e-2)
    with a:
        opt.step()
    opt.param_groups[0]["params"].append(params[2])
    with b:
        opt.step()


@pytest.mark.parametrize("capturable", [False, True])
def test_compact_state_and_master_copies_through_the_cuda_backend(fake, capturable):
    # bfloat16 parameters with a float32 copy and bfloat16 momentum: the CUDA launches (eager,
    # or captured and replayed) give the reference interpreter's bits
    cp = sys.modules["cupy"]
    model = FakeArray.model
    bf16 = DType.BF16.to_numpy()
    rng = np.random.default_rng(4)
    sizes = (1000, 70_000)
    data = [rng.standard_normal(n).astype(bf16) for n in sizes]
    grads = [[rng.standard_normal(n).astype(bf16) for n in sizes] for _ in range(6)]
    stream = cp.new_stream()
    with stream:
        params = [stepjit.Parameter(cp.asarray(d)) for d in data]
        static = [cp.zeros(n, bf16) for n in sizes]
    for p, g in zip(params, static, strict=True):
        p.grad = g
    opt = stepjit.optim.SGD(params, lr=0.05, capturable=capturable, **COMPACT)
    ref = [stepjit.Parameter(d.copy()) for d in data]
    ref_opt = stepjit.optim.SGD(ref, lr=0.05, backend="reference", **COMPACT)
    graph = None
    for k, step in enumerate(grads):
        with stream:
            for g, new in zip(static, step, strict=True):
                g[...] = new
            if capturable and k >= 2:
                if graph is None:
                    with model.capture(stream) as graph:
                        opt.step()
                graph.replay()
            else:
                opt.step()
        for r, new in zip(ref, step, strict=True):
            r.grad = new
        ref_opt.step()
    stream.synchronize()
    for p, r in zip(params, ref, strict=True):
        np.testing.assert_array_equal(p.data.get(), r.data)
        for name in ("momentum_buffer", "master"):
            np.testing.assert_array_equal(opt.state[p][name].get(), ref_opt.state[r][name])
    assert opt.state[params[0]]["momentum_buffer"].dtype == bf16
    assert opt.state[params[0]]["master"].dtype == np.float32


def test_stochastic_rounding_through_the_cuda_backend(fake):
    # the keys are drawn on the host each step, the bits in the kernels: the interpreter's
    cp = sys.modules["cupy"]
    bf16 = DType.BF16.to_numpy()
    rng = np.random.default_rng(6)
    sizes = (1000, 70_000)
    data = [rng.standard_normal(n).astype(bf16) for n in sizes]
    params = [stepjit.Parameter(cp.asarray(d)) for d in data]
    ref = [stepjit.Parameter(d.copy()) for d in data]
    opts = [stepjit.optim.SGD(ps, lr=2**-10, momentum=0.9, stochastic_rounding=True,
                              rounding_seed=9, backend=backend)
            for ps, backend in ((params, None), (ref, "reference"))]
    for _ in range(3):
        for p, r in zip(params, ref, strict=True):
            r.grad = rng.standard_normal(r.shape).astype(bf16)
            p.grad = cp.asarray(r.grad)
        for opt in opts:
            opt.step()
    for p, r in zip(params, ref, strict=True):
        assert p.data.get().tobytes() == r.data.tobytes()
    captured = stepjit.optim.SGD(params, lr=0.1, momentum=0.9, stochastic_rounding=True,
                                 capturable=True)
    with pytest.raises(ValueError, match="capturable step cannot use it yet"):
        captured.step()


def test_int8_state_through_the_cuda_backend(fake):
    # 8-bit Adam state (signed codes in int8 arrays, unsigned ones in uint8, one float32 scale
    # per block of 256): the CUDA launches give the reference interpreter's bits
    cp = sys.modules["cupy"]
    rng = np.random.default_rng(8)
    sizes = (1000, 70_000, 3)
    data = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    params = [stepjit.Parameter(cp.asarray(d)) for d in data]
    ref = [stepjit.Parameter(d.copy()) for d in data]
    opts = [stepjit.optim.Adam(ps, lr=1e-2, state_dtype="int8", rounding_seed=3, backend=b)
            for ps, b in ((params, None), (ref, "reference"))]
    for _ in range(3):
        for p, r in zip(params, ref, strict=True):
            r.grad = rng.standard_normal(r.shape).astype(np.float32)
            p.grad = cp.asarray(r.grad)
        for opt in opts:
            opt.step()
    assert f"{ADAM_INT8.name}_update" in fake
    for p, r in zip(params, ref, strict=True):
        assert p.data.get().tobytes() == r.data.tobytes()
        for name in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
            got, want = opts[0].state[p][name], opts[1].state[r][name]
            assert got.dtype == want.dtype and got.get().tobytes() == want.tobytes(), name
    assert opts[0].state[params[1]]["exp_avg"].dtype == np.int8
    assert opts[0].state[params[1]]["exp_avg_absmax"].size == -(-70_000 // 256)


def test_per_block_slots_are_checked_in_bytes(fake):
    # a per-block slot spans one value per block of 256: a kernel is bound only to arrays of
    # exactly the bytes it touches, and the signed codes may be int8
    backend = gpu.CUDABackend(0)
    kernel = backend.compile(ADAM_INT8)
    n = 1000

    def tensor(scales=4, codes=np.int8):
        arrays = {"param": np.zeros(n, np.float32), "grad": np.zeros(n, np.float32),
                  "exp_avg": np.zeros(n, codes), "exp_avg_absmax": np.zeros(scales, np.float32),
                  "exp_avg_sq": np.zeros(n, np.uint8),
                  "exp_avg_sq_absmax": np.zeros(4, np.float32)}
        return tuple(FakeArray(arrays[s.name]) for s in ADAM_INT8.slots)

    values = np.zeros((1, len(ADAM_INT8.per_tensor)))
    launch = backend.bind(kernel, [tensor(), tensor(codes=np.uint8)], np.zeros((2, 3)))
    assert list(launch._numel) == [n, n]
    with pytest.raises(ValueError, match="exp_avg_absmax: 4000 bytes where the kernel expects 16"):
        backend.bind(kernel, [tensor(scales=n)], values)
    with pytest.raises(ValueError, match="exp_avg_absmax: 12 bytes where the kernel expects 16"):
        backend.bind(kernel, [tensor(scales=3)], values)
    k = [s.name for s in ADAM_INT8.slots].index("exp_avg_absmax")
    with pytest.raises(ValueError, match="bytes where the kernel expects 16"):
        launch.repoint("exp_avg_absmax", [0], [FakeArray(np.zeros(5, np.float32))])
    launch.repoint("exp_avg_absmax", [0], [FakeArray(np.zeros(4, np.float32))])
    assert launch._ptrs[0, k] == launch.held[0][k].data.ptr
