"""The kernel cache: memory, disk across processes, corruption, trust, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import stepjit
from stepjit.ir import DType
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import cache, cpu

RULE = sgd_rule(True, True, True, False, DType.F32, DType.F32)

# a child process: one step, then its compile counters and result as JSON
CHILD = textwrap.dedent("""
    import json, time, numpy as np, stepjit
    p = stepjit.Parameter(np.linspace(-1, 1, 1001, dtype=np.float32))
    p.grad = np.cos(np.arange(1001, dtype=np.float32))
    opt = stepjit.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    t0 = time.perf_counter()
    opt.step()
    first_step = time.perf_counter() - t0
    info = stepjit.cache_info()
    print(json.dumps(dict(compiles=info.compiles, disk_hits=info.disk_hits,
                          first_step=first_step, checksum=float(p.data.astype(float).sum()))))
""")


def run_child(cache_dir) -> dict:
    env = {**os.environ, "STEPJIT_CACHE_DIR": str(cache_dir), "STEPJIT_BACKEND": "llvm"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(d))
    monkeypatch.setattr(cache, "_warned", set())
    return d


def test_a_new_process_loads_the_kernel_from_disk(cache_dir):
    first = run_child(cache_dir)
    second = run_child(cache_dir)
    assert first["compiles"] == 1 and first["disk_hits"] == 0
    assert second["compiles"] == 0 and second["disk_hits"] == 1
    assert second["checksum"] == first["checksum"]


def test_cache_directory_is_private(cache_dir):
    cpu.LLVMBackend().compile(RULE)
    assert (cache_dir / "llvm").stat().st_mode & 0o777 == 0o700
    assert len(list((cache_dir / "llvm").glob("*.o"))) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_cache_file_is_recompiled(cache_dir, damage):
    cpu.LLVMBackend().compile(RULE)
    (path,) = (cache_dir / "llvm").glob("*.o")
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    before = stepjit.cache_info()
    cpu.LLVMBackend().compile(RULE)
    after = stepjit.cache_info()
    assert after.compiles == before.compiles + 1 and after.disk_hits == before.disk_hits
    # and the rewritten file is whole again: a third engine loads it
    cpu.LLVMBackend().compile(RULE)
    assert stepjit.cache_info().disk_hits == after.disk_hits + 1


def test_an_unusable_directory_falls_back_to_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cache, "_warned", set())
    with pytest.warns(RuntimeWarning, match="memory only") as record:
        backend = cpu.LLVMBackend()
        backend.compile(RULE)
        backend.compile(sgd_rule(False, False, False, False, DType.F64, DType.F64))
    assert len([w for w in record if "memory only" in str(w.message)]) == 1
    assert backend.compile(RULE) is backend.compile(RULE)  # still cached in memory


def test_a_directory_others_can_write_is_not_trusted(cache_dir):
    (cache_dir / "llvm").mkdir(parents=True)
    os.chmod(cache_dir / "llvm", 0o777)
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        cpu.LLVMBackend().compile(RULE)
    assert list((cache_dir / "llvm").glob("*.o")) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="changing a file's owner needs root")
def test_a_file_owned_by_someone_else_is_not_loaded(cache_dir):
    cpu.LLVMBackend().compile(RULE)
    (path,) = (cache_dir / "llvm").glob("*.o")
    os.chown(path, 65534, 65534)
    before = stepjit.cache_info()
    with pytest.warns(RuntimeWarning, match="not private"):
        cpu.LLVMBackend().compile(RULE)
    assert stepjit.cache_info().compiles == before.compiles + 1


def test_two_processes_compiling_at_once_both_succeed(cache_dir):
    env = {**os.environ, "STEPJIT_CACHE_DIR": str(cache_dir), "STEPJIT_BACKEND": "llvm"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results[0]["checksum"] == results[1]["checksum"]
    assert len(list((cache_dir / "llvm").glob("*.o"))) == 1
    assert not list((cache_dir / "llvm").glob(".tmp-*"))


def test_compile_phases_are_logged_at_debug(cache_dir, caplog):
    with caplog.at_level("DEBUG", logger="stepjit"):
        cpu.LLVMBackend().compile(RULE)
    (message,) = [r.getMessage() for r in caplog.records if "optimize" in r.getMessage()]
    assert "compiled" in message and "codegen" in message and RULE.name in message


def test_memory_hits_are_counted(cache_dir):
    backend = cpu.LLVMBackend()
    backend.compile(RULE)
    before = stepjit.cache_info()
    backend.compile(RULE)
    after = stepjit.cache_info()
    assert after.memory_hits == before.memory_hits + 1 and after.compiles == before.compiles


def test_llvm_is_the_default_for_host_arrays(monkeypatch):
    monkeypatch.delenv("STEPJIT_BACKEND", raising=False)
    p = stepjit.Parameter(np.zeros(3, np.float32))
    assert stepjit.optim.SGD([p], lr=0.1).backend == "llvm"
    monkeypatch.setenv("STEPJIT_BACKEND", "reference")
    assert stepjit.optim.SGD([p], lr=0.1).backend == "reference"
    assert stepjit.optim.SGD([p], lr=0.1, backend="llvm").backend == "llvm"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        stepjit.optim.SGD([p], lr=0.1, backend="tpu")


def test_without_llvmlite_the_reference_backend_runs_with_one_warning(monkeypatch):
    from stepjit.runtime import select

    monkeypatch.delenv("STEPJIT_BACKEND", raising=False)
    monkeypatch.setattr(select, "_llvm_usable", lambda: "ImportError: no llvmlite")
    monkeypatch.setattr(cache, "_warned", set())
    p = stepjit.Parameter(np.zeros(3, np.float32))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opts = [stepjit.optim.SGD([p], lr=0.1) for _ in range(3)]
    assert [o.backend for o in opts] == ["reference"] * 3
    assert len([w for w in record if "reference" in str(w.message)]) == 1
