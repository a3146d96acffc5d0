"""The `stepjit` parser, built from one function per subcommand, and the entry point `main`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._version import __version__
from . import bench, cache, dump
from .args import Parser, UsageError

DESCRIPTION = (
    "stepjit: optimizers whose step() runs compiled, fused kernels. See the kernels a "
    "configuration compiles to, benchmark compile cost against step time, and manage the on-disk "
    "kernel cache."
)
EPILOG = (
    "Environment: STEPJIT_CACHE_DIR (kernel cache location), STEPJIT_DUMP_DIR (write every kernel "
    "the library compiles), STEPJIT_NUM_THREADS, STEPJIT_LOG=debug. Run 'stepjit COMMAND --help' "
    "for a command's options."
)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser of the `stepjit` command and its subcommands. Parsing is in two
    phases: a user's `--optimizer package.module:Class` in `argv` is found first, so that
    `stepjit dump` has a flag for each of its hyperparameters."""
    parser = Parser(prog="stepjit", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"stepjit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dump.add_parser(commands, dump.requested_optimizer(argv))
    bench.add_parser(commands)
    cache.add_parser(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its failures become an exit status and one line on stderr."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `stepjit` command with `argv` (default: the process's arguments); return the exit
    status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    return _run(args)
