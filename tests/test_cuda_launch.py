"""The CUDA backend's control flow without a GPU: SGD on a stand-in CuPy.

The stand-in keeps arrays in host memory and runs each kernel the backend launches through the
host harness (the same generated source, compiled by g++). Everything else is the real code
path: backend selection, NVRTC compilation and the disk cache, table building and uploads, the
per-tensor `first` flag, scalar packing in ABI order, one or two launches per group. What it
cannot show is how the real device runs the code (see test_cuda_gpu.py for that).
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest
from cuda_host.harness import HostLibrary, compiler

import stepjit
from stepjit.codegen import cuda as codegen
from stepjit.ir import DType
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import select

gpu = pytest.importorskip("stepjit.runtime.gpu")
F16, F32, F64 = DType.F16, DType.F32, DType.F64

RULES = [
    sgd_rule(True, False, True, False, F32, F32),
    sgd_rule(True, False, True, True, F32, F32),
    sgd_rule(True, True, False, True, F16, F32),
    sgd_rule(False, False, False, False, F32, F32),
    _accumulate_rule(F32, F32),
    _zero_rule(F32),
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


class _Memory:
    def __init__(self, owner: np.ndarray, log: list) -> None:
        self.ptr = owner.ctypes.data
        self._log = log

    def copy_from_host_async(self, src, nbytes, stream=None):
        self._log.append(nbytes)
        ctypes.memmove(self.ptr, src.value, nbytes)


class FakeArray:
    """A host array that looks like a cupy.ndarray to stepjit."""

    uploads: list = []

    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        self.data = _Memory(a, FakeArray.uploads)
        self.device = types.SimpleNamespace(id=0)
        self.dtype, self.shape, self.size, self.flags = a.dtype, a.shape, a.size, a.flags
        self.itemsize, self.strides = a.itemsize, a.strides

    def reshape(self, *shape):
        return FakeArray(self._a.reshape(*shape))

    def __getitem__(self, index):
        return FakeArray(self._a[index])

    def __setitem__(self, index, value):
        self._a[index] = value._a if isinstance(value, FakeArray) else value

    def copy(self):
        return FakeArray(self._a.copy())

    def get(self):
        return self._a.copy()


class _Function:
    def __init__(self, lib: HostLibrary, name: str, launches: list) -> None:
        self._fn = getattr(lib.lib, f"run_{name}")
        self._name, self._launches = name, launches

    def __call__(self, grid, block, args):
        assert block == (codegen.BLOCK,)
        converted = []
        for a in args:
            if isinstance(a, FakeArray):
                converted.append(ctypes.c_void_p(a.data.ptr))
            elif isinstance(a, np.float32):
                converted.append(ctypes.c_float(a))
            elif isinstance(a, np.float64):
                converted.append(ctypes.c_double(a))
            elif isinstance(a, (np.float16, np.uint16)):
                converted.append(ctypes.c_uint16(int(np.array(a).view(np.uint16))))
            else:
                raise TypeError(f"{self._name}: unexpected kernel argument {type(a).__name__}")
        self._launches.append(self._name)
        self._fn(ctypes.c_uint(grid[0]), *converted)


def fake_cupy(lib: HostLibrary, nvrtc, launches: list) -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeArray
    cp.zeros = lambda shape, dtype: FakeArray(np.zeros(shape, dtype))
    cp.zeros_like = lambda a, dtype, order: FakeArray(np.zeros_like(a._a, dtype, order))
    cp.empty = lambda shape, dtype: FakeArray(np.zeros(shape, dtype))
    cp.asarray = lambda a: FakeArray(np.array(a))

    class Device:
        compute_capability = "80"

        def __init__(self, device=0):
            assert device == 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Module:
        def load(self, image):
            assert image[:4] == b"\x7fELF"  # a real cubin from NVRTC

        def get_function(self, name):
            return _Function(lib, name, launches)

    stream = types.SimpleNamespace(ptr=0, wait_event=lambda event: None)
    cp.cuda = types.SimpleNamespace(
        Device=Device,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0),
        function=types.SimpleNamespace(Module=Module),
        alloc_pinned_memory=bytearray,
        get_current_stream=lambda: stream,
        Event=lambda **kw: types.SimpleNamespace(record=lambda s: None, done=True),
        nvrtc=nvrtc,
    )
    return cp


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return HostLibrary.start(RULES, tmp_path_factory.mktemp("launch"), "launch").finish()


@pytest.fixture
def fake(host_lib, monkeypatch):
    """Install the stand-in CuPy; yields the list of kernel launches."""
    from cupy.cuda import nvrtc

    launches: list = []
    cp = fake_cupy(host_lib, nvrtc, launches)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cp.cuda)
    select._instance.cache_clear()
    FakeArray.uploads.clear()
    yield launches
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
    if clip:  # the partial sums always run just before the update
        assert all(fake[i].endswith("_partial_sums") for i in range(0, 8, 2))


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
