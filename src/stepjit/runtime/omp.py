"""Running a launch's chunks on the OpenMP team torch already uses.

In a torch training loop, torch's OpenMP (libgomp) workers keep spinning on the cores for a while
after each parallel op, backward's included: a second thread pool competes with them for the
cores. Once torch is imported, libgomp's entry points are among the process's global symbols, so
a launch can run on torch's team instead, as one call

    GOMP_parallel(body, ctx, threads, 0)

through ctypes (which releases the GIL). `body` is a few lines of native code, written in LLVM IR
and compiled once per process, in which thread t of the team calls the kernel on chunks
[bounds[p], bounds[p + 1]) for p = t, t + team size, ...: every part runs even if libgomp gives a
smaller team than asked for. No Python runs inside the team, so no exception can cross it.

    work = Work(kernel_address, table_addresses, bounds)  # kept alive by the caller
    run(work, threads)                                     # returns once every part has run

Nothing here looks at torch or decides when to use the team: that is `cpu.py`'s policy. Never
use the team in a process forked after its parent ran one: libgomp's team stays the parent's,
and the child hangs in its first parallel region.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from functools import cache

import llvmlite.binding as llvm
import numpy as np

N_TABLES = 6  # the table addresses every kernel takes before its chunk range (see cpu.py)
BODY = "stepjit_team_body"
HELPERS = ("omp_get_thread_num", "omp_get_num_threads")  # what BODY calls


def _body_ir() -> str:
    """`void BODY(uint64_t *ctx)`; ctx holds the kernel's address, its table addresses, the
    address of the int64 bounds array and the number of parts."""
    tables = "".join(
        f"  %t{i}.at = getelementptr inbounds i64, ptr %ctx, i64 {i + 1}\n"
        f"  %t{i} = load ptr, ptr %t{i}.at\n"
        for i in range(N_TABLES)
    )
    table_args = ", ".join(f"ptr %t{i}" for i in range(N_TABLES))
    return f"""
declare i32 @omp_get_thread_num()
declare i32 @omp_get_num_threads()

define void @{BODY}(ptr %ctx) {{
entry:
  %kernel = load ptr, ptr %ctx
{tables}  %bounds.at = getelementptr inbounds i64, ptr %ctx, i64 {N_TABLES + 1}
  %bounds = load ptr, ptr %bounds.at
  %parts.at = getelementptr inbounds i64, ptr %ctx, i64 {N_TABLES + 2}
  %parts = load i64, ptr %parts.at
  %thread.32 = call i32 @omp_get_thread_num()
  %team.32 = call i32 @omp_get_num_threads()
  %thread = sext i32 %thread.32 to i64
  %team = sext i32 %team.32 to i64
  br label %next

next:
  %part = phi i64 [ %thread, %entry ], [ %after, %run ]
  %more = icmp slt i64 %part, %parts
  br i1 %more, label %run, label %done

run:
  %lo.at = getelementptr inbounds i64, ptr %bounds, i64 %part
  %lo = load i64, ptr %lo.at
  %hi.at = getelementptr inbounds i64, ptr %lo.at, i64 1
  %hi = load i64, ptr %hi.at
  call void %kernel({table_args}, i64 %lo, i64 %hi)
  %after = add i64 %part, %team
  br label %next

done:
  ret void
}}
"""


@dataclass(frozen=True)
class _Runtime:
    parallel: object  # GOMP_parallel, through ctypes
    max_threads: object  # omp_get_max_threads, through ctypes
    body: int  # the address of BODY
    engine: object  # owns BODY's code: kept alive with its address


@cache
def _runtime() -> _Runtime | None:
    """libgomp's entry points and the compiled body; None when this process has no libgomp
    among its global symbols."""
    try:
        process = ctypes.CDLL(None)
        parallel, max_threads = process.GOMP_parallel, process.omp_get_max_threads
        helpers = [getattr(process, name) for name in HELPERS]
    except (AttributeError, OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    max_threads.restype = ctypes.c_int
    for name, function in zip(HELPERS, helpers):
        llvm.add_symbol(name, ctypes.cast(function, ctypes.c_void_p).value)
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(_body_ir())
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine(jit=True)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    return _Runtime(parallel, max_threads, engine.get_function_address(BODY), engine)


def available() -> bool:
    """Whether launches can run on an OpenMP team (libgomp is loaded, its symbols global).
    Looked up once: the first call compiles BODY, or settles that there is no team."""
    return _runtime() is not None


def max_threads() -> int:
    """The size of the team torch uses (`torch.get_num_threads()`, which also sets this thread's
    OpenMP default to it); OpenMP's default for this thread when torch is not imported."""
    get = getattr(sys.modules.get("torch"), "get_num_threads", None)
    return get() if get is not None else _runtime().max_threads()


class Work:
    """One kernel over its parts, as BODY reads it (`ctx`): the kernel's address, its `N_TABLES`
    table addresses, the address of the int64 `bounds` (part p is chunks [bounds[p],
    bounds[p + 1])) and the number of parts. Holds `bounds`; the caller keeps the tables alive."""

    def __init__(self, kernel: int, tables: tuple[int, ...], bounds: np.ndarray) -> None:
        if len(tables) != N_TABLES or bounds.dtype != np.int64 or not bounds.flags.c_contiguous:
            raise ValueError(f"expected {N_TABLES} table addresses and C-contiguous int64 bounds")
        self.bounds = bounds
        self.ctx = np.array([kernel, *tables, bounds.ctypes.data, len(bounds) - 1], np.uint64)
        self.address = self.ctx.ctypes.data


def native_call(work: Work, threads: int) -> tuple[int, int, int, int]:
    """What `run(work, threads)` calls, for native code to call it: (GOMP_parallel's address,
    the body's address, the work's address, threads)."""
    runtime = _runtime()
    return (ctypes.cast(runtime.parallel, ctypes.c_void_p).value, runtime.body, work.address,
            threads)


def run(work: Work, threads: int) -> None:
    """Run every part of `work` on a team of `threads` OpenMP threads (the calling thread one of
    them); returns when all are done."""
    runtime = _runtime()
    runtime.parallel(runtime.body, work.address, threads, 0)
