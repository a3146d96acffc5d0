"""Every kernel the library can generate compiles for sm_75, sm_80 and sm_90 (no GPU needed).

"Every kernel": every structure of every registered optimizer (`registry.structures`) in every
parameter dtype, plus one mixed gradient dtype each, with 8-bit state in one dtype each, and the
accumulate and zero rules (see `cuda_rules`), each in its plain and its capturable variant (for
CUDA graphs, with the optimizer's per-tensor formulas; none where a per-tensor value comes from
the host at every step: stochastic rounding's keys). To stay fast on small CI machines, each
rule's plain variant is compiled for one architecture (round robin) and its capturable variant
for one of sm_80 and sm_90 (graph capture's targets), in one NVRTC program where the two
architectures agree; a set of rules that together use every template path (every kernel, every
dtype as parameter, gradient and state, the accumulate and zero rules, 8-bit state) is compiled
for all three, both variants in one program. Compilations run in parallel threads (NVRTC
releases the GIL).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from cuda_rules import (
    FLOATS,
    all_rules,
    capturable_rules,
    compact_rules,
    has_capturable_variant,
    int8_cases,
)

from stepjit.codegen import cuda
from stepjit.ir import OPS, DType, UpdateRule
from stepjit.optim import OPTIMIZERS, registry, rule_for
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule

gpu = pytest.importorskip("stepjit.runtime.gpu")

ARCHS = ("sm_75", "sm_80", "sm_90")
CAPTURABLE_ARCHS = ("sm_80", "sm_90")


def _nvrtc_missing() -> str | None:
    try:
        gpu.nvrtc_version()
    except Exception as exc:  # ImportError, or a CuPy without a loadable NVRTC library
        return f"NVRTC is not available: {exc}"
    if not gpu.include_dirs():
        return "cuda_fp16.h not found (install nvidia-cuda-runtime or a CUDA toolkit)"
    return None


pytestmark = pytest.mark.skipif(bool(_nvrtc_missing()), reason=str(_nvrtc_missing()))


def path_rules():
    """Rules that together reach every path of the templates and of the op table."""
    rules = [sgd_rule(True, True, True, True, d, d) for d in FLOATS]  # every kernel, per dtype
    rules += [sgd_rule(True, False, True, True, DType.BF16, DType.F16),  # mixed half types
              sgd_rule(False, False, False, False, DType.F32, DType.F64),  # vanilla
              _accumulate_rule(DType.F32, DType.BF16), _accumulate_rule(DType.F64, DType.F16),
              _zero_rule(DType.F16), _zero_rule(DType.BF16),
              rule_for("adamw", "float32", clip_norm=1.0)]  # prepare with float64 formulas
    rules += [rule for rule, _ in compact_rules()]  # bfloat16 and 8-bit state, master copies
    return rules


@dataclass(frozen=True)
class Job:
    """One NVRTC program: the plain and/or the capturable variant of one rule, for one arch."""

    rule: UpdateRule
    formulas: dict | None  # the capturable variant's, when it is in the program
    plain: bool
    arch: str

    @property
    def variants(self) -> list[dict | None]:
        """The `capturable` argument of `describe` and `render` for each variant."""
        return [None] * self.plain + ([self.formulas] if self.formulas is not None else [])

    @property
    def id(self) -> str:
        kinds = "+".join(["plain"] * self.plain + ["capturable"] * (self.formulas is not None))
        return f"{self.rule.name}-{kinds}-{self.arch}"


def plan() -> list[Job]:
    """Every rule's plain variant at least once, its capturable variant on sm_80 or sm_90,
    every path rule's both variants on every arch."""
    formulas = {rule.key: f for rule, f in capturable_rules() + compact_rules()}  # sgd's: {}
    wanted: dict[tuple[str, str], dict] = {}  # (rule key, arch) -> {"plain": ..., ...}
    for i, rule in enumerate(all_rules()):
        wanted.setdefault((rule.key, ARCHS[i % len(ARCHS)]), {})["plain"] = True
        if has_capturable_variant(rule):
            wanted.setdefault((rule.key, CAPTURABLE_ARCHS[i % 2]), {})["capturable"] = True
    for rule in path_rules():
        for arch in ARCHS:  # the keys of stochastic rounding come from the host: no capture
            wanted[(rule.key, arch)] = {"plain": True, "capturable": has_capturable_variant(rule)}
    rules = {r.key: r for r in all_rules() + path_rules()}
    return [Job(rules[key], formulas.get(key, {}) if kinds.get("capturable") else None,
                kinds.get("plain", False), arch) for (key, arch), kinds in wanted.items()]


PLAN = plan()


@pytest.fixture(scope="module")
def compiled():
    """Compile the whole plan once, in parallel; map each job's id to its output or error."""

    def build(job):
        source = "\n".join(gpu.render(job.rule, capturable=f) for f in job.variants)
        try:
            return gpu.nvrtc_compile(source, job.arch, name=f"{job.rule.name}.cu")
        except Exception as exc:  # reported by the test of this job
            return exc

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(build, PLAN))
    seconds = time.perf_counter() - t0
    print(f"\ncompiled {len(PLAN)} programs in {seconds:.1f} s")
    return {job.id: out for job, out in zip(PLAN, results, strict=True)}


def test_plan_covers_every_rule_and_every_arch():
    keys = {r.key for r in all_rules() + path_rules()}
    assert {job.rule.key for job in PLAN if job.plain} == keys
    host_keys = {r.key for r in all_rules() + path_rules() if not has_capturable_variant(r)}
    assert host_keys  # stochastic rounding: no capturable variant
    assert {job.rule.key for job in PLAN if job.formulas is not None} == keys - host_keys
    assert all(job.arch in CAPTURABLE_ARCHS for job in PLAN
               if job.formulas is not None and not job.plain)
    for arch in ARCHS:
        on_arch = {job.rule.key for job in PLAN if job.arch == arch and job.plain}
        assert {r.key for r in path_rules()} <= on_arch
        # every dtype reaches every arch as parameter, gradient and state
        rules = [job.rule for job in PLAN if job.arch == arch]
        for d in FLOATS:
            assert any(r.slot("param").dtype is d for r in rules if r.name.startswith("sgd"))
            assert any(r.slot("grad").dtype is d for r in rules)
        assert any(r.reductions for r in rules)


def test_every_registered_optimizer_is_in_the_plan():
    """A new optimizer module reaches this test through the registry, every structure of it,
    both variants."""
    plain = {job.rule.key for job in PLAN if job.plain}
    capturable = {job.rule.key for job in PLAN if job.formulas is not None}
    for name, cls in OPTIMIZERS.items():
        for config in registry.structures(cls):
            for d in FLOATS:
                key = rule_for(name, str(d), **config).key
                assert key in plain and key in capturable, (name, config, d)
    assert {case.rule.key for case in int8_cases()} <= plain  # stochastic codes: plain only


def _entries(ptx: str) -> dict[str, str]:
    """The PTX of each kernel, by name."""
    starts = [(m.group(1), m.start()) for m in re.finditer(r"\.entry (\w+)\(", ptx)]
    ends = [start for _, start in starts[1:]] + [len(ptx)]
    return {name: ptx[start:end] for (name, start), end in zip(starts, ends, strict=True)}


@pytest.mark.parametrize("job", PLAN, ids=[job.id for job in PLAN])
def test_kernel_compiles(compiled, job):
    out = compiled[job.id]
    if isinstance(out, Exception):
        raise out
    assert out.cubin is not None and out.cubin[:4] == b"\x7fELF"
    assert f".target {job.arch}" in out.ptx
    entries = set(_entries(out.ptx))
    for variant in job.variants:
        info = cuda.describe(job.rule, capturable=variant)
        assert set(info.kernels) | ({info.prepare} - {None}) <= entries


def _approximate(formulas: dict) -> bool:
    """Whether the formulas call a math function that CUDA implements with fused multiply-adds
    and approximate .ftz steps of its own (exp, log, tanh: within their documented ulps)."""
    todo, seen = list(formulas.values()), set()
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.src)
    return any(OPS[n.op].ulps for n in seen)


def test_no_flush_to_zero_and_no_fused_multiply_add(compiled):
    """-ftz=false keeps denormals (no .ftz instruction variants); -fmad=false rounds every
    multiply and add separately, as the reference interpreter does. In every kernel but a
    prepare kernel whose formulas call exp or log (CUDA's own implementations use both; the
    values they compute are within the record's ulps, as test_ops exempts them too)."""
    checked = 0
    for job in PLAN:
        out = compiled[job.id]
        assert not isinstance(out, Exception)
        exempt = set()
        if job.formulas is not None and _approximate(job.formulas):
            exempt.add(cuda.describe(job.rule, capturable=job.formulas).prepare)
        for name, body in _entries(out.ptx).items():
            if name not in exempt:
                assert ".ftz" not in body, name
                assert "fma.rn" not in body and "mad.rn" not in body, name
                checked += 1
    assert checked > len(PLAN)


def test_flush_to_zero_would_show_in_the_ptx():
    """The check above can fail: with CuPy's default (-ftz=true) the same kernel has .ftz ops."""
    rule = sgd_rule(True, False, True, False, DType.F32, DType.F32)
    nvrtc = gpu._nvrtc()
    prog = nvrtc.createProgram(gpu.render(rule), "ftz.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-arch=sm_80", "-ftz=true"])
        text = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    text = text.decode() if isinstance(text, bytes) else text
    assert ".ftz.f32" in text


def test_ptx_helper_and_compile_errors():
    source = gpu.render(_zero_rule(DType.F32))
    text = gpu.ptx(source, "compute_80")
    assert ".target sm_80" in text and "zero_float32_update" in text
    assert gpu.cubin(source, "sm_75")[:4] == b"\x7fELF"
    with pytest.raises(gpu.CUDACompileError, match="error"):
        gpu.nvrtc_compile(source + "\nthis is not C++;\n", "sm_80")
    with pytest.raises(ValueError):
        gpu.ptx(source, "volta")


def test_disk_cache_reuses_images(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(tmp_path))
    source = gpu.render(_zero_rule(DType.F16))
    image, from_disk = gpu.load_or_compile(source, "sm_80")
    assert not from_disk and image[:4] == b"\x7fELF"
    again, from_disk = gpu.load_or_compile(source, "sm_80")
    assert from_disk and again == image
    assert len(list((tmp_path / "cuda").glob("*.cubin"))) == 1
    other, from_disk = gpu.load_or_compile(source, "sm_90")  # another arch, another entry
    assert not from_disk and other != image
    ptx_image, _ = gpu.load_or_compile(source, "compute_90")
    assert ptx_image.endswith(b"\0") and b".entry" in ptx_image
    assert gpu.cache_key(source, "sm_80") != gpu.cache_key(source + " ", "sm_80")


def test_pick_arch():
    assert gpu.pick_arch("90", (75, 80, 90)) == "sm_90"
    assert gpu.pick_arch("89", (75, 80, 90)) == "compute_80"
    with pytest.raises(RuntimeError):
        gpu.pick_arch("70", (75, 80))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_agrees(tmp_path):
    """The generated source is valid for nvcc too, with the same numerics options."""
    rule = sgd_rule(True, True, True, True, DType.BF16, DType.F16)
    path = tmp_path / "k.cu"
    path.write_text(gpu.render(rule))
    flags = [o for o in gpu.NVRTC_OPTIONS if not o.startswith("-std")]
    subprocess.run(
        ["nvcc", "-cubin", "-arch=sm_80", "-std=c++17", *flags, str(path), "-o",
         str(tmp_path / "k.cubin")],
        check=True, capture_output=True, timeout=300,
    )
    assert (tmp_path / "k.cubin").read_bytes()[:4] == b"\x7fELF"
