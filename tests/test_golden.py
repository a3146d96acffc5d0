"""Golden text of small lowered rules: a change to the code generators shows up as a diff of
tests/golden/, which `python tools/regen_golden.py` rewrites (never edit those files by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tool import load_tool

from stepjit.codegen.llvm import kernel_names

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
REGEN = "python tools/regen_golden.py"


tool = load_tool("regen_golden")  # the test and the tool share one definition of the golden text
RULES = tool.golden_rules()
CUDA_MISSING = "stepjit.codegen.cuda is not importable"


def _compare(name: str, actual: str) -> None:
    path = GOLDEN / name
    assert path.exists(), f"tests/golden/{name} is missing: run {REGEN}"
    expected = path.read_text()
    if actual != expected:
        diff = [f"line {i + 1}:\n  golden: {e}\n  now:    {a}"
                for i, (e, a) in enumerate(zip(expected.splitlines(), actual.splitlines()))
                if e != a][:3]
        pytest.fail(f"tests/golden/{name} differs from the code generator's output; if the change "
                    f"is intended, run {REGEN} and review the diff\n" + "\n".join(diff))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_llvm_ir_matches_golden(rule):
    _compare(f"{rule.name}.ll", tool.llvm_text(rule))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_llvm_golden_is_valid_ir(rule):
    """The golden file, with this host's target lines put back, parses and verifies."""
    import llvmlite.binding as llvm

    from stepjit.runtime.cpu import lower_text

    host = lower_text(rule, f16_native=True).splitlines()
    triple = next(line for line in host if line.startswith("target triple"))
    layout = next(line for line in host if line.startswith("target datalayout"))
    text = (GOLDEN / f"{rule.name}.ll").read_text()
    text = text.replace('target triple = "<host>"', triple)
    text = text.replace('target datalayout = "<host>"', layout)
    module = llvm.parse_assembly(text)
    module.verify()
    assert {n for n in kernel_names(rule) if n} <= {f.name for f in module.functions}


def test_golden_text_is_host_independent():
    for rule in RULES:
        text = (GOLDEN / f"{rule.name}.ll").read_text()
        assert 'target triple = "<host>"' in text and 'target datalayout = "<host>"' in text
    assert tool.normalize_llvm('target triple = "x86_64-pc-linux"\nx\n') == (
        'target triple = "<host>"\nx\n'
    )


def test_no_stray_golden_files():
    """Every file in tests/golden/ is one the tool writes (a hand-made file would never be
    checked)."""
    expected = {f"{r.name}.ll" for r in RULES} | {f"{r.name}.cu" for r in RULES}
    stray = sorted(p.name for p in GOLDEN.iterdir() if p.name not in expected)
    assert not stray, f"tests/golden/ holds files no tool writes: {stray}"


@pytest.mark.skipif(importlib.util.find_spec("stepjit.codegen.cuda") is None, reason=CUDA_MISSING)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_cuda_source_matches_golden(rule):
    _compare(f"{rule.name}.cu", tool.cuda_text(rule))
