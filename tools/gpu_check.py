"""One prepared run on a GPU machine: the GPU tests, correctness checks and benchmarks.

    PYTHONPATH=src python tools/gpu_check.py --out gpu_check.json   # everything, < 5 minutes
    python tools/gpu_check.py --list                                # the parts and their budgets
    python tools/gpu_check.py --only graph-Adam,stream --out x.json # some parts

Needs a CUDA device, python3 with torch (a CUDA build), CuPy, NVRTC, numpy, llvmlite, pytest,
hypothesis and ml_dtypes; the project comes from `src/` (no install step). Without a usable
device it stops within seconds: exit status 2, the reason on stderr (and in --out).

Every part has a time budget, and the whole run one (--budget, 285 s by default):
- `pytest`: `pytest -m gpu` over tests/ in a subprocess, killed after --pytest-timeout (120 s).
- the checks and benchmarks below run in a worker subprocess, one part after the other. A part
  that runs past its budget, or crashes the worker, is recorded as failed and the worker is
  started again for the parts after it; so is a new worker after any part that failed, so that a
  broken CUDA context cannot fail the parts that follow. Exceptions are caught per case and
  recorded with the end of their traceback.
The results go to one JSON file (--out; rewritten after every part, so a run killed from outside
leaves what it had) and a table on stdout: check, result or figure, target, PASS / FAIL / INFO
/ SKIP. Exit status 0 when nothing failed, 1 otherwise, 2 when there is no usable device.

The checks (torch CUDA tensors stepped by `stepjit.torch`, compared with a reference computed
apart: torch.optim's own implementation on copies of the same tensors, or stepjit's CPU backend
on host copies; float32 tolerance: an error ratio err = |got - want| / (atol + rtol |want|),
atol = max(rtol / 10, rtol max|want|), rtol 1e-5 as in docs/semantics.md; err <= 1 passes):
- `stream` (a): SGD, Adam and RMSprop stepped inside `with torch.cuda.stream(side)` right after
  their tables are built or rebuilt (first step, new gradient tensors, an added param group),
  with the default stream busy (anything queued there runs late) and the side stream busy before
  the gradients are written (a launch on another stream would read them early).
- `free` (b): 40 steps on a side stream that a spinning kernel keeps busy before each of them,
  while gradients alternate between all, half (set_to_none) and new tensors and param groups
  are added: tables are rebuilt again and again while the kernels that read the old ones have
  not run yet. Against torch.optim.
- `graph-<config>` (c): SGD(momentum), Adam, RMSprop, AdamW(amsgrad, weight_decay) and
  Adam(amsgrad, weight_decay) with `capturable=True` and `lr` a 0-d float32 CUDA tensor: three
  warm-up steps on a side stream, one `opt.step()` captured in a torch.cuda.CUDAGraph, then 20
  replays with `lr.fill_()` following a cosine schedule and new values copied into the static
  gradients between them. Against torch.optim (float learning rates) run eagerly over the same
  23 steps; `state[p]["step"]` must be a CUDA tensor at 23.
- `misaligned` (d): parameters and gradients that are views at odd element offsets into flat
  buffers (DDP's gradient_as_bucket_view, FSDP's flat parameters) against aligned copies, for
  SGD, Adam, AdamW, RMSprop, Adagrad (float32, float16, bfloat16) and the CuPy engine: bit for
  bit; SGD with clip_norm within rtol 1e-6 (its norm may be summed in another order).
- `over-2-31` (e): one float16 tensor of 2**31 + 1000 elements (and its gradient: 8.6 GB),
  SGD without momentum; every element against torch's float32 computation rounded to float16
  (at most one unit in the last place), the first and last elements and those around 2**31
  shown; the memory is given back afterwards.
- `many-chunks` (f): 40M-element tensors (611 chunks of 65536: more than the 512 threads of a
  block) with SGD + clip_norm, Adam + clip_norm and LARS (norms of p and g): two runs give the
  same bits, and the stepjit CPU backend on host copies agrees within the tolerance.
Benchmarks (`bench-*`): the measurements of tools/bench_gpu.py (see its docstring), with their
targets: SGD 64M >= 90 % of a device-to-device copy's bandwidth and >= 1.0x torch fused (goal
1.1x); Adam >= 1.0x torch fused; clip_norm <= 1.25x unclipped; misaligned >= 0.9x aligned;
host time of step() for 200 small tensors <= 30 us.

tests/test_cuda_gpu.py runs the same check functions (smaller: no 2**31 tensor, 513 chunks), and
tests/test_gpu_check.py runs every check and benchmark through the CPU backend (streams and graph
capture replaced by eager calls) and tests the budgets, the worker restarts and the reading of
pytest's output, without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
SRC = ROOT / "src"
for _path in (str(TOOLS), str(SRC)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_gpu  # noqa: E402  (tools/, beside this file)
from bench_gpu import row  # noqa: E402

RTOL = 1e-5
"""Relative tolerance of float32 results against a reference (docs/semantics.md)."""

DEFAULT_BUDGET = 285.0
PYTEST_TIMEOUT = 120.0
WORKER_STARTUP = 90.0  # seconds a new worker may take to import torch, CuPy and stepjit
MIN_PART = 5.0  # a part is not started with less time than this left


# -- comparing -------------------------------------------------------------------------------------
def error_ratio(got, want, rtol: float = RTOL) -> float:
    """max |got - want| / (atol + rtol |want|), atol = max(rtol / 10, rtol max|want|): at most 1
    is within tolerance; inf for a NaN or infinity that `want` does not have, or another shape."""
    import torch

    got, want = got.detach(), want.detach()
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    g, w = got.to(want.device, torch.float64), want.to(torch.float64)
    atol = max(rtol / 10, rtol * float(w.abs().max()))
    ratio = (g - w).abs() / (atol + rtol * w.abs())
    return float(torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf).max())


def compare_optimizers(ours: list, our_opt, ref: list, ref_opt, rtol: float = RTOL
                       ) -> tuple[float, str]:
    """The worst `error_ratio` over the parameters and every tensor in the reference optimizer's
    state (our optimizer must have each key), and where it is. Step counts must be equal."""
    import torch

    worst, where = 0.0, "nothing compared"
    for i, (p, q) in enumerate(zip(ours, ref, strict=True)):
        pairs = [("param", p, q)]
        mine, theirs = our_opt.state.get(p, {}), ref_opt.state.get(q, {})
        for key, want in theirs.items():
            if key not in mine:
                raise AssertionError(f"parameter {i}: no state {key!r} (torch.optim has it)")
            if key == "step":
                if float(mine[key]) != float(want):
                    raise AssertionError(f"parameter {i}: step {float(mine[key])}, torch.optim "
                                         f"{float(want)}")
            elif isinstance(want, torch.Tensor):
                pairs.append((key, mine[key], want))
        for key, got, want in pairs:
            ratio = error_ratio(got, want, rtol)
            if ratio > worst or where == "nothing compared":
                worst, where = ratio, f"parameter {i} {key}"
    return worst, where


def _close_figure(worst: float, where: str) -> str:
    return f"err {worst:.2g} x tol (worst: {where})"


def _tail(text: str, lines: int = 20, chars: int = 2500) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def guarded(check: str, target: str, fn: Callable[[], tuple[bool | None, str, dict]]) -> dict:
    """A row for `fn()` -> (passed, figure, data); an exception is a FAIL row holding the end of
    its traceback."""
    try:
        passed, figure, data = fn()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return row(check, f"error: {type(exc).__name__}: {first}", target, False,
                   error=_tail(traceback.format_exc()))
    if passed is None and figure.startswith("skipped"):
        return {**row(check, figure, target, None, **data), "result": "SKIP"}
    return row(check, figure, target, passed, **data)


def _faces(name: str):
    import torch

    import stepjit.torch

    return getattr(stepjit.torch, name), getattr(torch.optim, name, None)


# -- the device: the tests of this script set DEVICE = "cpu" and replace these helpers, to run the
# checks' own code on the CPU backend (tests/test_gpu_check.py)
DEVICE = "cuda"
"""Where the checks put their tensors."""


def _busy(torch, cycles: int) -> None:
    """Queue a kernel that spins for about `cycles` clock cycles on the current stream."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(int(cycles))
        return
    x = torch.empty(1 << 22, device=DEVICE)
    for _ in range(max(1, cycles // 200_000)):
        x.mul_(1.0)


def _new_stream():
    import torch

    return torch.cuda.Stream()


def _on(stream):
    """A context in which `stream` is torch's current stream."""
    import torch

    return torch.cuda.stream(stream)


def _waits_for_current(stream) -> None:
    """`stream` waits for what is queued on the current stream so far."""
    import torch

    stream.wait_stream(torch.cuda.current_stream())


def _current_waits_for(stream) -> None:
    import torch

    torch.cuda.current_stream().wait_stream(stream)


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def _capture(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture `fn()` in a CUDA graph (on torch's capture stream); its replay."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _memory() -> tuple[int, int]:
    """(free bytes on the device, bytes torch has allocated)."""
    import torch

    return torch.cuda.mem_get_info()[0], torch.cuda.memory_allocated()


def _generator(seed: int):
    import torch

    return torch.Generator(device=DEVICE).manual_seed(seed)


def _params(torch, shapes, gen, dtype=None):
    dtype = dtype or torch.float32
    return [torch.randn(s, device=DEVICE, generator=gen).to(dtype) for s in shapes]


SHAPES = [(1000,), (70_001,), (3,), (257, 545)]
"""Small tensors of odd sizes: several chunks, one element, a partial last chunk."""
EXTRA_SHAPES = [(513,), (65_537,)]


# -- (a) side streams right after (re)building tables ----------------------------------------------
STREAM_CONFIGS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}),
    ("Adam", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5}),
]


def check_stream(configs=STREAM_CONFIGS, shapes=SHAPES, busy_cycles: int = 2_000_000
                 ) -> list[dict]:
    """(a) Steps on a torch side stream right after tables are built or rebuilt, with the
    default stream busy, against torch.optim."""
    return [guarded(f"stream: {name} on a side stream after rebuilds", f"== torch.optim "
                    f"(rtol {RTOL:g})", lambda n=name, c=cfg: _stream_case(n, c, shapes,
                                                                            busy_cycles))
            for name, cfg in configs]


def _stream_case(name: str, cfg: dict, shapes, busy_cycles: int):
    import torch

    face, torch_class = _faces(name)
    gen = _generator(1)
    init = _params(torch, shapes, gen)
    extra = _params(torch, EXTRA_SHAPES, gen)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = face(ours, **cfg)
    ref_opt = torch_class(ref, **cfg, foreach=False)
    side = _new_stream()
    keep = []  # every gradient, alive until the end: the test itself frees nothing in use

    def step(fresh: bool) -> None:
        grads = [torch.randn(p.shape, device=DEVICE, generator=gen) for p in ours]
        keep.append(grads)
        _waits_for_current(side)  # parameters and gradient values ready
        _busy(torch, busy_cycles)  # the default stream is busy: what is queued there runs late
        with _on(side):
            _busy(torch, busy_cycles)  # so is the side stream: the gradients are written late
            for p, g in zip(ours, grads):
                if fresh or p.grad is None:  # new gradient tensors, made on the side stream
                    p.grad = torch.empty_like(g)
                    keep.append(p.grad)
                p.grad.copy_(g)
            opt.step()
        for q, g in zip(ref, grads):
            q.grad = g.clone()
        ref_opt.step()

    step(fresh=True)  # the first step: tables built, state created
    step(fresh=True)  # new gradient tensors
    ours.append(torch.nn.Parameter(extra[0].clone()))
    ours.append(torch.nn.Parameter(extra[1].clone()))
    ref += [torch.nn.Parameter(t.clone()) for t in extra]
    group_lr = cfg["lr"] * 0.5
    opt.add_param_group({"params": ours[-2:], "lr": group_lr})
    ref_opt.add_param_group({"params": ref[-2:], "lr": group_lr})
    step(fresh=True)  # a group added
    step(fresh=False)
    step(fresh=False)
    _sync()
    worst, where = compare_optimizers(ours, opt, ref, ref_opt)
    return worst <= 1, _close_figure(worst, where), {"error_ratio": worst}


# -- (b) table memory reused while kernels still read it -------------------------------------------
FREE_CONFIGS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}),
    ("Adam", {"lr": 0.01, "weight_decay": 1e-2}),
]


def check_free(configs=FREE_CONFIGS, rounds: int = 40, shapes=SHAPES,
               busy_cycles: int = 1_000_000) -> list[dict]:
    """(b) Tables rebuilt many times while a busy side stream still has to run the kernels that
    read the previous ones, against torch.optim."""
    return [guarded(f"free: {name}, {rounds} rebuilds behind a busy stream",
                    f"== torch.optim (rtol {RTOL:g})",
                    lambda n=name, c=cfg: _free_case(n, c, rounds, shapes, busy_cycles))
            for name, cfg in configs]


def _free_case(name: str, cfg: dict, rounds: int, shapes, busy_cycles: int):
    import torch

    face, torch_class = _faces(name)
    gen = _generator(2)
    init = _params(torch, shapes, gen)
    extra = _params(torch, [(1000,), (33,), (70_001,)], gen)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt, ref_opt = face(ours, **cfg), torch_class(ref, **cfg, foreach=False)
    added = {rounds // 4: 0, rounds // 2: 1, 3 * rounds // 4: 2}
    side = _new_stream()
    _waits_for_current(side)
    keep = []
    with _on(side):
        for r in range(rounds):
            _busy(torch, busy_cycles)  # every kernel below starts late; the host runs ahead
            if r in added:
                t = extra[added[r]]
                ours.append(torch.nn.Parameter(t.clone()))
                ref.append(torch.nn.Parameter(t.clone()))
                opt.add_param_group({"params": [ours[-1]]})
                ref_opt.add_param_group({"params": [ref[-1]]})
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
            for i, (p, q) in enumerate(zip(ours, ref)):
                if r % 3 == 1 and i % 2 == 1:
                    continue  # half of the tensors have no gradient: another table
                g = torch.randn(p.shape, device=DEVICE, generator=gen)
                keep.append(g)
                p.grad, q.grad = g, g.clone()
            opt.step()
            ref_opt.step()
    _sync()
    worst, where = compare_optimizers(ours, opt, ref, ref_opt)
    return worst <= 1, _close_figure(worst, where), {"error_ratio": worst, "rounds": rounds}


# -- (c) capturable steps in a CUDA graph, lr a CUDA tensor ----------------------------------------
GRAPH_CONFIGS = {
    "SGD": ("SGD", {"momentum": 0.9, "weight_decay": 1e-4}),
    "Adam": ("Adam", {}),
    "RMSprop": ("RMSprop", {"momentum": 0.9}),
    "AdamW-amsgrad": ("AdamW", {"amsgrad": True, "weight_decay": 1e-2}),
    "Adam-amsgrad-wd": ("Adam", {"amsgrad": True, "weight_decay": 1e-2}),
}


def cosine(k: int, n: int, lr: float, floor: float = 0.05) -> float:
    """Step k (0-based) of n of a cosine schedule from lr down to floor * lr."""
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (k + 1) / n)))


def check_graph(key: str, shapes=SHAPES, warmup: int = 3, replays: int = 20) -> list[dict]:
    """(c) One capturable step captured in a CUDA graph and replayed under an lr schedule."""
    name, cfg = GRAPH_CONFIGS[key]
    return [guarded(f"graph: {key}, capturable, {replays} replays, lr schedule",
                    f"== torch.optim (rtol {RTOL:g}); step on device",
                    lambda: _graph_case(name, cfg, shapes, warmup, replays))]


def _graph_case(name: str, cfg: dict, shapes, warmup: int, replays: int, lr0: float = 0.01):
    import torch

    face, torch_class = _faces(name)
    gen = _generator(3)
    init = _params(torch, shapes, gen)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    static = [torch.zeros_like(p) for p in ours]  # the gradients the graph reads
    for p, s in zip(ours, static):
        p.grad = s
    steps = warmup + replays
    grads = [[torch.randn(p.shape, device=DEVICE, generator=gen) for p in ours]
             for _ in range(steps)]
    # the learning rates as the float32 tensor holds them, so that torch gets the same values
    lrs = [float(torch.tensor(x, dtype=torch.float32))
           for x in [lr0] * warmup + [cosine(k, replays, lr0) for k in range(replays)]]
    lr = torch.tensor(lr0, device=DEVICE)  # a 0-d float32 CUDA tensor
    capturable = {"capturable": True} if DEVICE == "cuda" else {}
    opt = face(ours, lr=lr, **capturable, **cfg)
    side = _new_stream()
    _waits_for_current(side)
    with _on(side):  # torch's warm-up before capture
        for k in range(warmup):
            for s, g in zip(static, grads[k]):
                s.copy_(g)
            opt.step()
    _current_waits_for(side)
    replay = _capture(opt.step)
    for k in range(warmup, steps):
        lr.fill_(lrs[k])
        for s, g in zip(static, grads[k]):
            s.copy_(g)
        replay()
    _sync()

    ref_opt = torch_class(ref, lr=lrs[0], **cfg, foreach=False)
    for k in range(steps):
        for group in ref_opt.param_groups:
            group["lr"] = lrs[k]
        for q, g in zip(ref, grads[k]):
            q.grad = g
        ref_opt.step()
    _sync()
    worst, where = compare_optimizers(ours, opt, ref, ref_opt)
    counts = []
    if "step" in ref_opt.state[ref[0]]:
        for i, p in enumerate(ours):
            s = opt.state[p]["step"]
            if not (isinstance(s, torch.Tensor) and s.device.type == DEVICE):
                raise AssertionError(f"parameter {i}: state['step'] is {s!r}, not a CUDA tensor")
            counts.append(float(s))
        if any(c != steps for c in counts):
            raise AssertionError(f"state['step'] is {counts}, expected {steps} everywhere")
    figure = _close_figure(worst, where) + (f"; step {steps} on {DEVICE}" if counts else "")
    return worst <= 1, figure, {"error_ratio": worst, "steps": counts}


# -- (d) views at odd element offsets --------------------------------------------------------------
MISALIGNED_CONFIGS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}, "float32"),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, "float16"),
    ("Adam", {"lr": 0.01}, "float32"),
    ("Adam", {"lr": 0.01, "weight_decay": 1e-2}, "bfloat16"),
    ("AdamW", {"lr": 0.01, "amsgrad": True}, "float32"),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True}, "float32"),
    ("Adagrad", {"lr": 0.05, "lr_decay": 1e-3}, "float32"),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "clip_norm": 1.0}, "float32"),
]
MISALIGNED_SHAPES = [(1000,), (70_001,), (3,), (140_007,), (65_537,), (33, 31)]


def check_misaligned(configs=MISALIGNED_CONFIGS, shapes=MISALIGNED_SHAPES, steps: int = 3
                     ) -> list[dict]:
    """(d) Views at odd element offsets into flat buffers against aligned copies."""
    rows = []
    for name, cfg, dtype in configs:
        exact = "clip_norm" not in cfg
        target = "bit-identical" if exact else "== aligned (rtol 1e-6)"
        label = f"misaligned: {name} {dtype}" + (" clip_norm" if not exact else "")
        rows.append(guarded(label, target, lambda n=name, c=cfg, d=dtype, e=exact:
                            _misaligned_case(n, c, d, shapes, steps, e)))
    rows.append(guarded("misaligned: CuPy engine SGD float32", "bit-identical",
                        lambda: _misaligned_cupy_case(shapes, steps)))
    return rows


def _misaligned_case(name: str, cfg: dict, dtype: str, shapes, steps: int, exact: bool):
    import torch

    face, _ = _faces(name)
    dt = getattr(torch, dtype)
    gen = _generator(4)
    sizes = [math.prod(s) for s in shapes]
    pviews, _pflat = bench_gpu.odd_views(torch, sizes, dt, offset=1, device=DEVICE)
    gviews, _gflat = bench_gpu.odd_views(torch, sizes, dt, offset=3, device=DEVICE)
    init = _params(torch, shapes, gen, dt)
    mis = [torch.nn.Parameter(v.view(s)) for v, s in zip(pviews, shapes)]
    ali = [torch.nn.Parameter(t.clone()) for t in init]
    for p, v, t, g in zip(mis, pviews, init, gviews):
        if p.data_ptr() != v.data_ptr():
            raise AssertionError("nn.Parameter(view) does not share the view's memory")
        p.data.copy_(t)
        p.grad = g.view(p.shape)
    for p in ali:
        p.grad = torch.zeros_like(p)
    odd = sum(p.data_ptr() % 16 != 0 for p in mis) + sum(p.grad.data_ptr() % 16 != 0 for p in mis)
    if odd != 2 * len(mis):
        raise AssertionError("the views are not misaligned as intended")
    opts = [face(mis, **cfg), face(ali, **cfg)]
    for _ in range(steps):
        for p, q in zip(mis, ali):
            g = torch.randn(p.shape, device=DEVICE, generator=gen).to(dt)
            p.grad.copy_(g)
            q.grad.copy_(g)
        for opt in opts:
            opt.step()
    _sync()
    differ, worst = [], 0.0
    for i, (p, q, t) in enumerate(zip(mis, ali, init)):
        if torch.equal(q, t):
            raise AssertionError(f"parameter {i} did not change")
        pairs = [("param", p, q)] + [(k, v, opts[1].state[q][k])
                                     for k, v in opts[0].state[p].items()
                                     if isinstance(v, torch.Tensor)]
        for key, a, b in pairs:
            if not torch.equal(a, b):
                differ.append(f"parameter {i} {key}")
                worst = max(worst, error_ratio(a, b, 1e-6))
    if exact:
        figure = "identical bits" if not differ else f"{len(differ)} differ: {differ[:3]}"
        return not differ, figure, {"differ": differ}
    figure = ("identical bits" if not differ
              else f"err {worst:.2g} x tol, {len(differ)} arrays not bit-identical")
    return worst <= 1, figure, {"differ": differ, "error_ratio": worst}


def _misaligned_cupy_case(shapes, steps: int):
    if DEVICE != "cuda":
        return None, f"skipped: no CuPy arrays on {DEVICE}", {}
    import cupy as cp
    import numpy as np

    import stepjit

    sizes = [math.prod(s) for s in shapes]
    rng = np.random.default_rng(5)
    flat_p = cp.zeros(sum(sizes) + 2 * len(sizes) + 2, cp.float32)
    flat_g = cp.zeros_like(flat_p)
    mis, ali, at = [], [], 1
    for n in sizes:
        x = cp.asarray(rng.standard_normal(n).astype(np.float32))
        view = flat_p[at : at + n]
        view[...] = x
        p = stepjit.Parameter(view)
        p.grad = flat_g[at : at + n]
        mis.append(p)
        a = stepjit.Parameter(x.copy())
        a.grad = cp.zeros(n, cp.float32)
        ali.append(a)
        at += n + (1 if n % 2 == 1 else 2)
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
    opts = [stepjit.optim.SGD(mis, **kw), stepjit.optim.SGD(ali, **kw)]
    for _ in range(steps):
        for p, a in zip(mis, ali):
            g = cp.asarray(rng.standard_normal(p.data.size).astype(np.float32))
            p.grad[...] = g
            a.grad[...] = g
        for opt in opts:
            opt.step()
    differ = [i for i, (p, a) in enumerate(zip(mis, ali))
              if p.data.get().tobytes() != a.data.get().tobytes()
              or opts[0].state[p]["momentum_buffer"].get().tobytes()
              != opts[1].state[a]["momentum_buffer"].get().tobytes()]
    return not differ, ("identical bits" if not differ else f"parameters {differ} differ"), {}


# -- (e) one tensor of more than 2**31 elements ----------------------------------------------------
def check_over_2_31(numel: int = 2**31 + 1000, lr: float = 0.1, chunk: int = 2**28
                    ) -> list[dict]:
    """(e) SGD on one float16 tensor of more than 2**31 elements, then its memory freed."""
    found: dict = {}
    rows = [guarded(f"over 2^31: SGD fp16, {numel} elements", "every element == torch (<= 1 ulp)",
                    lambda: _over_2_31_case(numel, lr, chunk, found))]
    if "before" in found:
        rows.append(guarded("over 2^31: memory given back", "<= 16 MiB left",
                            lambda: _memory_freed(found["before"])))
    return rows


def _over_2_31_case(numel: int, lr: float, chunk: int, found: dict):
    import torch

    import stepjit.torch

    free, allocated = _memory()
    need = 3 * 2 * numel + 5 * 2**30  # param, gradient, a copy; comparison temporaries
    if free < need:
        return None, f"skipped: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} needed", {}
    found["before"] = allocated
    gen = _generator(6)
    p = torch.nn.Parameter(torch.randn(numel, dtype=torch.float16, device=DEVICE, generator=gen))
    p.grad = torch.randn(numel, dtype=torch.float16, device=DEVICE, generator=gen)
    before = p.detach().clone()
    opt = stepjit.torch.SGD([p], lr=lr)
    opt.step()
    _sync()
    mismatched, beyond_ulp = 0, 0
    for start in range(0, numel, chunk):
        end = min(numel, start + chunk)
        want = (before[start:end].float() - p.grad[start:end].float() * lr).half()
        got = p.detach()[start:end]
        differ = (got != want) & ~(got.isnan() & want.isnan())
        n = int(differ.sum())
        if n:
            mismatched += n
            w, g = want[differ].float(), got[differ].float()
            ulp = torch.where(w.abs() >= 2**-14, torch.exp2(torch.floor(torch.log2(w.abs())) - 10),
                              torch.full_like(w, 2**-24))
            beyond_ulp += int((~((g - w).abs() <= ulp)).sum())
        del want, got, differ
    shown = {}
    for label, lo in (("first", 0), ("around 2^31", min(2**31, numel // 2) - 2),
                      ("last", numel - 3)):
        idx = slice(lo, min(numel, lo + (4 if label == "around 2^31" else 3)))
        want = (before[idx].float() - p.grad[idx].float() * lr).half()
        shown[label] = {"index": lo, "got": p.detach()[idx].float().tolist(),
                        "want": want.float().tolist(), "before": before[idx].float().tolist()}
    del opt, p, before
    figure = (f"{mismatched} elements differ ({beyond_ulp} by more than 1 ulp)" if mismatched
              else "every element identical")
    return beyond_ulp == 0, figure, {"numel": numel, "mismatched": mismatched,
                                     "beyond_one_ulp": beyond_ulp, "shown": shown}


def _memory_freed(before: int):
    release_memory()
    left = _memory()[1] - before
    return left <= 16 * 2**20, f"{left / 2**20:.1f} MiB left allocated", {"left_bytes": left}


def release_memory() -> None:
    """Collect garbage and give cached device memory back (torch's and CuPy's pools)."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    if "cupy" in sys.modules:
        import cupy

        if not cupy.cuda.is_available():  # imported, but no device (a dry run)
            return
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


# -- (f) more than 512 chunks per tensor -----------------------------------------------------------
MANY_CHUNKS_CONFIGS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "clip_norm": 1.0}),
    ("Adam", {"lr": 1e-3, "clip_norm": 1.0}),
    ("LARS", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
]


def check_many_chunks(numel: int = 40_000_000, configs=MANY_CHUNKS_CONFIGS, steps: int = 3
                      ) -> list[dict]:
    """(f) Tensors of more than 512 chunks with reductions: deterministic, and equal to the CPU
    backend within the tolerance."""
    chunks = -(-numel // 65536)
    return [guarded(f"many chunks: {name} {numel} elements ({chunks} chunks)"
                    + (" clip_norm" if "clip_norm" in cfg else ""),
                    f"2 runs same bits; == CPU backend (rtol {RTOL:g})",
                    lambda n=name, c=cfg: _many_chunks_case(n, c, numel, steps))
            for name, cfg in configs]


def _many_chunks_case(name: str, cfg: dict, numel: int, steps: int):
    import torch

    face, _ = _faces(name)
    gen = _generator(7)
    shapes = [(numel,), (1000,), (3,)]
    init = _params(torch, shapes, gen)
    grads = [[torch.randn(s, device=DEVICE, generator=gen) for s in shapes] for _ in range(steps)]

    def run(device: str):
        params = [torch.nn.Parameter(t.to(device, copy=True)) for t in init]
        opt = face(params, **cfg)
        if opt.backend != ("cuda" if device == "cuda" else "llvm"):
            raise AssertionError(f"{device} tensors run on the {opt.backend} backend")
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(device, copy=True)
            opt.step()
        _sync()
        return params, opt

    first, opt1 = run(DEVICE)
    second, opt2 = run(DEVICE)
    differ = [i for i, (a, b) in enumerate(zip(first, second)) if not torch.equal(a, b)]
    differ += [f"{i} {k}" for i, (a, b) in enumerate(zip(first, second))
               for k, v in opt1.state[a].items()
               if isinstance(v, torch.Tensor) and not torch.equal(v, opt2.state[b][k])]
    del second, opt2
    cpu, cpu_opt = run("cpu")
    worst, where = compare_optimizers(first, opt1, cpu, cpu_opt)
    figure = ("same bits twice; " if not differ else f"runs differ at {differ[:3]}; ") + (
        _close_figure(worst, where))
    return not differ and worst <= 1, figure, {"differ": [str(d) for d in differ],
                                                "error_ratio": worst}


# -- the parts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A piece of the run with its own time budget (seconds)."""

    name: str
    budget: float
    run: Callable[[], list[dict]]
    what: str


PARTS: list[Part] = [
    Part("stream", 45, check_stream, "(a) side streams right after tables are (re)built"),
    Part("free", 45, check_free, "(b) rebuilt tables while kernels on a busy stream read them"),
    *[Part(f"graph-{key}", 30, lambda k=key: check_graph(k),
           f"(c) capturable {key} in a CUDA graph, lr tensor schedule")
      for key in GRAPH_CONFIGS],
    Part("misaligned", 45, check_misaligned, "(d) views at odd offsets: bits of aligned copies"),
    Part("over-2-31", 60, check_over_2_31, "(e) one float16 tensor of 2**31 + 1000 elements"),
    Part("many-chunks", 60, check_many_chunks, "(f) > 512 chunks with reductions, 40M elements"),
    *[Part(f"bench-{name}", 30, fn,
           "bench: " + (fn.__doc__ or name).strip().splitlines()[0].partition(": ")[2])
      for name, fn in bench_gpu.BENCHES.items()],
]
PART_NAMES = ["pytest", *(p.name for p in PARTS)]


# -- pytest ----------------------------------------------------------------------------------------
_STATUS = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"^=+ (.+?) in ([\d.]+)s\b.*=+$")
_SHORT = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")
_SKIP = re.compile(r"^SKIPPED \[(\d+)\] [^:]+(?::\d+)?: (.*)$")


def parse_pytest(text: str) -> dict:
    """What `pytest -v -ra` printed: counts, the ids that failed or errored (with the short
    summary's message), skip reasons, and the test that was running when the output ends
    (a hang), if any."""
    counts: dict[str, int] = {}
    failed: dict[str, str] = {}
    skips: dict[str, int] = {}
    running = None
    for line in text.splitlines():
        line = line.rstrip()
        if m := _STATUS.match(line):
            running = None
            if m.group(2) in ("FAILED", "ERROR"):
                failed.setdefault(m.group(1), m.group(2))
        elif re.match(r"^\S+::\S+ ?$", line):
            running = line.strip()
        elif m := _SHORT.match(line):
            failed[m.group(2)] = f"{m.group(1)}: {m.group(3) or ''}".strip()
        elif m := _SKIP.match(line):
            skips[m.group(2)] = skips.get(m.group(2), 0) + int(m.group(1))
        elif m := _SUMMARY.match(line):
            for part in m.group(1).split(", "):
                number, _, word = part.partition(" ")
                if number.isdigit():
                    word = {"error": "errors", "warning": "warnings"}.get(word, word)
                    counts[word] = int(number)
    return {"counts": counts, "failed": failed, "skips": skips, "running": running}


def run_pytest(timeout: float, basetemp: Path, env: dict) -> dict:
    """`pytest -m gpu` over tests/ in a subprocess killed after `timeout` seconds: a record."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-ra", "--tb=short",
           "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--basetemp={basetemp}", "tests"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        out, _ = proc.communicate()
    seconds = time.monotonic() - t0
    return pytest_record(parse_pytest(out), proc.returncode, timed_out, seconds, timeout, out)


def pytest_record(parsed: dict, returncode: int | None, timed_out: bool, seconds: float,
                  timeout: float, output: str) -> dict:
    """The part record of a pytest run from its parsed output."""
    c = parsed["counts"]
    passed, failures = c.get("passed", 0), c.get("failed", 0) + c.get("errors", 0)
    figure = (f"{passed} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
              f"{c.get('skipped', 0)} skipped ({seconds:.0f} s)")
    if timed_out:
        figure = (f"timeout after {timeout:.0f} s" + (f" in {parsed['running']}"
                                                     if parsed["running"] else ""))
    ok = not timed_out and returncode == 0 and passed > 0 and failures == 0
    if returncode == 5:
        figure = "no test selected by -m gpu"
    rows = [row("pytest -m gpu", figure, "all pass", ok, returncode=returncode,
                counts=c)]
    if timed_out and parsed["running"]:
        rows.append(row(parsed["running"], "hung (pytest killed)", "", False))
    for test_id, message in parsed["failed"].items():
        rows.append(row(test_id, message[:160], "", False))
    for reason, n in parsed["skips"].items():
        rows.append({**row(f"pytest skipped x{n}", reason[:160]), "result": "SKIP"})
    status = "passed" if ok else ("timeout" if timed_out else "failed")
    record = {"name": "pytest", "kind": "pytest", "status": status, "seconds": seconds,
              "budget_s": timeout, "rows": rows, "parsed": parsed}
    if not ok:
        record["output_tail"] = _tail(output, lines=60, chars=6000)
    return record


# -- the worker ------------------------------------------------------------------------------------
def worker_main(parts: dict[str, Callable[[], list[dict]]], names: list[str], results: Path
                ) -> int:
    """Run `names` in order, appending to `results` one JSON line as each starts and one with
    its record as it ends. Returns 3 after a part that failed (a new worker runs the rest)."""
    with open(results, "a") as out:

        def emit(**event) -> None:
            out.write(json.dumps(event, default=str) + "\n")
            out.flush()

        for index, name in enumerate(names):
            emit(event="start", name=name)
            t0 = time.monotonic()
            try:
                rows = parts[name]()
                status = "failed" if any(r["result"] == "FAIL" for r in rows) else "passed"
                record = {"name": name, "status": status, "rows": rows}
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                record = {"name": name, "status": "error", "error": _tail(traceback.format_exc()),
                          "rows": [row(name, f"error: {type(exc).__name__}: {first}", "", False)]}
            try:
                release_memory()
            except Exception as exc:
                record["status"] = "error"
                record["rows"].append(row(name, f"cleanup failed: {exc}", "", False))
            record["seconds"] = time.monotonic() - t0
            emit(event="end", name=name, record=record)
            if record["status"] != "passed" and index + 1 < len(names):
                return 3
    return 0


class _Events:
    """The complete JSON lines appended to a file so far."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, ""

    def new(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def _kill(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_parts(names: list[str], budgets: dict[str, float],
              command: Callable[[list[str], Path], list[str]], workdir: Path, env: dict,
              deadline: float, on_record: Callable[[dict], None] = lambda r: None,
              startup: float = WORKER_STARTUP, poll: float = 0.1) -> list[dict]:
    """Run the parts `names` in worker processes (`command(names, results_file)`), each part
    within min(its budget, the time to `deadline`), restarting a worker for the parts left
    after one that timed out, crashed or failed. Returns a record per part, in order."""
    pending, records, attempt = list(names), [], 0

    def done(record: dict) -> None:
        record.setdefault("kind", "bench" if record["name"].startswith("bench") else "check")
        record.setdefault("budget_s", budgets[record["name"]])
        pending.remove(record["name"])
        records.append(record)
        on_record(record)

    def lost(name: str, status: str, figure: str, log: Path | None) -> None:
        text = _tail(log.read_text(errors="replace"), lines=40, chars=4000) if log else ""
        done({"name": name, "status": status, "seconds": None,
              "rows": [row(name, figure, "", False)], "worker_log_tail": text})

    while pending:
        if deadline - time.monotonic() < MIN_PART:
            for name in list(pending):
                done({"name": name, "status": "not run", "seconds": None, "rows": [
                    {**row(name, "not run: out of time (--budget)", "", False)}]})
            break
        attempt += 1
        results, log = workdir / f"worker-{attempt}.jsonl", workdir / f"worker-{attempt}.log"
        with open(log, "w") as log_file:
            proc = subprocess.Popen(command(pending, results), cwd=ROOT, env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        events, progress = _Events(results), False
        current, since = None, time.monotonic()
        while True:
            exited = proc.poll() is not None
            for event in events.new():  # after poll(): all that an exited worker wrote
                if event["event"] == "start":
                    current, since, progress = event["name"], time.monotonic(), True
                elif event["event"] == "end":
                    done(event["record"])
                    current, since = None, time.monotonic()
            now = time.monotonic()
            if exited:
                if current is not None:
                    lost(current, "crashed", f"worker died (exit status {proc.returncode})",
                         log)
                elif not progress and pending:
                    for name in list(pending):
                        lost(name, "error", f"worker exited (status {proc.returncode}) "
                             "before starting a part", log)
                break
            if current is None:
                limit = min(startup, deadline - since)
            else:
                limit = min(budgets[current], deadline - since)
            if now - since > limit:
                _kill(proc)
                if current is None:
                    for name in list(pending):
                        lost(name, "error", f"no part started within {limit:.0f} s", log)
                else:
                    lost(current, "timeout", f"timeout after {limit:.0f} s (killed)", log)
                break
            time.sleep(poll)
    return records


# -- the probe -------------------------------------------------------------------------------------
def probe() -> dict:
    """What this machine has; `problems` says what keeps the run from working, `warnings`
    what is missing for some of it."""
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    problems = []
    try:
        import torch

        info["torch"], info["torch_cuda"] = torch.__version__, torch.version.cuda
        if not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} sees no CUDA device "
                            f"(built for CUDA {torch.version.cuda})")
        else:
            info["devices"] = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                info["devices"].append({"name": props.name, "capability": f"{props.major}."
                                        f"{props.minor}", "memory_gib": props.total_memory / 2**30})
    except Exception as exc:
        problems.append(f"torch: {type(exc).__name__}: {exc}")
    try:
        import cupy

        info["cupy"] = cupy.__version__
        count = cupy.cuda.runtime.getDeviceCount()
        info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        if count == 0:
            problems.append("CuPy sees no CUDA device")
    except Exception as exc:
        problems.append(f"CuPy: {type(exc).__name__}: {exc}")
    try:
        import stepjit
        from stepjit.runtime import gpu

        info["stepjit"] = stepjit.__version__
        info["nvrtc"] = ".".join(map(str, gpu.nvrtc_version()))
    except Exception as exc:
        problems.append(f"stepjit / NVRTC: {type(exc).__name__}: {exc}")
    warnings = []  # what makes some tests fail, not the run impossible
    for module in ("numpy", "llvmlite", "pytest", "hypothesis", "ml_dtypes"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:
            warnings.append(f"{module}: {type(exc).__name__}: {exc}")
    info["problems"], info["warnings"] = problems, warnings
    return info


def _probe_in_subprocess(env: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"problems": [f"probing the device took more than {timeout:.0f} s"]}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"problems": [f"the probe failed (exit status {done.returncode}): "
                             f"{_tail(done.stderr, lines=5)}"]}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# -- the run ---------------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict:
    rows = [r for rec in records for r in rec["rows"]]
    counts = {k: sum(r["result"] == k for r in rows) for k in ("PASS", "FAIL", "INFO", "SKIP")}
    return {**counts, "ok": counts["FAIL"] == 0 and bool(rows)}


def _write(path: str | None, doc: dict) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    os.replace(tmp, path)


def _child_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["STEPJIT_CACHE_DIR"] = str(cache_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _progress(started: float, record: dict) -> None:
    fails = sum(r["result"] == "FAIL" for r in record["rows"])
    seconds = "" if record.get("seconds") is None else f" ({record['seconds']:.1f} s)"
    print(f"[{time.monotonic() - started:5.0f} s] {record['name']}: {record['status']}"
          f"{f', {fails} FAIL' if fails else ''}{seconds}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--only", help="comma-separated parts to run (see --list)")
    parser.add_argument("--skip", default="", help="comma-separated parts not to run")
    parser.add_argument("--list", action="store_true", help="list the parts and their budgets")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help="seconds for the whole run (default %(default)s)")
    parser.add_argument("--pytest-timeout", type=float, default=PYTEST_TIMEOUT,
                        help="seconds for `pytest -m gpu` (default %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (worker logs, pytest's temporary files)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--parts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe:
        print(json.dumps(probe(), default=str))
        return 0
    by_name = {p.name: p for p in PARTS}
    if args.worker:
        return worker_main({n: p.run for n, p in by_name.items()}, args.parts.split(","),
                           Path(args.results))
    if args.list:
        print(f"{'pytest':22s} {args.pytest_timeout:4.0f} s  pytest -m gpu over tests/")
        for p in PARTS:
            print(f"{p.name:22s} {p.budget:4.0f} s  {p.what}")
        return 0
    chosen = args.only.split(",") if args.only else list(PART_NAMES)
    skipped = set(filter(None, args.skip.split(",")))
    unknown = [n for n in [*chosen, *skipped] if n not in PART_NAMES]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)} (see --list)")
    chosen = [n for n in PART_NAMES if n in chosen and n not in skipped]

    started = time.monotonic()
    deadline = started + args.budget
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    basetemp = workdir / "pytest"
    env = _child_env(basetemp / "kernel-cache")  # the cache pytest's conftest uses there
    doc: dict = {"argv": sys.argv[1:] if argv is None else argv, "commit": _commit(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget,
                 "parts": []}
    try:
        doc["environment"] = env_info = _probe_in_subprocess(env, timeout=90)
        if env_info.get("problems"):
            message = "; ".join(env_info["problems"])
            doc["error"] = f"no usable CUDA device: {message}"
            doc["elapsed_s"] = time.monotonic() - started
            _write(args.out, doc)
            print(f"gpu_check: no usable CUDA device: {message}", file=sys.stderr)
            return 2
        devices = env_info.get("devices") or [{}]
        print(f"gpu_check: {devices[0].get('name')} x{len(devices)}, torch "
              f"{env_info.get('torch')}, CuPy {env_info.get('cupy')}, NVRTC "
              f"{env_info.get('nvrtc')}; parts: {', '.join(chosen)}", file=sys.stderr, flush=True)
        for warning in env_info.get("warnings", []):
            print(f"gpu_check: warning: {warning}", file=sys.stderr)

        def record_part(record: dict) -> None:
            doc["parts"].append(record)
            doc["summary"] = summarize(doc["parts"])
            doc["elapsed_s"] = time.monotonic() - started
            _write(args.out, doc)
            _progress(started, record)

        if "pytest" in chosen:
            timeout = max(1.0, min(args.pytest_timeout, deadline - time.monotonic()))
            record_part(run_pytest(timeout, basetemp, env))
        names = [n for n in chosen if n != "pytest"]
        if names:
            here = str(Path(__file__).resolve())
            run_parts(names, {p.name: p.budget for p in PARTS},
                      lambda todo, results: [sys.executable, here, "--worker", "--results",
                                             str(results), "--parts", ",".join(todo)],
                      workdir, env, deadline, on_record=record_part)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["summary"] = summary = summarize(doc["parts"])
    doc["elapsed_s"] = time.monotonic() - started
    if args.keep:
        doc["workdir"] = str(workdir)
    _write(args.out, doc)
    rows = [r for rec in doc["parts"] for r in rec["rows"]]
    print(bench_gpu.format_table(rows))
    print(f"\n{summary['PASS']} PASS, {summary['FAIL']} FAIL, {summary['INFO']} INFO, "
          f"{summary['SKIP']} SKIP in {doc['elapsed_s']:.0f} s"
          + (f"; results in {args.out}" if args.out else ""))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
