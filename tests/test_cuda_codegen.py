"""The CUDA lowering as text: op coverage, determinism, structure of the emitted kernels."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cuda_rules import all_rules, tensor_formulas

from stepjit.codegen import cuda
from stepjit.ir import (
    DType,
    Op,
    Slot,
    UpdateRule,
    block_absmax,
    const,
    decode,
    encode,
    maximum,
    minimum,
    per_tensor,
    quantized,
    scalar,
    tensor,
    where,
)
from stepjit.optim import rule_for
from stepjit.optim.adagrad import adagrad_rule
from stepjit.optim.adam import adam_rule
from stepjit.optim.lars import lars_rule
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule
from stepjit.runtime import gpu

F16, BF16, F32, F64 = DType.F16, DType.BF16, DType.F32, DType.F64
SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_op_has_an_emitter():
    assert set(cuda.CUDA_OPS) == set(Op)


def test_every_dtype_has_a_c_type():
    assert set(cuda.CTYPES) == set(DType)


def test_every_generated_rule_renders_its_kernels_in_launch_order():
    for rule in all_rules():
        source = gpu.render(rule)
        info = cuda.describe(rule)
        heads = [source.index(f"void __launch_bounds__({info.block}) {name}(")
                 for name in info.kernels]
        assert heads == sorted(heads) and info.kernels[-1] == info.update
        if rule.reductions:
            assert info.kernels == (info.partial_sums, info.tensor_sums, info.update)
        else:
            assert info.kernels == (info.update,) and info.partial_sums is None
            assert info.tensor_sums is None and "_partial_sums" not in source
        assert not info.capturable and info.prepare is None and "_capturable" not in source


def test_render_is_deterministic_across_processes():
    """The text keys the compile cache: no set or dict order may leak into it (the capturable
    variant's formulas and inputs included)."""
    sgd = sgd_rule(True, True, True, True, BF16, F16)
    texts = [gpu.render(sgd), gpu.render(_accumulate_rule(F32, F16)),
             gpu.render(sgd, capturable={}),
             gpu.render(adam_rule(True, False, True, True, F16, F32),
                        capturable=tensor_formulas("adamw")),
             gpu.render(rule_for("rmsprop", "float32", state_dtype="int8", centered=True))]
    here = "\n=====\n".join(texts)
    script = (
        "from stepjit.runtime import gpu; from stepjit.ir import DType as D\n"
        "from stepjit.optim import OPTIMIZERS, registry\n"
        "from stepjit.optim.adam import adam_rule\n"
        "from stepjit.optim.sgd import sgd_rule\n"
        "from stepjit.optim.optimizer import _accumulate_rule\n"
        "sgd = sgd_rule(True, True, True, True, D.BF16, D.F16)\n"
        "adam = registry.configure(OPTIMIZERS['adamw']).tensor_formulas()\n"
        "texts = [gpu.render(sgd), gpu.render(_accumulate_rule(D.F32, D.F16)),\n"
        "         gpu.render(sgd, capturable={}),\n"
        "         gpu.render(adam_rule(True, False, True, True, D.F16, D.F32), capturable=adam),\n"
        "         gpu.render(registry.rule_for('rmsprop', 'float32', state_dtype='int8',\n"
        "                                      centered=True))]\n"
        "print('\\n=====\\n'.join(texts), end='')\n"
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


def _kernel(source: str, name: str) -> str:
    """The text of kernel `name` in `source`, up to the next kernel."""
    text = source.split(f" {name}(")[1]
    return text.split('extern "C"')[0]


def test_partial_sums_kernel_only_computes_the_sum_terms():
    rule = sgd_rule(True, False, True, True, F32, F32)
    source = gpu.render(rule)
    partial = _kernel(source, f"{rule.name}_partial_sums")
    assert "param_ptr" not in partial and "momentum_buffer_ptr" not in partial
    assert "block_sum<BLOCK>(sum_0, scratch)" in partial
    assert not re.search(r"atomic\w*\(", source)  # deterministic: no atomics anywhere


X64 = tensor("x", F32).cast(F64)


@pytest.mark.parametrize(
    ("term", "in_float32"),
    [
        (X64 * X64, "x * x"),  # a clip norm's square
        (tensor("h", F16).cast(F64) * tensor("b", BF16).cast(F64),
         "__half2float(h) * __bfloat162float(b)"),
        (X64, "x"),
        (abs(-X64), "fabsf((-x))"),
        (-(X64 * abs(X64)), "(-x * fabsf(x))"),
        (tensor("w", F64) * tensor("w", F64), None),  # a float64 parameter
        (X64 * scalar("s", F64), None),  # a float64 scalar
        (X64 * X64 * X64, None),  # two roundings in float32
        (X64 / (X64 + 1.0), None),
        ((X64 + X64) * X64, None),
        (tensor("f", F32).exp().cast(F64) * X64, "v2 * x"),  # any float32 value
    ],
)
def test_which_sum_terms_are_computed_in_float32(term, in_float32):
    """A float64 term is computed in float32 when that rounds it at most once: a cast of a
    float32-or-narrower value, or the product of two (negated or absolute or not)."""
    rule = UpdateRule("terms", [Slot("x", F32), Slot("h", F16), Slot("b", BF16), Slot("w", F64),
                                Slot("f", F32), Slot("out", F64, True)],
                      {"out": tensor("w", F64) + term.sum()})
    partial = _kernel(gpu.render(rule), "terms_partial_sums")
    ids = {n: i for i, n in enumerate(rule.nodes)}
    if in_float32 is None:
        assert "run_0" not in partial and "accumulate_exact" not in partial
        assert re.search(rf"sum_0 \+= v{ids[term]};", partial)
    else:
        line = f"run_0 += {in_float32};  // %{ids[term]} = {term.op.value} "
        assert line in partial and "float run_0;" in partial
        assert "if (float32_run_ok(run_0)) {" in partial
        assert "sum_0 += (double)run_0;" in partial
        assert re.search(rf"sum_0 \+= v{ids[term]};", partial.split("accumulate_exact")[1])


def test_float32_run_sums_fall_back_to_float64_outside_float32_range():
    """The runs of an F32 clip norm are float32, each checked; float64 parameters keep float64."""
    f32 = _kernel(gpu.render(sgd_rule(False, False, False, True, F32, F32)),
                  "sgd_clip_float32_float32_partial_sums")
    assert re.search(r"run_0 \+= v\d+ \* v\d+;  // %\d+ = mul %\d+, %\d+ : float64, in float32",
                     f32)
    body = f32.split("run_0 = 0.0f;")[1]
    assert body.index("accumulate(") < body.index("float32_run_ok(run_0)")
    assert body.index("float32_run_ok(run_0)") < body.index("accumulate_exact(")
    f64 = _kernel(gpu.render(sgd_rule(False, False, False, True, F64, F64)),
                  "sgd_clip_float64_float64_partial_sums")
    assert "run_0" not in f64 and re.search(r"sum_0 \+= v\d+;", f64)
    prelude = (gpu.template_dir() / "prelude.cuh").read_text()
    assert "magnitude >= 0x1p-100f && magnitude <= 0x1.fffffep127f" in prelude


def test_tensor_sums_are_added_once_per_tensor():
    """tensor_sums: blocks of later chunks return; the first chunk's block adds the partials
    and writes them over its own row, which the update reads with one load per sum."""
    rule = lars_rule(True, True, True, F32, F32)  # two reductions
    source = gpu.render(rule)
    sums = _kernel(source, f"{rule.name}_tensor_sums")
    assert sums.index("if (chunk.y != 0) {\n        return;") < sums.index("block_sum")
    assert "sum_1 += partials[1];" in sums
    assert sums.rindex("block_sum") < sums.index("chunk_partials[first_chunk * 2 + 0] = sum_0;")
    update = _kernel(source, f"{rule.name}_update")
    assert ("totals = chunk_partials + (long long)(blockIdx.x - chunk.y) * 2;" in update)
    assert "const double sum_1 = totals[1];" in update and "block_sum" not in update


def test_misaligned_tensors_take_coalesced_scalar_accesses():
    """Aligned: VEC consecutive elements per thread from begin + t * VEC, loaded as one pack;
    not aligned: elements begin + t + k * BLOCK, consecutive threads on consecutive elements."""
    rule = sgd_rule(True, False, False, True, F32, F32)
    source = gpu.render(rule)
    for kernel in (f"{rule.name}_partial_sums", f"{rule.name}_update"):
        text = _kernel(source, kernel)
        assert "const long long spacing = aligned ? 1 : BLOCK;" in text
        assert "i = begin + (long long)threadIdx.x * (aligned ? VEC : 1);" in text
        assert "i += (long long)BLOCK * VEC)" in text
        assert "const bool wide = aligned && i + VEC <= end;" in text
        assert "grad_v = load_pack<VEC>(grad_ptr + i);" in text
        assert "grad_v.v[k] = grad_ptr[i + k * spacing];" in text
    update = _kernel(source, f"{rule.name}_update")
    assert "store_pack(param_ptr + i, param_v);" in update
    assert "param_ptr[i + k * spacing] = param_v.v[k];" in update


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
    fields = {
        "update.cu": ("${kernel_name}", "${element_body}", "${load_packs}", "${store_packs}",
                      "${scalar_params}", "${tensor_sums}"),
        "partial_sums.cu": ("${kernel_name}", "${element_body}", "${load_packs}", "${run_start}",
                            "${run_end}", "${exact_terms}", "${block_sums}"),
        "tensor_sums.cu": ("${kernel_name}", "${scalar_params}", "${chunk_sums}", "${totals}"),
        "prepare.cu": ("${kernel_name}", "${input_params}", "${formulas}", "${writes}"),
        "update_blocks.cu": ("${kernel_name}", "${stage_lambdas}", "${block_loop}",
                             "${load_packs}", "${store_packs}", "${scalar_params}",
                             "${tensor_sums}", "${group}", "${scratch}"),
        "quantized.cuh": ("decode_code", "encode_code", "encode_code_sr", "group_max"),
    }
    for name, wanted in fields.items():
        text = (folder / name).read_text()
        for field in wanted:
            assert field in text, (name, field)


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


# -- 8-bit state -----------------------------------------------------------------------------------
INT8_ADAM = rule_for("adam", "float32", state_dtype="int8")


def test_int8_update_is_one_pass_in_blocks_of_threads():
    """A rule with per-block values: VEC consecutive elements per thread, aligned or not, so a
    block of 256 elements stays with 64 threads; the early part keeps the values the codes need
    in registers, the group reduces the maxima, the reciprocal of each scale is computed once
    per thread, the late part encodes, the group's first thread stores the scales."""
    update = _kernel(gpu.render(INT8_ADAM), f"{INT8_ADAM.name}_update")
    assert "constexpr int GROUP = 64;" in update
    assert "for (long long base = begin; base < end; base += (long long)BLOCK * VEC) {" in update
    assert "const long long i = base + (long long)threadIdx.x * VEC;" in update
    assert "constexpr long long spacing = 1;" in update
    # scales: read element by element at index >> 8, never part of a wide access
    assert "exp_avg_absmax_v.v[k] = exp_avg_absmax_ptr[(i + k * spacing) >> 8];" in update
    assert "pack_aligned<VEC>(exp_avg_absmax_ptr)" not in update
    assert "pack_aligned<VEC>(exp_avg_ptr)" in update and "store_pack(exp_avg_ptr + i" in update
    early = update.split("auto early = ")[1].split("};")[0]
    late = update.split("auto late = ")[1].split("};")[0]
    assert "decode_code<true, 4, 3>(exp_avg)" in early and "param_out = " in early
    assert "encode_code" not in early and "absmax_0" not in early
    assert "encode_code_sr<true, 4, 3>(" in late and "encode_code_sr<false, 5, 3>(" in late
    assert "code_stream(" in late and "1.0f / absmax" not in late
    loop = update.split("for (long long base = begin;")[1]
    order = ["float v16_kept[VEC];", "unsigned absmax_bits[2] = {};", "early(",
             "absmax_bits[0] = fold_absmax(absmax_bits[0], v16_kept[k]);",
             "group_max<GROUP, BLOCK>(absmax_bits, scratch);",
             "const float absmax_0 = __uint_as_float(absmax_bits[0]);",
             "= 1.0f / absmax_0;", "late(", "if (threadIdx.x % GROUP == 0 && i < end) {",
             "exp_avg_absmax_ptr[i >> 8] = absmax_0;", "store_pack(param_ptr + i, param_v);"]
    at = [loop.index(x) for x in order]
    assert at == sorted(at), order
    assert "__shared__ unsigned scratch[2 * (BLOCK / 32)];" in update


def test_int8_helpers_only_where_needed():
    plain = gpu.render(sgd_rule(True, False, True, True, F32, F32))
    assert "STEPJIT_QUANTIZED_CUH" not in plain and "unsigned code_stream(" not in plain
    source = gpu.render(INT8_ADAM)
    assert source.count("#define STEPJIT_QUANTIZED_CUH") == 1
    assert source.count("__device__ __forceinline__ unsigned code_stream(") == 1
    nearest = quantized(rule_for("adam", "float32"), {"exp_avg": "signed"}, "nearest", key=None)
    text = gpu.render(nearest)
    assert "encode_code<true, 4, 3>(" in text and "unsigned code_stream(" not in text
    decoded = UpdateRule("decoded", [Slot("code", DType.U8), Slot("x", F32, True)],
                         {"x": decode(tensor("code", DType.U8), "unsigned")})
    text = gpu.render(decoded)  # codes without blocks: the helpers, the plain update kernel
    assert "decode_code<false, 5, 3>(code)" in text and "STEPJIT_QUANTIZED_CUH" in text
    assert "auto update = " in text and "group_max" not in text.split("extern")[-1]


@pytest.mark.parametrize(("dtype", "vec", "group"),
                         [("float64", 2, 128), ("float32", 4, 64), ("bfloat16", 8, 32)])
def test_int8_threads_per_block_of_256(dtype, vec, group):
    """The scales (float32, one per block) do not set the pack width: the element slots do."""
    info = cuda.describe(rule_for("sgd", dtype, momentum=0.9, state_dtype="int8"))
    assert (info.vec, info.group) == (vec, group)
    assert cuda.describe(rule_for("sgd", dtype, momentum=0.9)).group == 0


def test_int8_geometry_is_refused_where_a_block_would_split():
    codes = UpdateRule("codes", [Slot("c", DType.U8, True), Slot("s", F32, True, per_block=True)],
                       {"c": encode(decode(tensor("c", DType.U8), "signed"), "signed"),
                        "s": block_absmax(decode(tensor("c", DType.U8), "signed"))})
    assert (cuda.describe(codes).vec, cuda.describe(codes).group) == (16, 16)  # half a warp
    f64 = rule_for("adagrad", "float64", state_dtype="int8")
    with pytest.raises(ValueError, match="block must be a multiple of 128, got 64"):
        cuda.describe(f64, block=64)
    with pytest.raises(ValueError, match="chunk must be a multiple of 256, got 128"):
        cuda.describe(INT8_ADAM, chunk=128)
    assert cuda.describe(f64, block=128, chunk=256).group == 128


def test_codes_are_not_cast():
    with pytest.raises(TypeError, match="cast to uint8: codes of 8-bit state are no numbers"):
        tensor("x", F32).cast(DType.U8)
    with pytest.raises(TypeError, match="cast takes .* operands, not int8"):
        tensor("c", DType.I8).cast(F32)


def test_int8_names_of_block_values_are_reserved():
    for name in ("absmax_0", "v3_kept", "group_max", "code_stream", "GROUP"):
        assert cuda.c_name(name) == f"{name}_arg"


# -- the capturable variant ------------------------------------------------------------------------
def test_capturable_kernels_take_lr_source_and_derive_lr_from_it():
    rule = sgd_rule(True, False, True, True, F32, F32)
    info = cuda.describe(rule, capturable={})
    assert info.capturable and all(k.endswith("_capturable") for k in info.kernels)
    assert info.kernels == tuple(f"{k}_capturable" for k in cuda.describe(rule).kernels)
    names = [n for _, n in info.params]
    assert names[5:] == ["lr_source", *("lr_arg" if n == "lr" else n for n in rule.scalar_names)]
    assert dict((n, t) for t, n in info.params)["lr_source"] == "const float*"
    source = gpu.render(rule, capturable={})
    for kernel in info.kernels:  # the same arguments for every kernel of the step
        assert ("chunk_partials,\n    const float* __restrict__ lr_source,\n"
                "    const double clip_norm," in _kernel(source, kernel))
    update = _kernel(source, info.update)
    lam = update.index("auto update = ")
    live = update.index("const float lr = lr_source != nullptr ? "
                        "(float)((double)lr_arg * (double)*lr_source) : lr_arg;")
    assert update.index("// Values uniform over the tensor") < live < lam
    assert "lr_arg" not in _kernel(source, info.partial_sums).split("{", 1)[1]


def test_a_float64_lr_is_scaled_in_float64():
    rule = adam_rule(False, False, True, False, F32, F32)  # AdamW: lr is a float64 scalar
    source = gpu.render(rule, capturable=tensor_formulas("adamw"))
    assert ("const double lr = lr_source != nullptr ? (lr_arg * (double)*lr_source) : lr_arg;"
            in source)


def test_plain_and_capturable_variants_share_a_module():
    rule = sgd_rule(True, False, False, True, BF16, F16)
    plain, capturable = cuda.describe(rule), cuda.describe(rule, capturable={})
    names = [*plain.kernels, *capturable.kernels, capturable.prepare]
    assert len(set(names)) == len(names)
    assert "_capturable" not in gpu.render(rule)


def test_prepare_kernel_evaluates_the_formulas_node_by_node():
    rule = adam_rule(False, False, False, False, F32, F32)
    formulas = tensor_formulas("adam")
    info = cuda.describe(rule, capturable=formulas)
    assert info.prepare == f"{rule.name}_prepare_capturable"
    assert info.prepare_inputs == ("beta1", "beta2", "lr") and info.prepare_block == 256
    assert info.prepare_params == (("float*", "steps"), ("double*", "per_tensor_values"),
                                   ("const float*", "lr_source"), ("int", "n_tensors"),
                                   ("double", "beta1"), ("double", "beta2"), ("double", "lr_arg"))
    prepare = _kernel(gpu.render(rule, capturable=formulas), info.prepare)
    assert prepare.lstrip().startswith("float* __restrict__ steps,\n    double* __restrict__ "
                              "per_tensor_values,\n    const float* __restrict__ lr_source,\n"
                              "    const int n_tensors,\n    const double beta1,")
    for line in ("const float step_count = steps[tensor] + 1.0f;",
                 "steps[tensor] = step_count;",
                 "const double step = (double)step_count;",
                 "const double lr = lr_source != nullptr ? lr_arg * (double)*lr_source : lr_arg;"):
        assert line in prepare
    assert re.search(r"const double v\d+ = log\(beta1\);  // %\d+ = log %\d+ : float64", prepare)
    j = rule.per_tensor_names.index("step_size")
    assert re.search(rf"per_tensor_values\[\(long long\)tensor \* 2 \+ {j}\] = v\d+;  "
                     r"// step_size <- %\d+", prepare)


def test_first_flag_comes_from_the_step_count():
    rule = sgd_rule(True, False, False, False, F32, F32)
    info = cuda.describe(rule, capturable={})
    assert info.prepare and info.prepare_inputs == ()
    prepare = _kernel(gpu.render(rule, capturable={}), info.prepare)
    assert ("per_tensor_values[(long long)tensor * 1 + 0] = step_count == 1.0f ? 1.0 : 0.0;"
            in prepare)
    assert "const double step" not in prepare  # no formula reads it
    # no per-tensor value: a prepare kernel all the same, which counts steps (RMSprop's)
    plain = sgd_rule(False, False, False, False, F32, F32)
    prepare = _kernel(gpu.render(plain, capturable={}), cuda.describe(plain, capturable={}).prepare)
    assert "steps[tensor] = step_count;" in prepare
    assert "per_tensor_values[(long long)tensor" not in prepare


def test_formulas_must_match_the_per_tensor_values():
    adam = adam_rule(False, False, False, False, F32, F32)
    with pytest.raises(ValueError, match="no formula for the per-tensor value "
                                         "bias_correction2_sqrt, step_size"):
        cuda.describe(adam, capturable={})
    with pytest.raises(ValueError, match="has no per-tensor value clr"):
        gpu.render(adam, capturable={**tensor_formulas("adam"), **tensor_formulas("adagrad")})
    with pytest.raises(ValueError, match="has no per-tensor value clr"):
        cuda.describe(sgd_rule(True, False, False, False, F32, F32),
                      capturable=tensor_formulas("adagrad"))
    clr = adagrad_rule(False, False, F32, F32)
    for bad in (scalar("lr", F32), per_tensor("count", F64), tensor("grad", F64)):
        with pytest.raises(ValueError, match="reads float64 scalars"):
            cuda.describe(clr, capturable={"clr": bad * 2.0})
