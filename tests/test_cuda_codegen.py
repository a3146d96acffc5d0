"""The CUDA lowering as text: op coverage, determinism, structure of the emitted kernels."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cuda_rules import all_rules

from stepjit.codegen import cuda
from stepjit.ir import DType, Op, Slot, UpdateRule, const, maximum, minimum, scalar, tensor, where
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import gpu

F16, BF16, F32, F64 = DType.F16, DType.BF16, DType.F32, DType.F64
SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_op_has_an_emitter():
    assert set(cuda.CUDA_OPS) == set(Op)


def test_every_dtype_has_a_c_type():
    assert set(cuda.CTYPES) == set(DType)


def test_every_generated_rule_renders_both_kernels_when_it_reduces():
    for rule in all_rules():
        source = gpu.render(rule)
        info = cuda.describe(rule)
        assert f"void __launch_bounds__({info.block}) {info.update}(" in source
        if rule.reductions:
            assert info.partial_sums is not None
            head = f"void __launch_bounds__({info.block}) {info.partial_sums}("
            assert head in source
            assert source.index(head) < source.index(f"{info.block}) {info.update}(")
        else:
            assert info.partial_sums is None and "_partial_sums" not in source


def test_render_is_deterministic_across_processes():
    """The text keys the compile cache: no set or dict order may leak into it."""
    rules = [sgd_rule(True, True, True, True, BF16, F16), _accumulate_rule(F32, F16)]
    here = "\n=====\n".join(gpu.render(r) for r in rules)
    assert here == "\n=====\n".join(gpu.render(r) for r in rules)
    script = (
        "from stepjit.runtime import gpu; from stepjit.ir import DType as D\n"
        "from stepjit.optim.sgd import sgd_rule\n"
        "from stepjit.optim.optimizer import _accumulate_rule\n"
        "rules = [sgd_rule(True, True, True, True, D.BF16, D.F16), "
        "_accumulate_rule(D.F32, D.F16)]\n"
        "print('\\n=====\\n'.join(gpu.render(r) for r in rules), end='')\n"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True,
            env={"PYTHONPATH": str(SRC), "PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        assert out == here


def test_kernel_reads_like_the_rule():
    rule = sgd_rule(True, False, False, False, F32, F32)
    source = gpu.render(rule)
    for line in rule.text.splitlines():  # the rule heads the file
        assert f"// {line}" in source
    ids = {n: i for i, n in enumerate(rule.nodes)}
    for n in rule.nodes:
        if n.op in (Op.MUL, Op.ADD, Op.SUB, Op.WHERE, Op.CAST):
            # every computed node keeps its number, its C type and its op in a comment
            assert re.search(rf"const {cuda.CTYPES[n.dtype]} v{ids[n]} = .*// %{ids[n]} = "
                             rf"{n.op.value} ", source), n
    assert re.search(r"const float v\d+ = momentum \* momentum_buffer;  // %\d+ = mul", source)
    assert "param_out = v" in source and "momentum_buffer_out = v" in source


def test_uniform_values_are_computed_once_per_block_outside_the_element_lambda():
    rule = sgd_rule(True, False, False, True, F32, F32)
    update = gpu.render(rule).split(f"{rule.name}_update(")[1]
    lam = update.index("auto update = ")
    for pattern in (r"= 1\.0f - dampening;", r"= sqrt\(sum_0\);", r"= clip_norm / v\d+;"):
        match = re.search(pattern, update)
        assert match and match.start() < lam, pattern
    assert re.search(r"= scale \* grad;", update).start() > lam


def test_partial_sums_kernel_only_computes_the_sum_terms():
    rule = sgd_rule(True, False, True, True, F32, F32)
    source = gpu.render(rule)
    partial = source.split(f"{rule.name}_partial_sums(")[1].split(f"{rule.name}_update(")[0]
    assert "param_ptr" not in partial and "momentum_buffer_ptr" not in partial
    assert "sum_0 += v" in partial and "block_sum<BLOCK>(sum_0, scratch)" in partial
    assert not re.search(r"atomic\w*\(", source)  # deterministic: no atomics anywhere


def test_half_headers_only_when_needed():
    assert "#include <cuda_fp16.h>" not in gpu.render(sgd_rule(False, False, False, False,
                                                                  F32, F32))
    half = gpu.render(sgd_rule(False, False, False, False, F16, F32))
    assert "#include <cuda_fp16.h>" in half and "#include <cuda_bf16.h>" not in half
    bf = gpu.render(sgd_rule(False, False, False, False, F32, BF16))
    assert "#include <cuda_bf16.h>" in bf and "#include <cuda_fp16.h>" not in bf


def test_half_parameters_keep_float32_state_and_round_once():
    rule = sgd_rule(True, True, True, False, BF16, F16)
    source = gpu.render(rule)
    assert "float& momentum_buffer_out" in source
    assert "__nv_bfloat16& param_out" in source
    assert source.count("__float2bfloat16_rn(") == 1  # the single rounding of the new param
    assert "__half2float(grad)" in source and "__bfloat162float(param)" in source


@pytest.mark.parametrize(
    ("value", "dtype", "text"),
    [
        (0.5, F32, "0.5f"),
        (0.1, F64, "0.1"),
        (-2.0, F64, "(-2.0)"),
        (0.1, F16, "__float2half_rn(0.0999755859375f)"),
        (1.0, BF16, "__float2bfloat16_rn(1.0f)"),
        (float("inf"), F32, "__int_as_float(0x7f800000)"),
        (float("-inf"), F64, "(-__longlong_as_double(0x7ff0000000000000LL))"),
        (1.0, DType.BOOL, "true"),
    ],
)
def test_literals(value, dtype, text):
    assert cuda.literal(value, dtype) == text


def test_literal_nan_and_rounding_match_numpy():
    assert cuda.literal(float("nan"), F32) == "__int_as_float(0x7fc00000)"
    with np.errstate(over="ignore"):
        for v in (0.1, 1 / 3, 1e-8, 65519.0, 65520.0, 70000.0, 3.0e38, 1e39):
            assert cuda.round_to(v, F16) == float(np.float16(v))
            assert cuda.round_to(v, F32) == float(np.float32(v))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for v in (0.1, 1 / 3, 1 + 2**-8, 1 + 3 * 2**-9, -1e-40, 3.0e38):
        assert cuda.round_to(v, BF16) == float(np.array(v).astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        (F32, F16, "__float2half_rn(x)"),
        (F64, F16, "__double2half(x)"),  # one rounding, like numpy
        (F32, BF16, "__float2bfloat16_rn(x)"),
        (F64, BF16, "__float2bfloat16_rn((float)x)"),  # through float32, like ml_dtypes
        (F16, F32, "__half2float(x)"),
        (BF16, F64, "(double)__bfloat162float(x)"),
        (F16, BF16, "__float2bfloat16_rn(__half2float(x))"),
        (F64, F32, "(float)x"),
        (DType.BOOL, F32, "(x ? 1.0f : 0.0f)"),
        (F32, DType.BOOL, "(x != 0)"),
    ],
)
def test_casts(src, dst, expected):
    assert cuda.cast("x", src, dst) == expected


def test_max_min_propagate_nan_and_cmplt_is_ordered():
    x, y = tensor("x", F32), tensor("y", F16)
    rule = UpdateRule(
        "ops", [Slot("x", F32, written=True), Slot("y", F16, written=True)],
        {"x": where(x < 0.5, maximum(x, 1.0), minimum(x, -1.0)), "y": maximum(y, y * y)},
    )
    source = gpu.render(rule)
    assert "nan_max(x, 1.0f)" in source and "nan_min(x, (-1.0f))" in source
    assert "(a > b || a != a) ? a : b" in source  # the NaN-propagating definition
    assert "x < 0.5f" in source
    # half arithmetic runs in float32 and rounds back
    assert "__float2half_rn(nan_max(__half2float(y), __half2float(v" in source


def test_names_that_clash_with_c_are_renamed():
    x = tensor("float", F32)
    rule = UpdateRule("clash", [Slot("float", F32, written=True)],
                      {"float": x * scalar("end", F32) + scalar("v3", F32)})
    source = gpu.render(rule)
    assert "const float end_arg" in source and "const float v3_arg" in source
    assert "float_arg_out" in source
    assert not re.search(r"\bfloat\* __restrict__ float_ptr", source)


def test_describe_matches_the_kernel_signature():
    rule = sgd_rule(True, False, True, True, F16, F32)
    info = cuda.describe(rule)
    assert info.scalars == rule.scalars
    assert [n for _, n in info.params[5:]] == list(rule.scalar_names)
    assert dict((n, t) for t, n in info.params)["clip_norm"] == "double"
    assert info.vec == 4 and info.n_reductions == 1 and info.n_per_tensor == 1
    signature = ",\n    ".join(f"const {t} {n}" if not t.startswith("const") else
                               f"{t} __restrict__ {n}" for t, n in info.params)
    assert signature in gpu.render(rule)
    assert cuda.describe(sgd_rule(False, False, False, False, F64, F64)).vec == 2
    assert cuda.describe(_zero_rule(BF16)).vec == 8
    with pytest.raises(ValueError):
        cuda.describe(rule, block=48)
    with pytest.raises(ValueError):
        cuda.describe(rule, chunk=6)


def test_constant_output_writes_without_loading():
    rule = _zero_rule(F16)
    source = gpu.render(rule)
    assert "load_pack" not in source.split("auto update")[1]
    assert "grad_out = __float2half_rn(0.0f);" in source


def test_templates_are_found_and_complete():
    folder = gpu.template_dir()
    for name in cuda.TEMPLATE_NAMES:
        assert (folder / name).is_file()
    text = (folder / "update.cu").read_text()
    for field in ("${kernel_name}", "${element_body}", "${pack_body}", "${scalar_params}"):
        assert field in text


def test_codegen_does_not_import_runtime_or_optim():
    tree = ast.parse((SRC / "stepjit" / "codegen" / "cuda.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not any("runtime" in m or "optim" in m or "cupy" in m for m in imported), imported


def test_const_only_rule_and_bool_per_tensor():
    c = const(2.0, F64)
    rule = UpdateRule("k", [Slot("w", F64, written=True)], {"w": tensor("w", F64) * c})
    assert "w_out = v" in gpu.render(rule)
