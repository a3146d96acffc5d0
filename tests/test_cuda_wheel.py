"""The CUDA kernel templates ship inside the wheel and are found from an installed package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (pip fetches the build backend if needed)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "codegen_templates"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = work / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    wheels = list(out.glob("stepjit-*.whl"))
    if proc.returncode or not wheels:
        pytest.skip(f"could not build a wheel here: {proc.stderr.strip()[-300:]}")
    return wheels[0]


def test_wheel_contains_the_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("prelude.cuh", "update.cu", "partial_sums.cu"):
        assert f"stepjit/codegen_templates/{template}" in names
    assert "stepjit/codegen/cuda.py" in names


def test_installed_wheel_renders_kernels(wheel, tmp_path):
    """Unpacked as pip installs a pure wheel, away from the checkout: the templates are found
    inside the package."""
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import stepjit.runtime.gpu as c\n"
        "from stepjit.ir import DType as D\n"
        "from stepjit.optim.sgd import sgd_rule\n"
        "print(c.template_dir())\n"
        "print(len(c.render(sgd_rule(True, False, True, True, D.F16, D.F32))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""})
    folder, size = out.stdout.split()
    assert Path(folder) == site / "stepjit" / "codegen_templates"
    assert int(size) > 1000
