"""Every kernel the library can generate compiles for sm_75, sm_80 and sm_90 (no GPU needed).

"Every kernel": every structure of every registered optimizer (`registry.structures`) in every
parameter dtype, plus one mixed gradient dtype each, and the accumulate and zero rules (see
`cuda_rules`). Each rule is one NVRTC program. To stay fast on small CI machines, each rule is
compiled for one architecture (round robin), and a set of rules that together use every template
path (both kernels, every dtype as parameter, gradient and state, the accumulate and zero rules)
is compiled for all three. Compilations run in parallel threads (NVRTC releases the GIL).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cuda_rules import FLOATS, all_rules

from stepjit.codegen import cuda
from stepjit.ir import DType
from stepjit.optim import OPTIMIZERS, registry, rule_for
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule

gpu = pytest.importorskip("stepjit.runtime.gpu")

ARCHS = ("sm_75", "sm_80", "sm_90")


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
    rules = [sgd_rule(True, True, True, True, d, d) for d in FLOATS]  # both kernels, per dtype
    rules += [sgd_rule(True, False, True, True, DType.BF16, DType.F16),  # mixed half types
              sgd_rule(False, False, False, False, DType.F32, DType.F64),  # vanilla
              _accumulate_rule(DType.F32, DType.BF16), _accumulate_rule(DType.F64, DType.F16),
              _zero_rule(DType.F16), _zero_rule(DType.BF16)]
    return rules


def plan() -> list[tuple[object, str]]:
    """(rule, arch) pairs: every rule at least once, every path rule on every arch."""
    jobs = {(r.key, ARCHS[i % len(ARCHS)]): r for i, r in enumerate(all_rules())}
    jobs.update({(r.key, arch): r for r in path_rules() for arch in ARCHS})
    return [(rule, arch) for (_, arch), rule in jobs.items()]


PLAN = plan()


@pytest.fixture(scope="module")
def compiled():
    """Compile the whole plan once, in parallel; map (rule key, arch) to output or error."""

    def build(job):
        rule, arch = job
        try:
            return gpu.nvrtc_compile(gpu.render(rule), arch, name=f"{rule.name}.cu")
        except Exception as exc:  # reported by the test of this job
            return exc

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(build, PLAN))
    seconds = time.perf_counter() - t0
    print(f"\ncompiled {len(PLAN)} kernels in {seconds:.1f} s")
    return {(rule.key, arch): out for (rule, arch), out in zip(PLAN, results, strict=True)}


def test_plan_covers_every_rule_and_every_arch():
    keys = {r.key for r in all_rules() + path_rules()}
    assert {rule.key for rule, _ in PLAN} == keys
    for arch in ARCHS:
        on_arch = {rule.key for rule, a in PLAN if a == arch}
        assert {r.key for r in path_rules()} <= on_arch
        # every dtype reaches every arch as parameter, gradient and state
        rules = [rule for rule, a in PLAN if a == arch]
        for d in FLOATS:
            assert any(r.slot("param").dtype is d for r in rules if r.name.startswith("sgd"))
            assert any(r.slot("grad").dtype is d for r in rules)
        assert any(r.reductions for r in rules)


def test_every_registered_optimizer_is_in_the_plan():
    """A new optimizer module reaches this test through the registry, every structure of it."""
    planned = {rule.key for rule, _ in PLAN}
    for name, cls in OPTIMIZERS.items():
        for config in registry.structures(cls):
            for d in FLOATS:
                assert rule_for(name, str(d), **config).key in planned, (name, config, d)


@pytest.mark.parametrize(("rule", "arch"), PLAN, ids=[f"{r.name}-{a}" for r, a in PLAN])
def test_kernel_compiles(compiled, rule, arch):
    out = compiled[(rule.key, arch)]
    if isinstance(out, Exception):
        raise out
    assert out.cubin is not None and out.cubin[:4] == b"\x7fELF"
    assert f".target {arch}" in out.ptx
    info = cuda.describe(rule)
    assert f".entry {info.update}(" in out.ptx
    if info.partial_sums:
        assert f".entry {info.partial_sums}(" in out.ptx


def test_no_flush_to_zero_and_no_fused_multiply_add(compiled):
    """-ftz=false keeps denormals (no .ftz instruction variants); -fmad=false rounds every
    multiply and add separately, as the reference interpreter does."""
    for out in compiled.values():
        assert not isinstance(out, Exception)
        assert ".ftz" not in out.ptx
        assert "fma.rn" not in out.ptx and "mad.rn" not in out.ptx


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
