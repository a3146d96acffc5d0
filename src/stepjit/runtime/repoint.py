"""Re-pointing host launch tables at new gradients in one native call.

Inside a torch training loop every gradient is new at every step (`zero_grad()` frees them and
backward makes new ones), so each step the optimizer checks a list of new addresses and writes
them into its launch tables. Right after backward the CPU caches hold backward's data, and a
step's first numpy calls cost tens of microseconds each; this does the whole job (every check,
then every write) in one call of a few lines of native code, compiled once per process.

    program = Program(cells, nbytes, itemsize)   # where each address goes, what it must span
    program.written(starts, ends)                # sorted, disjoint ranges the step writes
    program(addresses)                           # True: checked and written; False: nothing
    Program(..., calls=[...])                    # then runs these kernels (a whole step)

Gradient i is `addresses[index[i]]`; it must be aligned to its element size and its
[address, address + nbytes) must not overlap any written range; only when every one passes is
each written to `cells[i]` (the address of a table entry of a launch that does not hold that
slot's arrays: `Launch.table_cells`).
"""

from __future__ import annotations

import ctypes
from array import array
from functools import cache

import numpy as np

FUNCTION = "stepjit_repoint"

# ctx: n, index, nbytes, mask (itemsize - 1), cells, written starts, written ends, n written,
# calls, n calls
_IR = f"""
define i64 @{FUNCTION}(ptr %ctx, ptr %new) {{
entry:
  %n = load i64, ptr %ctx
  %index.at = getelementptr inbounds i64, ptr %ctx, i64 1
  %index = load ptr, ptr %index.at
  %nbytes.at = getelementptr inbounds i64, ptr %ctx, i64 2
  %nbytes = load ptr, ptr %nbytes.at
  %mask.at = getelementptr inbounds i64, ptr %ctx, i64 3
  %mask = load ptr, ptr %mask.at
  %cells.at = getelementptr inbounds i64, ptr %ctx, i64 4
  %cells = load ptr, ptr %cells.at
  %ws.at = getelementptr inbounds i64, ptr %ctx, i64 5
  %ws = load ptr, ptr %ws.at
  %we.at = getelementptr inbounds i64, ptr %ctx, i64 6
  %we = load ptr, ptr %we.at
  %nw.at = getelementptr inbounds i64, ptr %ctx, i64 7
  %nw = load i64, ptr %nw.at
  br label %check

check:
  %i = phi i64 [ 0, %entry ], [ %i.next, %passed ]
  %more = icmp ult i64 %i, %n
  br i1 %more, label %one, label %write

one:
  %j.at = getelementptr inbounds i64, ptr %index, i64 %i
  %j = load i64, ptr %j.at
  %p.at = getelementptr inbounds i64, ptr %new, i64 %j
  %p = load i64, ptr %p.at
  %m.at = getelementptr inbounds i64, ptr %mask, i64 %i
  %m = load i64, ptr %m.at
  %low = and i64 %p, %m
  %aligned = icmp eq i64 %low, 0
  br i1 %aligned, label %search, label %fail

search:
  %b.at = getelementptr inbounds i64, ptr %nbytes, i64 %i
  %b = load i64, ptr %b.at
  %e = add i64 %p, %b
  br label %bisect

bisect:  ; lo = the number of written ranges that start before e
  %lo = phi i64 [ 0, %search ], [ %lo.next, %step ]
  %hi = phi i64 [ %nw, %search ], [ %hi.next, %step ]
  %open = icmp ult i64 %lo, %hi
  br i1 %open, label %step, label %found

step:
  %sum = add i64 %lo, %hi
  %mid = lshr i64 %sum, 1
  %s.at = getelementptr inbounds i64, ptr %ws, i64 %mid
  %s = load i64, ptr %s.at
  %before = icmp ult i64 %s, %e
  %mid1 = add i64 %mid, 1
  %lo.next = select i1 %before, i64 %mid1, i64 %lo
  %hi.next = select i1 %before, i64 %hi, i64 %mid
  br label %bisect

found:
  %any = icmp ugt i64 %lo, 0
  br i1 %any, label %last, label %passed

last:  ; ranges are disjoint and sorted: only the last one starting before e can reach p
  %k = sub i64 %lo, 1
  %end.at = getelementptr inbounds i64, ptr %we, i64 %k
  %end = load i64, ptr %end.at
  %clash = icmp ugt i64 %end, %p
  br i1 %clash, label %fail, label %passed

passed:
  %i.next = add i64 %i, 1
  br label %check

write:
  %w = phi i64 [ 0, %check ], [ %w.next, %store ]
  %wmore = icmp ult i64 %w, %n
  br i1 %wmore, label %store, label %calls

store:
  %wj.at = getelementptr inbounds i64, ptr %index, i64 %w
  %wj = load i64, ptr %wj.at
  %wp.at = getelementptr inbounds i64, ptr %new, i64 %wj
  %wp = load i64, ptr %wp.at
  %cell.at = getelementptr inbounds i64, ptr %cells, i64 %w
  %cell = load ptr, ptr %cell.at
  store i64 %wp, ptr %cell
  %w.next = add i64 %w, 1
  br label %write

calls:  ; then each launch: kernel(tables..., first chunk, end chunk), or a team's
  %c = phi i64 [ 0, %write ], [ %c.next, %called ]
  %callv.at = getelementptr inbounds i64, ptr %ctx, i64 8
  %callv = load ptr, ptr %callv.at
  %nc.at = getelementptr inbounds i64, ptr %ctx, i64 9
  %nc = load i64, ptr %nc.at
  %cmore = icmp ult i64 %c, %nc
  br i1 %cmore, label %call, label %done

call:
  %offset = mul i64 %c, 10
  %row = getelementptr inbounds i64, ptr %callv, i64 %offset
  %kind = load i64, ptr %row
  %fn.at = getelementptr inbounds i64, ptr %row, i64 1
  %fn = load ptr, ptr %fn.at
  %a0.at = getelementptr inbounds i64, ptr %row, i64 2
  %a0 = load ptr, ptr %a0.at
  %a1.at = getelementptr inbounds i64, ptr %row, i64 3
  %a1 = load ptr, ptr %a1.at
  %a2.at = getelementptr inbounds i64, ptr %row, i64 4
  %a2 = load ptr, ptr %a2.at
  %a3.at = getelementptr inbounds i64, ptr %row, i64 5
  %a3 = load ptr, ptr %a3.at
  %a4.at = getelementptr inbounds i64, ptr %row, i64 6
  %a4 = load ptr, ptr %a4.at
  %a5.at = getelementptr inbounds i64, ptr %row, i64 7
  %a5 = load ptr, ptr %a5.at
  %lo.at = getelementptr inbounds i64, ptr %row, i64 8
  %lo.c = load i64, ptr %lo.at
  %hi.at = getelementptr inbounds i64, ptr %row, i64 9
  %hi.c = load i64, ptr %hi.at
  %team = icmp eq i64 %kind, 1
  br i1 %team, label %team.call, label %kernel.call

kernel.call:
  call void %fn(ptr %a0, ptr %a1, ptr %a2, ptr %a3, ptr %a4, ptr %a5, i64 %lo.c, i64 %hi.c)
  br label %called

team.call:  ; GOMP_parallel(body, work, threads, 0)
  %threads.64 = ptrtoint ptr %a2 to i64
  %threads = trunc i64 %threads.64 to i32
  call void %fn(ptr %a0, ptr %a1, i32 %threads, i32 0)
  br label %called

called:
  %c.next = add i64 %c, 1
  br label %calls

done:
  ret i64 -1

fail:
  ret i64 %i
}}
"""


@cache
def _function():
    """The compiled function, through ctypes (its engine kept alive with it). Only host
    tables, made by the LLVM backend, are re-pointed: llvmlite is there when this runs."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(_IR)
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine(jit=True)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    kind = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)
    return kind(engine.get_function_address(FUNCTION)), engine


class Program:
    """The re-pointing of one set of table cells (see the module docstring); then, when every
    address passed, `calls`, rows of 10 as `Launch.native_calls` gives them: (0, kernel, its six
    table addresses, first chunk, end chunk) runs a kernel in the calling thread, (1,
    GOMP_parallel, body, work, threads, ...) one pass on an OpenMP team (`omp`)."""

    def __init__(self, index: np.ndarray, cells: np.ndarray, nbytes: np.ndarray,
                 itemsize: np.ndarray, calls: list[tuple[int, ...]] = ()) -> None:
        n = len(index)
        if not (len(cells) == len(nbytes) == len(itemsize) == n):
            raise ValueError("index, cells, nbytes and itemsize must have one entry per gradient")
        if any(s & (s - 1) for s in map(int, itemsize)):
            raise ValueError("element sizes must be powers of two")
        self._arrays = [np.ascontiguousarray(a, np.uint64) for a in
                        (index, nbytes, np.asarray(itemsize, np.uint64) - 1, cells)]
        self._index_max = int(index.max()) if n else -1
        self._written: tuple = ()
        self._calls = np.array(calls, np.uint64).reshape(len(calls), 10)
        self._ctx = np.zeros(10, np.uint64)
        self._ctx[0] = n
        self._ctx[1:5] = [a.ctypes.data for a in self._arrays]
        self._ctx[8:10] = [self._calls.ctypes.data, len(calls)]
        self._ctx_address = self._ctx.ctypes.data
        self._function = _function()[0]

    def written(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """The ranges a step writes: sorted by start, disjoint, uint64 (kept alive here)."""
        if starts.dtype != np.uint64 or ends.dtype != np.uint64 or len(starts) != len(ends):
            raise ValueError("written ranges must be two uint64 arrays of one length")
        self._written = (np.ascontiguousarray(starts), np.ascontiguousarray(ends))
        self._ctx[5:8] = [self._written[0].ctypes.data, self._written[1].ctypes.data,
                          len(starts)]

    def __call__(self, addresses: list[int]) -> bool:
        """Check every new address (`addresses[index[i]]`) and, if all pass, write each into its
        cell and run the calls; False, with nothing written or run, when one fails."""
        if len(addresses) <= self._index_max or not self._written:
            raise ValueError("an address for every indexed gradient, and the written ranges, "
                             "are needed")
        new = array("Q", addresses)
        return self._function(self._ctx_address, new.buffer_info()[0]) < 0
