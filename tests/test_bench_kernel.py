"""tools/bench_kernel.py: a row per state dtype, each kernel run on the tensor it was bound to."""

from __future__ import annotations

import numpy as np
from tool import load_tool


def test_prints_a_row_per_state_dtype_against_float32(capsys):
    bench = load_tool("bench_kernel")
    assert bench.main(["--optimizer", "adamw", "--numel", "5000", "--reps", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("adamw, 5000 float32 parameters")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == set(bench.STATES)
    assert rows["float32"][1] == "1.00x"
    assert all(float(ns) > 0 for ns, _ in rows.values())


def test_the_launch_steps_its_own_tensors():
    bench = load_tool("bench_kernel")
    bound, scalars = bench.launch("adamw", "int8", 3000, np.random.default_rng(0))
    (param, grad, codes, scales, *_), = bound.held
    before = param.copy()
    bound(scalars)
    assert not np.array_equal(param, before) and np.all(np.isfinite(param))
    assert codes.dtype == np.int8 or codes.dtype == np.uint8
    assert scales.shape == (-(-3000 // 256),) and np.all(scales > 0)


def test_sgd_and_lars_are_timed_with_state():
    bench = load_tool("bench_kernel")
    for name in ("sgd", "lars"):
        rules = {bench.registry.rule_for(name, "float32", state_dtype=s,
                                         **bench.STATEFUL[name]).name for s in bench.STATES}
        assert len(rules) == 3, rules  # three kernels, not float32's three times
