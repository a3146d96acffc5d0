"""tools/bench_dist.py: a tiny run (2 gloo ranks, a 52K-parameter model, 2 timed steps) prints
every variant's row, and every rank ends with identical parameters."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from tool import TOOLS, load_tool

torch = pytest.importorskip("torch")

PATH = TOOLS / "bench_dist.py"


def test_a_tiny_run_prints_every_row_and_the_ranks_agree(tmp_path):
    bench = load_tool("bench_dist")
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, str(PATH), "--world", "2", "--steps", "2", "--warmup",
                          "1", "--params", "0.05", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for name in bench.VARIANTS:  # one row each, its ms/step a number
        assert sum(bool(re.match(re.escape(name) + r" +\d+\.\d ", line)) for line in lines) == 1
    assert any(line.startswith("parity: ok, all 2 ranks hold identical parameters")
               for line in lines), run.stdout
    (res,) = json.loads(out.read_text())
    v = res["variants"]
    assert all(r["ranks_identical"] for r in v.values())
    full = max(v["DDP + fused"]["state_bytes"])
    assert full == 8 * res["params"]  # AdamW's two float32 moments
    assert max(v["stepjit unsharded"]["state_bytes"]) == full
    assert max(v["stepjit sharded"]["state_bytes"]) < 0.6 * full
    assert max(v["stepjit sharded int8"]["state_bytes"]) < max(v["stepjit sharded"]["state_bytes"])
    assert max(v["DDP + ZeRO"]["state_bytes"]) < full
