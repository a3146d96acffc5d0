"""Run generated CUDA kernels on the host: compiled by g++ with cuda_host.h, called by ctypes.

    lib = HostLibrary.start([rule, ...], workdir, name).finish()  # one library, many rules
    out = lib.run(rule, tensors, per_tensor, scalars)   # the same launches as the CUDA backend

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
from stepjit.ir import DType, UpdateRule
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


def _wrapper(info: codegen.KernelInfo, kernel: str) -> str:
    """A host entry point that launches `kernel` on the emulated device."""
    params = [(ctype.replace("const double*", "double*") if name == "chunk_partials" else ctype,
               name) for ctype, name in info.params]
    decl = ", ".join(f"{ctype} {name}" for ctype, name in params)
    call = ", ".join(name for _, name in params)
    return (
        f'extern "C" void run_{kernel}(unsigned grid, {decl}) {{\n'
        f"    cuda_host::launch(grid, {info.block}, [&] {{ {kernel}({call}); }});\n"
        "}\n"
    )


@dataclass
class Result:
    """What one run produced (arrays are the caller's, updated in place)."""

    partials: np.ndarray  # chunk_partials after the launches
    n_chunks: int


class HostLibrary:
    """Kernels of several rules compiled into one host shared library."""

    def __init__(self, path: Path, infos: Mapping[str, codegen.KernelInfo]) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.infos = dict(infos)

    @classmethod
    def source(cls, rules: Sequence[UpdateRule], **geometry) -> str:
        parts = []
        for rule in rules:
            info = codegen.describe(rule, **geometry)
            parts.append(gpu.render(rule, **geometry))
            parts.append(_wrapper(info, info.update))
            if info.partial_sums:
                parts.append(_wrapper(info, info.partial_sums))
        return "\n".join(parts)

    @classmethod
    def start(cls, rules: Sequence[UpdateRule], workdir: Path, name: str, **geometry):
        """Start compiling in the background; `finish()` the returned handle."""
        workdir.mkdir(parents=True, exist_ok=True)
        src = workdir / f"{name}.cpp"
        out = workdir / f"{name}.so"
        src.write_text(cls.source(rules, **geometry))
        cmd = [compiler(), *CXX_FLAGS, "-include", str(HERE / "cuda_host.h"),
               "-I", str(HERE / "include"), str(src), "-o", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        infos = {r.key: codegen.describe(r, **geometry) for r in rules}
        return _Pending(proc, out, infos)

    def run(
        self,
        rule: UpdateRule,
        tensors: Sequence[Mapping[str, np.ndarray]],
        per_tensor: np.ndarray,
        scalars: Mapping[str, float],
        partials: np.ndarray | None = None,
        update_only: bool = False,
    ) -> Result:
        """Launch the rule's kernels over `tensors` (slot name -> 1-D array, updated in place).

        `update_only` skips the partial-sum launch: the update then reads `partials` as given.
        """
        info = self.infos[rule.key]
        slots = [s.name for s in rule.slots]
        tables = build_tables(
            [[t[s].ctypes.data for s in slots] for t in tensors],
            [t[slots[0]].size for t in tensors],
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
        for name, dtype in rule.scalars:
            value = scalars[name]
            if dtype.is_half:
                bits = np.array([value], dtype.to_numpy()).view(np.uint16)[0]
                args.append(ctypes.c_uint16(int(bits)))
            else:
                args.append(_CTYPES[dtype](value))
        if tables.n_chunks:
            grid = ctypes.c_uint(tables.n_chunks)
            if info.partial_sums and not update_only:
                getattr(self.lib, f"run_{info.partial_sums}")(grid, *args)
            getattr(self.lib, f"run_{info.update}")(grid, *args)
        return Result(partials=partials, n_chunks=tables.n_chunks)


@dataclass
class _Pending:
    proc: subprocess.Popen
    out: Path
    infos: dict

    def finish(self) -> HostLibrary:
        log, _ = self.proc.communicate()
        if self.proc.returncode:
            raise RuntimeError(f"g++ failed on the generated kernels:\n{log[-20000:]}")
        return HostLibrary(self.out, self.infos)
