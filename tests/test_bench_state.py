"""tools/bench_state.py: every row prints, whether or not its optimizer can be built."""

from __future__ import annotations

import sys

import pytest
from tool import load_tool

torch = pytest.importorskip("torch")

COMPETITORS = ["bitsandbytes", "bitsandbytes.optim", "torchao", "torchao.optim",
               "torchao.prototype.low_bit_optim"]


def test_missing_competitors_and_options_are_skipped_not_raised(capsys, monkeypatch):
    bench = load_tool("bench_state")
    for name in COMPETITORS:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.setitem(bench.ROWS, "stepjit no such state",
                        (torch.float32, bench.stepjit(state_dtype="int3")))
    assert bench.main(["--numel", "4096", "--rounds", "1", "--steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for kind in bench.ROWS:
        (line,) = [line for line in lines if line.startswith(kind + " ")]
        if "bitsandbytes" in kind or "torchao" in kind:
            assert "skipped: ModuleNotFoundError" in line
    (line,) = [line for line in lines if line.startswith("stepjit no such state")]
    assert "skipped: ValueError: unknown state_dtype 'int3'" in line
    (line,) = [line for line in lines if line.startswith("torch fused ")]
    assert line.endswith("1.00x")


def test_state_bytes_counts_every_tensor_but_step():
    bench = load_tool("bench_state")
    p = torch.nn.Parameter(torch.zeros(1000))

    class Opt:
        state = {p: {"step": torch.tensor(3.0), "codes": torch.zeros(1000, dtype=torch.uint8),
                     "scale": torch.zeros(4), "lr": 0.1}}

    assert bench.state_bytes(Opt, p) == 1000 + 16
