"""Run generated CUDA kernels on the host: compiled by g++ with cuda_host.h, called by ctypes.

    lib = HostLibrary.start([rule, (rule, formulas), ...], workdir, name).finish()
    out = lib.run(rule, tensors, per_tensor, scalars)   # the same launches as the CUDA backend
    out = lib.run(rule, tensors, per_tensor, scalars, capturable=True, lr_source=lr)
    values = lib.prepare(rule, steps, inputs, lr_source=lr)  # the capturable prepare kernel

An entry `rule` compiles the plain kernels of `rule`; an entry `(rule, formulas)` its capturable
variant (`formulas`: the optimizer's `tensor_formulas()`); one library may hold both. Every
kernel has a host entry point `run_<kernel>(unsigned grid, <the kernel's own parameters>)` that
launches `grid` blocks of it on the emulated device: the kernels of `info.kernels` with
`info.block` threads per block, prepare with `info.prepare_block`. `run` and `prepare` call
them as the CUDA backend launches the kernels.

The tables are built by `stepjit.runtime.gpu.build_tables`, the same function the CUDA backend
uses, from the host addresses of numpy arrays. Test code only.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepjit.codegen import cuda as codegen
from stepjit.ir import DType, Expr, UpdateRule
from stepjit.ir.dtypes import rounded
from stepjit.runtime import gpu
from stepjit.runtime.gpu import build_tables

HERE = Path(__file__).resolve().parent

CXX_FLAGS = (
    "-std=c++20",
    "-O1",
    "-ffp-contract=off",  # no fused multiply-add: every operation rounds, as with -fmad=false
    "-fno-fast-math",
    "-fno-strict-aliasing",
    "-Wno-unknown-pragmas",
    "-pthread",
    "-shared",
    "-fPIC",
)

_CTYPES = {
    DType.F32: ctypes.c_float,
    DType.F64: ctypes.c_double,
    DType.BOOL: ctypes.c_bool,
    DType.F16: ctypes.c_uint16,
    DType.BF16: ctypes.c_uint16,
}


def compiler() -> str | None:
    """The host C++ compiler, or None."""
    return shutil.which("g++")


def _wrapper(kernel: str, params: Sequence[tuple[str, str]], block: int) -> str:
    """A host entry point that launches `kernel` (parameters `params`) on the emulated device,
    `block` threads per block."""
    params = [(ctype.replace("const double*", "double*") if name == "chunk_partials" else ctype,
               name) for ctype, name in params]
    decl = ", ".join(f"{ctype} {name}" for ctype, name in params)
    call = ", ".join(name for _, name in params)
    return (
        f'extern "C" void run_{kernel}(unsigned grid, {decl}) {{\n'
        f"    cuda_host::launch(grid, {block}, [&] {{ {kernel}({call}); }});\n"
        "}\n"
    )


Entry = UpdateRule | tuple[UpdateRule, Mapping[str, Expr]]
"""A rule (its plain kernels) or a rule and its per-tensor formulas (its capturable variant)."""


def _variant(entry: Entry) -> tuple[UpdateRule, Mapping[str, Expr] | None]:
    return (entry, None) if isinstance(entry, UpdateRule) else entry


def _pointer(array: np.ndarray | None, dtype: type) -> ctypes.c_void_p:
    """The address of `array` (of `dtype`, contiguous), or a null pointer for None."""
    if array is None:
        return ctypes.c_void_p(None)
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise TypeError(f"expected a contiguous {np.dtype(dtype)} array, got {array.dtype}")
    return ctypes.c_void_p(array.ctypes.data)


@dataclass
class Result:
    """What one run produced (arrays are the caller's, updated in place)."""

    partials: np.ndarray  # chunk_partials after the launches
    n_chunks: int


class HostLibrary:
    """Kernels of several rules compiled into one host shared library."""

    def __init__(self, path: Path, variants: Mapping[tuple[str, bool], codegen.KernelInfo]) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.variants = dict(variants)  # (rule key, capturable) -> its kernels
        self.infos = {key: info for (key, capturable), info in variants.items() if not capturable}

    def info(self, rule: UpdateRule, capturable: bool = False) -> codegen.KernelInfo:
        """The kernels of `rule` in this library, plain or capturable."""
        return self.variants[(rule.key, capturable)]

    @classmethod
    def source(cls, entries: Sequence[Entry], **geometry) -> str:
        parts = []
        for rule, formulas in map(_variant, entries):
            info = codegen.describe(rule, capturable=formulas, **geometry)
            parts.append(gpu.render(rule, capturable=formulas, **geometry))
            parts += [_wrapper(kernel, info.params, info.block) for kernel in info.kernels]
            if info.prepare:
                parts.append(_wrapper(info.prepare, info.prepare_params, info.prepare_block))
        return "\n".join(parts)

    @classmethod
    def start(cls, entries: Sequence[Entry], workdir: Path, name: str, **geometry):
        """Start compiling in the background; `finish()` the returned handle."""
        workdir.mkdir(parents=True, exist_ok=True)
        src = workdir / f"{name}.cpp"
        out = workdir / f"{name}.so"
        src.write_text(cls.source(entries, **geometry))
        cmd = [compiler(), *CXX_FLAGS, "-include", str(HERE / "cuda_host.h"),
               "-I", str(HERE / "include"), str(src), "-o", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        variants = {(rule.key, formulas is not None):
                    codegen.describe(rule, capturable=formulas, **geometry)
                    for rule, formulas in map(_variant, entries)}
        return _Pending(proc, out, variants)

    def run(
        self,
        rule: UpdateRule,
        tensors: Sequence[Mapping[str, np.ndarray]],
        per_tensor: np.ndarray,
        scalars: Mapping[str, float],
        partials: np.ndarray | None = None,
        kernels: Sequence[str] | None = None,
        *,
        capturable: bool = False,
        lr_source: np.ndarray | None = None,
    ) -> Result:
        """Launch the rule's kernels over `tensors` (slot name -> 1-D array, updated in place;
        a per-block slot's array holds `Slot.length(numel)` values).

        `kernels`: the kernels to launch, in order; by default `info.kernels`, as the backend
        does. Leaving out the partial-sum kernel makes the others read `partials` as given.
        `capturable`: launch the capturable variant, with `lr_source` (a float32 array whose
        first element is the learning rate on the device, or None: a null pointer); `scalars`
        then gives lr_arg as "lr".
        """
        info = self.info(rule, capturable)
        slots = [s.name for s in rule.slots]
        tables = build_tables(
            [[t[s].ctypes.data for s in slots] for t in tensors],
            [t[rule.numel_slot.name].size for t in tensors],  # per-block slots hold fewer
            info.chunk,
        )
        pt = np.zeros((max(1, len(tensors)), info.n_per_tensor))
        pt[: per_tensor.shape[0], : per_tensor.shape[1]] = per_tensor
        if partials is None:
            partials = np.full((max(1, tables.n_chunks), info.n_reductions), np.nan)
        chunks = np.ascontiguousarray(tables.chunks)
        args = [
            ctypes.c_void_p(tables.ptrs.ctypes.data),
            ctypes.c_void_p(tables.numel.ctypes.data),
            ctypes.c_void_p(chunks.ctypes.data),
            ctypes.c_void_p(pt.ctypes.data),
            ctypes.c_void_p(partials.ctypes.data),
        ]
        if capturable:
            args.append(_pointer(lr_source, np.float32))
        for name, dtype in rule.scalars:
            value = scalars[name]
            if dtype.is_half:
                bits = np.asarray(rounded(np.float64(value), dtype)).view(np.uint16)
                args.append(ctypes.c_uint16(int(bits)))
            else:
                args.append(_CTYPES[dtype](value))
        if tables.n_chunks:
            grid = ctypes.c_uint(tables.n_chunks)
            for kernel in info.kernels if kernels is None else kernels:
                getattr(self.lib, f"run_{kernel}")(grid, *args)
        return Result(partials=partials, n_chunks=tables.n_chunks)

    def prepare(
        self,
        rule: UpdateRule,
        steps: np.ndarray,
        inputs: Mapping[str, float],
        lr_source: np.ndarray | None = None,
    ) -> np.ndarray:
        """Launch the prepare kernel of `rule`'s capturable variant for `steps.size` tensors:
        `steps` (float32 step counts) is incremented in place, and the per-tensor values it
        computes are returned, [tensors, n_per_tensor] as the launch table holds them.
        `inputs` gives the formulas' scalars by name (lr_arg as "lr")."""
        info = self.info(rule, capturable=True)
        n = steps.size
        values = np.full((max(1, n), info.n_per_tensor), np.nan)
        args = [_pointer(steps, np.float32), ctypes.c_void_p(values.ctypes.data),
                _pointer(lr_source, np.float32), ctypes.c_int(n),
                *(ctypes.c_double(inputs[name]) for name in info.prepare_inputs)]
        grid = -(-n // info.prepare_block)
        if grid:
            getattr(self.lib, f"run_{info.prepare}")(ctypes.c_uint(grid), *args)
        return values[:n]


@dataclass
class _Pending:
    proc: subprocess.Popen
    out: Path
    variants: dict

    def finish(self) -> HostLibrary:
        log, _ = self.proc.communicate()
        if self.proc.returncode:
            raise RuntimeError(f"g++ failed on the generated kernels:\n{log[-20000:]}")
        return HostLibrary(self.out, self.variants)
