"""The `stepjit` command: dump, bench and cache, their help, and their errors.

Most tests call `stepjit.cli.main` in-process; two run the real entry point in a subprocess.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
import pytest
from tool import load_tool

import stepjit
from stepjit import cli
from stepjit.cli import bench, dump
from stepjit.codegen.llvm import kernel_names
from stepjit.ir import DType
from stepjit.optim import OPTIMIZERS, registry, required, rule_for
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import select

CUDA_MISSING = importlib.util.find_spec("stepjit.codegen.cuda") is None
CUDA_REASON = "stepjit.codegen.cuda is not importable"

# every SGD structure: (flags, structure as sgd_rule takes it)
STRUCTURES = [
    (flags, (momentum, nesterov, decay, clip))
    for momentum, nesterov, decay, clip in itertools.product([False, True], repeat=4)
    if momentum or not nesterov
    for flags in [
        (["--momentum", "0.9"] if momentum else [])
        + (["--nesterov"] if nesterov else [])
        + (["--weight-decay", "1e-4"] if decay else [])
        + (["--clip-norm", "1.0"] if clip else [])
    ]
]
CONFIGS = [(flags, structure, dtype) for flags, structure in STRUCTURES for dtype in dump.DTYPES]


def _id(config) -> str:
    flags, _, dtype = config
    terms = [f.lstrip("-") for f in flags if f.startswith("--")] or ["vanilla"]
    return "_".join(terms) + "-" + dtype


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `stepjit ARGV`, run in-process."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rule_of(structure, dtype: str):
    return sgd_rule(*structure, DType(dtype), DType(dtype))


# -- errors: one line, exit status 2, no traceback -----------------------------------------------
BAD = {
    "dtype int8": (["dump", "--dtype", "int8"], "int8"),
    "negative lr": (["dump", "--lr", "-1"], "Invalid lr: -1.0"),
    "nan momentum": (["dump", "--momentum", "nan"], "Invalid momentum"),
    "lr not a number": (["dump", "--lr", "fast"], "--lr"),
    "nesterov without momentum": (["dump", "--nesterov"], "Nesterov"),
    "dampening above 1": (["dump", "--dampening", "2"], "Invalid dampening"),
    "zero scale": (["dump", "--scale", "0"], "Invalid scale"),
    "unknown subcommand": (["frobnicate"], "frobnicate"),
    "no subcommand": ([], "COMMAND"),
    "unknown flag": (["dump", "--bogus"], "--bogus"),
    "stage of the other backend": (["dump", "--backend", "llvm", "--stage", "ptx"], "ptx"),
    "unknown stage": (["dump", "--stage", "obj"], "obj"),
    "bad arch": (["dump", "--stage", "ptx", "--arch", "volta"], "volta"),
    "bad size": (["bench", "--sizes", "3q"], "3q"),
    "unknown config": (["bench", "--configs", "lion"], "lion"),
    "unknown optimizer": (["dump", "--optimizer", "lion"], "lion"),
    "optimizer module missing": (["dump", "--optimizer", "no_such_module:Lion"], "no_such_module"),
    "not an optimizer class": (["dump", "--optimizer", "pathlib:Path"], "Optimizer"),
    "bench optimizer unknown": (["bench", "--optimizer", "momentum"], "momentum"),
    "zero reps": (["bench", "--reps", "0"], "--reps"),
    "json into a missing directory": (["bench", "--json", "/nonexistent/dir/b.json"], "--json"),
    "cache without action": (["cache"], "action"),
    "unknown cache action": (["cache", "purge"], "purge"),
}


@pytest.mark.parametrize("argv, needle", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_and_status_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("stepjit"), err
    assert "error:" in err and needle in err
    assert out == ""


@pytest.mark.parametrize("argv", [["--backend", "cuda"], ["--stage", "cuda"], ["--stage", "ptx"],
                                  ["--backend", "cuda", "--stage", "all"]])
def test_cuda_without_its_code_generator_is_a_one_line_error(capsys, monkeypatch, argv):
    monkeypatch.setitem(sys.modules, "stepjit.codegen.cuda", None)  # importing it now fails
    code, out, err = run(capsys, "dump", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "CUDA code generator is not available" in err


# -- help -----------------------------------------------------------------------------------------
HELP = {
    (): ["dump", "bench", "cache", "--version", "STEPJIT_CACHE_DIR", "STEPJIT_DUMP_DIR"],
    ("dump",): ["--optimizer", "--lr", "--momentum", "--dampening", "--weight-decay",
                "--nesterov", "--scale", "--clip-norm", "--dtype", "bfloat16", "--backend",
                "--stage", "llvm-opt", "ptx", "--out", "--arch", "STEPJIT_DUMP_DIR"],
    ("bench",): ["--quick", "--sizes", "--configs", "--reps", "--json", "--plot", "--quiet",
                 "break_even_steps"],
    ("cache",): ["info", "clear", "STEPJIT_CACHE_DIR"],
}


@pytest.mark.parametrize("command, words", HELP.items(), ids=lambda c: " ".join(c) or "stepjit")
def test_help_is_complete(capsys, command, words):
    code, out, err = run(capsys, *command, "--help")
    assert code == 0 and err == ""
    flat = " ".join(out.split())
    missing = [w for w in words if w not in flat]
    assert not missing, f"stepjit {' '.join(command)} --help does not mention {missing}"


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"stepjit {stepjit.__version__}"


# -- dump -----------------------------------------------------------------------------------------
def test_dump_ir_is_one_line_per_node_and_names_the_scalars(capsys):
    structure = (True, False, True, True)
    code, out, _ = run(capsys, "dump", "--momentum", "0.9", "--weight-decay", "1e-4",
                       "--clip-norm", "1", "--dtype", "float16")
    assert code == 0
    rule = rule_of(structure, "float16")
    node_lines = [line for line in out.splitlines() if re.match(r"\s+%\d+\s*=", line)]
    assert len(node_lines) == len(rule.nodes)
    assert out.splitlines()[0].startswith(f"rule {rule.name}(")
    for name in ("lr", "momentum", "dampening", "weight_decay", "scale", "clip_norm"):
        assert re.search(rf"\b{name}\b", out), name
    for slot in ("param", "momentum_buffer"):
        assert re.search(rf"^\s+{slot} <- %\d+$", out, flags=re.M), slot


def test_numeric_values_do_not_change_the_kernel(capsys):
    _, a, _ = run(capsys, "dump", "--stage", "llvm", "--momentum", "0.9", "--lr", "0.1")
    _, b, _ = run(capsys, "dump", "--stage", "llvm", "--momentum", "0.5", "--lr", "3",
                  "--dampening", "0.3", "--scale", "0.25")
    _, c, _ = run(capsys, "dump", "--stage", "llvm", "--lr", "0.1")
    assert a == b != c


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_dump_every_llvm_stage_of_every_configuration(capsys, config):
    flags, structure, dtype = config
    rule = rule_of(structure, dtype)
    symbols = [n for n in kernel_names(rule) if n]
    for stage in ("llvm", "llvm-opt"):
        code, out, err = run(capsys, "dump", *flags, "--dtype", dtype, "--stage", stage)
        assert code == 0, err
        module = llvm.parse_assembly(out)
        module.verify()
        assert set(symbols) <= {f.name for f in module.functions}
    code, out, err = run(capsys, "dump", *flags, "--dtype", dtype, "--stage", "asm")
    assert code == 0, err
    labels = set(re.findall(r"^([A-Za-z_.$][\w.$]*):", out, flags=re.M))
    assert set(symbols) <= labels


def test_dump_state_dtype_shows_the_compact_rule(capsys):
    code, out, _ = run(capsys, "dump", "--optimizer", "adam", "--state-dtype", "bfloat16")
    assert code == 0
    assert "exp_avg: bfloat16 inout, exp_avg_sq: bfloat16 inout" in out.splitlines()[0]
    assert "= cast %" in out and ": bfloat16" in out  # stored rounded, loaded widened
    code, out, _ = run(capsys, "dump", "--optimizer", "adam", "--state-dtype", "int8")
    assert code == 0
    assert ("exp_avg: uint8 inout codes signed, exp_avg_absmax: float32 inout per-block"
            in out.splitlines()[0])
    assert "= block_absmax %" in out and "= encode_sr %" in out and "map unsigned" in out
    code, _, err = run(capsys, "dump", "--state-dtype", "int4")
    assert code == 2 and "invalid choice: 'int4'" in err


def test_dump_out_writes_one_file_per_stage_named_by_configuration(capsys, tmp_path):
    code, out, err = run(capsys, "dump", "--momentum", "0.9", "--nesterov", "--dtype", "bfloat16",
                         "--stage", "all", "--out", str(tmp_path / "k"))
    assert code == 0, err
    rule = rule_of((True, True, False, False), "bfloat16")
    assert rule.name == "sgd_nesterov_bfloat16_bfloat16"
    expected = {f"{rule.name}{dump.SUFFIX[s]}" for s in dump.LLVM_STAGES}
    assert {p.name for p in (tmp_path / "k").iterdir()} == expected
    assert sorted(Path(p).name for p in out.split()) == sorted(expected)
    assert (tmp_path / "k" / f"{rule.name}.ir.txt").read_text() == rule.text + "\n"

    code, out, _ = run(capsys, "dump", "--stage", "llvm", "--out", str(tmp_path / "one"))
    assert code == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["sgd_float32_float32.ll"]


def test_dump_all_to_stdout_marks_each_stage(capsys):
    code, out, _ = run(capsys, "dump", "--stage", "all")
    assert code == 0
    assert re.findall(r"^==> (\S+) <==$", out, flags=re.M) == [
        f"sgd_float32_float32{dump.SUFFIX[s]}" for s in dump.LLVM_STAGES
    ]


def test_dump_dir_writes_what_the_library_compiles(tmp_path, monkeypatch):
    """STEPJIT_DUMP_DIR: a user's own run leaves each compiled kernel, under the names
    `stepjit dump --out` uses."""
    monkeypatch.setenv("STEPJIT_DUMP_DIR", str(tmp_path / "dump"))
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(tmp_path / "cache"))
    select._instance.cache_clear()  # a new engine: the kernel is compiled, not found in memory
    try:
        p = stepjit.Parameter(np.zeros(8, np.float64))
        p.grad = np.ones(8, np.float64)
        stepjit.optim.SGD([p], lr=0.1, momentum=0.9, clip_norm=1.0, backend="llvm").step()
    finally:
        select._instance.cache_clear()
    rule = rule_of((True, False, False, True), "float64")
    written = {f.name for f in (tmp_path / "dump").iterdir()}
    assert {f"{rule.name}{s}" for s in (".ir.txt", ".ll", ".opt.ll", ".s")} == written
    llvm.parse_assembly((tmp_path / "dump" / f"{rule.name}.ll").read_text()).verify()


@pytest.mark.skipif(CUDA_MISSING, reason=CUDA_REASON)
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_dump_cuda_source_of_every_configuration(capsys, config):
    flags, structure, dtype = config
    code, out, err = run(capsys, "dump", *flags, "--dtype", dtype, "--stage", "cuda")
    assert code == 0, err
    assert "__global__" in out


@pytest.mark.skipif(CUDA_MISSING, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", dump.DTYPES)
def test_dump_ptx_compiles_without_a_gpu(capsys, dtype):
    try:
        import stepjit.runtime.gpu  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"stepjit.runtime.gpu is not importable: {exc}")
    code, out, err = run(capsys, "dump", "--momentum", "0.9", "--weight-decay", "1e-4",
                         "--clip-norm", "1", "--dtype", dtype, "--stage", "ptx", "--arch", "sm_80")
    assert code == 0, err
    assert ".version" in out and ".target sm_80" in out
    assert out.count(".entry") == 3  # the clip norm: partial sums, per-tensor totals, update


# -- bench ----------------------------------------------------------------------------------------
def test_parse_sizes_and_configs():
    sizes = bench.parse_sizes("4M, 3x1K,resnet50")
    assert list(sizes) == ["4M", "3x1K", "resnet50"]
    assert sizes["4M"]() == [(4 << 20,)] and sizes["3x1K"]() == [(1024,)] * 3
    assert len(sizes["resnet50"]()) == 147
    assert list(bench.parse_configs("clip,sgd,clip")) == ["clip", "sgd"]
    assert bench.parse_configs("all") == bench.CONFIGS
    # any registered optimizer, at its defaults (a required lr gets a placeholder)
    assert bench.parse_configs("rmsprop,lars") == {
        "rmsprop": {"optimizer": "rmsprop"}, "lars": {"optimizer": "lars", "lr": 0.01}}
    for bad in ("0", "2x", "x5", "1T", ""):
        with pytest.raises(ValueError):
            bench.parse_sizes(bad)


def test_bench_quick_json_has_the_documented_fields(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", "--quick", "--configs", "sgd,clip", "--json", str(path))
    assert code == 0, err
    assert out.startswith("config") and "even@torch" in out
    assert "[1/4] measuring sgd" in err  # progress on stderr
    data = json.loads(path.read_text())
    assert set(data) == {"stepjit", "host", "reps", "configs", "rows"}
    assert data["stepjit"] == stepjit.__version__ and data["reps"] == 3
    assert {"cpu", "threads", "numpy", "llvmlite", "torch"} <= set(data["host"])
    assert [(r["config"], r["size"]) for r in data["rows"]] == [
        (c, s) for s in bench.QUICK_SIZES for c in ("sgd", "clip")
    ]
    has_torch = importlib.util.find_spec("torch") is not None
    for row in data["rows"]:
        assert set(row) == {f.name for f in dataclasses.fields(bench.Row)}
        assert set(row["compile_ms"]) == {"trace", "lower", "parse", "optimize", "codegen", "load"}
        assert set(row["first_step_ms"]) == {"cold", "disk", "memory"}
        torch_here = has_torch and row["config"] != "clip"  # torch's SGD has no clipping
        competitors = {"stepjit", "numpy", "probe"} | ({"torch_fused"} if torch_here else set())
        assert set(row["step_ms"]) == set(row["gbps"]) == competitors
        assert set(row["break_even_steps"]) == competitors - {"stepjit", "probe"}
        numbers = [*row["compile_ms"].values(), row["disk_load_ms"], *row["first_step_ms"].values(),
                   *row["step_ms"].values(), *row["gbps"].values(), row["elements"],
                   row["tensors"], row["bytes_per_element"]]
        assert all(isinstance(x, (int, float)) and x > 0 for x in numbers), row
        assert all(v is None or v > 0 for v in row["break_even_steps"].values())
        assert row["first_step_ms"]["cold"] > row["first_step_ms"]["memory"]
    # the JSON reads back into rows that format as the terminal table did
    assert bench.format_table(bench.rows_from_json(data)).splitlines()[0] == out.splitlines()[0]
    # every field of a row is documented in `stepjit bench --help`
    _, help_text, _ = run(capsys, "bench", "--help")
    flat = " ".join(help_text.split())
    assert all(name in flat for name in data["rows"][0])
    # and the JSON renders as BENCHMARKS.md
    page = _benchmarks_md().render(data)
    assert page.startswith("# Benchmarks") and "## Compile cost and break-even" in page
    for row in data["rows"]:
        assert re.search(rf"^\| {row['config']} \| {row['size']} \|", page, flags=re.M)


def _benchmarks_md():
    return load_tool("bench_benchmarks_md")


def _fake_rows() -> list[bench.Row]:
    return [
        bench.Row(c, "1M", "float32", 1, 1 << 20, 12, dict.fromkeys(("trace", "lower"), 1.0),
                  0.3, {"cold": 30.0, "disk": 2.0, "memory": 1.0},
                  {"stepjit": 0.5, "numpy": 0.9, "probe": 0.2, "torch_fused": 0.4},
                  {"stepjit": 25.0, "numpy": 14.0, "probe": 60.0, "torch_fused": 30.0},
                  {"numpy": 75.0, "torch_fused": None})
        for c in ("sgd", "momentum")
    ]


def test_plot_without_matplotlib_is_a_usage_error(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = run(capsys, "bench", "--quick", "--plot", str(tmp_path / "b.png"))
    assert code == 2 and out == "" and "pip install 'stepjit[plot]'" in err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (the plot extra)")
def test_plot_writes_a_png(tmp_path):
    bench.plot(_fake_rows(), str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- cache ----------------------------------------------------------------------------------------
def test_cache_info_and_clear_act_on_the_cache_dir(capsys, tmp_path, monkeypatch):
    cache_dir = tmp_path / "kernels"
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(cache_dir))
    code, out, _ = run(capsys, "cache", "info")
    assert code == 0 and f"location  {cache_dir}" in out and "0 entries" in out

    select._instance.cache_clear()  # a new engine, so these kernels are compiled into cache_dir
    try:
        for kw in ({}, {"momentum": 0.9}):
            p = stepjit.Parameter(np.zeros(4, np.float32))
            p.grad = np.ones(4, np.float32)
            stepjit.optim.SGD([p], lr=0.1, backend="llvm", **kw).step()
    finally:
        select._instance.cache_clear()
    (cache_dir / "llvm" / "notes.txt").write_text("not a kernel")
    (cache_dir / "llvm" / f"{'0' * 40}.o").write_bytes(b"not a kernel either")
    cuda = 0
    if not CUDA_MISSING and importlib.util.find_spec("stepjit.runtime.gpu"):
        from stepjit.runtime.gpu import load_or_compile, render

        load_or_compile(render(rule_of((False, False, False, False), "float32")), "sm_75")
        cuda = 1

    code, out, _ = run(capsys, "cache", "info")
    assert code == 0
    assert re.search(r"^llvm\s+2 entries, [\d.]+ (B|KiB)$", out, flags=re.M), out
    assert bool(re.search(r"^cuda\s+1 entries", out, flags=re.M)) == bool(cuda), out
    assert re.search(rf"^total\s+{2 + cuda} entries", out, flags=re.M)

    code, out, _ = run(capsys, "cache", "clear")
    assert code == 0 and out.strip() == f"removed {2 + cuda} entries from {cache_dir}"
    assert sorted(p.name for p in (cache_dir / "llvm").iterdir()) == [f"{'0' * 40}.o", "notes.txt"]
    _, out, _ = run(capsys, "cache", "info")
    assert re.search(r"^total\s+0 entries", out, flags=re.M)


# -- the real entry point -------------------------------------------------------------------------
def test_python_m_stepjit_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "stepjit", "dump", "--stage", "ir"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rule sgd_float32_float32(")


def test_installed_script_reports_bad_values_in_one_line():
    script = Path(sys.executable).with_name("stepjit")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "stepjit"]
    done = subprocess.run([*argv, "dump", "--dtype", "int8"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("stepjit dump: error: argument --dtype: invalid choice: 'int8'")


# -- every optimizer ----------------------------------------------------------------------------
def _flags(config: dict) -> list[str]:
    """The dump flags that give hyperparameters `config`."""
    argv: list[str] = []
    for name, value in config.items():
        if isinstance(value, bool):
            argv.append(dump.flag(name) if value else f"--no-{dump.flag(name)[2:]}")
        else:
            argv += [dump.flag(name), *map(str, value if isinstance(value, tuple) else [value])]
    return argv


# every registered optimizer, in the last structure its `examples` reach (most terms on)
FAMILY = [(name, registry.structures(cls)[-1]) for name, cls in OPTIMIZERS.items()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,config", FAMILY, ids=[f[0] for f in FAMILY])
def test_dump_every_stage_of_every_optimizer(capsys, tmp_path, name, config, dtype):
    stages = ["ir", "llvm", "llvm-opt", "asm"]
    if not CUDA_MISSING:
        stages += ["cuda", "ptx"]
    for stage in stages:
        code, out, err = run(capsys, "dump", "--optimizer", name, *_flags(config), "--dtype",
                             dtype, "--stage", stage)
        assert code == 0, err
        if stage == "ir":  # the flags reach the optimizer as its keyword arguments
            assert out == rule_for(name, dtype, **config).text + "\n"
        elif stage in ("llvm", "llvm-opt"):
            llvm.parse_assembly(out).verify()
        elif stage == "ptx":
            assert ".entry" in out
        else:
            assert out.strip()


@pytest.mark.parametrize("argv", [
    ["--optimizer", "sgd", "--betas", "0.9", "0.99"],
    ["--optimizer", "adam", "--momentum", "0.9"],
    ["--optimizer", "rmsprop", "--nesterov"],
    ["--optimizer", "lars", "--eps", "1e-8"],
])
def test_a_flag_the_optimizer_does_not_take_is_refused(capsys, argv):
    code, out, err = run(capsys, "dump", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "does not apply to" in err and "Traceback" not in err


def test_an_optimizers_own_check_reaches_the_user(capsys):
    code, _, err = run(capsys, "dump", "--optimizer", "adam", "--betas", "1.5", "0.9")
    assert code == 2 and "1.5" in err and "Traceback" not in err


def test_bytes_per_element_counts_every_pass():
    def moved(rule, reread):
        return sum(s.dtype.itemsize * (1 + s.written + (s.name in reread)) for s in rule.slots)

    adam = rule_for("adam", "float32")
    assert bench._bytes_per_element(adam) == moved(adam, ()) == 28
    clip = rule_for("sgd", "float32", momentum=0.9, clip_norm=1.0)
    assert bench._bytes_per_element(clip) == moved(clip, {"grad"})  # the reduce pass reads grad
    lars = rule_for("lars", "float32", momentum=0.9, weight_decay=1e-4)
    assert bench._bytes_per_element(lars) == moved(lars, {"param", "grad"})  # both norms


def test_bench_adam_quick_json(capsys, tmp_path):
    path = tmp_path / "adam.json"
    code, out, err = run(capsys, "bench", "--quick", "--quiet", "--configs", "adam",
                         "--sizes", "64K", "--json", str(path))
    assert code == 0, err
    (row,) = json.loads(path.read_text())["rows"]
    assert row["config"] == "adam" and row["bytes_per_element"] == 28
    assert all(v > 0 for v in row["step_ms"].values())
    assert row["step_ms"]["numpy"] > 0 and "probe" in row["step_ms"]


@pytest.mark.parametrize("name,flags", [("sgd", {}), ("sgd", {"momentum": 0.9, "clip_norm": 1.0}),
                                        ("adam", {}), ("lars", {"momentum": 0.9})])
def test_the_probe_moves_the_same_bytes_as_the_rule(name, flags):
    rule = rule_for(name, "float32", **flags)
    probe = bench._probe_rule(rule)
    assert bench._bytes_per_element(probe) == bench._bytes_per_element(rule)
    assert bool(probe.reductions) == bool(rule.reductions)


# -- the registry: flags, optimizers and configurations come from it ----------------------------
def test_every_hyperparameter_of_every_registered_optimizer_is_a_dump_flag(capsys):
    _, out, _ = run(capsys, "dump", "--help")
    flat = " ".join(out.split())
    for name, cls in OPTIMIZERS.items():
        assert name in flat
        for hyperparameter in registry.hyperparameters(cls):
            assert dump.flag(hyperparameter) in flat, (name, hyperparameter)


def test_flags_are_typed_by_their_defaults():
    assert dump.flag("weight_decay") == "--weight-decay"
    assert dump.flag_options("nesterov", False)["action"].__name__ == "BooleanOptionalAction"
    assert dump.flag_options("betas", (0.9, 0.999)) == {"type": float, "nargs": 2,
                                                         "metavar": ("B1", "B2")}
    assert dump.flag_options("lr", required) == dump.flag_options("eps", 1e-8) == {"type": float}


def test_a_bool_flag_can_be_turned_off(capsys):
    _, on, _ = run(capsys, "dump", "--optimizer", "rmsprop", "--centered")
    _, off, _ = run(capsys, "dump", "--optimizer", "rmsprop", "--centered", "--no-centered")
    assert on.startswith("rule rmsprop_centered") and off.startswith("rule rmsprop_float32")


class _Damped(stepjit.optim.SGD):
    """A user's optimizer with a hyperparameter no built-in optimizer has."""

    def __init__(self, params, lr=0.1, extra_damping=0.5, *, backend=None):
        super().__init__(params, lr=lr, momentum=0.9, dampening=extra_damping, backend=backend)


@pytest.fixture
def user_module(monkeypatch):
    """A module `user_optimizers` holding `Damped`, as a user's package would."""
    module = type(sys)("user_optimizers")
    module.Damped = _Damped
    monkeypatch.setitem(sys.modules, "user_optimizers", module)
    return "user_optimizers:Damped"


def test_a_user_class_brings_its_own_flags(capsys, user_module):
    code, out, err = run(capsys, "dump", "--optimizer", user_module, "--extra-damping", "0.25")
    assert code == 0, err
    assert out.startswith("rule sgd_momentum_float32_float32(")
    code, _, err = run(capsys, "dump", "--optimizer", user_module, "--extra-damping", "2")
    assert code == 2 and "Invalid dampening" in err
    code, _, err = run(capsys, "dump", "--optimizer", user_module, "--nesterov")
    assert code == 2 and "--nesterov does not apply to user_optimizers:Damped" in err
    code, _, err = run(capsys, "dump", "--extra-damping", "0.25")  # sgd has no such flag
    assert code == 2 and err.count("\n") == 1 and "--extra-damping" in err
    _, help_text, _ = run(capsys, "dump", "--optimizer", user_module, "--help")
    assert "--extra-damping" in help_text


def test_a_newly_registered_optimizer_is_in_dump_and_bench(capsys, monkeypatch, user_module):
    """Registering a class is all it takes: the command reads the registry when it runs."""
    monkeypatch.setitem(OPTIMIZERS, "damped", _Damped)
    _, help_text, _ = run(capsys, "dump", "--help")
    assert "damped" in help_text and "--extra-damping" in help_text
    code, out, err = run(capsys, "dump", "--optimizer", "damped", "--extra-damping", "0.1",
                         "--stage", "llvm")
    assert code == 0, err
    llvm.parse_assembly(out).verify()
    assert bench.parse_configs("damped") == {"damped": {"optimizer": "damped"}}


def _readme_lion(directory: Path) -> str:
    """The README's Lion example, as the module `readme_lion` in `directory`."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## More optimizers, and your own", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert "class Lion(Optimizer)" in code
    (directory / "readme_lion.py").write_text(code)
    return "readme_lion:Lion"


def test_dump_and_bench_a_user_optimizer_class(tmp_path):
    """`stepjit dump` and `stepjit bench` run the README's Lion, from a module on PYTHONPATH."""
    spec = _readme_lion(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def stepjit_command(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "stepjit", *argv], capture_output=True,
                              text=True, timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = stepjit_command("dump", "--optimizer", spec, "--betas", "0.8", "0.9")
    assert "rule lion_float32_float32(" in out
    for slot in ("param", "exp_avg"):
        assert re.search(rf"^\s+{slot} <- %\d+$", out, flags=re.M), slot
    assert re.search(r"scalars .*\bbeta1\b.*\bbeta2\b", out)
    out = stepjit_command("bench", "--optimizer", spec, "--sizes", "64K", "--reps", "1",
                          "--quiet")
    table = out.split("\n\n")[0]  # then the compile phases, one row each too
    (row,) = [line for line in table.splitlines() if line.startswith("lion ")]
    assert re.match(r"lion\s+64K\s+[\d.]+m", row), row


def test_a_row_without_numpy_or_torch_shows_dashes():
    """An optimizer with no numpy or torch counterpart: its row formats, renders and plots."""
    row = dataclasses.replace(_fake_rows()[0], config="lion",
                              step_ms={"stepjit": 0.5, "probe": 0.2},
                              gbps={"stepjit": 25.0, "probe": 60.0}, break_even_steps={})
    (line,) = [s for s in bench.format_table([row]).splitlines() if s.startswith("lion")]
    assert line.split()[-3:] == ["-", "-", "-"]  # x numpy, x torch, even@
    (line,) = [s for s in bench.format_phases([row]).splitlines() if s.startswith("lion")]
    assert line.split()[-2:] == ["-", "-"]
    page = _benchmarks_md().render({"rows": [dataclasses.asdict(row)]})
    assert re.search(r"^\| lion \| 1M \|.*\| - \| - \|$", page, flags=re.M)
