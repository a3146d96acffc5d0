"""tools/gpu_check.py without a GPU: its command line, its refusal without a device, the budgets
of its worker processes, its reading of pytest's output, and every check and benchmark run
through the CPU backend (streams and graph capture replaced by eager calls), so that the one
prepared GPU run does not fail on its own code."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tool import load_tool

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _load():
    return load_tool("gpu_check")


gpu_check = _load()


def _run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


# -- the command line ------------------------------------------------------------------------------
def test_help_and_list():
    shown = _run("--help")
    assert shown.returncode == 0
    for option in ("--out", "--only", "--skip", "--budget", "--pytest-timeout", "--list"):
        assert option in shown.stdout
    listed = _run("--list")
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == gpu_check.PART_NAMES and len(set(names)) == len(names)
    assert _run("--only", "nothing-of-that-name").returncode == 2


def test_without_a_device_it_stops_at_once_with_status_2(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "gpu_check.json"
    t0 = time.monotonic()
    done = _run("--out", str(out), env=env)
    assert time.monotonic() - t0 < 60
    assert done.returncode == 2, done.stderr
    assert "no usable CUDA device" in done.stderr
    doc = json.loads(out.read_text())
    assert doc["error"].startswith("no usable CUDA device") and doc["parts"] == []
    assert doc["environment"]["problems"]


# -- pytest's output -------------------------------------------------------------------------------
PYTEST_OUTPUT = """\
============================= test session starts ==============================
collecting ... collected 812 items / 790 deselected / 22 selected

tests/test_cuda_gpu.py::test_backend_is_chosen_from_the_arrays PASSED    [  4%]
tests/test_cuda_gpu.py::test_sgd_matches_the_reference_backend[F32-F32-mu0.0-clip0.0] PASSED [  9%]
tests/test_cuda_gpu.py::test_clip_is_deterministic FAILED                [ 13%]
tests/test_cuda_gpu.py::test_two_devices SKIPPED (needs two CUDA devices)  [ 18%]
tests/test_cuda_gpu.py::test_graph[Adam] ERROR                           [ 22%]

=========================== short test summary info ============================
SKIPPED [1] tests/test_cuda_gpu.py:281: needs two CUDA devices
SKIPPED [2] tests/test_cuda_gpu.py:300: needs two CUDA devices
FAILED tests/test_cuda_gpu.py::test_clip_is_deterministic - AssertionError: assert b'' == b'x'
ERROR tests/test_cuda_gpu.py::test_graph[Adam] - RuntimeError: capture failed
===== 1 failed, 2 passed, 3 skipped, 790 deselected, 1 error in 12.34s (0:00:12) =====
"""


def test_pytest_output_is_read():
    parsed = gpu_check.parse_pytest(PYTEST_OUTPUT)
    assert parsed["counts"] == {"failed": 1, "passed": 2, "skipped": 3, "deselected": 790,
                                "errors": 1}
    assert parsed["failed"] == {
        "tests/test_cuda_gpu.py::test_clip_is_deterministic":
            "FAILED: AssertionError: assert b'' == b'x'",
        "tests/test_cuda_gpu.py::test_graph[Adam]": "ERROR: RuntimeError: capture failed"}
    assert parsed["skips"] == {"needs two CUDA devices": 3}
    assert parsed["running"] is None
    record = gpu_check.pytest_record(parsed, 1, False, 12.3, 120, PYTEST_OUTPUT)
    assert record["status"] == "failed" and record["rows"][0]["result"] == "FAIL"
    assert {r["check"] for r in record["rows"] if r["result"] == "FAIL"} >= set(parsed["failed"])
    assert "12 s" in record["rows"][0]["figure"] and "output_tail" in record


def test_a_hung_pytest_names_the_test_it_was_running():
    text = PYTEST_OUTPUT.split("\n\n=====")[0] + "\ntests/test_cuda_gpu.py::test_hangs "
    parsed = gpu_check.parse_pytest(text)
    assert parsed["running"] == "tests/test_cuda_gpu.py::test_hangs"
    record = gpu_check.pytest_record(parsed, -9, True, 120.0, 120, text)
    assert record["status"] == "timeout"
    assert "tests/test_cuda_gpu.py::test_hangs" in record["rows"][0]["figure"]


def test_a_clean_pytest_run_passes():
    text = "tests/a.py::test_x PASSED\n==== 3 passed, 1 skipped, 9 deselected in 1.00s ====\n"
    record = gpu_check.pytest_record(gpu_check.parse_pytest(text), 0, False, 1.0, 120, text)
    assert record["status"] == "passed" and record["rows"][0]["result"] == "PASS"
    nothing = gpu_check.pytest_record(gpu_check.parse_pytest(""), 5, False, 1.0, 120, "")
    assert nothing["status"] == "failed"  # no GPU test selected is no pass


# -- the worker processes and their budgets --------------------------------------------------------
FAKE_WORKER = """\
import importlib.util, os, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
m = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = m
spec.loader.exec_module(m)

def ok():
    return [m.row("ok", "fine", "t", True)]

def fails():
    return [m.row("fails", "bad", "t", False), m.row("fails", "figure")]

def boom():
    raise ValueError("boom")

def hang():
    time.sleep(120)

def crash():
    os._exit(7)

parts = {"ok": ok, "boom": boom, "hang": hang, "crash": crash, "fails": fails, "last": ok}
sys.exit(m.worker_main(parts, sys.argv[3].split(","), Path(sys.argv[2])))
"""


def _fake_command(tmp_path):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    return lambda names, results: [sys.executable, str(worker), str(SCRIPT), str(results),
                                   ",".join(names)]


def test_a_hang_a_crash_or_a_failure_costs_one_part_and_a_new_worker(tmp_path):
    names = ["ok", "boom", "hang", "crash", "fails", "last"]
    budgets = {n: 30.0 for n in names} | {"hang": 1.0}
    seen = []
    t0 = time.monotonic()
    records = gpu_check.run_parts(names, budgets, _fake_command(tmp_path), tmp_path, dict(
        os.environ), time.monotonic() + 60, on_record=seen.append)
    assert time.monotonic() - t0 < 30
    assert [r["name"] for r in records] == names and seen == records
    status = {r["name"]: r["status"] for r in records}
    assert status == {"ok": "passed", "boom": "error", "hang": "timeout", "crash": "crashed",
                      "fails": "failed", "last": "passed"}
    by_name = {r["name"]: r for r in records}
    assert "ValueError: boom" in by_name["boom"]["error"]
    assert "boom" in by_name["boom"]["rows"][0]["figure"]
    assert "exit status 7" in by_name["crash"]["rows"][0]["figure"]
    assert [r["result"] for r in by_name["fails"]["rows"]] == ["FAIL", "INFO"]
    summary = gpu_check.summarize(records)
    assert summary == {"PASS": 2, "FAIL": 4, "INFO": 1, "SKIP": 0, "ok": False}
    assert len(list(tmp_path.glob("worker-*.log"))) == 5  # a new worker after each bad part


def test_parts_that_do_not_fit_the_deadline_are_not_run(tmp_path):
    records = gpu_check.run_parts(["ok", "last"], {"ok": 30.0, "last": 30.0},
                                  _fake_command(tmp_path), tmp_path, dict(os.environ),
                                  time.monotonic() + 1)
    assert [r["status"] for r in records] == ["not run", "not run"]
    assert gpu_check.summarize(records)["FAIL"] == 2


def test_a_worker_that_never_starts_a_part_is_given_up(tmp_path):
    command = lambda names, results: [sys.executable, "-c", "import time; time.sleep(60)"]
    t0 = time.monotonic()
    records = gpu_check.run_parts(["ok", "last"], {"ok": 30.0, "last": 30.0}, command,
                                  tmp_path, dict(os.environ), time.monotonic() + 60, startup=1.0)
    assert time.monotonic() - t0 < 10
    assert [r["status"] for r in records] == ["error", "error"]


# -- comparisons and targets -----------------------------------------------------------------------
def test_error_ratio_and_targets():
    torch = pytest.importorskip("torch")
    want = torch.tensor([1.0, -2.0, 0.0, 4.0])
    assert gpu_check.error_ratio(want.clone(), want) == 0.0
    assert gpu_check.error_ratio(want + 1e-6, want) <= 1
    assert gpu_check.error_ratio(want * 1.001, want) > 1
    assert gpu_check.error_ratio(torch.tensor([1.0, -2.0, float("nan"), 4.0]), want) == float(
        "inf")
    assert gpu_check.error_ratio(want[:3], want) == float("inf")
    bench = gpu_check.bench_gpu
    assert bench.target_row("c", "clip_ratio", 1.3, "")["result"] == "FAIL"
    assert bench.target_row("c", "clip_ratio", 1.2, "")["result"] == "PASS"
    assert bench.target_row("c", "sgd_copy_fraction", 0.91, "")["result"] == "PASS"
    assert bench.target_row("c", "host_us", 31.0, "")["result"] == "FAIL"
    table = bench.format_table([bench.row("a check", "1.0x", ">= 1", True)])
    assert table.splitlines()[1].split() == ["a", "check", "1.0x", ">=", "1", "PASS"]


# -- every check and benchmark, run on the CPU backend ---------------------------------------------
@pytest.fixture
def on_cpu(monkeypatch):
    """The checks with their tensors on the CPU and streams, capture and memory queries
    replaced: what runs is the checks' own code, stepjit's CPU backend and torch.optim."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("llvmlite") is None:
        pytest.skip("llvmlite is not installed")
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_check, "_busy", lambda torch, cycles: None)
    monkeypatch.setattr(gpu_check, "_new_stream", lambda: None)
    monkeypatch.setattr(gpu_check, "_on", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(gpu_check, "_waits_for_current", lambda stream: None)
    monkeypatch.setattr(gpu_check, "_current_waits_for", lambda stream: None)
    monkeypatch.setattr(gpu_check, "_sync", lambda: None)
    monkeypatch.setattr(gpu_check, "_capture", lambda fn: fn)  # a replay: the call itself
    monkeypatch.setattr(gpu_check, "_memory", lambda: (2**40, 0))
    return gpu_check


def _assert_rows(rows, allowed=("PASS", "SKIP")):
    assert rows
    bad = [r for r in rows if r["result"] not in allowed]
    assert not bad, "\n\n".join(f"{r['check']}: {r['figure']}\n{r.get('error', '')}"
                                for r in bad)


CHECKS = {
    "stream": lambda g: g.check_stream(),
    "free": lambda g: g.check_free(rounds=12),
    **{f"graph-{key}": (lambda g, k=key: g.check_graph(k)) for key in gpu_check.GRAPH_CONFIGS},
    "misaligned": lambda g: g.check_misaligned(),
    "over-2-31": lambda g: g.check_over_2_31(numel=5003, chunk=1024),
    "many-chunks": lambda g: g.check_many_chunks(numel=200_003),
}


def test_every_check_has_a_dry_run():
    assert {p.name for p in gpu_check.PARTS if not p.name.startswith("bench-")} == set(CHECKS)


@pytest.mark.parametrize("name", list(CHECKS))
def test_the_check_passes_on_the_cpu_backend(on_cpu, name):
    rows = CHECKS[name](on_cpu)
    _assert_rows(rows)
    if name == "misaligned":  # the CuPy engine's case needs a device
        assert [r["result"] for r in rows].count("SKIP") == 1
    json.dumps(rows)  # what the worker writes


def test_the_graph_check_sees_a_learning_rate_frozen_at_capture(on_cpu, monkeypatch):
    def capture_with_frozen_lr(step):
        lr = step.__self__.param_groups[0]["lr"]  # the 0-d tensor the schedule fills
        captured = float(lr)

        def replay():
            scheduled = float(lr)
            lr.fill_(captured)
            step()
            lr.fill_(scheduled)

        return replay

    monkeypatch.setattr(on_cpu, "_capture", capture_with_frozen_lr)
    rows = on_cpu.check_graph("Adam")
    assert [r["result"] for r in rows] == ["FAIL"], rows


def test_the_stream_check_sees_a_step_that_is_lost(on_cpu, monkeypatch):
    face = on_cpu._faces

    def faces(name):
        ours, theirs = face(name)

        def made(*args, **kwargs):
            opt = ours(*args, **kwargs)
            step, calls = opt.step, []

            def lossy(*a, **k):
                calls.append(1)
                return None if len(calls) == 1 else step(*a, **k)

            opt.step = lossy
            return opt

        return made, theirs

    monkeypatch.setattr(on_cpu, "_faces", faces)
    rows = on_cpu.check_stream(configs=on_cpu.STREAM_CONFIGS[:1])
    assert [r["result"] for r in rows] == ["FAIL"], rows


@pytest.fixture
def bench_on_cpu(monkeypatch):
    torch = pytest.importorskip("torch")
    bench = gpu_check.bench_gpu

    def per_call(fn, iters, events="torch"):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "per_call", per_call)
    monkeypatch.setattr(bench, "_synchronize", lambda events: None)
    return bench, torch


def test_the_benchmarks_run_on_the_cpu_backend(bench_on_cpu):
    bench, _ = bench_on_cpu
    small = {"numel": 4096, "iters": 2, "rounds": 1}
    rows = (bench.bench_sgd(**small) + bench.bench_adam(**small) + bench.bench_clip(**small)
            + bench.bench_misaligned(pieces=4, **small)
            + bench.bench_host(tensors=5, small=10, calls=5))
    assert [r["check"].split(" ")[1] for r in rows] == ["SGD", "SGD", "Adam", "clip_norm",
                                                        "misaligned", "host"]
    for r in rows:
        assert r["result"] in ("PASS", "FAIL") and r["target"] and r["value"] > 0
    assert set(bench.BENCHES) == {p.name.removeprefix("bench-") for p in gpu_check.PARTS
                                  if p.name.startswith("bench-")}
    json.dumps(rows)
