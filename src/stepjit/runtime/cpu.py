"""The LLVM backend: rules compiled for the host CPU with llvmlite, run through ctypes.

compile:  lower (codegen.llvm) -> parse -> optimize (new pass manager, O3, host CPU) ->
          object code -> loaded into one MCJIT engine. Object code is cached in memory and on
          disk (`DiskCache`), keyed by the rule's text, the target and the library versions.
launch:   one native call per (group, dtype combination) over a table of every tensor, split
          into chunks; a large launch (PARALLEL_MIN elements or more) is split across threads:
          - once torch is imported, those of torch's OpenMP team (`omp.py`): its workers spin on
            the cores after each torch op, and a second pool would compete with them;
          - otherwise a persistent thread pool of stepjit's own (ctypes releases the GIL during
            the call), as in a forked child, where the parent's OpenMP team is unusable.

Environment:
    STEPJIT_NUM_THREADS      threads a step may use (default: every core this process may run
                             on); on torch's team, at most torch's thread count.
    STEPJIT_THREADS_BACKEND  whose threads a large launch runs on: "omp" (an OpenMP team whenever
                             libgomp is loaded, torch imported or not), "pool" (stepjit's own);
                             unset: the team when torch is imported and libgomp is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import sys
import threading
import time
import weakref
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm
import numpy as np

from .._version import __version__
from ..codegen import llvm as codegen
from ..ir import UpdateRule
from . import arrays, omp
from . import cache as kcache
from .backend import Backend, Launch, cells_of, expected_bytes

log = logging.getLogger("stepjit")

CHUNK = 1 << 15  # elements per chunk: the unit of work split across threads
PARALLEL_MIN = 1 << 19  # launches over fewer elements run in the calling thread
KERNEL_CFUNC = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 6, ctypes.c_int64, ctypes.c_int64)


class CompileError(RuntimeError):
    """Raised when generated code cannot be compiled or loaded safely."""


# -- the host target -------------------------------------------------------------------------
@dataclass(frozen=True)
class HostTarget:
    triple: str
    cpu: str
    features: str

    @property
    def f16_native(self) -> bool:
        """Whether LLVM converts half precision without library calls on this target."""
        if self.triple.startswith(("x86_64", "i686", "i386")):
            return "+f16c" in self.features.split(",")
        return self.triple.startswith(("aarch64", "arm64"))

    @property
    def description(self) -> str:
        return f"{self.triple} {self.cpu} {self.features}"


@cache
def host_target() -> HostTarget:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return HostTarget(
        llvm.get_process_triple(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    )


def _new_target_machine() -> llvm.TargetMachine:
    t = host_target()
    target = llvm.Target.from_triple(t.triple)
    return target.create_target_machine(cpu=t.cpu, features=t.features, opt=3, jit=True)


# For compiling. An MCJIT engine takes ownership of (and frees) the target machine it is given,
# so every engine gets a fresh one of its own instead of this shared instance.
_target_machine = cache(_new_target_machine)


def _fingerprint() -> str:
    """Changes whenever the code generator's source does (so a stale cache is never loaded)."""
    src = Path(codegen.__file__).read_bytes()
    return hashlib.sha256(src + __version__.encode() + llvmlite.__version__.encode()).hexdigest()


# -- the C math library, for the JIT ------------------------------------------------------------
@cache
def register_libm_symbols() -> tuple[str, ...]:
    """Give the JIT the addresses of the C math functions kernels may call (LLVM lowers exp, log
    and tanh to calls of expf, logf, tanhf, exp, log and tanh: `codegen.LIBM_SYMBOLS`), as this
    process's C library provides them. Returns the names registered; one the library lacks stays
    unresolved, and `_safe` refuses a kernel that needs it."""
    registered = []
    for name in codegen.LIBM_SYMBOLS:
        function = _c_function(name)
        if function is not None:
            llvm.add_symbol(name, ctypes.cast(function, ctypes.c_void_p).value)
            registered.append(name)
    return tuple(registered)


def _c_function(name: str):
    """The C function `name` of this process, else of the C math library; None if neither."""
    for library in ("process", "libm"):
        function = getattr(_c_library(library), name, None)
        if function is not None:
            return function
    return None


@cache
def _c_library(which: str) -> ctypes.CDLL | None:
    """This process's own symbols ("process") or the C math library ("libm"), kept loaded."""
    path = None if which == "process" else ctypes.util.find_library("m")
    if which == "libm" and path is None:
        return None
    try:
        return ctypes.CDLL(path)
    except (OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None


# -- compile stages (also used by `stepjit dump`) -----------------------------------------------
@dataclass
class Timings:
    """Seconds spent in each compile phase."""

    lower: float = 0.0
    parse: float = 0.0
    optimize: float = 0.0
    codegen: float = 0.0
    load: float = 0.0
    disk: float = 0.0

    def total(self) -> float:
        return self.lower + self.parse + self.optimize + self.codegen + self.load + self.disk


def lower_text(rule: UpdateRule, f16_native: bool | None = None) -> str:
    """The rule's kernels as LLVM IR text, before optimization."""
    t = host_target()
    module = codegen.lower(rule, f16_native=t.f16_native if f16_native is None else f16_native)
    module.triple = t.triple
    module.data_layout = str(_target_machine().target_data)
    return str(module)


def parse(ir_text: str) -> llvm.ModuleRef:
    """Parse and verify LLVM IR text."""
    mod = llvm.parse_assembly(ir_text)
    mod.verify()
    return mod


def run_passes(mod: llvm.ModuleRef) -> llvm.ModuleRef:
    """Optimize a module in place (O3 for the host CPU, loop and SLP vectorization)."""
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(_target_machine(), pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def optimize(ir_text: str) -> llvm.ModuleRef:
    """Parse and optimize (O3 for the host CPU) LLVM IR text."""
    return run_passes(parse(ir_text))


def assembly(rule: UpdateRule, f16_native: bool | None = None) -> str:
    """The rule's kernels as host assembly."""
    return _target_machine().emit_assembly(optimize(lower_text(rule, f16_native)))


# -- the backend ---------------------------------------------------------------------------------
@dataclass
class CPUKernel:
    rule: UpdateRule
    update: object  # ctypes function
    reduce: object | None
    timings: Timings = field(default_factory=Timings)
    source: str = "compiled"  # "compiled", "disk" or "memory"
    engine: object = None  # the MCJIT engine holding its code: kept alive while the kernel is


class LLVMBackend(Backend):
    """Host arrays, through LLVM. One per process (see `select.py`)."""

    name = "llvm"

    def __init__(self, f16_native: bool | None = None) -> None:
        register_libm_symbols()
        self.target = host_target()
        self.f16_native = self.target.f16_native if f16_native is None else f16_native
        self._lock = threading.Lock()
        self._kernels: dict[str, CPUKernel] = {}
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _new_target_machine())
        _BACKENDS.add(self)
        self._disk = kcache.DiskCache("llvm", ".o")
        self._fingerprint = _fingerprint()

    def cache_key(self, rule: UpdateRule) -> str:
        h = hashlib.sha256()
        for part in (rule.text, self.target.description, str(self.f16_native), self._fingerprint):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:40]

    def compile(self, rule: UpdateRule) -> CPUKernel:
        key = self.cache_key(rule)
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is not None:
                kcache.record(memory_hits=1)
                return kernel
            kernel = self._build(rule, key)
            self._kernels[key] = kernel
            return kernel

    def _build(self, rule: UpdateRule, key: str) -> CPUKernel:
        timings = Timings()
        t0 = time.perf_counter()
        obj = self._disk.get(key)
        if obj is not None and not self._safe(obj, rule, quiet=True):
            obj = None  # a miss: compiled again below, and the entry overwritten
        timings.disk = time.perf_counter() - t0
        source = "disk"
        if obj is None:
            source = "compiled"
            obj = self._compile_object(rule, timings)
            if self._safe(obj, rule, quiet=False):
                self._disk.put(key, obj)
        t0 = time.perf_counter()
        self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        update_name, reduce_name = codegen.kernel_names(rule)
        addresses = [self._engine.get_function_address(n) for n in (update_name, reduce_name) if n]
        if not all(addresses):
            raise CompileError(f"kernel {rule.name}: its object code does not define "
                               f"{update_name} and {reduce_name or 'no reduce kernel'}")
        update = KERNEL_CFUNC(addresses[0])
        reduce = KERNEL_CFUNC(addresses[1]) if reduce_name else None
        timings.load = time.perf_counter() - t0
        seconds = timings.total()
        if source == "disk":
            kcache.record(disk_hits=1, seconds=seconds)
        else:
            kcache.record(compiles=1, seconds=seconds)
        log.debug(
            "llvm %s %s: lower %.2f ms, parse %.2f ms, optimize %.2f ms, codegen %.2f ms, "
            "load %.2f ms, disk %.2f ms", source, rule.name, *(1e3 * x for x in (
                timings.lower, timings.parse, timings.optimize, timings.codegen, timings.load,
                timings.disk)),
        )
        dump_dir = os.environ.get("STEPJIT_DUMP_DIR")
        if dump_dir:
            _dump(Path(dump_dir), rule, self.f16_native)
        return CPUKernel(rule, update, reduce, timings, source, self._engine)

    def _compile_object(self, rule: UpdateRule, timings: Timings) -> bytes:
        t0 = time.perf_counter()
        text = lower_text(rule, self.f16_native)
        t1 = time.perf_counter()
        mod = parse(text)
        t2 = time.perf_counter()
        run_passes(mod)
        t3 = time.perf_counter()
        obj = _target_machine().emit_object(mod)
        t4 = time.perf_counter()
        timings.lower, timings.parse = t1 - t0, t2 - t1
        timings.optimize, timings.codegen = t3 - t2, t4 - t3
        return obj

    def _safe(self, obj: bytes, rule: UpdateRule, quiet: bool) -> bool:
        """Whether the JIT may load `obj` and the disk cache may keep it: an object file of this
        host whose structure checks out (`check_object`), that defines exactly the rule's kernels
        and needs no symbol this process lacks (the JIT would crash on either).

        quiet: `obj` was read from the disk cache; any problem returns False (a miss). Otherwise
        `obj` is new from LLVM: an unresolvable symbol raises CompileError, and False only means
        that it is not stored on disk (its structure is not one the checks accept).
        """
        origin = "cached" if quiet else "new"
        try:
            missing = [name for name in undefined_symbols(obj) if not llvm.address_of_symbol(name)]
            if missing and not quiet:
                raise CompileError(
                    f"kernel {rule.name} needs symbols this process does not provide: "
                    f"{', '.join(missing)} (is the target missing a CPU feature such as F16C?)"
                )
            elf = check_object(obj)
        except kcache.MalformedEntry as exc:
            log.debug("%s object code of %s refused: %s", origin, rule.name, exc)
            return False
        exported = {s.name: s for s in elf.symbols if s.defined and s.bind != kcache.STB_LOCAL}
        wanted = {name for name in codegen.kernel_names(rule) if name}
        not_code = [s.name for s in exported.values() if s.type != kcache.STT_FUNC or not s.size
                    or s.section >= len(elf.sections)
                    or not elf.sections[s.section].flags & kcache.SHF_EXECINSTR]
        if missing:
            problem = f"needs {', '.join(missing)}"
        elif exported.keys() != wanted:
            problem = f"defines {sorted(exported)}, not {sorted(wanted)}"
        elif not_code:
            problem = f"{', '.join(not_code)} is not a function in a code section"
        else:
            return True
        log.debug("%s object code of %s refused: %s", origin, rule.name, problem)
        return False

    def bind(self, kernel: CPUKernel, tensors: list[tuple], per_tensor: np.ndarray) -> Launch:
        return CPULaunch(kernel, tensors, per_tensor)


def _dump(directory: Path, rule: UpdateRule, f16_native: bool) -> None:
    """STEPJIT_DUMP_DIR: every stage of a kernel, named as `stepjit dump --out` names them."""
    from .select import BACKENDS  # each stage's file suffix

    directory.mkdir(parents=True, exist_ok=True)
    text = lower_text(rule, f16_native)
    optimized = optimize(text)
    stages = {"ir": rule.text + "\n", "llvm": text, "llvm-opt": str(optimized),
              "asm": _target_machine().emit_assembly(optimized)}
    for stage, suffix in BACKENDS["llvm"].stages.items():
        (directory / f"{rule.name}{suffix}").write_text(stages[stage])


# -- the launch table ---------------------------------------------------------------------------
def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class CPULaunch(Launch):
    """A compiled rule bound to a fixed list of host tensors (the tables live here)."""

    def __init__(self, kernel: CPUKernel, tensors: list[tuple], per_tensor: np.ndarray) -> None:
        rule = kernel.rule
        super().__init__(rule, tensors, per_tensor)
        self.kernel = kernel
        if per_tensor.dtype != np.float64 or not per_tensor.flags.c_contiguous:
            raise ValueError("per_tensor must be a C-contiguous float64 array")
        n = len(tensors)
        self._ptrs = np.array(
            [[arrays.data_ptr(a) for a in t] for t in tensors], dtype=np.uintp
        ).reshape(n, len(rule.slots))
        numel = np.array([arrays.numel(t[0]) for t in tensors], dtype=np.int64)
        check_sizes(rule, tensors, numel)
        self._numel = numel
        self._chunks, self._tchunks = chunk_table(numel)
        n_chunks = len(self._chunks)
        self._partials = np.zeros(max(1, n_chunks * len(rule.reductions)))
        self._scalars = np.zeros(max(1, len(rule.scalars)))
        self._scalar_cells = memoryview(self._scalars)  # written without numpy's call overhead
        self._args = tuple(
            _addr(a) for a in (self._ptrs, self._chunks, self._tchunks, self._partials,
                               per_tensor, self._scalars)
        )
        self._parallel = bool(numel.sum() >= PARALLEL_MIN)
        self.parts = _split(self._chunks, num_threads() if self._parallel else 1)  # the pool's
        self.team: TeamSplit | None = None  # the split for torch's OpenMP team, once used

    can_repoint = True

    def repoint(self, slot: str, rows: Sequence[int], tensors: Sequence) -> None:
        k = self._hold(slot, rows, tensors, self._numel)
        self._ptrs[list(rows), k] = [arrays.data_ptr(a) for a in tensors]

    def calls_key(self) -> int:
        return _team_threads() if self._parallel else 0

    def native_calls(self) -> list[tuple[int, ...]] | None:
        threads = self.calls_key()
        if not self._parallel:
            lo, hi = self.parts[0]
            return [(0, ctypes.cast(f, ctypes.c_void_p).value, *self._args, lo, hi)
                    for f in (self.kernel.reduce, self.kernel.update) if f is not None]
        if not threads:
            return None  # stepjit's own pool: Python threads
        if self.team is None or self.team.threads != threads:
            self.team = TeamSplit(self.kernel, self._args, self._chunks, threads)
        return self.team.native_calls()

    def set_scalars(self, scalars: Sequence[float]) -> None:
        if scalars:
            self._scalar_cells[: len(scalars)] = array("d", scalars)

    def table_cells(self, slot: str, rows: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        return cells_of(self._ptrs, rows, self._repoint_check(slot, rows, nbytes, self._numel))

    def __call__(self, scalars: Sequence[float]) -> None:
        self.set_scalars(scalars)
        threads = _team_threads() if self._parallel else 0
        if threads:
            if self.team is None or self.team.threads != threads:
                self.team = TeamSplit(self.kernel, self._args, self._chunks, threads)
            self.team()
            return
        if self.kernel.reduce is not None:
            _run_parts(self.kernel.reduce, self._args, self.parts)
        _run_parts(self.kernel.update, self._args, self.parts)


TEAM_PART = 8 * CHUNK  # elements of one part of a team launch


class TeamSplit:
    """A launch's chunks split for `threads` threads of an OpenMP team, and the work handed to
    it: the reduce pass, if any, then the update pass, one team (one barrier) each.

    Parts of about TEAM_PART elements go to the threads in turn (thread t takes parts t,
    t + threads, ...), so that the team sweeps memory in order, together, as torch's own kernels
    do: right after backward, the gradients written last are still in the caches, and halves
    taken from both ends would evict them before they are read."""

    def __init__(self, kernel: CPUKernel, args: tuple, chunks: np.ndarray, threads: int) -> None:
        self.threads = threads
        total = int((chunks[:, 2] - chunks[:, 1]).sum())
        rounds = max(1, -(-total // (TEAM_PART * threads)))
        self.parts = _split(chunks, threads * rounds)
        bounds = np.array([lo for lo, _ in self.parts] + [self.parts[-1][1]], np.int64)
        functions = [f for f in (kernel.reduce, kernel.update) if f is not None]
        alone = threads == 1 or len(self.parts) == 1  # no team: the calling thread does all
        self._serial = [(f, args) for f in functions] if alone else []
        self._all = (self.parts[0][0], self.parts[-1][1])
        self._work = [] if self._serial else [
            omp.Work(ctypes.cast(f, ctypes.c_void_p).value, args, bounds) for f in functions]

    def native_calls(self) -> list[tuple[int, ...]]:
        """These passes as `runtime.repoint` rows: (0, kernel, tables..., chunks) run in the
        calling thread, or (1, GOMP_parallel, body, work, threads) on the team."""
        rows = [(0, ctypes.cast(f, ctypes.c_void_p).value, *args, *self._all)
                for f, args in self._serial]
        threads = min(self.threads, len(self.parts))
        rows += [(1, *omp.native_call(work, threads), 0, 0, 0, 0, 0) for work in self._work]
        return rows

    def __call__(self) -> None:
        for function, args in self._serial:  # one thread, or one part: no team
            function(*args, *self._all)
        for work in self._work:
            omp.run(work, min(self.threads, len(self.parts)))


def check_sizes(rule: UpdateRule, tensors: list[tuple], numel: np.ndarray) -> None:
    """Raise ValueError unless every array of every tensor spans exactly the bytes the kernel
    will touch: `numel` elements of its slot's dtype (a per-block slot: one per block). The last
    line of defence: the optimizer checks shapes, dtypes and layouts first and names the
    culprit."""
    nbytes = np.array([[arrays.numel(a) * arrays.itemsize(a) for a in t] for t in tensors],
                      np.int64).reshape(len(tensors), len(rule.slots))
    want = expected_bytes(rule, numel)
    bad = np.argwhere(nbytes != want)
    if len(bad):
        i, k = bad[0]
        raise ValueError(f"{rule.name}: tensor {i}, slot {rule.slots[k].name}: "
                         f"{nbytes[i, k]} bytes where the kernel expects {want[i, k]}")


def chunk_table(numel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n_chunks, 3] tensor/begin/end, [n_tensors, 2] first chunk/count), no Python loop."""
    counts = np.maximum(1, -(-numel // CHUNK))
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    tensor = np.repeat(np.arange(len(numel), dtype=np.int64), counts)
    begin = (np.arange(len(tensor), dtype=np.int64) - first[tensor]) * CHUNK
    end = np.minimum(begin + CHUNK, numel[tensor])
    chunks = np.ascontiguousarray(np.stack([tensor, begin, end], axis=1), dtype=np.int64)
    tchunks = np.ascontiguousarray(np.stack([first, counts], axis=1), dtype=np.int64)
    return chunks, tchunks


def _split(chunks: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous chunk ranges holding about equal numbers of elements."""
    if parts <= 1 or len(chunks) <= 1:
        return [(0, len(chunks))]
    cum = np.cumsum(chunks[:, 2] - chunks[:, 1])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts)
    bounds = np.unique(np.concatenate(([0], cuts, [len(chunks)])))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# -- threads -----------------------------------------------------------------------------------
@cache
def num_threads() -> int:
    """STEPJIT_NUM_THREADS, else every core this process may run on."""
    env = os.environ.get("STEPJIT_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"STEPJIT_NUM_THREADS={env!r}: expected a positive integer "
                             "(the number of threads a step may use)")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@cache
def threads_backend() -> str:
    """STEPJIT_THREADS_BACKEND: "omp", "pool", or "auto" when unset (see the module's doc)."""
    env = os.environ.get("STEPJIT_THREADS_BACKEND", "") or "auto"
    if env not in ("omp", "pool", "auto"):
        raise ValueError(f"STEPJIT_THREADS_BACKEND={env!r}: expected 'omp' (torch's OpenMP "
                         "threads) or 'pool' (stepjit's own), or unset")
    return env


def _team_threads() -> int:
    """How many threads of an OpenMP team a large launch runs on: torch's thread count, at most
    `num_threads()`; 0 for stepjit's own pool instead. A process without torch never touches
    OpenMP unless STEPJIT_THREADS_BACKEND=omp asks for it."""
    backend = threads_backend()
    if _forked or backend == "pool" or (backend == "auto" and "torch" not in sys.modules):
        return 0
    if not omp.available():
        return 0
    return max(1, min(omp.max_threads(), num_threads()))


_forked = False  # this process was forked: its OpenMP team, if any, is its parent's


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, num_threads() - 1), thread_name_prefix="stepjit")


def _after_fork_in_child() -> None:
    # A forked child inherits the pool's bookkeeping but none of its threads: work submitted to
    # it would wait forever. The child starts a pool of its own when it first needs one.
    # libgomp has the same flaw and no such remedy (a child whose parent ran a team hangs in its
    # first parallel region): a forked child never runs a launch on OpenMP (`_team_threads`).
    global _forked
    _forked = True
    _pool.cache_clear()
    num_threads.cache_clear()  # the child may run on other cores
    for backend in _BACKENDS:  # another thread may have been compiling: its lock is stale
        backend._lock = threading.Lock()


_BACKENDS: weakref.WeakSet = weakref.WeakSet()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _run_parts(fn, args: tuple, parts: list[tuple[int, int]]) -> None:
    if len(parts) == 1:
        fn(*args, *parts[0])
        return
    futures = [_pool().submit(fn, *args, lo, hi) for lo, hi in parts[1:]]
    try:
        fn(*args, *parts[0])
    finally:  # whatever happens here, no worker is still writing when this returns or raises
        for f in futures:
            f.result()


# -- object files ------------------------------------------------------------------------------
# The relocation types of the large code model, which JIT objects use, and the bytes each patches:
# absolute addresses, and on AArch64 calls (given a stub when out of reach). Other types could
# overflow their field, which LLVM builds with assertions abort on; an object that has them is
# compiled again rather than cached on disk.
_X86_64_RELOCATIONS = {1: 8}  # R_X86_64_64
_AARCH64_RELOCATIONS = {
    257: 8,  # R_AARCH64_ABS64
    **dict.fromkeys((264, 266, 268, 269), 4),  # R_AARCH64_MOVW_UABS_G0_NC, G1_NC, G2_NC, G3
    **dict.fromkeys((282, 283), 4),  # R_AARCH64_JUMP26, R_AARCH64_CALL26
}
_EM_X86_64, _EM_AARCH64 = 62, 183
_SHF_X86_64_LARGE = 0x10000000  # sections of the large code model (.ltext)
_NOT_ELF = ("apple", "darwin", "macos", "ios", "windows", "win32", "aix")


@cache
def object_rules() -> kcache.ElfRules | None:
    """What object code for this host must look like to be loaded from the disk cache: an ELF
    relocatable file for this machine with only the sections, symbols and relocations LLVM emits
    for kernels. None where objects are not ELF or the machine is not x86-64 or AArch64: there
    object code is not checked, so it is never stored on disk."""
    triple = host_target().triple
    arch = triple.partition("-")[0]
    if any(name in triple for name in _NOT_ELF):
        return None
    if arch == "x86_64":
        machine, relocations, extra_flags = _EM_X86_64, _X86_64_RELOCATIONS, _SHF_X86_64_LARGE
    elif arch in ("aarch64", "arm64"):
        machine, relocations, extra_flags = _EM_AARCH64, _AARCH64_RELOCATIONS, 0
    else:
        return None
    return kcache.ElfRules(
        file_type=kcache.ET_REL,
        machine=machine,
        section_types=frozenset({kcache.SHT_NULL, kcache.SHT_PROGBITS, kcache.SHT_SYMTAB,
                                 kcache.SHT_STRTAB, kcache.SHT_RELA, kcache.SHT_NOBITS}),
        section_flags=(kcache.SHF_WRITE | kcache.SHF_ALLOC | kcache.SHF_EXECINSTR
                       | kcache.SHF_MERGE | kcache.SHF_STRINGS | kcache.SHF_INFO_LINK
                       | extra_flags),
        forbidden_sections=frozenset({".eh_frame"}),  # RuntimeDyld would register its contents
        relocation_sizes=relocations,
        symbol_types=frozenset({kcache.STT_NOTYPE, kcache.STT_OBJECT, kcache.STT_FUNC,
                                kcache.STT_SECTION, kcache.STT_FILE}),
        symbol_binds=frozenset({kcache.STB_LOCAL, kcache.STB_GLOBAL}),
        absolute_types=frozenset({kcache.STT_FILE}),
    )


def check_object(obj: bytes) -> kcache.ElfFile:
    """`obj` parsed, if it is object code the JIT can be given for this host (see `object_rules`
    and `stepjit.runtime.cache.read_elf`); raises `MalformedEntry` saying why not otherwise."""
    rules = object_rules()
    if rules is None:
        raise kcache.MalformedEntry(f"object code for {host_target().triple} is not checked")
    return kcache.read_elf(obj, rules)


def undefined_symbols(obj: bytes) -> list[str]:
    """Names an ELF64 object file needs from elsewhere. Only its ELF structure is checked
    (`MalformedEntry` otherwise, for other formats too); `check_object` checks the rest."""
    structure = kcache.ElfRules(file_type=kcache.ET_REL, machine=None)
    return [s.name for s in kcache.read_elf(obj, structure).symbols[1:] if not s.defined]
