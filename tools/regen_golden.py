"""Regenerate the golden text of small lowered rules in tests/golden/ (never edit those by hand).

    python tools/regen_golden.py          # rewrite the files
    python tools/regen_golden.py --check  # exit status 1 if a file is stale (tests check this too)

For each rule in GOLDEN: `<rule name>.ll`, its LLVM IR before optimization (`stepjit.runtime.cpu.
lower_text`) with the host's target triple and data layout replaced by placeholders, so that the
file is the same on every machine; and, once the CUDA code generator exists, `<rule name>.cu`,
its CUDA source. Review the diff of a regenerated file like code: it is what the compiler sees.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

from stepjit.ir import UpdateRule
from stepjit.optim import rule_for

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"

# (registered optimizer, dtype, hyperparameters): small, and between them the plain element loop,
# a state buffer, the per-tensor flag, the reduce kernel and bfloat16 rounding
GOLDEN: list[tuple[str, str, dict]] = [
    ("sgd", "float32", {}),
    ("sgd", "bfloat16", {"momentum": 0.9, "clip_norm": 1.0}),
]


def golden_rules() -> list[UpdateRule]:
    """The rules whose lowered text is kept in tests/golden/ (see `stepjit.optim.rule_for`)."""
    return [rule_for(name, dtype, **hyperparameters) for name, dtype, hyperparameters in GOLDEN]


def normalize_llvm(text: str) -> str:
    """LLVM IR text with the host-specific target lines replaced by placeholders."""
    text = re.sub(r'^target triple = ".*"$', 'target triple = "<host>"', text, flags=re.M)
    text = re.sub(r'^target datalayout = ".*"$', 'target datalayout = "<host>"', text, flags=re.M)
    return text if text.endswith("\n") else text + "\n"


def cuda_available() -> bool:
    """Whether the CUDA code generator (stepjit.codegen.cuda) exists in this checkout."""
    return importlib.util.find_spec("stepjit.codegen.cuda") is not None


def llvm_text(rule: UpdateRule) -> str:
    """The golden LLVM text of `rule` (half types lowered as on a CPU with F16C)."""
    from stepjit.runtime.cpu import lower_text

    return normalize_llvm(lower_text(rule, f16_native=True))


def cuda_text(rule: UpdateRule) -> str:
    """The golden CUDA source of `rule`."""
    from stepjit.runtime.gpu import render

    text = render(rule)
    return text if text.endswith("\n") else text + "\n"


def golden_files() -> dict[str, Callable[[], str]]:
    """File name in tests/golden/ -> a function producing its expected text."""
    files: dict[str, Callable[[], str]] = {}
    for rule in golden_rules():
        files[f"{rule.name}.ll"] = lambda rule=rule: llvm_text(rule)
        if cuda_available():
            files[f"{rule.name}.cu"] = lambda rule=rule: cuda_text(rule)
    return files


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) every golden file; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name, make in golden_files().items():
        path = GOLDEN_DIR / name
        text = make()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
            print(f"wrote {path}")
    if not cuda_available():
        print("stepjit.codegen.cuda is not available: no .cu files", file=sys.stderr)
    if args.check and stale:
        print(f"stale golden files: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
