"""The CUDA backend: rules lowered to CUDA C, compiled with NVRTC, launched through CuPy.

    backend = CUDABackend(0)                           # device 0
    kernel = backend.compile(rule)                     # memory cache, then disk cache, then NVRTC
    launch = backend.bind(kernel, tensors, per_tensor) # tables uploaded to the device once
    launch(scalars)                                    # one or two kernel launches, no host sync

Compilation does not go through `cupy.RawModule`: CuPy appends `-ftz=true` (flush denormals to
zero) to every program it compiles, and this backend keeps IEEE denormals like the CPU backend.
It calls NVRTC itself (`cupy.cuda.nvrtc`) with `NVRTC_OPTIONS`, keeps the cubin in its own disk
cache and loads it with `cupy.cuda.function.Module`. `ptx()` and `cubin()` need no GPU.

Launches run on the stream of their tensors' framework (torch's current stream for torch
tensors, CuPy's for CuPy arrays) and never wait for the device: every device operation of a
launch, the upload of its tables included, is queued on that stream, and a launch that moves to
another stream first makes the new one wait for the old (`CUDALaunch`). Host-to-device copies
happen only when a table is (re)built or re-pointed and when the optimizer edits a per-tensor
value (the `first` flag after a tensor's first step, Adam's bias corrections every step), from
pinned memory, asynchronously; a capturable launch computes its per-tensor values on the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .._version import __version__
from ..codegen import cuda as codegen
from ..ir import DType, UpdateRule
from . import arrays, cache
from .backend import Backend, Launch, cells_of

NVRTC_OPTIONS: tuple[str, ...] = (
    "-std=c++17",
    "-ftz=false",  # keep denormals, as the CPU backend does
    "-prec-div=true",
    "-prec-sqrt=true",
    "-fmad=false",  # round every multiply and add, like the reference interpreter
)
"""Options of every NVRTC compilation (plus `-arch` and the include directories)."""


class CUDACompileError(RuntimeError):
    """NVRTC rejected a generated source; the message carries the compiler log."""


# -- compiling without a device --------------------------------------------------------------------
@functools.cache
def include_dirs() -> tuple[str, ...]:
    """Directories holding `cuda_fp16.h` / `cuda_bf16.h` (NVRTC 13 does not build them in).

    Looked up in the `nvidia-cuda-runtime` wheel first, then in a CUDA toolkit ($CUDA_PATH,
    $CUDA_HOME, or the one around `nvcc`).
    """
    found: list[str] = []

    def consider(path: Path) -> None:
        if (path / "cuda_fp16.h").is_file() and str(path) not in found:
            found.append(str(path))

    for module in ("nvidia.cu13", "nvidia.cuda_runtime", "nvidia.cu12"):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            consider(Path(location) / "include")
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        consider(Path(root) / "include")
        consider(Path(root) / "targets" / "x86_64-linux" / "include")
        consider(Path(root) / "targets" / "sbsa-linux" / "include")
    return tuple(found)


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
    except ImportError as exc:
        raise ImportError(
            "compiling CUDA kernels needs CuPy and NVRTC: pip install 'stepjit[cuda]' "
            "nvidia-cuda-nvrtc nvidia-cuda-runtime"
        ) from exc
    return nvrtc


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """The (major, minor) version of the NVRTC library in use."""
    return tuple(_nvrtc().getVersion())


@functools.cache
def supported_archs() -> tuple[int, ...]:
    """The real architectures (75 for sm_75, ...) this NVRTC can emit cubins for."""
    return tuple(_nvrtc().getSupportedArchs())


def _arch(arch: str | int) -> str:
    """'sm_90' from 'sm_90', 'compute_90', '90' or 90."""
    text = str(arch)
    digits = text.rpartition("_")[2]
    if not digits.isdigit():
        raise ValueError(f"unknown CUDA architecture {arch!r} (use e.g. 'sm_90')")
    return f"{'compute' if text.startswith('compute') else 'sm'}_{digits}"


@dataclass(frozen=True)
class Compiled:
    """The output of one NVRTC compilation."""

    ptx: str
    cubin: bytes | None  # None when compiled for a virtual architecture (compute_XX)
    log: str


def nvrtc_compile(source: str, arch: str | int, name: str = "stepjit.cu") -> Compiled:
    """Compile `source` for `arch` ('sm_90', or 'compute_90' for PTX only) with NVRTC.

    Needs the NVRTC library, not a GPU. Raises CUDACompileError with the log on failure.
    """
    nvrtc = _nvrtc()
    arch = _arch(arch)
    options = [f"-arch={arch}", *NVRTC_OPTIONS, *(f"-I{d}" for d in include_dirs())]
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise CUDACompileError(f"NVRTC failed to compile {name} for {arch}:\n{log}") from exc
        log = nvrtc.getProgramLog(prog)
        ptx_text = nvrtc.getPTX(prog)
        image = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else None
    finally:
        nvrtc.destroyProgram(prog)
    if isinstance(ptx_text, bytes):
        ptx_text = ptx_text.decode()
    return Compiled(ptx=ptx_text.rstrip("\0"), cubin=image, log=log)


def ptx(source: str, arch: str | int = "sm_90") -> str:
    """The PTX of `source` for `arch` (no GPU needed)."""
    return nvrtc_compile(source, arch).ptx


def cubin(source: str, arch: str | int = "sm_90") -> bytes:
    """The cubin (machine code) of `source` for the real architecture `arch` (no GPU needed)."""
    image = nvrtc_compile(source, _arch(arch).replace("compute_", "sm_")).cubin
    assert image is not None
    return image


# -- the kernel skeletons --------------------------------------------------------------------------
def template_dir() -> Path:
    """Where the kernel skeletons are: inside the installed package (wheels ship them as
    `stepjit/codegen_templates`), else at the root of a source checkout."""
    packaged = Path(str(resources.files("stepjit"))) / "codegen_templates"
    if (packaged / codegen.TEMPLATE_NAMES[0]).is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[3] / "codegen_templates"
    if (checkout / codegen.TEMPLATE_NAMES[0]).is_file():
        return checkout
    raise FileNotFoundError(
        f"CUDA kernel templates not found (looked in {packaged} and {checkout})"
    )


@functools.cache
def templates() -> codegen.Templates:
    """The kernel skeletons the CUDA code generator fills in, read once."""
    folder = template_dir()
    return codegen.Templates.from_texts([(folder / n).read_text() for n in codegen.TEMPLATE_NAMES])


def render(rule: UpdateRule, **geometry) -> str:
    """The complete CUDA source of `rule`'s kernels (`codegen.cuda.render` with the templates)."""
    return codegen.render(rule, templates(), **geometry)


# -- the disk cache --------------------------------------------------------------------------------
# Cubins are code this process will run: they go through the same private, checksummed,
# atomically written cache as the CPU backend's object code.
_IMAGES = {".cubin": cache.DiskCache("cuda", ".cubin"), ".ptx": cache.DiskCache("cuda", ".ptx")}


def cache_key(source: str, arch: str) -> str:
    """A hash of everything the compiled image depends on."""
    parts = (__version__, ".".join(map(str, nvrtc_version())), arch, " ".join(NVRTC_OPTIONS),
             source)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


_EM_CUDA = 190
_ELFOSABI_CUDA = frozenset({0x33, 0x41})
_CUBIN_RULES = cache.ElfRules(file_type=cache.ET_EXEC, machine=_EM_CUDA, osabi=_ELFOSABI_CUDA,
                              locals_first=False, aligned=False, program_headers=True)


def check_image(image: bytes, arch: str, entry_points: Sequence[str] = ()) -> None:
    """Raise `MalformedEntry` unless `image` is what `load_or_compile` returns for `arch` and may
    be given to the driver: for 'sm_XX' a cubin for that architecture whose ELF structure checks
    out (`stepjit.runtime.cache.read_elf`), for 'compute_XX' NUL-terminated ASCII PTX targeting
    it; either defining the kernels `entry_points`. The code inside is not checked."""
    arch = _arch(arch)
    number = int(arch.rpartition("_")[2])
    if arch.startswith("sm_"):
        # The driver is given no length: it reads what the headers say, and CPython keeps a NUL
        # after every bytes object. CuPy's getCUBIN drops a cubin's last byte (a zero), so a fresh
        # cubin relies on that NUL: check what the driver reads.
        elf = cache.read_elf(image + b"\0", _CUBIN_RULES)
        # e_flags holds the architecture in bits 8-15 (CUDA's ELF ABI 8) or 0-7 (earlier ABIs)
        if number not in (elf.flags & 0xFF, (elf.flags >> 8) & 0xFF):
            raise cache.MalformedEntry(f"a cubin for another architecture (flags {elf.flags:#x})")
        kernels = {s.name for s in elf.symbols
                   if s.defined and s.type == cache.STT_FUNC and s.bind != cache.STB_LOCAL}
        missing = [name for name in entry_points if name not in kernels]
    else:
        if not image.endswith(b"\0") or b"\0" in image[:-1] or not image[:-1].isascii():
            raise cache.MalformedEntry("PTX that is not ASCII text ending in one NUL")
        text = image[:-1].decode("ascii")
        if not (re.search(r"^\s*\.version\s+\d+\.\d+\s*$", text, re.M)
                and re.search(rf"^\s*\.target\s+sm_{number}\b", text, re.M)
                and re.search(r"^\s*\.address_size\s+64\s*$", text, re.M)):
            raise cache.MalformedEntry(f"PTX without .version, .target sm_{number} and "
                                       ".address_size 64")
        missing = [name for name in entry_points
                   if not re.search(rf"\.entry\s+{re.escape(name)}\s*\(", text)]
    if missing:
        raise cache.MalformedEntry(f"no kernel {', '.join(missing)}")


def load_or_compile(source: str, arch: str, entry_points: Sequence[str] = ()) -> tuple[bytes, bool]:
    """The loadable image of `source` for `arch`: a cubin for 'sm_XX', NUL-terminated PTX for
    'compute_XX'; and whether it came from the disk cache. A cached image that `check_image`
    refuses (defining `entry_points` included) is a miss: compiled again and overwritten."""
    arch = _arch(arch)
    store = _IMAGES[".cubin" if arch.startswith("sm_") else ".ptx"]
    key = cache_key(source, arch)
    image = store.get(key)
    if image is not None:
        try:
            check_image(image, arch, entry_points)
            return image, True
        except cache.MalformedEntry as exc:
            cache.log.debug("cached CUDA image %s refused: %s; recompiling", key, exc)
    out = nvrtc_compile(source, arch)
    image = out.cubin if out.cubin is not None else out.ptx.encode() + b"\0"
    try:
        check_image(image, arch, entry_points)
    except cache.MalformedEntry as exc:  # loaded all the same: it comes from NVRTC
        cache.log.debug("new CUDA image %s not stored on disk: %s", key, exc)
    else:
        store.put(key, image)
    return image, False


# -- launch tables ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tables:
    """The host copy of one launch's tables (layout in `stepjit.codegen.cuda`)."""

    ptrs: np.ndarray  # uint64 [tensors, slots]
    numel: np.ndarray  # int64 [tensors]
    chunks: np.ndarray  # int32 [chunks, 2]: (tensor, chunk index within the tensor)

    @property
    def n_chunks(self) -> int:
        return int(self.chunks.shape[0])


def build_tables(pointers: Sequence[Sequence[int]], numels: Sequence[int], chunk: int) -> Tables:
    """Tables for tensors with these slot addresses and sizes, `chunk` elements per block.

    A tensor's chunks are consecutive (the update kernel finds its tensor's partial sums from
    that); empty tensors get no chunk.
    """
    n = len(numels)
    ptrs = np.array(pointers, dtype=np.uint64).reshape(n, -1) if n else np.zeros((0, 1), np.uint64)
    numel = np.asarray(numels, dtype=np.int64).reshape(n)
    counts = (numel + chunk - 1) // chunk
    if counts.size and int(counts.max()) >= 2**31:
        raise ValueError(f"a tensor of {int(numel.max())} elements is too large for one launch")
    tensor = np.repeat(np.arange(n, dtype=np.int32), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    within = (np.arange(int(counts.sum()), dtype=np.int64) - starts).astype(np.int32)
    if tensor.size >= 2**31:
        raise ValueError("too many chunks for one launch")
    chunks = np.ascontiguousarray(np.stack([tensor, within], axis=1), dtype=np.int32)
    return Tables(ptrs=ptrs, numel=numel, chunks=chunks)


def scalar_types(scalars: Sequence[tuple[str, DType]]) -> tuple:
    """How each scalar argument is passed to CuPy: a numpy scalar of the parameter's C type
    (a Python float would be passed as a C double)."""

    def pack(dtype: DType):
        if dtype is DType.F32:
            return np.float32
        if dtype is DType.F64:
            return np.float64
        if dtype is DType.F16:
            return np.float16
        if dtype is DType.BOOL:
            return np.bool_
        return _bf16_bits

    return tuple(pack(d) for _, d in scalars)


def _bf16_bits(value: float) -> np.uint16:
    rounded = np.float32(codegen.round_to(float(value), DType.BF16))
    return np.uint16(int(np.array(rounded).view(np.uint32)) >> 16)


# -- the backend -----------------------------------------------------------------------------------
def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            "the CUDA backend needs CuPy: pip install 'stepjit[cuda]'"
        ) from exc
    return cupy


def pick_arch(compute_capability: str, available: Sequence[int]) -> str:
    """The target for a device: its own 'sm_XY' when NVRTC can emit it, else PTX for the
    newest virtual architecture not above the device's (the driver compiles that)."""
    cc = int(compute_capability)
    if cc in available:
        return f"sm_{cc}"
    older = [a for a in available if a <= cc]
    if not older:
        raise RuntimeError(f"this NVRTC cannot target compute capability {cc}")
    return f"compute_{max(older)}"


@dataclass
class CUDAKernel:
    """A compiled rule, loaded on one device."""

    rule: UpdateRule
    info: codegen.KernelInfo
    source: str
    arch: str
    device: int
    module: object
    functions: tuple  # info.kernels, loaded: launched in this order over the same arguments
    prepare: object | None  # the capturable variant's per-tensor kernel (info.prepare)


class CUDABackend(Backend):
    """Compiles rules for one CUDA device and launches them over CuPy arrays on it."""

    name = "cuda"

    def __init__(self, device: int = 0) -> None:
        cp = _cupy()
        try:
            count = cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError: no driver, no device
            raise RuntimeError(f"the CUDA backend found no usable CUDA device ({exc})") from exc
        if not 0 <= device < count:
            raise ValueError(f"CUDA device {device} does not exist ({count} present)")
        self.device = device
        self.arch = pick_arch(cp.cuda.Device(device).compute_capability, supported_archs())
        self._kernels: dict[str, CUDAKernel] = {}
        self._lock = threading.Lock()
        self._order = _Order()  # the stream of the last launch on this device

    def compile(self, rule: UpdateRule, formulas: dict | None = None) -> CUDAKernel:
        """The kernels of `rule`; with `formulas` (the optimizer's `tensor_formulas()`), its
        capturable variant, which computes the per-tensor values and counts steps itself."""
        # Exprs are interned: equal formulas are the same objects
        key = (rule.key, None if formulas is None else tuple(sorted(formulas.items())))
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is not None:
                cache.record(memory_hits=1)
                return kernel
            t0 = time.perf_counter()
            source = render(rule, capturable=formulas)
            if dump_dir := os.environ.get("STEPJIT_DUMP_DIR"):
                _dump(Path(dump_dir), rule, source, self.arch)
            info = codegen.describe(rule, capturable=formulas)
            entry_points = [*info.kernels, *([info.prepare] if info.prepare else [])]
            image, from_disk = load_or_compile(source, self.arch, entry_points)
            cp = _cupy()
            with cp.cuda.Device(self.device):
                module = cp.cuda.function.Module()
                module.load(image)
                kernel = CUDAKernel(
                    rule=rule, info=info, source=source, arch=self.arch, device=self.device,
                    module=module, functions=tuple(map(module.get_function, info.kernels)),
                    prepare=module.get_function(info.prepare) if info.prepare else None,
                )
            self._kernels[key] = kernel
            seconds = time.perf_counter() - t0
            if from_disk:
                cache.record(disk_hits=1, seconds=seconds)
            else:
                cache.record(compiles=1, seconds=seconds)
            return kernel

    def bind(self, kernel: CUDAKernel, tensors: list[tuple], per_tensor: np.ndarray,
             steps=None) -> Launch:
        """A launch of `kernel`; for a capturable kernel, `steps` is the device array (float32,
        one per tensor) of step counts its kernels advance."""
        return CUDALaunch(kernel, tensors, per_tensor, steps, self._order)

    def settle(self) -> None:
        """Wait on the host for the kernels queued by this device's last launch (a rebuild reads
        device step counts back)."""
        if self._order.last is not None:
            self._order.last.synchronize()


def _dump(directory: Path, rule: UpdateRule, source: str, arch: str) -> None:
    """STEPJIT_DUMP_DIR: the rule, its CUDA source and PTX, named as `stepjit dump --out` does."""
    from .select import BACKENDS  # each stage's file suffix

    directory.mkdir(parents=True, exist_ok=True)
    stages = {"ir": rule.text + "\n", "cuda": source, "ptx": ptx(source, arch)}
    for stage, suffix in BACKENDS["cuda"].stages.items():
        (directory / f"{rule.name}{suffix}").write_text(stages[stage])


class _Order:
    """The stream of the last launch on one device: a new launch (a rebuilt table) starts
    ordered after it, as a moved launch is after its own last stream."""

    last: object | None = None


_CAPTURED: list = []
"""Every launch (and device lr) a CUDA graph captured: the graph holds their addresses, so they
live as long as the process (a graph may replay after its optimizer rebuilt its tables)."""

_IN_FLIGHT: list[tuple[object, object]] = []
"""Pinned staging buffers of copies the device may not have read yet, with their events:
module-wide, so that a launch dropped meanwhile does not free them under the copy."""


def upload(dst, src: np.ndarray, stream) -> None:
    """Copy the host array `src` into the device array `dst` on `stream`, asynchronously, from
    pinned memory kept alive until the device has read it."""
    cp = _cupy()
    src = np.ascontiguousarray(src, dtype=dst.dtype)
    if src.nbytes == 0:
        return
    memory = cp.cuda.alloc_pinned_memory(src.nbytes)
    staging = np.frombuffer(memory, src.dtype, src.size).reshape(src.shape)
    staging[...] = src
    dst.data.copy_from_host_async(ctypes.c_void_p(staging.ctypes.data), src.nbytes, stream)
    event = cp.cuda.Event(block=False, disable_timing=True)
    event.record(stream)
    _IN_FLIGHT[:] = [(e, m) for e, m in _IN_FLIGHT if not e.done]
    _IN_FLIGHT.append((event, memory))


class _RawStream:
    """A stream handle in the CUDA stream protocol, for `cupy.cuda.Stream.from_external`."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


_EXTERNAL: dict[int, object] = {}  # torch's stream handles as CuPy streams, made once each


def _torch_stream(device) -> tuple[object, object]:
    """torch's current stream on `device`: (as a CuPy stream, as torch's object)."""
    current = arrays._torch().cuda.current_stream(device)
    ptr = current.cuda_stream
    stream = _EXTERNAL.get(ptr)
    if stream is None:
        stream = _EXTERNAL[ptr] = _cupy().cuda.Stream.from_external(_RawStream(ptr))
    return stream, current


def _numel(rule: UpdateRule, tensor: tuple) -> int:
    """A bound tensor's number of elements: the size of its first slot that holds one value per
    element (a per-block slot holds one per block)."""
    return arrays.numel(tensor[rule.slots.index(rule.numel_slot)]) if tensor else 0


def _check_tensors(kernel: CUDAKernel, tensors: list[tuple]) -> None:
    """Every array on the kernel's device, of its slot's dtype, dense and aligned, and spanning
    exactly the bytes the kernel touches: `Slot.length(numel)` values of the slot's dtype."""
    rule = kernel.rule
    slots = rule.slots
    for i, t in enumerate(tensors):
        if len(t) != len(slots):
            raise ValueError(f"tensor {i}: {len(t)} arrays given, the rule has {len(slots)} slots")
        numel = _numel(rule, t)
        for slot, a in zip(slots, t, strict=True):
            where = f"tensor {i}, slot {slot.name}"
            _check_array(kernel, where, slot, a)
            nbytes = arrays.numel(a) * arrays.itemsize(a)
            want = slot.length(numel) * slot.dtype.itemsize
            if nbytes != want:
                raise ValueError(f"{where}: {nbytes} bytes where the kernel expects {want} "
                                 f"({slot.length(numel)} values for {numel} elements of slot "
                                 f"{rule.numel_slot.name})")


_ARRAY_DTYPES = {DType.U8: (DType.U8, DType.I8)}
"""The array dtypes a slot takes besides its own: 8-bit codes are bytes to a kernel, and the
codes of a signed map live in int8 arrays."""


def _check_array(kernel: CUDAKernel, where: str, slot, a) -> None:
    device = arrays.device(a) if arrays.is_array(a) else "?"
    if not device.startswith("cuda"):
        raise ValueError(f"{where}: the CUDA backend needs a CuPy array or a CUDA torch "
                         f"tensor, got {arrays.type_name(a)} on {device}")
    if device != f"cuda:{kernel.device}":
        raise ValueError(f"{where}: array is on {device}, the kernel on cuda:{kernel.device}")
    if arrays.storage_dtype(a) not in _ARRAY_DTYPES.get(slot.dtype, (slot.dtype,)):
        raise ValueError(f"{where}: dtype {a.dtype}, the rule expects {slot.dtype}")
    if not (arrays.is_dense(a) and arrays.is_aligned(a)):
        raise ValueError(f"{where}: array must be dense and aligned")


class CUDALaunch(Launch):
    """A compiled rule bound to a fixed list of tensors (tables in device memory).

    Streams. A launch runs on the stream its tensors' framework says: torch's current stream
    for torch tensors (so the update is ordered after backward), CuPy's current stream for CuPy
    arrays. All its device work happens there, in `__call__`: the tables are uploaded (when new
    or edited) right before the kernels that read them. When that stream is not the one of the
    last call, the new stream first waits for everything queued on the old one (an event, no
    host synchronization), so no table is rewritten under a kernel still reading it. The table
    memory comes from the pool of the stream the launch was bound on, and a dropped launch makes
    that stream wait for every other stream it ran on before its memory returns to the pool
    (what torch's `record_stream` does for torch tensors; the torch tensors the launch holds
    get `record_stream` for each new stream they are used on).
    """

    def __init__(self, kernel: CUDAKernel, tensors: list[tuple], per_tensor: np.ndarray,
                 steps=None, order: _Order | None = None) -> None:
        cp = _cupy()
        _check_tensors(kernel, tensors)
        info = kernel.info
        super().__init__(kernel.rule, tensors, per_tensor)
        self.kernel = kernel
        self.steps = steps
        if info.capturable:
            if steps is None or arrays.numel(steps) != len(tensors) or (
                    arrays.dtype(steps) is not DType.F32) or not arrays.is_dense(steps) or (
                    arrays.device(steps) != f"cuda:{kernel.device}"):
                raise ValueError(f"{self.rule.name}: a capturable launch needs a dense float32 "
                                 f"array of {len(tensors)} step counts on cuda:{kernel.device}")
            self._lr = np.uint64(0)  # no device lr: the `lr` argument is the learning rate
            self._lr_source = None
            self._inputs: tuple = ()
        tables = build_tables(
            [[arrays.data_ptr(a) for a in t] for t in tensors],
            [_numel(kernel.rule, t) for t in tensors],
            info.chunk,
        )
        self._ptrs, self._numel = tables.ptrs, tables.numel
        # torch tensors: launch on torch's current stream, so the update orders after backward
        self._torch_device = next(
            (t[0].device for t in tensors if t and arrays.is_torch(t[0])), None)
        self.n_chunks = tables.n_chunks
        n = len(tensors)
        self._home, _ = self._stream()
        self._streams = {self._home.ptr: self._home}  # every stream this launch ran on
        self._order = order or _Order()
        self._last = self._order.last or self._home
        with cp.cuda.Device(kernel.device), self._home:  # memory from the home stream's pool
            ptrs = cp.empty(tables.ptrs.shape, np.uint64)
            numel = cp.empty(tables.numel.shape, np.int64)
            chunks = cp.empty((max(1, self.n_chunks), 2), np.int32)
            self._per_tensor_dev = cp.empty((max(1, n), info.n_per_tensor), np.float64)
            partials = cp.empty((max(1, self.n_chunks), info.n_reductions), np.float64)
        self._tables = (ptrs, numel, chunks, self._per_tensor_dev, partials)
        # uploaded by the first call, on the stream it runs on; the address table whenever it
        # changed (re-pointed here, or written by `runtime.repoint` through `table_cells`)
        self._pending = [(numel, tables.numel), (chunks[: self.n_chunks], tables.chunks)]
        self._uploaded_ptrs: bytes | None = None
        self._uploaded: bytes | None = None
        # where a captured step copies the address table from: written once per capture and
        # never reused, since every replay copies it again
        self._capture_staging = (cp.cuda.alloc_pinned_memory(max(1, tables.ptrs.nbytes))
                                 if info.capturable else None)
        self._pack = scalar_types(self.rule.scalars)
        self._grid = (self.n_chunks,)
        self._block = (info.block,)

    def _stream(self) -> tuple[object, object | None]:
        """The stream to launch on now (as CuPy's object), and torch's object for it."""
        if self._torch_device is not None:
            return _torch_stream(self._torch_device)
        return _cupy().cuda.get_current_stream(), None

    can_repoint = True

    def repoint(self, slot: str, rows: Sequence[int], tensors: Sequence) -> None:
        k = [s.name for s in self.rule.slots].index(slot)
        for j, a in zip(rows, tensors):
            _check_array(self.kernel, f"tensor {j}, slot {slot}", self.rule.slots[k], a)
        self._hold(slot, rows, tensors, self._numel)
        self._ptrs[list(rows), k] = [arrays.data_ptr(a) for a in tensors]

    def table_cells(self, slot: str, rows: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        # the host copy of the address table: the next call uploads it when it changed
        return cells_of(self._ptrs, rows, self._repoint_check(slot, rows, nbytes, self._numel))

    def _switch(self, stream, torch_stream) -> None:
        """Order `stream` after everything this launch queued on the stream of the last call."""
        cp = _cupy()
        if not stream.is_capturing():  # capture starts after a device synchronization
            event = cp.cuda.Event(block=False, disable_timing=True)
            event.record(self._last)
            stream.wait_event(event)
        if torch_stream is not None and stream.ptr not in self._streams:
            # torch's allocator must not reuse a held tensor's memory before this stream is done
            # with it (gradients are not held: torch's rule for them is the caller's stream)
            for t in self.held:
                for a in t:
                    if a is not None:
                        a.record_stream(torch_stream)
        self._streams[stream.ptr] = stream
        self._last = stream

    def set_inputs(self, values: dict, lr_source=None) -> None:
        """A capturable launch's values for its next calls: the group's kernel arguments by
        name (those the per-tensor formulas read among them), and the device array, if any,
        whose value multiplies `lr` (a 0-d float32 array on this launch's device; `values`
        then gives lr as the multiplier)."""
        self._inputs = tuple(np.float64(values[n]) for n in self.kernel.info.prepare_inputs)
        if lr_source is not self._lr_source:
            if lr_source is None:
                self._lr = np.uint64(0)
            else:
                where = f"{self.rule.name}: the device learning rate"
                if not arrays.is_array(lr_source) or arrays.numel(lr_source) != 1 or (
                        arrays.dtype(lr_source) is not DType.F32):
                    raise ValueError(f"{where} must be one float32 element, got "
                                     f"{arrays.type_name(lr_source)}")
                if arrays.device(lr_source) != f"cuda:{self.kernel.device}":
                    raise ValueError(f"{where} is on {arrays.device(lr_source)}, the kernels "
                                     f"on cuda:{self.kernel.device}")
                self._lr = np.uint64(arrays.data_ptr(lr_source))
            self._lr_source = lr_source  # held: the kernels read it

    def _sync_per_tensor(self, stream) -> None:
        values = self.per_tensor
        if values.size == 0 or self.kernel.info.capturable:  # the device computes them
            return
        current = values.tobytes()
        if current != self._uploaded:
            if values.shape != self._per_tensor_dev.shape:
                raise ValueError(f"{self.rule.name}: per_tensor has shape {values.shape}, "
                                 f"expected {self._per_tensor_dev.shape}")
            upload(self._per_tensor_dev, values, stream)
            self._uploaded = current

    def __call__(self, scalars: Sequence[float]) -> None:
        if len(scalars) != len(self._pack):
            raise ValueError(f"{self.rule.name}: {len(scalars)} scalars given, expected "
                             f"{len(self._pack)} ({', '.join(self.rule.scalar_names)})")
        if self.n_chunks == 0 and self.kernel.prepare is None:
            return
        values = tuple(pack(v) for pack, v in zip(self._pack, scalars, strict=True))
        info = self.kernel.info
        args = self._tables + ((self._lr,) if info.capturable else ()) + values
        cp = _cupy()
        stream, torch_stream = self._stream()
        capturing = stream.is_capturing()
        if capturing:
            self._check_capture()
        with contextlib.ExitStack() as scope:
            if cp.cuda.runtime.getDevice() != self.kernel.device:
                scope.enter_context(cp.cuda.Device(self.kernel.device))
            if stream.ptr != self._last.ptr:
                self._switch(stream, torch_stream)
            self._order.last = stream
            scope.enter_context(stream)
            for dst, src in self._pending:
                upload(dst, src, stream)
            self._pending = []
            addresses = self._ptrs.tobytes()
            if addresses != self._uploaded_ptrs:
                if capturing:  # torch's recipe: backward made the gradients in the graph's pool
                    staging = np.frombuffer(self._capture_staging, np.uint8, len(addresses))
                    staging[...] = np.frombuffer(addresses, np.uint8)
                    self._tables[0].data.copy_from_host_async(
                        ctypes.c_void_p(staging.ctypes.data), len(addresses), stream)
                    self._uploaded_ptrs = None  # the graph's copy is not run now: eager steps
                    #                             upload the table again
                else:
                    upload(self._tables[0], self._ptrs, stream)
                    self._uploaded_ptrs = addresses
            self._sync_per_tensor(stream)
            if self.kernel.prepare is not None:
                n = len(self.held)
                self.kernel.prepare(
                    (-(-n // info.prepare_block),), (info.prepare_block,),
                    (np.uint64(arrays.data_ptr(self.steps)), self._per_tensor_dev, self._lr,
                     np.int32(n), *self._inputs))
            for function in self.kernel.functions if self.n_chunks else ():
                function(self._grid, self._block, args)

    def _check_capture(self) -> None:
        """Raise unless this call can be captured in a CUDA graph, and keep what the graph will
        read alive."""
        if not self.kernel.info.capturable:
            raise RuntimeError(
                f"{self.rule.name}: a step captured in a CUDA graph needs capturable=True (step "
                "counts, per-tensor values and a tensor lr then live on the device; otherwise "
                "every replay would repeat the captured step's)")
        if self._pending:
            raise RuntimeError(
                f"{self.rule.name}: the first step of new tables uploads them, which a captured "
                "step cannot do: run a step before capturing (torch's warm-up)")
        if not any(entry[0] is self and entry[1] is self._lr_source for entry in _CAPTURED):
            _CAPTURED.append((self, self._lr_source))

    def __del__(self) -> None:
        # The tables go back to the home stream's pool: order their reuse there after the
        # kernels queued on every other stream (nothing to do when the process is exiting).
        try:
            cp = _cupy()
            if self._home.is_capturing():
                return
            for stream in self._streams.values():
                if stream.ptr != self._home.ptr and not stream.is_capturing():
                    event = cp.cuda.Event(block=False, disable_timing=True)
                    event.record(stream)
                    self._home.wait_event(event)
        except Exception:  # noqa: BLE001 - interpreter shutdown, a lost device
            pass
