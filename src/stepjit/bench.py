"""`stepjit bench`: what compiling costs against what it saves, measured side by side.

For each configuration and size: the compile phases (lower, parse, optimize, machine code, load
from the disk cache), the first step cold / from disk / from memory, then the step time of stepjit
beside numpy's in-place ufuncs, `torch.optim.SGD(fused=True)` (when torch is installed) and a
streaming probe: an LLVM kernel that moves the same bytes with no arithmetic, timed in the same
run. Competitors are interleaved (A B C A B C ...) and the median is reported, so a noisy
neighbour slows everyone alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np

from . import optim
from .ir import DType, Op, Slot, UpdateRule, tensor
from .parameter import Parameter
from .runtime import cache as kcache
from .runtime import select

CONFIGS: dict[str, dict] = {
    "sgd": dict(lr=0.01),
    "momentum": dict(lr=0.01, momentum=0.9, weight_decay=1e-4),
    "nesterov": dict(lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True),
    "clip": dict(lr=0.01, momentum=0.9, weight_decay=1e-4, clip_norm=1.0),
}


def resnet50_like() -> list[tuple[int, ...]]:
    """147 tensors, about 12.5M parameters, shaped like a ResNet-50's convolutions and norms."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width, width, 3, 3), (width,),
                       (width * 2, width, 1, 1), (width * 2,)]
            if b == 0:
                shapes += [(width * 2, cin, 1, 1), (width * 2,)]
            cin = width * 2
    shapes += [(1000, cin), (1000,)]
    return shapes[:147]


SIZES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "16M": lambda: [(16 << 20,)],
    "resnet50": resnet50_like,
    "200x1000": lambda: [(1000,)] * 200,
}
QUICK_SIZES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "1M": lambda: [(1 << 20,)],
    "50x1000": lambda: [(1000,)] * 50,
}


@dataclasses.dataclass
class Row:
    """One (configuration, size) measurement. Times in milliseconds."""

    config: str
    size: str
    dtype: str
    tensors: int
    elements: int
    bytes_per_element: int
    compile_ms: dict[str, float]  # lower, parse, optimize, codegen, load: a cold compile
    disk_load_ms: float  # kernel from the disk cache into a fresh engine
    first_step_ms: dict[str, float]  # cold, disk, memory
    step_ms: dict[str, float]  # stepjit, numpy, torch_fused, probe
    gbps: dict[str, float]
    break_even_steps: dict[str, float | None]  # steps until compiling paid off, per competitor


# -- timing helpers ---------------------------------------------------------------------------------
def _interleaved(fns: dict[str, Callable[[], None]], reps: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


@contextlib.contextmanager
def _fresh_backend(cache_dir: str) -> Iterator[None]:
    """A new LLVM backend (a new engine, empty memory cache) using `cache_dir`, like a new process."""
    old = os.environ.get("STEPJIT_CACHE_DIR")
    os.environ["STEPJIT_CACHE_DIR"] = cache_dir
    select._instance.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STEPJIT_CACHE_DIR", None)
        else:
            os.environ["STEPJIT_CACHE_DIR"] = old
        select._instance.cache_clear()


def _make(shapes, dtype, seed=0) -> list[Parameter]:
    rng = np.random.default_rng(seed)
    params = []
    for s in shapes:
        p = Parameter(rng.standard_normal(s, dtype=np.float32).astype(dtype))
        p.grad = rng.standard_normal(s, dtype=np.float32).astype(dtype)
        params.append(p)
    return params


def _bytes_per_element(rule: UpdateRule) -> int:
    """Bytes moved per element by one step: each slot read once per pass, written once."""
    total = 0
    loads = [n.arg for n in rule.nodes if n.op is Op.TENSOR]
    for s in rule.slots:
        passes = loads.count(s.name) and (1 + (bool(rule.reductions) and s.name == "grad"))
        total += s.dtype.itemsize * (passes + s.written)
    return total


def _probe_rule(rule: UpdateRule) -> UpdateRule:
    """Moves exactly the bytes `rule` moves, with no arithmetic: the bandwidth yardstick."""
    slots = [Slot(s.name, s.dtype, s.written) for s in rule.slots]
    src = tensor("grad", rule.slot("grad").dtype)
    outs = {s.name: (tensor(s.name, s.dtype) + src.cast(s.dtype)) for s in slots if s.written}
    return UpdateRule("probe", slots, outs)


def _numpy_step(params, cfg) -> Callable[[], None]:
    """The same update as stepjit with numpy in-place ufuncs (float32 temporaries)."""
    lr, mu = cfg.get("lr"), cfg.get("momentum", 0.0)
    wd, nesterov, clip = cfg.get("weight_decay", 0.0), cfg.get("nesterov", False), cfg.get(
        "clip_norm", 0.0)
    bufs = [np.zeros_like(p.data) for p in params]
    tmps = [(np.empty_like(p.data), np.empty_like(p.data)) for p in params]

    def step() -> None:
        for p, b, (d, t) in zip(params, bufs, tmps):
            np.copyto(d, p.grad)
            if clip:
                n = float(np.sqrt(np.dot(d.ravel().astype(np.float64), d.ravel())))
                if n > clip:
                    d *= clip / n
            if wd:
                np.multiply(p.data, wd, out=t)
                d += t
            if mu:
                b *= mu
                b += d
                if nesterov:
                    np.multiply(b, mu, out=t)
                    d += t
                    d *= lr
                else:
                    np.multiply(b, lr, out=d)
            else:
                d *= lr
            p.data -= d

    return step


def _torch_step(params, cfg) -> Callable[[], None] | None:
    if importlib.util.find_spec("torch") is None:
        return None
    # torch's OpenMP workers spin after each parallel region by default, stealing the cores
    # from whatever runs next in the interleaved loop; make them sleep instead.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    tensors = []
    for p in params:
        t = torch.from_numpy(p.data.copy()).requires_grad_(True)
        t.grad = torch.from_numpy(p.grad.copy())
        tensors.append(t)
    kw = {k: v for k, v in cfg.items() if k in ("lr", "momentum", "weight_decay", "nesterov")}
    if cfg.get("clip_norm"):
        return None  # torch's SGD has no per-tensor clipping
    try:
        opt = torch.optim.SGD(tensors, fused=True, **kw)
        opt.step()
    except (RuntimeError, TypeError):
        return None
    return opt.step


def measure(config: str, size: str, shapes, dtype=np.float32, reps: int = 7) -> Row:
    cfg = CONFIGS[config]
    params = _make(shapes, dtype)
    elements = sum(p.size for p in params)
    inner = max(1, min(50, int(2e7 // max(elements, 1))))

    with tempfile.TemporaryDirectory(prefix="stepjit-bench-") as tmp:
        # cold: empty cache; disk: a fresh engine finds it on disk; memory: same engine again
        first: dict[str, float] = {}
        for label in ("cold", "disk"):
            with _fresh_backend(tmp):
                before = kcache.cache_info().compile_seconds
                opt = optim.SGD(_make(shapes, dtype), **cfg)
                t0 = time.perf_counter()
                opt.step()
                first[label] = 1e3 * (time.perf_counter() - t0)
                kernels = [b.launch.kernel for b in opt._plans[("step", 0)].batches]
                if label == "cold":
                    compile_ms = _phases(kernels, "compiled")
                else:
                    disk_ms = 1e3 * (kcache.cache_info().compile_seconds - before)
        opt2 = optim.SGD(_make(shapes, dtype, seed=1), **cfg)
        t0 = time.perf_counter()
        opt2.step()
        first["memory"] = 1e3 * (time.perf_counter() - t0)

        opt = optim.SGD(params, **cfg)
        opt.step()
        rule = opt._plans[("step", 0)].batches[0].rule
        bpe = _bytes_per_element(rule)
        backend = select.select_backend("llvm", {"cpu"})
        probe_rule = _probe_rule(rule)
        probe_tensors = [(p.data, p.grad, *opt.state.get(p, {}).values()) for p in params]
        probe = backend.bind(
            backend.compile(probe_rule), probe_tensors, np.zeros((len(params), 0))
        )
        fns: dict[str, Callable[[], None]] = {
            "stepjit": opt.step,
            "numpy": _numpy_step(_make(shapes, dtype), cfg),
            "probe": lambda: probe(()),
        }
        if (ts := _torch_step(params, cfg)) is not None:
            fns["torch_fused"] = ts
        step = _interleaved(fns, reps, inner)

    step_ms = {k: 1e3 * v for k, v in step.items()}
    gbps = {k: elements * bpe / v / 1e9 for k, v in step.items()}
    cold_ms = first["cold"] - step_ms["stepjit"]
    break_even = {
        k: (cold_ms / (v - step_ms["stepjit"]) if v > step_ms["stepjit"] else None)
        for k, v in step_ms.items()
        if k not in ("stepjit", "probe")
    }
    return Row(config, size, np.dtype(dtype).name, len(shapes), elements, bpe, compile_ms,
               disk_ms, first, step_ms, gbps, break_even)


def _phases(kernels, source: str) -> dict[str, float]:
    out = {k: 0.0 for k in ("lower", "parse", "optimize", "codegen", "load")}
    for k in kernels:
        for name in out:
            out[name] += 1e3 * getattr(k.timings, name)
    return out


# -- output -------------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    head = (f"{'config':<9} {'size':<9} {'compile':>8} {'disk':>6} {'1st cold':>9} "
            f"{'1st disk':>9} {'1st mem':>8} {'stepjit':>9} {'numpy':>9} {'torch':>9} "
            f"{'probe':>9} {'GB/s':>6} {'%probe':>6} {'x numpy':>7} {'x torch':>7} "
            f"{'even@':>6}")
    lines = [head, "-" * len(head)]

    def ms(v):
        return f"{v:9.3f}" if v is not None else f"{'-':>9}"

    for r in rows:
        sj, npy, th = r.step_ms["stepjit"], r.step_ms["numpy"], r.step_ms.get("torch_fused")
        even = r.break_even_steps.get("numpy")
        lines.append(
            f"{r.config:<9} {r.size:<9} {sum(r.compile_ms.values()):7.1f}m {r.disk_load_ms:5.1f}m "
            f"{r.first_step_ms['cold']:8.1f}m {r.first_step_ms['disk']:8.1f}m "
            f"{r.first_step_ms['memory']:7.2f}m {ms(sj)} {ms(npy)} {ms(th)} "
            f"{ms(r.step_ms['probe'])} {r.gbps['stepjit']:6.1f} "
            f"{100 * r.step_ms['probe'] / sj:5.0f}% {npy / sj:6.1f}x "
            f"{(f'{th / sj:6.2f}x' if th else '      -')} "
            f"{(f'{even:6.0f}' if even is not None else 'never'):>6}"
        )
    lines.append("")
    lines.append("times in ms: compile = cold compile (lower+parse+optimize+codegen+load); disk = "
                 "load from the disk cache; 1st = first step() cold / from disk / from memory;")
    lines.append("step columns: median step(); GB/s and %probe: bytes moved per step against "
                 "a no-arithmetic kernel moving the same bytes; even@ = steps until compiling "
                 "beats numpy")
    return "\n".join(lines)


def run(configs: list[str], sizes: dict[str, Callable], reps: int = 7, progress=None) -> list[Row]:
    rows = []
    for size, make in sizes.items():
        for config in configs:
            if progress:
                progress(f"measuring {config} / {size} ...")
            rows.append(measure(config, size, make(), reps=reps))
    return rows


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the CLI calls run()
    rows = run(list(CONFIGS), SIZES, progress=lambda m: print(m, file=sys.stderr))
    print(format_table(rows))
    return 0
