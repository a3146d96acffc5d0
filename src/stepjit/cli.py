"""The `stepjit` command: see the kernels a configuration compiles to, benchmark them, manage the
kernel cache.

    stepjit dump --momentum 0.9 --weight-decay 1e-4 --stage llvm-opt
    stepjit bench --quick --json bench.json
    stepjit cache info

Exit status: 0 on success, 1 when the work itself fails, 2 for a bad flag or value (a one-line
message on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .ir import UpdateRule

DTYPES = ("float32", "float64", "float16", "bfloat16")
LLVM_STAGES = ("ir", "llvm", "llvm-opt", "asm")
CUDA_STAGES = ("ir", "cuda", "ptx")
STAGES = ("ir", "llvm", "llvm-opt", "asm", "cuda", "ptx")
SUFFIX = {
    "ir": ".ir.txt", "llvm": ".ll", "llvm-opt": ".opt.ll", "asm": ".s", "cuda": ".cu",
    "ptx": ".ptx",
}
DEFAULT_ARCH = "sm_75"
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "lars")
# dump flags that are optimizer hyperparameters: flag -> keyword argument
HYPERPARAMETER_FLAGS = {
    "--lr": "lr", "--momentum": "momentum", "--dampening": "dampening",
    "--weight-decay": "weight_decay", "--nesterov": "nesterov", "--scale": "scale",
    "--clip-norm": "clip_norm", "--betas": "betas", "--eps": "eps", "--amsgrad": "amsgrad",
    "--decoupled-weight-decay": "decoupled_weight_decay", "--alpha": "alpha",
    "--centered": "centered", "--trust-coef": "trust_coef",
}


class UsageError(Exception):
    """A bad flag, value or combination: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse `type` whose ValueError message reaches the user as is."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _cuda_arch(text: str) -> str:
    if not re.fullmatch(r"(sm_|compute_)?\d{2,3}", text):
        raise ValueError(f"bad CUDA architecture {text!r}: use e.g. sm_75, sm_90 or compute_90")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text}")
    return value


# -- stepjit dump ---------------------------------------------------------------------------------
def configured_rule(args: argparse.Namespace) -> UpdateRule:
    """The update rule of the configuration given by the dump flags (checked as the optimizer
    checks it: a bad value raises ValueError or TypeError with the optimizer's message).

    Only the flags given are passed, so each optimizer keeps its own defaults; a flag the chosen
    optimizer does not take is a UsageError."""
    import inspect

    from .optim import OPTIMIZERS as CLASSES
    from .optim import rule_for

    accepted = inspect.signature(CLASSES[args.optimizer].__init__).parameters
    hyper = {}
    for flag, name in HYPERPARAMETER_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in accepted:
            raise UsageError(f"{flag} does not apply to {args.optimizer}")
        hyper[name] = tuple(value) if name == "betas" else value
    # built on the reference backend: checking the flags compiles nothing
    return rule_for(args.optimizer, args.dtype, grad_dtype=args.grad_dtype, **hyper)


def _import_cuda(module: str, what: str) -> ModuleType:
    """Import a CUDA module lazily; UsageError (exit 2) when it is not available."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if module == "stepjit.codegen.cuda":
            raise UsageError(f"the CUDA code generator is not available ({exc})") from None
        raise UsageError(f"{what} is not available ({exc}); "
                         "install the CUDA extra: pip install 'stepjit[cuda]'") from None


def render_stage(rule: UpdateRule, stage: str, arch: str = DEFAULT_ARCH) -> str:
    """The text of one compile stage of `rule` (see `STAGES`), ending in a newline."""
    if stage == "ir":
        text = rule.text
    elif stage in ("llvm", "llvm-opt", "asm"):
        from .runtime import cpu

        if stage == "llvm":
            text = cpu.lower_text(rule)
        elif stage == "llvm-opt":
            text = str(cpu.optimize(cpu.lower_text(rule)))
        else:
            text = cpu.assembly(rule)
    else:
        codegen = _import_cuda("stepjit.codegen.cuda", "the CUDA code generator")
        text = codegen.render(rule)
        if stage == "ptx":
            text = _import_cuda("stepjit.runtime.gpu", "NVRTC (PTX)").ptx(text, arch)
    return text if text.endswith("\n") else text + "\n"


def _stages(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(backend, stages) from --backend and --stage, or UsageError when they disagree."""
    backend, stage = args.backend, args.stage
    if backend is None:
        backend = "cuda" if stage in ("cuda", "ptx") else "llvm"
    own = LLVM_STAGES if backend == "llvm" else CUDA_STAGES
    if stage is None:
        stage = "llvm" if args.backend == "llvm" else "cuda" if backend == "cuda" else "ir"
    if stage == "all":
        return backend, list(own)
    if stage not in own:
        raise UsageError(f"--stage {stage} is not a stage of the {backend} backend "
                         f"(its stages: {', '.join(own)}, all)")
    return backend, [stage]


def cmd_dump(args: argparse.Namespace) -> int:
    """`stepjit dump`: print (or write into --out) the kernels of one configuration."""
    _, stages = _stages(args)
    if args.backend == "cuda" or any(s in ("cuda", "ptx") for s in stages):
        _import_cuda("stepjit.codegen.cuda", "the CUDA code generator")
    try:
        rule = configured_rule(args)
    except (TypeError, ValueError) as exc:  # the optimizer's own message, without "param group 0"
        raise UsageError(re.sub(r"^param group 0: ", "", str(exc))) from None
    texts = {f"{rule.name}{SUFFIX[s]}": render_stage(rule, s, args.arch) for s in stages}
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (out / name).write_text(text)
            print(out / name)
    elif len(texts) == 1:
        sys.stdout.write(next(iter(texts.values())))
    else:
        for name, text in texts.items():
            sys.stdout.write(f"==> {name} <==\n{text}\n")
    return 0


# -- stepjit bench --------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """`stepjit bench`: compile cost against step time, beside numpy, torch and a probe."""
    from . import bench

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'stepjit[plot]'")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{flag} {path}: the directory {Path(path).parent} does not exist")
    sizes = args.sizes or (bench.QUICK_SIZES if args.quick else bench.SIZES)
    configs = args.configs or list(bench.CONFIGS)
    reps = args.reps or (3 if args.quick else 7)

    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"{message} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    rows = bench.run(configs, sizes, reps=reps, progress=progress)
    print(bench.format_table(rows))
    print()
    print(bench.format_phases(rows))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(bench.to_json(rows, reps=reps), indent=1) + "\n")
        progress(f"wrote {args.json}")
    if args.plot:
        bench.plot(rows, args.plot)
        progress(f"wrote {args.plot}")
    progress("done")
    return 0


# -- stepjit cache --------------------------------------------------------------------------------
_MAGIC = b"STEPJIT\x01"  # the header of every file runtime/cache.py's DiskCache writes
_ENTRY = re.compile(r"[0-9a-f]{16,64}\.(o|cubin|ptx)")  # entries are named by a hash of their key


def is_cache_entry(path: Path) -> bool:
    """Whether `path` is a kernel the library cached: a hash-named file that is a `DiskCache`
    file (with its header) or a CUDA image (the CUDA backend keeps cubin/PTX as they are)."""
    if not _ENTRY.fullmatch(path.name) or path.is_symlink() or not path.is_file():
        return False
    if path.suffix in (".cubin", ".ptx"):
        return path.parent.name == "cuda"
    # without following a link or waiting on a FIFO put there since the checks above
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        return os.read(fd, len(_MAGIC)) == _MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def cache_entries(root: Path) -> dict[str, list[Path]]:
    """Kernel files under the cache directory `root`, by backend subdirectory. Only files that
    `is_cache_entry` recognises count: nothing else is ever reported or removed."""
    found: dict[str, list[Path]] = {}
    if not root.is_dir():
        return found
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        files = [path for path in sorted(sub.iterdir()) if is_cache_entry(path)]
        if files:
            found[sub.name] = files
    return found


def cache_temporaries(root: Path) -> list[Path]:
    """Files in the backend subdirectories of the cache directory `root` that a write left
    behind when its process was killed (see `stepjit.runtime.cache.is_temporary`)."""
    from .runtime.cache import is_temporary

    if not root.is_dir():
        return []
    return [
        path
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
        for path in sorted(sub.iterdir())
        if is_temporary(path) and not path.is_symlink() and path.is_file()
    ]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def cmd_cache(args: argparse.Namespace) -> int:
    """`stepjit cache info | clear`."""
    from .runtime.cache import default_cache_dir

    root = default_cache_dir()
    entries = cache_entries(root)
    temporaries = cache_temporaries(root)
    if args.action == "info":
        print(f"location  {root}{'' if root.is_dir() else '  (does not exist yet)'}")
        total_n = total_bytes = 0
        for backend, files in entries.items():
            size = sum(p.stat().st_size for p in files)
            total_n, total_bytes = total_n + len(files), total_bytes + size
            print(f"{backend:<9} {len(files)} entries, {_human(size)}")
        if temporaries:
            size = sum(p.stat().st_size for p in temporaries)
            print(f"{'leftover':<9} {len(temporaries)} temporary files, {_human(size)} (left by "
                  "interrupted writes; clear removes them)")
        print(f"{'total':<9} {total_n} entries, {_human(total_bytes)}")
        return 0
    removed = 0
    for files in entries.values():
        for path in files:
            path.unlink(missing_ok=True)
            removed += 1
    for path in temporaries:
        path.unlink(missing_ok=True)
    also = f" and {len(temporaries)} temporary files" if temporaries else ""
    print(f"removed {removed} entries{also} from {root}")
    return 0


# -- the parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `stepjit` command and its subcommands."""
    from . import bench

    parser = _Parser(
        prog="stepjit",
        description="stepjit: optimizers whose step() runs compiled, fused kernels. See the "
        "kernels a configuration compiles to, benchmark compile cost against step time, and "
        "manage the on-disk kernel cache.",
        epilog="Environment: STEPJIT_CACHE_DIR (kernel cache location), STEPJIT_DUMP_DIR (write "
        "every kernel the library compiles), STEPJIT_NUM_THREADS, STEPJIT_LOG=debug. "
        "Run 'stepjit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"stepjit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    dump = commands.add_parser(
        "dump", help="print the kernels one configuration compiles to",
        description="Print the kernels one optimizer configuration compiles to, at one stage of "
        "the pipeline (or every stage: --stage all). Only which terms are on (momentum, nesterov, "
        "weight decay, clipping) and the dtypes change the kernel; the numeric values are "
        "kernel arguments, checked here as the optimizer checks them. CUDA source and PTX need "
        "no GPU.",
        epilog="Stages: ir = the update rule, one line per expression; llvm = LLVM IR before "
        "optimization; llvm-opt = after O3 for this CPU; asm = this CPU's assembly; cuda = CUDA "
        "C source; ptx = PTX from NVRTC for --arch. With --out, each stage goes to "
        "DIR/<rule name><suffix> (.ir.txt .ll .opt.ll .s .cu .ptx), the rule name spelling out "
        "the configuration (e.g. sgd_momentum_decay_float32_float32), and the paths written are "
        "printed. STEPJIT_DUMP_DIR=DIR writes files named the same way for every kernel the "
        "library compiles while your own program runs.",
    )
    dump.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                      help="the optimizer (default: sgd)")
    hyper = dump.add_argument_group(
        "hyperparameters", "Each defaults to the optimizer's own default; a flag the chosen "
        "optimizer does not take is an error.")
    hyper.add_argument("--lr", type=float, help="learning rate (all)")
    hyper.add_argument("--weight-decay", type=float, metavar="WD", help="weight decay (all)")
    hyper.add_argument("--scale", type=float, help="factor applied to every gradient first (all)")
    hyper.add_argument("--clip-norm", type=float, metavar="NORM",
                       help="clip each gradient tensor to this L2 norm when > 0 (all)")
    hyper.add_argument("--momentum", type=float, help="momentum factor (sgd, rmsprop, lars)")
    hyper.add_argument("--dampening", type=float, help="dampening (sgd)")
    hyper.add_argument("--nesterov", action="store_const", const=True,
                       help="Nesterov momentum (sgd; needs --momentum > 0 and dampening 0)")
    hyper.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"),
                       help="Adam's moment decay rates (adam, adamw)")
    hyper.add_argument("--eps", type=float, help="denominator term (adam, adamw, rmsprop)")
    hyper.add_argument("--amsgrad", action="store_const", const=True,
                       help="AMSGrad: the maximum of the second moments (adam, adamw)")
    hyper.add_argument("--decoupled-weight-decay", action="store_const", const=True,
                       help="AdamW-style decay (adam)")
    hyper.add_argument("--alpha", type=float, help="smoothing constant (rmsprop)")
    hyper.add_argument("--centered", action="store_const", const=True,
                       help="centered RMSprop (rmsprop)")
    hyper.add_argument("--trust-coef", type=float, help="LARS trust coefficient (lars)")
    dump.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="parameter dtype (default: float32)")
    dump.add_argument("--grad-dtype", choices=DTYPES, default=None,
                      help="gradient dtype (default: the parameter dtype)")
    dump.add_argument("--backend", choices=("llvm", "cuda"), default=None,
                      help="llvm (CPU) or cuda; default: the backend of --stage, else llvm")
    dump.add_argument("--stage", choices=(*STAGES, "all"), default=None,
                      help="what to print (default: ir; llvm with --backend llvm; cuda with "
                      "--backend cuda); all: every stage of the backend")
    dump.add_argument("--arch", type=_checked(_cuda_arch), default=DEFAULT_ARCH,
                      help="GPU architecture for --stage ptx, e.g. sm_90 (default: "
                      f"{DEFAULT_ARCH}, the oldest CUDA 13 supports)")
    dump.add_argument("--out", metavar="DIR", default=None,
                      help="write one file per kernel and stage into DIR instead of stdout")
    dump.set_defaults(func=cmd_dump)

    default_sizes = ", ".join(bench.SIZES)
    quick_sizes = ", ".join(bench.QUICK_SIZES)
    configs = "; ".join(
        f"{name} ({', '.join(f'{k}={v}' for k, v in cfg.items())})"
        for name, cfg in bench.CONFIGS.items()
    )
    b = commands.add_parser(
        "bench", help="compile cost against step time, beside numpy and torch",
        description="For each configuration and size: the cold compile split into its phases "
        "(trace, lower, parse, optimize, machine code, load), the load from the disk cache, the "
        "first step() cold / from disk / from memory, the median step time beside numpy's "
        "in-place step, torch's fused optimizer (SGD or Adam, when torch is installed) and a "
        "streaming probe moving the same bytes, GB/s, and the number of steps after which "
        "compiling has paid off. Competitors run interleaved in the same process. Nothing "
        "touches your kernel cache.",
        epilog=f"Configurations (float32): {configs}. Sizes: 16M = one tensor of 16M elements, "
        "resnet50 = 147 tensors shaped like ResNet-50's (12.5M elements), 200x1000 = 200 tensors "
        f"of 1000 elements; default: {default_sizes}; --quick: {quick_sizes}. --json writes "
        "{stepjit, host, reps, configs, rows}; each row has config, size, dtype, tensors, "
        "elements, bytes_per_element, compile_ms {trace, lower, parse, optimize, codegen, "
        "load}, disk_load_ms, first_step_ms {cold, disk, memory}, step_ms and gbps {stepjit, "
        "numpy, probe, torch_fused}, break_even_steps {numpy, torch_fused} (null: never).",
    )
    b.add_argument("--quick", action="store_true",
                   help=f"small sizes ({quick_sizes}) and 3 repetitions: a few seconds")
    b.add_argument("--sizes", type=_checked(bench.parse_sizes), default=None, metavar="LIST",
                   help="comma-separated sizes: names, N (one tensor of N elements) or COUNTxN; "
                   "N may end in K, M or G (e.g. 4M,100x1000)")
    b.add_argument("--configs", type=_checked(bench.parse_configs), default=None, metavar="LIST",
                   help=f"comma-separated configurations ({', '.join(bench.CONFIGS)}; default: "
                   "all)")
    b.add_argument("--reps", type=_checked(_positive_int), default=None,
                   help="timed repetitions per competitor (default: 7; 3 with --quick)")
    b.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also save a figure: step-time bars and the break-even (needs "
                   "matplotlib: pip install 'stepjit[plot]')")
    b.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    b.set_defaults(func=cmd_bench)

    cache = commands.add_parser(
        "cache", help="show or clear the on-disk kernel cache",
        description="The compiled kernels kept on disk between runs (STEPJIT_CACHE_DIR, else the "
        "user's cache directory). info: location, entries and size per backend; clear: remove "
        "every entry (kernels are recompiled when next needed) and any temporary file an "
        "interrupted write left behind.",
    )
    cache.add_argument("action", choices=("info", "clear"), help="info or clear")
    cache.set_defaults(func=cmd_cache)
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    """Run the `stepjit` command with `argv` (default: the process's arguments); return the exit
    status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    prog = f"stepjit {args.command}"
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (stepjit dump | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if os.environ.get("STEPJIT_LOG", "").lower() == "debug":
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {type(exc).__name__}: {message} "
              "(STEPJIT_LOG=debug shows the traceback)", file=sys.stderr)
        return 1
