"""The kernel cache: memory, disk across processes, corruption, trust, concurrency."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import stat
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import stepjit
from stepjit import cli
from stepjit.ir import DType
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import cache, cpu, select

try:
    import resource
except ImportError:  # not POSIX
    resource = None

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
    monkeypatch.setattr(select, "_usable", lambda name, device: "ImportError: no llvmlite")
    monkeypatch.setattr(cache, "_warned", set())
    p = stepjit.Parameter(np.zeros(3, np.float32))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opts = [stepjit.optim.SGD([p], lr=0.1) for _ in range(3)]
    assert [o.backend for o in opts] == ["reference"] * 3
    assert len([w for w in record if "reference" in str(w.message)]) == 1


# -- directories: private whatever the umask, and only trusted when private ----------------------
@pytest.mark.parametrize("umask", [0o002, 0o022, 0o277], ids=["002", "022", "277"])
def test_cache_directories_are_made_private_whatever_the_umask(tmp_path, monkeypatch, umask):
    root = tmp_path / "made" / "by" / "stepjit"
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_warned", set())
    old = os.umask(umask)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            cpu.LLVMBackend().compile(RULE)
            before = stepjit.cache_info()
            cpu.LLVMBackend().compile(RULE)
    finally:
        os.umask(old)
    assert [str(w.message) for w in record if "stepjit" in str(w.message)] == []
    assert stepjit.cache_info().disk_hits == before.disk_hits + 1
    for d in (tmp_path / "made", tmp_path / "made" / "by", root, root / "llvm"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_directories_stepjit_did_not_create_keep_their_mode(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)  # a parent made by someone else under umask 002: not checked
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(shared / "stepjit"))
    monkeypatch.setattr(cache, "_warned", set())
    cpu.LLVMBackend().compile(RULE)
    before = stepjit.cache_info()
    cpu.LLVMBackend().compile(RULE)
    assert stepjit.cache_info().disk_hits == before.disk_hits + 1
    assert stat.S_IMODE(shared.stat().st_mode) == 0o775


def test_a_group_writable_cache_directory_is_refused_with_the_reason(tmp_path, monkeypatch):
    root = tmp_path / "stepjit"
    root.mkdir()
    os.chmod(root, 0o770)
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_warned", set())
    with pytest.warns(RuntimeWarning) as record:
        cpu.LLVMBackend().compile(RULE)
    (message,) = [str(w.message) for w in record if "stepjit" in str(w.message)]
    assert f"{root} is writable by its group (mode 0770)" in message
    assert "other users" not in message and f"chmod go-w {root}" in message
    assert stat.S_IMODE(root.stat().st_mode) == 0o770  # not changed behind the user's back
    assert not list(root.rglob("*.o"))


# -- entries that are not regular private files: never followed, never waited on ---------------
def _entry_path(cache_dir) -> Path:
    return cache_dir / "llvm" / f"{cpu.LLVMBackend().cache_key(RULE)}.o"


def _limited_child(cache_dir) -> dict:
    """run_child with 4 GiB of address space and a minute: a read without bounds or a wait on a
    FIFO fails instead of hanging or exhausting the machine."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {**os.environ, "STEPJIT_CACHE_DIR": str(cache_dir), "STEPJIT_BACKEND": "llvm",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no per-core buffers
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=60, preexec_fn=limit)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "mkfifo") or resource is None,
                    reason="needs FIFOs and resource limits")
@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero", "oversized file"])
def test_an_entry_that_is_not_a_private_regular_file_is_recompiled(cache_dir, kind):
    reference = run_child(cache_dir)  # compiles, and the entry's directory exists
    path = _entry_path(cache_dir)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    else:  # sparse: reading it whole would need 8 GiB
        with open(path, "wb") as f:
            f.truncate(8 << 30)
        os.chmod(path, 0o600)
    result = _limited_child(cache_dir)
    assert result["compiles"] == 1 and result["disk_hits"] == 0
    assert result["checksum"] == reference["checksum"]
    assert stat.S_ISREG(path.lstat().st_mode) and path.stat().st_size < cache.MAX_ENTRY_BYTES
    assert _limited_child(cache_dir)["disk_hits"] == 1  # the entry was replaced by a good one


# -- entries with a valid checksum whose object code is malformed -------------------------------
def _step_with_a_new_backend() -> tuple[np.ndarray, stepjit.CacheInfo]:
    """One SGD step (the configuration of RULE) through a backend created for it, and the
    change in the compile counters."""
    select._instance.cache_clear()
    try:
        p = stepjit.Parameter(np.linspace(-1, 1, 1001, dtype=np.float32))
        p.grad = np.cos(np.arange(1001, dtype=np.float32))
        opt = stepjit.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                backend="llvm")
        before = stepjit.cache_info()
        opt.step()
        after = stepjit.cache_info()
    finally:
        select._instance.cache_clear()
    return p.data.copy(), dataclasses.replace(
        after, compiles=after.compiles - before.compiles,
        disk_hits=after.disk_hits - before.disk_hits)


def _truncate_to_half(obj: bytes) -> bytes:
    return obj[: len(obj) // 2]


def _one_byte_short(obj: bytes) -> bytes:
    return obj[:-1]


def _too_many_sections(obj: bytes) -> bytes:
    return obj[:0x3C] + struct.pack("<H", 0xFF00) + obj[0x3E:]


@pytest.mark.parametrize("damage", [_truncate_to_half, _one_byte_short, _too_many_sections])
def test_malformed_object_code_with_a_valid_checksum_is_recompiled(cache_dir, damage):
    expected, first = _step_with_a_new_backend()
    assert first.compiles == 1
    store, key = cache.DiskCache("llvm", ".o"), cpu.LLVMBackend().cache_key(RULE)
    store.put(key, damage(store.get(key)))  # stored with a checksum that matches
    result, counts = _step_with_a_new_backend()  # no exception out of step()
    assert counts.compiles == 1 and counts.disk_hits == 0
    np.testing.assert_array_equal(result, expected)
    result, counts = _step_with_a_new_backend()  # the entry was overwritten with a good one
    assert counts.compiles == 0 and counts.disk_hits == 1
    np.testing.assert_array_equal(result, expected)


CLIP_RULE = sgd_rule(True, True, True, True, DType.F32, DType.F32)  # two kernels, relocations

# a child process: each mutated entry is stored (with a valid checksum) and compiled. A refused
# entry must be recompiled and step to the expected numbers; an accepted one must load without
# crashing (its code, which the mutation may have changed, is not run).
FUZZ_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import stepjit
    from stepjit.ir import DType
    from stepjit.optim.sgd import sgd_rule
    from stepjit.runtime import cache, cpu, select

    rule = sgd_rule(True, True, True, True, DType.F32, DType.F32)
    cases = json.loads(open(sys.argv[1]).read())
    store, key = cache.DiskCache("llvm", ".o"), cpu.LLVMBackend().cache_key(rule)
    outcomes = {}
    for label, payload in cases["mutations"].items():
        print(label, file=sys.stderr, flush=True)
        store.put(key, bytes.fromhex(payload))
        if cpu.LLVMBackend().compile(rule).source == "disk":
            outcomes[label] = "loaded"
            continue
        select._instance.cache_clear()
        p = stepjit.Parameter(np.linspace(-1, 1, 1001, dtype=np.float32))
        p.grad = np.cos(np.arange(1001, dtype=np.float32))
        opt = stepjit.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                clip_norm=1.0, backend="llvm")
        hits = stepjit.cache_info().disk_hits
        opt.step()
        rewritten = stepjit.cache_info().disk_hits == hits + 1
        right = p.data.tobytes().hex() == cases["expected"]
        outcomes[label] = "recompiled" if rewritten and right else "wrong numbers"
    print(json.dumps(outcomes))
""")


def _elf_layout(obj: bytes) -> tuple[int, list[tuple]]:
    """(e_shoff, section headers) of an ELF64 object, read independently of the library."""
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shnum, = struct.unpack_from("<H", obj, 0x3C)
    return shoff, [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + 64 * i) for i in range(shnum)]


def _patched(obj: bytes, offset: int, fmt: str, value: int) -> bytes:
    return obj[:offset] + struct.pack(fmt, value) + obj[offset + struct.calcsize(fmt):]


def _structural_mutations(obj: bytes) -> dict[str, bytes]:
    """Edits to fields a loader trusts, each of which makes the file malformed."""
    shoff, sections = _elf_layout(obj)
    shnum, size = len(sections), len(obj)
    symtab = next(i for i, s in enumerate(sections) if s[1] == 2)
    edits = {
        "ELF class 32": (4, "B", 1), "big-endian": (5, "B", 2), "e_type EXEC": (16, "<H", 2),
        "e_machine i386": (18, "<H", 3), "e_version 0": (20, "<I", 0),
        "e_phnum 1": (0x38, "<H", 1), "e_ehsize 52": (0x34, "<H", 52),
        "e_shoff past the end": (0x28, "<Q", size), "e_shoff unaligned": (0x28, "<Q", shoff + 4),
        "e_shoff huge": (0x28, "<Q", 1 << 63), "e_shentsize 40": (0x3A, "<H", 40),
        "e_shnum 0": (0x3C, "<H", 0), "e_shnum + 1": (0x3C, "<H", shnum + 1),
        "e_shnum max": (0x3C, "<H", 0xFFFF), "e_shstrndx past": (0x3E, "<H", shnum),
        "e_shstrndx symtab": (0x3E, "<H", symtab), "e_shstrndx 0": (0x3E, "<H", 0),
    }
    for i, (_, kind, flags, _, offset, length, link, info, _, _) in enumerate(sections[1:], 1):
        at = shoff + 64 * i
        edits |= {
            f"section {i} name past its table": (at, "<I", 0xFFFFFF),
            f"section {i} type X86_64_UNWIND": (at + 4, "<I", 0x70000001),
            f"section {i} TLS": (at + 8, "<Q", flags | 0x400),
            f"section {i} offset past the end": (at + 24, "<Q", size + 8),
            f"section {i} size past the end": (at + 32, "<Q", size - offset + 1),
            f"section {i} size huge": (at + 32, "<Q", 1 << 62),
            f"section {i} link past": (at + 40, "<I", shnum),
            f"section {i} alignment 3": (at + 48, "<Q", 3),
        }
        if kind in (2, 4):  # SYMTAB, RELA
            edits[f"section {i} entry size 1"] = (at + 56, "<Q", 1)
        if kind == 4:
            edits[f"section {i} patches a missing section"] = (at + 44, "<I", shnum)
            edits[f"section {i} patches the symbol table"] = (at + 44, "<I", symtab)
            target_size = sections[info][5]
            for k in sorted({0, length // 24 - 1}):
                r = offset + 24 * k
                r_info, = struct.unpack_from("<Q", obj, r + 8)
                nsyms = sections[link][5] // 24
                edits |= {
                    f"relocation {k} past its section": (r, "<Q", target_size - 7),
                    f"relocation {k} offset huge": (r, "<Q", 1 << 63),
                    f"relocation {k} symbol past": (r + 8, "<Q", nsyms << 32 | r_info & 0xFFFF),
                    f"relocation {k} type 255": (r + 8, "<Q", r_info & ~0xFFFFFFFF | 255),
                    f"relocation {k} against the file symbol": (r + 8, "<Q", 1 << 32 | 1),
                }
        if kind == 2:
            nsyms = length // 24
            edits["symbol 0 not null"] = (offset, "<I", 1)
            for k in range(1, nsyms):
                s = offset + 24 * k
                st_info = obj[s + 4]
                edits |= {
                    f"symbol {k} name past": (s, "<I", 0xFFFFFF),
                    f"symbol {k} TLS": (s + 4, "B", st_info & 0xF0 | 6),
                    f"symbol {k} in a missing section": (s + 6, "<H", shnum),
                    f"symbol {k} common": (s + 6, "<H", 0xFFF2),
                    f"symbol {k} extended index": (s + 6, "<H", 0xFFFF),
                }
                if st_info & 0xF != 4:  # not the (absolute) file symbol
                    edits[f"symbol {k} absolute"] = (s + 6, "<H", 0xFFF1)
                if st_info & 0xF == 3:  # SECTION
                    edits[f"symbol {k} undefined"] = (s + 6, "<H", 0)
                if st_info & 0xF == 2:  # FUNC
                    edits[f"symbol {k} value past its section"] = (s + 8, "<Q", 1 << 40)
                    edits[f"symbol {k} size past its section"] = (s + 16, "<Q", 1 << 40)
    mutations = {label: _patched(obj, *edit) for label, edit in edits.items()}
    end = max([shoff + 64 * shnum] + [s[4] + s[5] for s in sections if s[1] != 8])
    for n in sorted({0, 1, 16, 63, 64, shoff, end - 64, end - 1}):
        mutations[f"truncated to {n} bytes"] = obj[:n]
    return mutations


def _random_mutations(obj: bytes, rng: random.Random, count: int) -> dict[str, bytes]:
    """Random byte values, bit flips and runs of garbage anywhere in the file."""
    mutations = {}
    for i in range(count):
        data = bytearray(obj)
        at = rng.randrange(len(data))
        if i % 3 == 0:
            data[at] = (data[at] + rng.randrange(1, 256)) % 256
        elif i % 3 == 1:
            data[at] ^= 1 << rng.randrange(8)
        else:
            data[at : at + 8] = rng.randbytes(8)
        mutations[f"random {i} at {at}"] = bytes(data)
    return mutations


def _cached_clip_object() -> bytes:
    backend = cpu.LLVMBackend()
    backend.compile(CLIP_RULE)
    return cache.DiskCache("llvm", ".o").get(backend.cache_key(CLIP_RULE))


def test_every_edit_of_a_field_the_loader_trusts_is_refused(cache_dir):
    obj = _cached_clip_object()
    cpu.check_object(obj)
    accepted = []
    for label, data in _structural_mutations(obj).items():
        try:
            cpu.check_object(data)
        except cache.MalformedEntry:
            continue
        accepted.append(label)
    assert accepted == []


@pytest.mark.parametrize("seed", range(3))
def test_checking_object_code_raises_only_malformed_entry(cache_dir, seed):
    """Whatever the bytes, checking them passes or refuses them, never raises anything else."""
    obj = _cached_clip_object()
    refused = 0
    for data in _random_mutations(obj, random.Random(seed), 600).values():
        try:
            cpu.check_object(data)
            cpu.undefined_symbols(data)
        except cache.MalformedEntry:
            refused += 1
    assert 0 < refused < 600


def test_mutated_object_code_never_crashes_the_process(cache_dir, tmp_path):
    """Entries with a valid checksum and malformed object code, loaded in a child process (a
    crash there fails the test): a sample of the edits above and random damage anywhere."""
    obj = _cached_clip_object()
    p = stepjit.Parameter(np.linspace(-1, 1, 1001, dtype=np.float32))
    p.grad = np.cos(np.arange(1001, dtype=np.float32))
    stepjit.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, clip_norm=1.0,
                      backend="llvm").step()
    structural = dict(list(_structural_mutations(obj).items())[::4])
    mutations = {**structural, **_random_mutations(obj, random.Random(0), 60)}
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"expected": p.data.tobytes().hex(),
                                 "mutations": {k: v.hex() for k, v in mutations.items()}}))
    env = {**os.environ, "STEPJIT_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", FUZZ_CHILD, str(cases)], env=env,
                          capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1:]
    assert done.returncode == 0, f"the child died ({done.returncode}) after {last}"
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes.keys() == mutations.keys()
    assert {label for label in structural if outcomes[label] != "recompiled"} == set()
    assert set(outcomes.values()) <= {"recompiled", "loaded"}


# -- temporaries left by a killed writer -------------------------------------------------------
def test_cache_clear_removes_temporary_files_left_by_killed_writers(cache_dir, capsys):
    cpu.LLVMBackend().compile(RULE)
    llvm_dir = cache_dir / "llvm"
    leftovers = [llvm_dir / ".tmp-a1b2c3d4", llvm_dir / ".tmp-zz_9y8x7"]
    for path in leftovers:
        path.write_bytes(b"half a kernel")
    unrelated = llvm_dir / ".tmp-notes.txt"
    unrelated.write_text("not written by stepjit")
    assert cli.main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"removed 1 entries and 2 temporary files from {cache_dir}")
    assert sorted(p.name for p in llvm_dir.iterdir()) == [unrelated.name]


def test_cache_info_counts_temporary_files(cache_dir, capsys):
    cpu.LLVMBackend().compile(RULE)
    (cache_dir / "llvm" / ".tmp-a1b2c3d4").write_bytes(b"half a kernel")
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^leftover\s+1 temporary files, 13 B", out, flags=re.M), out
    assert re.search(r"^total\s+1 entries", out, flags=re.M), out


def test_disk_cache_clear_removes_temporary_files(cache_dir):
    store = cache.DiskCache("llvm", ".o")
    store.put("0" * 40, b"payload")
    (store.directory / ".tmp-a1b2c3d4").write_bytes(b"half")
    assert store.temporaries() == [store.directory / ".tmp-a1b2c3d4"]
    assert store.clear() == 1
    assert list(store.directory.iterdir()) == []


# -- CUDA images -----------------------------------------------------------------------------
def _cuda_source():
    pytest.importorskip("cupy")
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no NVRTC library
        pytest.skip(f"NVRTC is not available ({exc})")
    from stepjit.codegen import cuda as cuda_codegen
    from stepjit.runtime import gpu

    info = cuda_codegen.describe(CLIP_RULE)
    return gpu, gpu.render(CLIP_RULE), [info.update, info.partial_sums]


def _cuda_damage(gpu, source: str, arch: str, name: str) -> bytes:
    """A payload for the entry of (source, arch): its good image damaged as `name` says."""
    image, _ = gpu.load_or_compile(source, arch)
    if name == "truncated":
        return image[: len(image) // 2]
    if name == "another architecture":
        return gpu.load_or_compile(source, arch.replace("80", "90"))[0]
    if name == "another kernel":
        return gpu.load_or_compile(gpu.render(RULE), arch)[0]
    if name == "section table past the end":
        return image[:0x28] + struct.pack("<Q", len(image)) + image[0x30:]
    if name == "no NUL":
        return image[:-1]
    assert name == "not ASCII"
    return image[:100] + b"\xff" + image[101:]


@pytest.mark.parametrize("arch,damage", [
    ("sm_80", "truncated"), ("sm_80", "another architecture"), ("sm_80", "another kernel"),
    ("sm_80", "section table past the end"), ("compute_80", "truncated"),
    ("compute_80", "another architecture"), ("compute_80", "another kernel"),
    ("compute_80", "no NUL"), ("compute_80", "not ASCII"),
])
def test_a_malformed_cuda_image_with_a_valid_checksum_is_recompiled(cache_dir, arch, damage):
    gpu, source, entry_points = _cuda_source()
    # only "another kernel" needs the kernel names the backend passes; the rest is structural
    names = {"entry_points": entry_points} if damage == "another kernel" else {}
    good, _ = gpu.load_or_compile(source, arch, **names)
    suffix = ".cubin" if arch.startswith("sm_") else ".ptx"
    store, key = cache.DiskCache("cuda", suffix), gpu.cache_key(source, arch)
    store.put(key, _cuda_damage(gpu, source, arch, damage))
    image, from_disk = gpu.load_or_compile(source, arch, **names)
    assert not from_disk and image == good
    assert store.get(key) == good  # overwritten
    assert gpu.load_or_compile(source, arch, entry_points) == (good, True)


def test_checking_a_damaged_cubin_raises_only_malformed_entry(cache_dir):
    gpu, source, entry_points = _cuda_source()
    image, _ = gpu.load_or_compile(source, "sm_80", entry_points)
    gpu.check_image(image, "sm_80", entry_points)
    rng = random.Random(0)
    refused = 0
    for data in _random_mutations(image, rng, 300).values():
        try:
            gpu.check_image(data, "sm_80", entry_points)
        except cache.MalformedEntry:
            refused += 1
    assert refused > 0
