"""The repository keeps its promises: README commands, the README example, packaging."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in readme.splitlines() if "pytest" in line and "venv" in line]
    assert len(commands) == 1, "README should state one test command"
    assert commands[0] in ci


def test_readme_states_the_main_job():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"python3 -m venv .venv .*stepjit bench", readme)


def test_readme_examples_run(tmp_path):
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(examples) >= 2
    outputs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, check=True).stdout
        for code in examples
    ]
    assert outputs[0].startswith("llvm CacheInfo(")
    # an example whose print is annotated with its output prints exactly that
    for code, out in zip(examples, outputs):
        for expected in re.findall(r"^print\(.*\)\s+# (\[.*\])$", code, flags=re.M):
            assert expected in out
