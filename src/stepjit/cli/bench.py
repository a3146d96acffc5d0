"""`stepjit bench`: what compiling costs against what it saves, measured side by side.

For each configuration and size: the compile phases (trace, lower, parse, optimize, machine code,
load; and a load from the disk cache), the first step cold / from disk / from memory, then the step
time of stepjit beside numpy's in-place ufuncs (SGD and Adam: written here as torch.optim computes
them), torch's fused optimizer of the same name (when torch is installed and has one) and a
streaming probe: an LLVM kernel that moves the same bytes with no arithmetic, timed in the same
run. An optimizer without a numpy or torch counterpart has no such column. Competitors are
interleaved (A B C A B C ...) and the median is reported, so a noisy neighbour slows everyone
alike. Nothing is read from or written to the user's kernel cache: each measurement compiles into
a private temporary directory.

A configuration is a name of `CONFIGS`, any registered optimizer at its defaults, or a user's
class "package.module:Class" (see `configuration`).

`stepjit bench --json FILE` writes `to_json(rows)`: {"stepjit", "host", "reps", "configs",
"rows"}, one row per (configuration, size) with the fields of `Row`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .. import optim
from ..ir import QUANT_BLOCK, DType, Op, Slot, UpdateRule, tensor
from ..optim import OPTIMIZERS, registry
from ..parameter import Parameter
from ..runtime import cache as kcache
from ..runtime import select
from .args import UsageError, checked, optimizer_class, positive_int

CONFIGS: dict[str, dict] = {
    "sgd": dict(lr=0.01),
    "momentum": dict(lr=0.01, momentum=0.9, weight_decay=1e-4),
    "nesterov": dict(lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True),
    "clip": dict(lr=0.01, momentum=0.9, weight_decay=1e-4, clip_norm=1.0),
    "adam": dict(optimizer="adam", lr=1e-3),
    "adam-int8": dict(optimizer="adam", lr=1e-3, state_dtype="int8"),
}
"""The default configurations (float32 parameters); "optimizer" names the optimizer (default:
sgd). Storage options (`state_dtype`, ...) are stepjit's alone: the numpy and torch competitors
run the same update with float32 state."""

STORAGE_OPTIONS = frozenset({"state_dtype", "master_weights", "stochastic_rounding",
                             "rounding_seed"})

PLACEHOLDER = 0.01
"""The value a configuration gives a hyperparameter that has no default (SGD's lr)."""


def configuration(spec: str) -> tuple[str, dict]:
    """(name, configuration) for `spec`: a name of `CONFIGS`; a registered optimizer, at its own
    defaults (named as registered); or a user's class "package.module:Class", at its defaults
    (named after the class, in lower case). ValueError when `spec` is none of these."""
    if spec in CONFIGS:
        return spec, CONFIGS[spec]
    if spec not in OPTIMIZERS and ":" not in spec:
        raise ValueError(f"unknown configuration {spec!r}; choose from {', '.join(CONFIGS)}, a "
                         f"registered optimizer ({', '.join(OPTIMIZERS)}) or package.module:Class")
    cls = optimizer_class(spec)
    cfg = {"optimizer": spec}
    cfg.update((name, PLACEHOLDER) for name, default in registry.hyperparameters(cls).items()
               if default is registry.required)
    name = cls.__name__.lower()
    if spec in OPTIMIZERS or name in CONFIGS or name in OPTIMIZERS:
        name = spec
    return name, cfg


def optimizer_configuration(spec: str) -> tuple[str, dict]:
    """`configuration` of an optimizer: a registered name or "package.module:Class"."""
    optimizer_class(spec)  # ValueError naming the choices when `spec` is not an optimizer
    return configuration(spec)


def _optimizer(cfg: dict) -> tuple[type[optim.Optimizer], dict]:
    """(optimizer class, its keyword arguments) of a configuration."""
    kw = dict(cfg)
    return optimizer_class(kw.pop("optimizer", "sgd")), kw


def resnet50_like(width: float = 0.745) -> list[tuple[int, ...]]:
    """147 tensors, about 12.5M parameters: ResNet-50's bottleneck convolutions and norms, with
    channels scaled by `width` (and the last block cut short) to land on those totals."""
    def ch(x: int) -> int:
        return max(1, round(x * width))

    shapes: list[tuple[int, ...]] = [(ch(64), 3, 7, 7), (ch(64),), (ch(64),)]
    cin = ch(64)
    for base, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        mid, out = ch(base), ch(4 * base)
        for b in range(blocks):
            shapes += [(mid, cin, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,),
                       (out, mid, 1, 1), (out,), (out,)]
            if b == 0:
                shapes.append((out, cin, 1, 1))  # the projection shortcut
            cin = out
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
    bytes_per_element: float
    compile_ms: dict[str, float]  # trace, lower, parse, optimize, codegen, load: a cold compile
    disk_load_ms: float  # kernel from the disk cache into a fresh engine
    first_step_ms: dict[str, float]  # cold, disk, memory
    step_ms: dict[str, float]  # stepjit, numpy, torch_fused, probe
    gbps: dict[str, float]
    break_even_steps: dict[str, float | None]  # steps until compiling paid off, per competitor


# -- timing helpers -----------------------------------------------------------------------
SETTLE_SECONDS = 0.005


def _interleaved(fns: dict[str, Callable[[], None]], reps: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            # torch's OpenMP workers spin for a few ms after each parallel region: let them go
            # idle so they do not steal a core from the next competitor
            time.sleep(SETTLE_SECONDS)
            fn()  # untimed: warms this competitor up
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


@contextlib.contextmanager
def _fresh_backend(cache_dir: str) -> Iterator[None]:
    """A new LLVM backend (new engine, empty memory cache) using `cache_dir`: a new process."""
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


def _loads(roots: list, into_sums: bool) -> set[str]:
    """The slots an expression reads, optionally not looking inside reductions."""
    seen, todo, slots = set(), list(roots), set()
    while todo:
        n = todo.pop()
        if id(n) in seen or (n.op is Op.SUM and not into_sums):
            continue
        seen.add(id(n))
        if n.op is Op.TENSOR:
            slots.add(n.arg)
        todo.extend(n.src)
    return slots


def _bytes_per_element(rule: UpdateRule) -> float:
    """Bytes moved per element by one step: a slot is read once by each pass that loads it (the
    reduce pass, when the rule has reductions, and the update pass) and written once (a
    per-block slot: one value per QUANT_BLOCK elements)."""
    update = _loads([e for _, e in rule.outputs], into_sums=False)
    reduce = _loads([r.src[0] for r in rule.reductions], into_sums=True)
    return sum(s.dtype.itemsize / (QUANT_BLOCK if s.per_block else 1)
               * ((s.name in update) + (s.name in reduce) + s.written) for s in rule.slots)


def _probe_rule(rule: UpdateRule) -> UpdateRule:
    """Moves exactly the bytes `rule` moves, with no arithmetic: the bandwidth yardstick.

    Each written float slot gets itself plus the gradient, 8-bit codes and per-block scales
    themselves; when the rule has a reduce pass, the probe has one too, reading the same slots
    (its sum, times zero, joins every float output)."""
    slots = [Slot(s.name, s.dtype, s.written, per_block=s.per_block) for s in rule.slots]
    src = tensor("grad", rule.slot("grad").dtype)
    reread = sorted(_loads([r.src[0] for r in rule.reductions], into_sums=True))
    total = None
    for name in reread:
        term = tensor(name, rule.slot(name).dtype).cast(DType.F64).sum()
        total = term if total is None else total + term
    outs = {}
    for s in slots:
        if s.written and (s.per_block or not s.dtype.is_float):
            outs[s.name] = tensor(s.name, s.dtype)
        elif s.written:
            out = tensor(s.name, s.dtype) + src.cast(s.dtype)
            outs[s.name] = out if total is None else out + (total * 0.0).cast(s.dtype)
    return UpdateRule("probe", slots, outs)


def _numpy_adam(params, cfg) -> Callable[[], None]:
    """Adam with numpy in-place ufuncs, as torch.optim.Adam computes it."""
    lr, eps = cfg["lr"], cfg.get("eps", 1e-8)
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    state = [(np.zeros_like(p.data), np.zeros_like(p.data), np.empty_like(p.data))
             for p in params]
    count = [0]

    def step() -> None:
        count[0] += 1
        bc1, bc2 = 1 - b1 ** count[0], 1 - b2 ** count[0]
        for p, (m, v, t) in zip(params, state):
            m *= b1
            np.multiply(p.grad, 1 - b1, out=t)
            m += t
            v *= b2
            np.multiply(p.grad, p.grad, out=t)
            t *= 1 - b2
            v += t
            np.sqrt(v, out=t)
            t /= bc2**0.5
            t += eps
            np.divide(m, t, out=t)
            t *= lr / bc1
            p.data -= t

    return step


def _numpy_sgd(params, cfg) -> Callable[[], None]:
    """SGD with numpy in-place ufuncs (float32 temporaries)."""
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


# the hand-written numpy steps, and the hyperparameters each of them implements
_NUMPY_STEPS = {
    optim.SGD: (_numpy_sgd, {"lr", "momentum", "weight_decay", "nesterov", "clip_norm"}),
    optim.Adam: (_numpy_adam, {"lr", "betas", "eps"}),
}


def _numpy_step(params, cfg) -> Callable[[], None] | None:
    """The same update as stepjit with numpy in-place ufuncs; None when none is written here for
    this optimizer and these hyperparameters."""
    cls, kwargs = _optimizer(cfg)
    kwargs = {k: v for k, v in kwargs.items() if k not in STORAGE_OPTIONS}
    step, implemented = _NUMPY_STEPS.get(cls, (None, set()))
    if step is None or not kwargs.keys() <= implemented:
        return None
    return step(params, kwargs)


def _torch_step(params, cfg) -> Callable[[], None] | None:
    """torch.optim's class of the same name as a built-in optimizer, fused; None when torch is
    not installed, has no such class, or cannot run it fused with these arguments."""
    cls, kwargs = _optimizer(cfg)
    kwargs = {k: v for k, v in kwargs.items() if k not in STORAGE_OPTIONS}
    if importlib.util.find_spec("torch") is None or kwargs.get("clip_norm"):
        return None  # torch's optimizers have no per-tensor clipping
    import torch

    torch_cls = getattr(torch.optim, cls.__name__, None)
    if torch_cls is None or not cls.__module__.startswith("stepjit."):
        return None
    tensors = []
    for p in params:
        t = torch.from_numpy(p.data.copy()).requires_grad_(True)
        t.grad = torch.from_numpy(p.grad.copy())
        tensors.append(t)
    try:
        opt = torch_cls(tensors, fused=True, **kwargs)
        opt.step()
    except (RuntimeError, TypeError, ValueError):
        return None
    return opt.step


def measure(config: str, size: str, shapes, dtype=np.float32, reps: int = 7,
            cfg: dict | None = None) -> Row:
    """Measure one configuration over tensors of `shapes` (see the module docstring); `cfg`
    defaults to the configuration `config` names (see `configuration`)."""
    cfg = configuration(config)[1] if cfg is None else cfg
    cls, kwargs = _optimizer(cfg)
    params = _make(shapes, dtype)
    elements = sum(p.size for p in params)
    inner = max(1, min(50, int(2e7 // max(elements, 1))))

    def first_step(seed: int) -> tuple[float, optim.Optimizer]:
        opt = cls(_make(shapes, dtype, seed=seed) if seed else params, **kwargs)
        t0 = time.perf_counter()
        opt.step()
        return 1e3 * (time.perf_counter() - t0), opt

    # Everything runs against a private cache directory: the user's cache is neither read nor
    # written, and "cold" really is cold.
    with tempfile.TemporaryDirectory(prefix="stepjit-bench-") as tmp:
        first: dict[str, float] = {}
        with _fresh_backend(tmp):  # cold: an empty cache
            first["cold"], opt = first_step(seed=0)
            kernels = [b.launch.kernel for b in opt._plans[("step", 0)].batches]
            compile_ms = {"trace": _trace_ms(opt, dtype), **_phases(kernels, "compiled")}
        with _fresh_backend(tmp):  # a new engine, as in a new process: the kernel is on disk
            before = kcache.cache_info().compile_seconds
            first["disk"], opt = first_step(seed=0)
            disk_ms = 1e3 * (kcache.cache_info().compile_seconds - before)
            first["memory"], _ = first_step(seed=1)  # the same engine again: a memory hit

            rule = opt._plans[("step", 0)].batches[0].rule
            bpe = _bytes_per_element(rule)
            backend = select.select_backend("llvm", {"cpu"})
            probe_tensors = [
                tuple({"param": p.data, "grad": p.grad, **opt.state.get(p, {})}[s.name]
                      for s in rule.slots)
                for p in params
            ]
            probe = backend.bind(
                backend.compile(_probe_rule(rule)), probe_tensors, np.zeros((len(params), 0))
            )
            fns: dict[str, Callable[[], None]] = {"stepjit": opt.step}
            if (ns := _numpy_step(_make(shapes, dtype), cfg)) is not None:
                fns["numpy"] = ns
            fns["probe"] = lambda: probe(())
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


def _trace_ms(opt: optim.Optimizer, dtype) -> float:
    """Milliseconds to build the group's update rule from its structure (the memo bypassed)."""
    structure = opt.structure(opt.param_groups[0])
    dt = DType.from_numpy(dtype)
    build = _uncached(type(opt).rule)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        build(opt, structure, dt, dt)
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def _uncached(method: types.FunctionType) -> types.FunctionType:
    """`method` (an optimizer's `rule`) calling the rule functions of its own module through
    their `functools.cache` memo's `__wrapped__`: every call traces the rule anew."""
    names = method.__globals__
    plain = {name: f.__wrapped__ for name, f in names.items()
             if hasattr(f, "cache_clear") and hasattr(f, "__wrapped__")
             and getattr(f, "__module__", None) == method.__module__}
    if not plain:
        return method
    return types.FunctionType(method.__code__, {**names, **plain}, method.__name__,
                              method.__defaults__, method.__closure__)


def _phases(kernels, source: str) -> dict[str, float]:
    out = {k: 0.0 for k in ("lower", "parse", "optimize", "codegen", "load")}
    for k in kernels:
        for name in out:
            out[name] += 1e3 * getattr(k.timings, name)
    return out


# -- output -------------------------------------------------------------------------------------
def _even(row: Row, competitor: str, width: int) -> str:
    """The steps until compiling paid off against `competitor`, right-aligned: never (stepjit is
    not faster per step), or - (the row has no such competitor)."""
    if competitor not in row.break_even_steps:
        text = "-"
    elif (steps := row.break_even_steps[competitor]) is None:
        text = "never"
    else:
        text = f"{steps:.0f}"
    return f"{text:>{width}}"


def format_table(rows: list[Row]) -> str:
    """The terminal table: compile and first-step costs, step times against every competitor."""
    head = (f"{'config':<9} {'size':<9} {'compile':>8} {'disk':>6} {'1st cold':>9} "
            f"{'1st disk':>9} {'1st mem':>8} {'stepjit':>9} {'numpy':>9} {'torch':>9} "
            f"{'probe':>9} {'GB/s':>6} {'%probe':>6} {'x numpy':>7} {'x torch':>7} "
            f"{'even@':>6}")
    lines = [head, "-" * len(head)]

    def ms(v):
        return f"{v:9.3f}" if v is not None else f"{'-':>9}"

    for r in rows:
        sj, npy, th = r.step_ms["stepjit"], r.step_ms.get("numpy"), r.step_ms.get("torch_fused")
        lines.append(
            f"{r.config:<9} {r.size:<9} {sum(r.compile_ms.values()):7.1f}m {r.disk_load_ms:5.1f}m "
            f"{r.first_step_ms['cold']:8.1f}m {r.first_step_ms['disk']:8.1f}m "
            f"{r.first_step_ms['memory']:7.2f}m {ms(sj)} {ms(npy)} {ms(th)} "
            f"{ms(r.step_ms['probe'])} {r.gbps['stepjit']:6.1f} "
            f"{100 * r.step_ms['probe'] / sj:5.0f}% "
            f"{(f'{npy / sj:6.1f}x' if npy else '      -')} "
            f"{(f'{th / sj:6.2f}x' if th else '      -')} "
            f"{_even(r, 'numpy', 6)}"
        )
    lines.append("")
    lines.append("times in ms: compile = cold compile (trace+lower+parse+optimize+codegen+load); "
                 "disk = "
                 "load from the disk cache; 1st = first step() cold / from disk / from memory;")
    lines.append("step columns: median step(); GB/s and %probe: bytes moved per step against "
                 "a no-arithmetic kernel moving the same bytes; even@ = steps until compiling "
                 "beats numpy")
    return "\n".join(lines)


def format_phases(rows: list[Row]) -> str:
    """The cold compile split into its phases, and the break-even against each competitor."""
    phases = ("trace", "lower", "parse", "optimize", "codegen", "load")
    head = (f"{'config':<9} {'size':<9} " + " ".join(f"{p:>8}" for p in phases)
            + f" {'total':>8} {'disk':>8} {'even@numpy':>10} {'even@torch':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.config:<9} {r.size:<9} "
            + " ".join(f"{r.compile_ms.get(p, 0.0):8.2f}" for p in phases)
            + f" {sum(r.compile_ms.values()):8.2f} {r.disk_load_ms:8.2f}"
            + f" {_even(r, 'numpy', 10)} {_even(r, 'torch_fused', 10)}"
        )
    lines.append("")
    lines.append("compile phases in ms (trace: build the rule; lower: LLVM IR text; parse; "
                 "optimize: O3; codegen: machine code; load: into the JIT);")
    lines.append("disk: the whole load from the disk cache; even@: steps after which the first "
                 "step's compile has paid for itself against that competitor (never: stepjit is "
                 "not faster per step)")
    return "\n".join(lines)


def run(configs: dict[str, dict], sizes: dict[str, Callable], reps: int = 7,
        progress=None) -> list[Row]:
    """Measure every configuration (name -> configuration) at every size; `progress(message)`
    is called before each."""
    rows = []
    total = len(configs) * len(sizes)
    for size, make in sizes.items():
        for config, cfg in configs.items():
            if progress:
                progress(f"[{len(rows) + 1}/{total}] measuring {config} / {size} ...")
            rows.append(measure(config, size, make(), reps=reps, cfg=cfg))
    return rows


# -- command-line helpers: parsing, JSON, plot ------------------------------------------------
_SIZE_RE = re.compile(r"(?:(\d+)x)?(\d+)([KMG]?)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_configs(text: str) -> dict[str, dict]:
    """'sgd,momentum,rmsprop' -> {name: configuration} (see `configuration`); 'all' -> every
    configuration of `CONFIGS`."""
    specs = [n.strip() for n in text.split(",") if n.strip()]
    if specs == ["all"]:
        return dict(CONFIGS)
    if not specs:
        raise ValueError(f"no configuration in {text!r}; choose from {', '.join(CONFIGS)}, a "
                         "registered optimizer or package.module:Class (comma-separated), or all")
    return dict(configuration(spec) for spec in specs)


def parse_sizes(text: str) -> dict[str, Callable[[], list[tuple[int, ...]]]]:
    """Comma-separated sizes: a name (16M, resnet50, 200x1000, 1M, 50x1000), `N` elements in one
    tensor or `COUNTxN` tensors of N elements each; N may end in K, M or G (powers of 1024)."""
    named = {**SIZES, **QUICK_SIZES}
    sizes: dict[str, Callable[[], list[tuple[int, ...]]]] = {}
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if name in named:
            sizes[name] = named[name]
            continue
        m = _SIZE_RE.fullmatch(name)
        count, numel = (int(m[1] or 1), int(m[2]) * _UNITS[m[3]]) if m else (0, 0)
        if count < 1 or numel < 1:
            raise ValueError(f"bad size {name!r}: use a name ({', '.join(named)}), N or COUNTxN, "
                             "N an element count with an optional K/M/G suffix")
        sizes[name] = lambda count=count, numel=numel: [(numel,)] * count
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def to_json(rows: list[Row], reps: int | None = None,
            configs: dict[str, dict] | None = None) -> dict:
    """The benchmark's results, with the host and library versions, as JSON-ready data;
    `configs` (name -> configuration) defaults to `CONFIGS`."""
    import platform

    import llvmlite

    from .._version import __version__
    from ..runtime.cpu import host_target, num_threads

    torch_version = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch_version = torch.__version__
    target = host_target()
    host = {
        "cpu": target.cpu, "triple": target.triple, "threads": num_threads(),
        "machine": platform.machine(), "python": platform.python_version(),
        "numpy": np.__version__, "llvmlite": llvmlite.__version__, "torch": torch_version,
    }
    known = CONFIGS if configs is None else configs
    configs = {r.config: known.get(r.config, {}) for r in rows}
    return {"stepjit": __version__, "host": host, "reps": reps, "configs": configs,
            "rows": [dataclasses.asdict(r) for r in rows]}


def rows_from_json(data: dict) -> list[Row]:
    """The rows of a `to_json` document (or of a file written by `stepjit bench --json`)."""
    names = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in data["rows"]]


def plot(rows: list[Row], path: str) -> None:
    """Save a figure: step time of every competitor per row, and the compile break-even."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'stepjit[plot]'") from exc

    labels = [f"{r.config}\n{r.size}" for r in rows]
    x = np.arange(len(rows))
    competitors = ["stepjit", "numpy", "torch_fused", "probe"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(rows) + 2), 8))
    width = 0.8 / len(competitors)
    for i, name in enumerate(competitors):
        values = [r.step_ms.get(name, np.nan) for r in rows]
        ax1.bar(x + (i - 1.5) * width, values, width, label=name)
    ax1.set_yscale("log")
    ax1.set_ylabel("step time, ms (log)")
    ax1.set_title("median step() time")
    ax1.set_xticks(x, labels, fontsize=7)
    ax1.legend(fontsize=8)
    any_even = False
    for i, name in enumerate(["numpy", "torch_fused"]):
        values = [r.break_even_steps.get(name) for r in rows]
        any_even = any_even or any(v is not None for v in values)
        ax2.bar(x + (i - 0.5) * 0.4, [np.nan if v is None else v for v in values], 0.4,
                label=f"against {name}")
        for xi, r, v in zip(x, rows, values):
            if v is None and name in r.step_ms:  # x in data, y in axes coordinates
                ax2.text(xi + (i - 0.5) * 0.4, 0.02, "never", rotation=90, ha="center",
                         va="bottom", fontsize=7, transform=ax2.get_xaxis_transform())
    if any_even:
        ax2.set_yscale("log")
    ax2.set_ylabel("steps (log)")
    ax2.set_title("steps until the cold compile has paid for itself")
    ax2.set_xticks(x, labels, fontsize=7)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the subcommand ---------------------------------------------------------------------------
def command(args: argparse.Namespace) -> int:
    """`stepjit bench`: compile cost against step time, beside numpy, torch and a probe."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'stepjit[plot]'")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{flag} {path}: the directory {Path(path).parent} does not exist")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    configs = args.configs or ({} if args.optimizer else dict(CONFIGS))
    if args.optimizer:
        configs = {**configs, args.optimizer[0]: args.optimizer[1]}
    reps = args.reps or (3 if args.quick else 7)
    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"{message} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    rows = run(configs, sizes, reps=reps, progress=progress)
    print(format_table(rows))
    print()
    print(format_phases(rows))
    if args.json:
        import json

        data = to_json(rows, reps=reps, configs=configs)
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        progress(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
        progress(f"wrote {args.plot}")
    progress("done")
    return 0


def _epilog() -> str:
    configs = "; ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in cfg.items())})"
                        for name, cfg in CONFIGS.items())
    return (
        f"Configurations (float32): {configs}; or any registered optimizer at its defaults "
        f"({', '.join(OPTIMIZERS)}), or your own class as package.module:Class (a hyperparameter "
        f"without a default gets {PLACEHOLDER}). Sizes: 16M = one tensor of 16M elements, "
        "resnet50 = 147 tensors shaped like ResNet-50's (12.5M elements), 200x1000 = 200 tensors "
        f"of 1000 elements; default: {', '.join(SIZES)}; --quick: {', '.join(QUICK_SIZES)}. "
        "--json writes {stepjit, host, reps, configs, rows}; each row has config, size, dtype, "
        "tensors, elements, bytes_per_element, compile_ms {trace, lower, parse, optimize, "
        "codegen, load}, disk_load_ms, first_step_ms {cold, disk, memory}, step_ms and gbps "
        "{stepjit, numpy, probe, torch_fused}, break_even_steps {numpy, torch_fused} (null: "
        "never; numpy and torch_fused only where the optimizer has them)."
    )


def add_parser(commands) -> argparse.ArgumentParser:
    """Add `stepjit bench` to the subcommands `commands`."""
    b = commands.add_parser(
        "bench", help="compile cost against step time, beside numpy and torch",
        description="For each configuration and size: the cold compile split into its phases "
        "(trace, lower, parse, optimize, machine code, load), the load from the disk cache, the "
        "first step() cold / from disk / from memory, the median step time beside numpy's "
        "in-place step (SGD and Adam), torch's fused optimizer of the same name (when torch is "
        "installed and has one) and a streaming probe moving the same bytes, GB/s, and the "
        "number of steps after which compiling has paid off (-: no such competitor). "
        "Competitors run interleaved in the same process. Nothing touches your kernel cache.",
        epilog=_epilog(),
    )
    b.add_argument("--quick", action="store_true",
                   help=f"small sizes ({', '.join(QUICK_SIZES)}) and 3 repetitions: a few seconds")
    b.add_argument("--sizes", type=checked(parse_sizes), default=None, metavar="LIST",
                   help="comma-separated sizes: names, N (one tensor of N elements) or COUNTxN; "
                   "N may end in K, M or G (e.g. 4M,100x1000)")
    b.add_argument("--configs", type=checked(parse_configs), default=None, metavar="LIST",
                   help=f"comma-separated configurations: {', '.join(CONFIGS)} (the default: "
                   "all), a registered optimizer or package.module:Class")
    b.add_argument("--optimizer", type=checked(optimizer_configuration), default=None,
                   metavar="NAME",
                   help="also (without --configs: only) this optimizer at its defaults: a "
                   "registered name or package.module:Class")
    b.add_argument("--reps", type=checked(positive_int), default=None,
                   help="timed repetitions per competitor (default: 7; 3 with --quick)")
    b.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also save a figure: step-time bars and the break-even (needs "
                   "matplotlib: pip install 'stepjit[plot]')")
    b.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    b.set_defaults(func=command)
    return b
