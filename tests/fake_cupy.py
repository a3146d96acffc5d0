"""A stand-in CuPy for the CUDA backend's tests without a GPU, with a model of CUDA streams.

Arrays live in host memory and each kernel the backend launches runs through the host harness
(the generated source compiled by g++). Around that, the stand-in models what a device does
asynchronously, so that ordering bugs fail a test instead of a training run:

- **Streams and events** carry vector clocks: an operation on a stream happens after everything
  earlier on that stream, after every event the stream waited for, and after what the host did
  and saw complete before queuing it; the host is one more clock, which `synchronize()` joins.
  Nothing is ordered by accident: every stream, the null stream included, behaves as a
  non-blocking stream, and an event counts as done only once the host has synchronized with it
  (as on a slow device).
- **Memory accesses** of every operation (kernel, host-to-device copy, memset) are recorded by
  byte range. An operation that reads memory whose last write is not ordered before it, or
  writes memory that an unordered operation reads or writes, raises `StreamRace`, naming both.
  A kernel's accesses are its table arguments (read-only when the parameter is `const`) and the
  tensors its address table points at (written when the rule writes the slot).
- **The memory pool is stream-ordered** as CuPy's is: a freed block returns to the pool of the
  stream it was allocated on and the next allocation of its size on that stream reuses it at
  once, so memory freed while another stream still reads it is caught when it is rewritten.

- **Graph capture**: `Model.capture(stream)` records the kernels and host-to-device copies queued
  on that stream instead of running them, as CUDA does, and fails any allocation (device or
  pinned), event query or synchronization meanwhile (what a captured step must not do);
  `Graph.replay()` runs the recorded operations again with the arguments they were captured
  with. The graph holds addresses, not arrays: a replay that reaches memory freed since the
  capture fails.

What it does not model: kernels run when they are launched (a race is reported, not acted out);
pinned memory is never reused; the pool reuses a block only for an allocation of its size.
"""

from __future__ import annotations

import ctypes
import itertools
import types
import weakref
from dataclasses import dataclass

import numpy as np

from stepjit.codegen import cuda as codegen
from stepjit.ir import UpdateRule


class StreamRace(AssertionError):
    """Two accesses to device memory that no stream, event or synchronization orders."""


@dataclass(frozen=True)
class _Access:
    start: int
    end: int
    write: bool
    stream: int  # the stream's id; the host is 0
    time: int  # the stream's clock at the access
    what: str


class Model:
    """The device: streams, the host's clock, every recorded access, the memory pool."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.host: dict[int, int] = {0: 0}
        self.null = FakeStream(self, ptr=0)
        self.stack: list[FakeStream] = []
        self.accesses: list[_Access] = []
        self.free: dict[tuple[int, int], list[np.ndarray]] = {}  # (stream, size) -> blocks
        # start address -> live block (weak: a block is freed when its last array is)
        self.blocks: weakref.WeakValueDictionary[int, _Block] = weakref.WeakValueDictionary()
        self.kernels: list[str] = []  # every launch, in order
        self.graph: Graph | None = None  # the capture in progress

    def capture(self, stream: FakeStream) -> Graph:
        """A context manager: kernels launched on `stream` inside it are recorded in the graph
        it returns, not run."""
        return Graph(self, stream)

    def forbid(self, what: str) -> None:
        if self.graph is not None:
            raise AssertionError(f"{what} during graph capture")

    def current(self) -> FakeStream:
        return self.stack[-1] if self.stack else self.null

    @staticmethod
    def ordered(a: _Access, clock: dict[int, int]) -> bool:
        return clock.get(a.stream, 0) >= a.time

    def op(self, stream: FakeStream | None, what: str, reads=(), writes=()) -> None:
        """Record one operation on `stream` (None: the host) reading and writing byte ranges
        (start, end); raise StreamRace when one is unordered with an earlier access."""
        if stream is None:
            clock, sid = self.host, 0
        else:  # queued by the host: after all it did and saw complete before
            clock, sid = stream.clock, stream.id
            for k, v in self.host.items():
                clock[k] = max(clock.get(k, 0), v)
        clock[sid] = clock.get(sid, 0) + 1
        new = [_Access(s, e, False, sid, clock[sid], what) for s, e in reads if e > s]
        new += [_Access(s, e, True, sid, clock[sid], what) for s, e in writes if e > s]
        for a in new:
            for b in self.accesses:
                if (a.write or b.write) and a.start < b.end and b.start < a.end and (
                        not self.ordered(b, clock)):
                    where = "the host" if sid == 0 else f"stream {sid}"
                    there = "the host" if b.stream == 0 else f"stream {b.stream}"
                    verb = "writes" if a.write else "reads"
                    raise StreamRace(
                        f"{what} on {where} {verb} bytes [{a.start:#x}, {a.end:#x}) that "
                        f"{b.what} on {there} {'wrote' if b.write else 'read'}, and nothing "
                        "orders the two")
        # a write supersedes the accesses it covers (already checked against it)
        for a in new:
            if a.write:
                self.accesses = [b for b in self.accesses
                                 if not (a.start <= b.start and b.end <= a.end)]
        self.accesses += new

    def allocate(self, shape, dtype, stream: FakeStream) -> FakeArray:
        self.forbid("an allocation")
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape != () else 1
        size = max(512, -(-count * dtype.itemsize // 512) * 512)  # CuPy's 512-byte bins
        pool = self.free.setdefault((stream.id, size), [])
        raw = pool.pop() if pool else np.zeros(size, np.uint8)
        block = _Block(self, raw, stream.id, size)
        a = raw[: count * dtype.itemsize].view(dtype).reshape(shape)
        return FakeArray(a, block)

    def block_span(self, ptr: int) -> tuple[int, int]:
        """The bytes of the live pool block that holds address `ptr`."""
        for start, block in self.blocks.items():
            if start <= ptr < start + block.size:
                return start, start + block.size
        raise AssertionError(f"a kernel was given address {ptr:#x}, in no live allocation")

    def release(self, raw: np.ndarray, stream: int, size: int) -> None:
        self.blocks.pop(raw.ctypes.data, None)
        self.free.setdefault((stream, size), []).append(raw)

    def kernel_accesses(self, info: codegen.KernelInfo, rule, kernel: str, args) -> tuple:
        """The byte ranges `kernel` reads and writes, from its arguments and address table."""
        reads, writes = [], []
        params = info.prepare_params if kernel == info.prepare else info.params
        table = {}
        for (ctype, name), a in zip(params, args, strict=True):
            if name == "chunk_partials" and kernel != info.update:
                ctype = "double*"  # the partial-sum kernels write it (the update reads it)
            if isinstance(a, FakeArray):
                span = a.span()
                table[name] = a
            elif isinstance(a, np.uint64) and ctype.endswith("*") and a:  # a raw pointer
                span = self.block_span(int(a))
            else:
                continue
            (reads if ctype.startswith("const") else writes).append(span)
        if "tensor_ptrs" in table:
            ptrs = table["tensor_ptrs"].host().reshape(-1, len(rule.slots))
            numel = table["tensor_numel"].host().reshape(-1)
            for t in range(numel.shape[0]):
                for k, slot in enumerate(rule.slots):
                    start = int(ptrs[t, k])
                    span = (start, start + slot.length(int(numel[t])) * slot.dtype.itemsize)
                    (writes if slot.written else reads).append(span)
        return reads, writes


class _Block:
    """One pool allocation; back to its stream's pool when the last array on it is gone."""

    def __init__(self, model: Model, raw: np.ndarray, stream: int, size: int) -> None:
        model.blocks[raw.ctypes.data] = self
        self.size = size
        weakref.finalize(self, model.release, raw, stream, size)


class FakeStream:
    def __init__(self, model: Model, ptr: int | None = None) -> None:
        self.model = model
        self.id = next(model._ids)
        self.ptr = self.id * 16 if ptr is None else ptr
        self.clock: dict[int, int] = {self.id: 0}

    def __enter__(self):
        self.model.stack.append(self)
        return self

    def __exit__(self, *exc):
        self.model.stack.pop()
        return False

    def use(self):
        self.model.stack[:] = [self]
        return self

    def wait_event(self, event: FakeEvent) -> None:
        for k, v in (event.clock or {}).items():
            self.clock[k] = max(self.clock.get(k, 0), v)

    def synchronize(self) -> None:
        self.model.forbid("a stream synchronization")
        for k, v in self.clock.items():
            self.model.host[k] = max(self.model.host.get(k, 0), v)

    def record(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent(self.model)
        event.record(self)
        return event

    def is_capturing(self) -> bool:
        return self.model.graph is not None and self.model.graph.stream is self

    @property
    def done(self) -> bool:
        self.model.forbid("a stream query")
        return all(self.model.host.get(k, 0) >= v for k, v in self.clock.items())


class FakeEvent:
    def __init__(self, model: Model, **_) -> None:
        self.model = model
        self.clock: dict[int, int] | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.clock = dict((stream or self.model.current()).clock)

    def synchronize(self) -> None:
        self.model.forbid("an event synchronization")
        for k, v in (self.clock or {}).items():
            self.model.host[k] = max(self.model.host.get(k, 0), v)

    @property
    def done(self) -> bool:
        self.model.forbid("an event query")
        return all(self.model.host.get(k, 0) >= v for k, v in (self.clock or {}).items())


class _Memory:
    def __init__(self, owner: FakeArray) -> None:
        self._owner = owner
        self.ptr = owner._a.ctypes.data

    def copy_from_host_async(self, src, nbytes, stream=None):
        model = self._owner.model
        stream = stream or model.current()
        if model.graph is not None and stream is model.graph.stream:
            model.graph.nodes.append(_Copy(self.ptr, src.value, nbytes))  # run by replays
            return
        model.forbid("a host-to-device copy")
        _Copy(self.ptr, src.value, nbytes).run(model, stream)


@dataclass(frozen=True)
class _Copy:
    """A host-to-device copy (a graph node when captured: the source is read at each replay)."""

    dst: int
    src: int
    nbytes: int

    def run(self, model: Model, stream: FakeStream) -> None:
        model.op(stream, "a host-to-device copy", writes=[(self.dst, self.dst + self.nbytes)])
        FakeArray.uploads.append(self.nbytes)
        ctypes.memmove(self.dst, self.src, self.nbytes)


@dataclass(frozen=True)
class _Address:
    """A device array as a captured graph holds it: an address, not a reference."""

    ptr: int
    shape: tuple
    dtype: np.dtype


class FakeArray:
    """A host array that looks like a cupy.ndarray to stepjit."""

    uploads: list = []
    model: Model

    def __init__(self, a: np.ndarray, block: _Block | None = None) -> None:
        self._a = a
        self._block = block  # keeps the pool block in use
        self.data = _Memory(self)
        self.device = types.SimpleNamespace(id=0)
        self.dtype, self.shape, self.size, self.flags = a.dtype, a.shape, a.size, a.flags
        self.itemsize, self.strides, self.nbytes = a.itemsize, a.strides, a.nbytes
        self.ndim = a.ndim

    def span(self) -> tuple[int, int]:
        start = self._a.ctypes.data
        return start, start + self._a.nbytes

    def host(self) -> np.ndarray:
        """The values, read without a device operation (for the model itself)."""
        return self._a

    def reshape(self, *shape):
        return FakeArray(self._a.reshape(*shape), self._block)

    def ravel(self, order="C"):
        return FakeArray(self._a.ravel(order), self._block)

    def __getitem__(self, index):
        # an element is a 0-d view, as in CuPy (numpy would give a scalar)
        index = index if isinstance(index, tuple) else (index,)
        return FakeArray(self._a[(*index, ...)], self._block)

    def __setitem__(self, index, value):
        target = self._a[index]
        start = target.ctypes.data
        src = value._a if isinstance(value, FakeArray) else value
        reads = [value.span()] if isinstance(value, FakeArray) else []
        self.model.op(self.model.current(), "an assignment", reads=reads,
                      writes=[(start, start + target.nbytes)])
        target[...] = src

    def copy(self):
        out = self.model.allocate(self.shape, self.dtype, self.model.current())
        self.model.op(self.model.current(), "a copy", reads=[self.span()], writes=[out.span()])
        out._a[...] = self._a
        return out

    def get(self):
        """As CuPy: synchronize the current stream, then read on the host."""
        self.model.current().synchronize()
        self.model.op(None, "a device-to-host read", reads=[self.span()])
        return self._a.copy()


def install(model: Model, lib, rules, nvrtc) -> types.ModuleType:
    """A `cupy` module over `model`, running the kernels of `rules` from the host library
    `lib` (`cuda_host.harness.HostLibrary`)."""
    FakeArray.model = model
    by_key = {(r if isinstance(r, UpdateRule) else r[0]).key:
              (r if isinstance(r, UpdateRule) else r[0]) for r in rules}
    kernels = {}  # kernel name -> (rule, its KernelInfo)
    for (key, _), info in lib.variants.items():
        for name in [*info.kernels, *([info.prepare] if info.prepare else [])]:
            kernels[name] = (by_key[key], info)
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeArray

    def zeros(shape, dtype=np.float64):
        out = model.allocate(shape, dtype, model.current())
        model.op(model.current(), "a memset", writes=[out.span()])
        out._a[...] = 0
        return out

    def zeros_like(a, dtype=None, order="K"):
        return zeros(a.shape, dtype or a.dtype)

    def asarray(a):
        a = np.asarray(a)
        out = model.allocate(a.shape, a.dtype, model.current())
        out._a[...] = a  # written by the host before anything is queued: ordered
        return out

    def pinned(nbytes):
        model.forbid("a pinned allocation")
        return bytearray(nbytes)

    cp.zeros, cp.zeros_like, cp.asarray = zeros, zeros_like, asarray
    cp.empty = lambda shape, dtype=np.float64: model.allocate(shape, dtype, model.current())

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
            return _Function(model, lib, name, *kernels[name])

    class Stream(FakeStream):
        null = model.null

        def __init__(self, non_blocking=False, ptr=None):
            super().__init__(model, ptr)

        @classmethod
        def from_external(cls, obj):
            _, ptr = obj.__cuda_stream__()
            return model_stream(ptr)

    def model_stream(ptr: int) -> FakeStream:
        """The stream with raw handle `ptr` (one object per handle, as the device has)."""
        for s in itertools.chain([model.null], model.stack, _known):
            if s.ptr == ptr:
                return s
        raise AssertionError(f"no stream with handle {ptr:#x}")

    _known: list[FakeStream] = []

    def new_stream(*args, **kwargs):
        s = Stream(*args, **kwargs)
        _known.append(s)
        return s

    cp.cuda = types.SimpleNamespace(
        Device=Device,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0),
        function=types.SimpleNamespace(Module=Module),
        alloc_pinned_memory=pinned,
        get_current_stream=model.current,
        Stream=types.SimpleNamespace(null=model.null, from_external=Stream.from_external),
        ExternalStream=model_stream,  # CuPy's older spelling of from_external
        Event=lambda **kw: FakeEvent(model, **kw),
        nvrtc=nvrtc,
    )
    cp.new_stream = new_stream  # test-side: a fresh non-blocking stream
    return cp


class Graph:
    """Kernel launches recorded on one stream (`Model.capture`), replayed on demand."""

    def __init__(self, model: Model, stream: FakeStream) -> None:
        self.model, self.stream = model, stream
        self.nodes: list = []  # _Copy, and (function, grid, arguments) of each kernel

    @property
    def launches(self) -> list[tuple]:
        return [n for n in self.nodes if not isinstance(n, _Copy)]

    def __enter__(self) -> Graph:
        assert self.model.graph is None, "one capture at a time"
        self.model.graph = self
        self.model.stack.append(self.stream)
        return self

    def __exit__(self, *exc) -> bool:
        self.model.stack.pop()
        self.model.graph = None
        return False

    def replay(self) -> None:
        """Run the recorded operations again, on the stream they were captured on."""
        with self.stream:
            for node in self.nodes:
                if isinstance(node, _Copy):
                    self.model.block_span(node.dst)  # still allocated
                    node.run(self.model, self.stream)
                    continue
                function, grid, args = node
                function.run(grid, tuple(self._live(a) for a in args))

    def _live(self, a):
        """An argument as the replay passes it: an array at the captured address, which must
        still be allocated."""
        if not isinstance(a, _Address):
            return a
        start, end = self.model.block_span(a.ptr)  # fails for memory freed since the capture
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * (end - start)).from_address(start))
        count = int(np.prod(a.shape, dtype=np.int64))
        offset = a.ptr - start
        view = raw[offset: offset + count * a.dtype.itemsize].view(a.dtype).reshape(a.shape)
        return FakeArray(view, self.model.blocks[start])


class _Function:
    """One kernel of the host library, launched on the current stream."""

    def __init__(self, model: Model, lib, name: str, rule, info: codegen.KernelInfo) -> None:
        self._model, self._name, self._rule, self._info = model, name, rule, info
        self._fn = getattr(lib.lib, f"run_{name}")

    def __call__(self, grid, block, args):
        graph = self._model.graph
        if graph is not None and self._model.current() is graph.stream:
            held = tuple(_Address(a.data.ptr, a.shape, a.dtype) if isinstance(a, FakeArray)
                         else a for a in args)
            graph.nodes.append((self, grid, held))  # recorded, not run
            return
        self.run(grid, args)

    def run(self, grid, args) -> None:
        rule, info = self._rule, self._info
        reads, writes = self._model.kernel_accesses(info, rule, self._name, args)
        self._model.op(self._model.current(), f"kernel {self._name}", reads, writes)
        converted = []
        for a in args:
            if isinstance(a, FakeArray):
                converted.append(ctypes.c_void_p(a.data.ptr))
            elif isinstance(a, np.uint64):  # a raw device address
                converted.append(ctypes.c_void_p(int(a) or None))
            elif isinstance(a, np.float32):
                converted.append(ctypes.c_float(a))
            elif isinstance(a, np.float64):
                converted.append(ctypes.c_double(a))
            elif isinstance(a, np.int32):
                converted.append(ctypes.c_int(a))
            elif isinstance(a, (np.float16, np.uint16)):
                converted.append(ctypes.c_uint16(int(np.array(a).view(np.uint16))))
            else:
                raise TypeError(f"{self._name}: unexpected kernel argument {type(a).__name__}")
        self._model.kernels.append(self._name)
        self._fn(ctypes.c_uint(grid[0]), *converted)
