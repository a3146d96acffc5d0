"""The layering holds, so that data flows one way: optim -> runtime -> codegen -> ir.

`stepjit.ir` imports nothing else from the package; `stepjit.codegen` (source text from rules)
imports only `ir` and reads no files (it is given its templates); `stepjit.runtime` never imports
the optimizers or the package root; no library module imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stepjit

PACKAGE = Path(stepjit.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from . import x` may import the submodule x
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _files(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).glob("**/*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _stepjit_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m == "stepjit" or m.startswith("stepjit.")}


def test_import_resolution():
    """The checker itself: relative imports resolve to the names a violation would have."""
    ir_file = PACKAGE / "ir" / "expr.py"
    assert "stepjit.ir.dtypes" in imported_modules(ir_file)
    opt_file = PACKAGE / "optim" / "optimizer.py"
    found = imported_modules(opt_file)
    assert "stepjit.runtime" in found and "stepjit.ir" in found and "stepjit.parameter" in found


@pytest.mark.parametrize("path", _files("ir"), ids=_rel)
def test_ir_imports_nothing_else_from_stepjit(path):
    outside = {m for m in _stepjit_imports(path) if not (m + ".").startswith("stepjit.ir.")}
    assert not outside, f"{_rel(path)} imports {sorted(outside)}"


CODEGEN = _files("codegen")


@pytest.mark.parametrize("path", CODEGEN, ids=_rel)
def test_codegen_imports_only_ir_and_reads_no_files(path):
    bad = {m for m in _stepjit_imports(path) if not (m + ".").startswith(("stepjit.ir.",
                                                                          "stepjit.codegen."))}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"
    io = imported_modules(path) & {"os", "pathlib", "importlib.resources", "io", "shutil"}
    assert not io, f"{_rel(path)} imports {sorted(io)}: it should be given text, not read it"


@pytest.mark.parametrize("path", _files("runtime"), ids=_rel)
def test_runtime_never_imports_optim_or_the_package_root(path):
    bad = {m for m in _stepjit_imports(path)
           if m == "stepjit" or (m + ".").startswith(("stepjit.optim.", "stepjit.cli.",
                                                      "stepjit.torch."))}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"


LIBRARY = [p for p in sorted(PACKAGE.glob("**/*.py"))
           if not _rel(p).startswith(("stepjit/cli/", "stepjit/cli.py", "stepjit/__main__"))]


@pytest.mark.parametrize("path", LIBRARY, ids=_rel)
def test_no_library_module_imports_the_command_line(path):
    bad = {m for m in _stepjit_imports(path) if (m + ".").startswith("stepjit.cli.")}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"
