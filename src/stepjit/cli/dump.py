"""`stepjit dump`: the kernels one optimizer configuration compiles to, at any stage.

Its hyperparameter flags come from the optimizer registry: every keyword argument of every
registered optimizer's `__init__` (and of a user's `--optimizer package.module:Class`) is a flag
`--name-with-dashes`, typed by its default (see `add_hyperparameters`).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ..ir import DType
from ..optim import OPTIMIZERS, registry
from ..optim.optimizer import STATE_DTYPES
from ..runtime.select import BACKENDS
from .args import UsageError, checked, optimizer_class

if TYPE_CHECKING:
    from ..ir import UpdateRule

DTYPES = ("float32", "float64", "float16", "bfloat16")
DUMP_BACKENDS = ("llvm", "cuda")
LLVM_STAGES = tuple(BACKENDS["llvm"].stages)
CUDA_STAGES = tuple(BACKENDS["cuda"].stages)
SUFFIX = {stage: suffix for b in DUMP_BACKENDS for stage, suffix in BACKENDS[b].stages.items()}
"""The file suffix of each stage, as the library's STEPJIT_DUMP_DIR names them too."""
STAGES = tuple(SUFFIX)
DEFAULT_ARCH = "sm_75"
DEFAULT_OPTIMIZER = "sgd"
# dump's own options: a hyperparameter of the same name cannot be given on the command line
RESERVED = frozenset({"optimizer", "dtype", "grad_dtype", "state_dtype", "master_weights",
                      "backend", "stage",
                      "arch", "out",
                      "help", "func", "command", "hyperparameters"})


# -- the hyperparameter flags ---------------------------------------------------------------------
def flag(name: str) -> str:
    """The command-line flag of hyperparameter `name`: `weight_decay` -> `--weight-decay`."""
    return "--" + name.replace("_", "-")


def flag_options(name: str, default: object) -> dict:
    """argparse options for a hyperparameter, typed by its default: a bool is a flag (with its
    `--no-` form), a tuple takes that many floats, a string a string, anything else (a number, or
    `required`) one float."""
    if isinstance(default, bool):
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(default, (tuple, list)):
        letter = name[0].upper()
        return {"type": float, "nargs": len(default),
                "metavar": tuple(f"{letter}{i + 1}" for i in range(len(default)))}
    if isinstance(default, str):
        return {"type": str}
    return {"type": float}


def _shown(default: object) -> str:
    if default is registry.required:
        return "required"
    if isinstance(default, (tuple, list)):
        return " ".join(map(str, default))
    return str(default)


def _flag_help(name: str, classes: Mapping[str, type]) -> str:
    """Which optimizers take `name`, with their defaults: 'adam, adamw: 0.001; sgd: required'."""
    by_default: dict[str, list[str]] = {}
    for label, cls in classes.items():
        defaults = registry.hyperparameters(cls)
        if name in defaults:
            by_default.setdefault(_shown(defaults[name]), []).append(label)
    return "; ".join(f"{', '.join(labels)}: {d}" for d, labels in by_default.items())


def add_hyperparameters(parser: argparse.ArgumentParser, classes: Mapping[str, type]) -> dict:
    """One flag per hyperparameter of `classes` (label -> class; the first to declare a name sets
    its type); returns {hyperparameter name: flag}."""
    group = parser.add_argument_group(
        "hyperparameters", "Each defaults to the chosen optimizer's own default (listed below by "
        "optimizer); a flag the chosen optimizer does not take is an error.")
    flags: dict[str, str] = {}
    for cls in classes.values():
        for name, default in registry.hyperparameters(cls).items():
            if name in flags or name in RESERVED:
                continue
            flags[name] = flag(name)
            group.add_argument(flags[name], dest=name, default=None,
                               help=_flag_help(name, classes), **flag_options(name, default))
    return flags


class _Silent(argparse.ArgumentParser):
    """A parser that raises UsageError instead of printing: the full parse reports errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def requested_optimizer(argv: Sequence[str]) -> tuple[str, type] | None:
    """The first phase of parsing: (spec, class) of a user's `--optimizer package.module:Class`
    in `argv`, so that its own hyperparameters become flags; None for a registered name, none
    given, or one that does not load (the full parse reports it)."""
    pre = _Silent(add_help=False)
    pre.add_argument("--optimizer")
    try:
        spec = pre.parse_known_args(list(argv))[0].optimizer
    except UsageError:
        return None
    if spec is None or spec in OPTIMIZERS:
        return None
    try:
        return spec, optimizer_class(spec)
    except ValueError:
        return None


def optimizer_spec(text: str) -> str:
    """`text` when it names an optimizer (see `stepjit.optim.resolve`), else ValueError."""
    optimizer_class(text)
    return text


# -- the rule and its stages ----------------------------------------------------------------------
def configured_rule(args: argparse.Namespace) -> UpdateRule:
    """The update rule of the configuration given by the dump flags (checked as the optimizer
    checks it: a bad value raises ValueError or TypeError with the optimizer's message).

    Only the flags given are passed, so each optimizer keeps its own defaults; a flag the chosen
    optimizer does not take is a UsageError."""
    cls = optimizer_class(args.optimizer)
    accepted = registry.hyperparameters(cls)
    hyper = {}
    for name, option in args.hyperparameters.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in accepted:
            raise UsageError(f"{option} does not apply to {args.optimizer}")
        hyper[name] = tuple(value) if isinstance(value, list) else value
    if args.master_weights and not DType(args.dtype).is_half:
        raise UsageError("--master-weights is for float16 and bfloat16 parameters (--dtype)")
    # built on the reference backend: checking the flags compiles nothing
    return registry.rule_for(cls, args.dtype, grad_dtype=args.grad_dtype,
                             state_dtype=args.state_dtype, master_weights=args.master_weights,
                             **hyper)


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
    elif stage in LLVM_STAGES:
        from ..runtime import cpu

        if stage == "llvm":
            text = cpu.lower_text(rule)
        elif stage == "llvm-opt":
            text = str(cpu.optimize(cpu.lower_text(rule)))
        else:
            text = cpu.assembly(rule)
    else:
        gpu = _import_cuda("stepjit.runtime.gpu", "the CUDA code generator")
        text = gpu.render(rule)
        if stage == "ptx":
            text = gpu.ptx(text, arch)
    return text if text.endswith("\n") else text + "\n"


def _stages(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(backend, stages) from --backend and --stage, or UsageError when they disagree."""
    backend, stage = args.backend, args.stage
    if backend is None:
        backend = "cuda" if stage in CUDA_STAGES and stage not in LLVM_STAGES else "llvm"
    own = LLVM_STAGES if backend == "llvm" else CUDA_STAGES
    if stage is None:
        stage = "llvm" if args.backend == "llvm" else "cuda" if backend == "cuda" else "ir"
    if stage == "all":
        return backend, list(own)
    if stage not in own:
        raise UsageError(f"--stage {stage} is not a stage of the {backend} backend "
                         f"(its stages: {', '.join(own)}, all)")
    return backend, [stage]


def command(args: argparse.Namespace) -> int:
    """`stepjit dump`: print (or write into --out) the kernels of one configuration."""
    _, stages = _stages(args)
    if args.backend == "cuda" or any(s not in LLVM_STAGES for s in stages):
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


# -- the parser -----------------------------------------------------------------------------------
def _cuda_arch(text: str) -> str:
    if not re.fullmatch(r"(sm_|compute_)?\d{2,3}", text):
        raise ValueError(f"bad CUDA architecture {text!r}: use e.g. sm_75, sm_90 or compute_90")
    return text


DESCRIPTION = (
    "Print the kernels one optimizer configuration compiles to, at one stage of the pipeline (or "
    "every stage: --stage all). Only which terms are on (momentum, weight decay, clipping, ...) "
    "and the dtypes change the kernel; the numeric values are kernel arguments, checked here as "
    "the optimizer checks them. CUDA source and PTX need no GPU."
)
EPILOG = (
    "Stages: ir = the update rule, one line per expression; llvm = LLVM IR before optimization; "
    "llvm-opt = after O3 for this CPU; asm = this CPU's assembly; cuda = CUDA C source; ptx = PTX "
    "from NVRTC for --arch. With --out, each stage goes to DIR/<rule name><suffix> "
    f"({' '.join(SUFFIX.values())}), the rule name spelling out the configuration (e.g. "
    "sgd_momentum_decay_float32_float32), and the paths written are printed. "
    "STEPJIT_DUMP_DIR=DIR writes files named the same way for every kernel the library compiles "
    "while your own program runs."
)


def add_parser(commands, user: tuple[str, type] | None = None) -> argparse.ArgumentParser:
    """Add `stepjit dump` to the subcommands `commands`; `user` (see `requested_optimizer`) adds
    the hyperparameters of a user's optimizer class."""
    dump = commands.add_parser("dump", help="print the kernels one configuration compiles to",
                               description=DESCRIPTION, epilog=EPILOG)
    dump.add_argument("--optimizer", type=checked(optimizer_spec), default=DEFAULT_OPTIMIZER,
                      metavar="NAME",
                      help=f"a registered optimizer ({', '.join(OPTIMIZERS)}) or your own class "
                      f"as package.module:Class (default: {DEFAULT_OPTIMIZER})")
    classes = dict([user] if user else []) | dict(OPTIMIZERS)
    hyperparameters = add_hyperparameters(dump, classes)
    dump.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="parameter dtype (default: float32)")
    dump.add_argument("--grad-dtype", choices=DTYPES, default=None,
                      help="gradient dtype (default: the parameter dtype)")
    dump.add_argument("--state-dtype", choices=tuple(STATE_DTYPES), default=None,
                      help="how state buffers are stored (default: the compute type)")
    dump.add_argument("--master-weights", action="store_true",
                      help="a float32 copy of a half parameter in the state (with a half --dtype)")
    dump.add_argument("--backend", choices=DUMP_BACKENDS, default=None,
                      help="llvm (CPU) or cuda; default: the backend of --stage, else llvm")
    dump.add_argument("--stage", choices=(*STAGES, "all"), default=None,
                      help="what to print (default: ir; llvm with --backend llvm; cuda with "
                      "--backend cuda); all: every stage of the backend")
    dump.add_argument("--arch", type=checked(_cuda_arch), default=DEFAULT_ARCH,
                      help="GPU architecture for --stage ptx, e.g. sm_90 (default: "
                      f"{DEFAULT_ARCH}, the oldest CUDA 13 supports)")
    dump.add_argument("--out", metavar="DIR", default=None,
                      help="write one file per kernel and stage into DIR instead of stdout")
    dump.set_defaults(func=command, hyperparameters=hyperparameters)
    return dump
