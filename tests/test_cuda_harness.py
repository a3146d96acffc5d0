"""The numerics of the generated CUDA source, run on the host (no GPU).

The kernels are compiled unchanged by g++ with tests/cuda_host/cuda_host.h (threads, barriers,
shuffles and half types of a CUDA block), launched on real multi-tensor tables built by the CUDA
backend's own table builder, and compared with the reference interpreter (`stepjit.ir.evaluate`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from cuda_host.harness import HostLibrary, compiler
from cuda_rules import int8_cases, nearest_int8, optimizer_cases, tensor_formulas

from stepjit.codegen import cuda
from stepjit.codegen.cuda import FIRST, LR
from stepjit.ir import (
    CODE_MAPS,
    DType,
    Op,
    Slot,
    UpdateRule,
    block_absmax,
    decode,
    encode,
    encode_stochastic,
    evaluate,
    maximum,
    minimum,
    per_tensor,
    scalar,
    stochastic_round,
    stored_as,
    tensor,
    where,
    with_master,
    with_stochastic_rounding,
)
from stepjit.optim import OPTIMIZERS, registry
from stepjit.optim.adagrad import adagrad_rule
from stepjit.optim.adam import adam_rule
from stepjit.optim.lars import lars_rule
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule

pytestmark = pytest.mark.skipif(compiler() is None, reason="no host C++ compiler (g++)")

F16, BF16, F32, F64, BOOL, U8 = DType.F16, DType.BF16, DType.F32, DType.F64, DType.BOOL, DType.U8
CHUNK = cuda.CHUNK
SMALL = {"block": 64, "chunk": 256}  # many chunks per tensor, more chunks than threads


def ops_rule() -> UpdateRule:
    """A rule that uses every op, on every dtype, with two reductions."""
    x, h, b, w = tensor("x", F32), tensor("h", F16), tensor("b", BF16), tensor("w", F64)
    a, s = scalar("a", F32), scalar("s", F64)
    flag, k = per_tensor("flag", BOOL), per_tensor("k", F64)
    # NaN in x, h or b reaches the output through one maximum / minimum alone (a test that
    # the NaN propagates); w gathers everything else, half arithmetic included
    new_x = where(x.cast(BOOL), maximum(x, a), a) + (x < 0.0).cast(F32)
    new_h = where(flag, minimum(h, 0.5), maximum(h, 0.25))
    new_b = where(b < 0.0, stochastic_round(b.cast(F32) * a, k) + b * b, minimum(b, 0.25))
    x64 = x.cast(F64)
    half_math = (h * h - h / (abs(h) + 1.0)).sqrt()
    new_w = (-w * s + (x64 * x64).sum() / ((w * w).sum() + 1.0) + abs(w).sqrt()
             + w.cast(BF16).cast(F64) + w.cast(F16).cast(F64) + h.cast(BF16).cast(F64)
             + half_math.cast(F64) + k + (w < 0.0).cast(F64)
             + w.tanh() + (-abs(w)).exp() + (abs(w) + 1.0).log())
    return UpdateRule(
        "every_op",
        [Slot("x", F32, True), Slot("h", F16, True), Slot("b", BF16, True), Slot("w", F64, True)],
        {"x": new_x, "h": new_h, "b": new_b, "w": new_w},
    )


def codes_rule() -> UpdateRule:
    """8-bit state by hand: the ops of codes (decode, block_absmax, encode, encode_sr), two
    per-block scales read by every element and written once per block, codes rounded to nearest
    and stochastically, a parameter that reads a block's reduction."""
    x = tensor("x", F32)
    m = decode(tensor("m", U8), "signed") * tensor("m_absmax", F32)
    v = decode(tensor("v", U8), "unsigned") * tensor("v_absmax", F32)
    new_m = m * 0.5 + x
    new_v = v * 0.25 + x * x
    m_scale, v_scale = block_absmax(new_m), block_absmax(new_v)
    return UpdateRule(
        "codes",
        [Slot("x", F32, True), Slot("m", U8, True, code_map="signed"),
         Slot("m_absmax", F32, True, per_block=True), Slot("v", U8, True, code_map="unsigned"),
         Slot("v_absmax", F32, True, per_block=True)],
        {"x": x - new_m / (new_v.sqrt() + m_scale), "m": encode(new_m / m_scale, "signed"),
         "m_absmax": m_scale, "v_absmax": v_scale,
         "v": encode_stochastic(new_v * (1.0 / v_scale), per_tensor("rounding_key", F64),
                                "unsigned")},
    )


def coding_rule() -> UpdateRule:
    """Codes of float32 values in both maps, to nearest and stochastically, and the values of
    codes: ENCODE, ENCODE_SR and DECODE on their own (no block structure)."""
    x, c, key = tensor("x", F32), tensor("c", U8), per_tensor("rounding_key", F64)
    outputs = {}
    for name in CODE_MAPS:
        outputs[f"{name}_code"] = encode(x, name)
        outputs[f"{name}_sr_code"] = encode_stochastic(x, key, name)
        outputs[f"{name}_value"] = decode(c, name)
    slots = [Slot("x", F32), Slot("c", U8)] + [
        Slot(n, e.dtype, True) for n, e in outputs.items()]
    return UpdateRule("coding", slots, outputs)


def code_values() -> np.ndarray:
    """float32 values at and around every value of each code map, scaled into blocks: each
    value, the midpoints between neighbours (ties to even), their float32 neighbours, both
    signs, the subnormal range of both maps, magnitudes above 1, zeros, NaN, infinities, random
    magnitudes over many binades."""
    out = [np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0, 1.5, 3e38, -3e38,
                     2.0**-149, -(2.0**-149), 2.0**-126, 1 + 2.0**-23, 1 - 2.0**-24],
                    np.float32)]
    for code_map in CODE_MAPS.values():
        v = code_map.magnitudes()
        mid = ((v[:-1].astype(np.float64) + v[1:]) / 2).astype(np.float32)
        for x in (v, mid):
            for y in (x, np.nextafter(x, np.float32(2)), np.nextafter(x, np.float32(-2))):
                out += [y, -y]
    rng = np.random.default_rng(8)
    out.append(rng.choice([-1.0, 1.0], 4000) * np.exp2(rng.uniform(-40, 1, 4000)))
    return np.concatenate(out).astype(np.float32)


def recode_rule() -> UpdateRule:
    """Codes alone (16 elements of one byte per thread: half a warp per block of 256), a
    per-block output computed from per-block loads, and a block reduction of a uniform value."""
    c = tensor("c", U8)
    scale = tensor("c_absmax", F32)
    value = decode(c, "signed") * scale * 0.5
    s = block_absmax(value)
    return UpdateRule(
        "recode",
        [Slot("c", U8, True, code_map="signed"), Slot("c_absmax", F32, True, per_block=True),
         Slot("u_absmax", F32, True, per_block=True)],
        {"c": encode(value / s, "signed"), "c_absmax": scale * 0.5,
         "u_absmax": block_absmax(scalar("a", F32) * -2.0)},
    )


def casts_rule() -> UpdateRule:
    f, d = tensor("f", F32), tensor("d", F64)
    return UpdateRule(
        "casts",
        [Slot("f", F32), Slot("d", F64), Slot("hf", F16, True), Slot("bf", BF16, True),
         Slot("hd", F16, True), Slot("bd", BF16, True)],
        {"hf": f.cast(F16), "bf": f.cast(BF16), "hd": d.cast(F16), "bd": d.cast(BF16)},
    )


# every structure of every registered optimizer, once, the dtype pairs in turn (`cuda_rules`)
CASES = optimizer_cases(every_dtype=False)
# and the rules the tests below use by name
PINNED = [
    sgd_rule(False, False, False, False, F32, F32),
    sgd_rule(True, False, True, True, F32, F32),
]
# compact state (`state_dtype="bfloat16"`): per optimizer, its largest elementwise rule with
# float32 state, the state kept in bfloat16 (`stored_as`: loads widened, stores rounded)
STORED = {}
for _c in sorted(CASES, key=lambda c: len(c.rule.nodes)):
    _state = [s.name for s in _c.rule.slots[2:] if s.dtype is F32]
    if _state and not _c.rule.reductions:
        STORED[_c.optimizer] = (_c, stored_as(_c.rule, dict.fromkeys(_state, BF16),
                                              f"{_c.rule.name}_state_bfloat16"))
# master weights: per optimizer, an elementwise rule of half parameters with its float32 copy
for _c in CASES:
    if _c.rule.slot("param").dtype.is_half and not _c.rule.reductions:
        STORED[f"{_c.optimizer} master"] = (_c, with_master(_c.rule))
# stochastic rounding: per optimizer, an elementwise rule of bfloat16 parameters
for _c in CASES:
    if _c.rule.slot("param").dtype is BF16 and not _c.rule.reductions:
        STORED[f"{_c.optimizer} sr"] = (_c, with_stochastic_rounding(_c.rule))
PLAIN = [c.rule for c in CASES if not c.rule.reductions] + [r for _, r in STORED.values()] + [
    _accumulate_rule(F32, BF16),
    _accumulate_rule(F64, F32),
    _accumulate_rule(F32, F16),
    _zero_rule(F16),
    _zero_rule(BF16),
    _zero_rule(F64),
]


def _smallest_and_largest(cases) -> list:
    """Per optimizer, its case whose rule has the fewest nodes and the one with the most."""
    by_optimizer: dict[str, list] = {}
    for c in cases:
        by_optimizer.setdefault(c.optimizer, []).append(c)
    picked = {}
    for group in by_optimizer.values():
        group.sort(key=lambda c: len(c.rule.nodes))
        picked.update({group[0].rule.key: group[0], group[-1].rule.key: group[-1]})
    return list(picked.values())


# a rule with a reduction takes three emulated launches over many chunks (about a second): per
# optimizer, its smallest and its largest such rule run here (test_cuda_compile compiles all)
CLIP_CASES = _smallest_and_largest([c for c in CASES if c.rule.reductions])
CLIP = [c.rule for c in CLIP_CASES]
PRODUCTION = list({r.key: r for r in [*PLAIN, *CLIP, *PINNED]}.values())
# views into buckets: elementwise rules of every pack width (VEC 2, 4, 8) and mixed slot widths
BUCKETED = [
    sgd_rule(True, False, True, False, F32, F32),
    sgd_rule(True, False, False, False, BF16, BF16),
    adam_rule(False, False, True, False, F64, F64),
    _zero_rule(BF16),
    _accumulate_rule(F32, F16),
]
BUCKETED_CLIP = [sgd_rule(True, False, True, True, F32, F32), lars_rule(True, True, True, F16, F16)]
SMALL_RULES = list({r.key: r for r in [
    sgd_rule(True, False, True, True, F32, F32),
    sgd_rule(False, False, False, True, F32, F32),
    sgd_rule(False, False, False, True, F64, F64),
    sgd_rule(True, False, False, False, F16, F32),
    *BUCKETED,
    *BUCKETED_CLIP,
]}.values())
# both variants: every optimizer's clip rules (lr on the device or not, per-tensor values, first
# flags, one or two reductions), and one rule per optimizer for its prepare kernel
PREPARE = {
    "adam": adam_rule(False, False, False, False, F32, F32),
    "adamw": adam_rule(False, False, True, False, F32, F32),
    "adagrad": adagrad_rule(False, False, F32, F32),
    "sgd": sgd_rule(True, False, False, False, F32, F32),
}
# 8-bit state (`state_dtype="int8"`, the block-structured update): per optimizer, its smallest and
# its largest rule without a reduction and with one (the dtypes in turn: 128, 64 or 32 threads
# per block of 256), Adam's codes rounded to nearest (`ENCODE`), and the hand-written rules
INT8_CASES = int8_cases()
INT8_CLIP = [c.rule for c in _smallest_and_largest([c for c in INT8_CASES if c.rule.reductions])]
NEAREST = [(base, nearest_int8("adam", base)) for base in (adam_rule(False, False, True, False,
                                                                       F32, F32),
                                                             adam_rule(False, False, True, True,
                                                                       F32, F32))]
INT8 = [c.rule for c in _smallest_and_largest([c for c in INT8_CASES if not c.rule.reductions])]
INT8 += [NEAREST[0][1], codes_rule(), recode_rule()]
# in the small geometry (64 threads): a block of 256 elements takes every thread, or half
INT8_SMALL = [r for r in INT8 + INT8_CLIP if 64 % cuda.describe(r).group == 0]
CAPTURABLE = [(c.rule, c.formulas) for c in CLIP_CASES] + [
    (rule, tensor_formulas(name)) for name, rule in PREPARE.items()
] + [(NEAREST[1][1], tensor_formulas("adamw"))]


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """The libraries, compiled in parallel: production geometry, a small one, and the plain and
    capturable variants of CAPTURABLE in the small one; the 8-bit rules in both geometries."""
    work = tmp_path_factory.mktemp("cuda_host")
    pending = [
        HostLibrary.start(PRODUCTION + [ops_rule(), casts_rule()], work, "production"),
        HostLibrary.start(SMALL_RULES + [ops_rule()], work, "small", **SMALL),
        HostLibrary.start([entry for rule, formulas in CAPTURABLE
                           for entry in (rule, (rule, formulas))], work, "capturable", **SMALL),
        HostLibrary.start(INT8 + INT8_CLIP + [coding_rule()], work, "int8"),
        HostLibrary.start(INT8_SMALL, work, "int8_small", **SMALL),
    ]
    production, small, capturable, int8, int8_small = (p.finish() for p in pending)
    return {"production": production, "small": small, "capturable": capturable, "int8": int8,
            "int8_small": int8_small}


# -- data ------------------------------------------------------------------------------------------
# kernel arguments: an optimizer rule's come from its configuration (`registry.example_scalars`;
# the rules above, and every structure in every dtype), a hand-written rule's from OWN_SCALARS
SCALARS = {c.rule.key: dict(c.scalars) for c in [*optimizer_cases(), *CASES]}
SCALARS.update({r.key: dict(c.scalars) for c, r in STORED.values()})
SCALARS.update({c.rule.key: dict(c.scalars) for c in INT8_CASES})
SCALARS.update({nearest.key: SCALARS[base.key] for base, nearest in NEAREST})
OWN_SCALARS = {"a": 0.75, "s": -1.5}
# per-tensor values of the hand-written rules; any other (an optimizer's `tensor_values`: bias
# corrections, a decayed learning rate) comes from the host: positive, differing per tensor
FLAGS, OWN_VALUES = ("first", "flag"), ("k",)


def scalars_for(rule: UpdateRule) -> dict[str, float]:
    known = SCALARS.get(rule.key, OWN_SCALARS)
    return {n: known[n] for n in rule.scalar_names}


def make_tensors(rule, sizes, rng, misaligned=(), specials=()):
    """One dict slot -> array per size; tensors listed in `misaligned` get views that are
    not aligned for wide loads; those in `specials` get NaN, infinities, zeros, denormals.
    8-bit codes are random bytes; a per-block slot holds one magnitude per block (scales)."""
    tensors = []
    for t, n in enumerate(sizes):
        arrays = {}
        for slot in rule.slots:
            length = slot.length(n)
            if slot.dtype is U8:
                values = rng.integers(0, 256, length).astype(np.float64)
            else:
                values = rng.standard_normal(length) * 2.0
                if slot.per_block:
                    values = np.abs(values)
                if t in specials and length >= 8:
                    tiny = {F32: 1e-40, F64: 1e-310, F16: 1e-6, BF16: 1e-39}[slot.dtype]
                    values[:8] = [np.nan, np.inf, -np.inf, -0.0, 0.0, tiny, -tiny, 7e4]
            np_dtype = slot.dtype.to_numpy()
            if t in misaligned:
                buf = np.empty(length + 1, np_dtype)
                arr = buf[1:]
            else:
                arr = np.empty(length, np_dtype)
            with np.errstate(over="ignore", invalid="ignore"):
                arr[...] = values.astype(np_dtype)
            arrays[slot.name] = arr
        tensors.append(arrays)
    return tensors


def first_flags(rule, n):
    pt = np.zeros((n, len(rule.per_tensor)))
    for j, (name, _) in enumerate(rule.per_tensor):
        if name in FLAGS:
            pt[:, j] = np.arange(n) % 2 == 0
        elif name in OWN_VALUES:
            pt[:, j] = np.arange(n) * 0.5
        elif name == "rounding_key":  # an integer per tensor (stochastic rounding)
            pt[:, j] = 12345 + 7919 * np.arange(n)
        else:
            pt[:, j] = 0.5 + 0.25 * np.arange(n)
    return pt


def expected(rule, tensors, pt, scalars):
    names = rule.per_tensor_names
    return [evaluate(rule, {k: v.copy() for k, v in t.items()}, scalars,
                     dict(zip(names, row, strict=True)))
            for t, row in zip(tensors, pt, strict=True)]


def as_f64(a):
    return np.asarray(a).astype(np.float64)


def ordered(a, dtype):
    """Integers whose order and differences follow the floats (for ulp distances)."""
    int_type = {2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize]
    bits = np.asarray(a).view(int_type)
    return np.where(bits < 0, np.iinfo(int_type).min - bits, bits).astype(np.int64)


def raw_bits(a, dtype):
    return np.asarray(a).view({1: np.uint8, 2: np.uint16, 4: np.uint32,
                                8: np.uint64}[dtype.itemsize])


def assert_matches(actual, want, dtype, *, exact, what="", atol=0.0):
    a, e = as_f64(actual), as_f64(want)
    nan = np.isnan(a) | np.isnan(e)
    assert (np.isnan(a) == np.isnan(e)).all(), f"{what}: NaN positions differ"
    if exact:
        same = raw_bits(actual, dtype) == raw_bits(want, dtype)  # -0.0 differs from 0.0
        bad = np.flatnonzero(~same & ~nan)
        assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[:3]}: " \
                              f"{a[bad[:3]]} vs {e[bad[:3]]}"
    elif dtype.is_half:
        ulps = np.abs(ordered(actual, dtype) - ordered(want, dtype))[~nan]
        assert ulps.size == 0 or ulps.max() <= 1, f"{what}: {ulps.max()} ulps apart"
    else:
        rtol = 1e-12 if dtype is F64 else 1e-5
        scale = np.max(np.abs(e[~nan & np.isfinite(e)]), initial=0.0)
        np.testing.assert_allclose(a[~nan], e[~nan], rtol=rtol,
                                   atol=rtol * 1e-2 * scale + atol, err_msg=what)


def run_and_check(lib, rule, sizes, rng, *, exact, misaligned=(), specials=()):
    tensors = make_tensors(rule, sizes, rng, misaligned, specials)
    pt = first_flags(rule, len(sizes))
    scalars = scalars_for(rule)
    want = expected(rule, tensors, pt, scalars)
    result = lib.run(rule, tensors, pt, scalars)
    for t, (got, exp) in enumerate(zip(tensors, want, strict=True)):
        for slot, value in exp.items():
            assert_matches(got[slot], value, rule.slot(slot).dtype, exact=exact,
                           what=f"{rule.name} tensor {t} ({sizes[t]} elements) slot {slot}")
    return tensors, result


def sum_bound(terms, vec: int) -> float:
    """How far a kernel's sum of the float64 `terms` may be from the exact sum: float32 runs of
    at most `vec` terms, each term rounded once to float32, added in float64 (the partial-sum
    template): (vec + 1) 2^-24 + n 2^-53 of the sum of their magnitudes."""
    terms = np.asarray(terms, np.float64)
    return ((vec + 1) * 2.0**-24 + terms.size * 2.0**-53) * float(np.abs(terms).sum())


def assert_sum_within_bound(got, terms, vec, what=""):
    exact = math.fsum(np.asarray(terms, np.float64))
    bound = sum_bound(terms, vec)
    assert abs(got - exact) <= bound, f"{what}: {got!r}, exact {exact!r}, bound {bound!r}"


def first_chunks(sizes, chunk):
    """The row of each tensor's first chunk in chunk_partials (empty tensors have none)."""
    counts = [-(-n // chunk) for n in sizes]
    return np.cumsum([0, *counts[:-1]])


def wide_range(rng, n, low, high):
    """n float32 values of random signs, their magnitudes spread evenly over 2^low to 2^high."""
    return (rng.choice([-1.0, 1.0], n) * np.exp2(rng.uniform(low, high, n))).astype(np.float32)


def bucket_views(rule, sizes, rng, bucketed):
    """Tensors whose slots in `bucketed` are views into one buffer per slot, back to back from
    element 1, as DDP's gradient buckets and FSDP's flat parameters hold them: aligned for wide
    accesses or not as the running offset falls. The other slots are arrays of their own
    (aligned). Returns the tensors and copies of them that are all aligned."""
    copies = make_tensors(rule, sizes, rng)
    buffers = {s: np.zeros(1 + sum(sizes), rule.slot(s).dtype.to_numpy()) for s in bucketed}
    views, offset = [], 1
    for copy, n in zip(copies, sizes, strict=True):
        view = {s: a.copy() for s, a in copy.items() if s not in bucketed}
        for s in bucketed:
            view[s] = buffers[s][offset:offset + n]
            view[s][...] = copy[s]
        views.append(view)
        offset += n
    return views, copies


def pack_aligned(array, vec):
    return array.ctypes.data % (array.itemsize * vec) == 0


SIZES = [1000, 3, CHUNK + 5, 0, 2 * CHUNK + 17, 1]


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", PLAIN, ids=[r.name for r in PLAIN])
def test_elementwise_rules_are_bit_exact(libs, rule):
    """Without reductions the kernel rounds exactly as the interpreter: identical bits."""
    rng = np.random.default_rng(int(rule.key[:8], 16))
    run_and_check(libs["production"], rule, SIZES, rng, exact=True, misaligned=(1, 2))


# -- 8-bit state -----------------------------------------------------------------------------------
INT8_SIZES = {  # partial last blocks, several chunks (more chunks than threads in the small one)
    "int8": [1, 255, 256, 257, 1000, 0, CHUNK + 300, 3],
    "int8_small": [1000, 3, 2 * SMALL["chunk"] + 17, 0, 70 * SMALL["chunk"] + 1, 255],
}


def int8_tensors(rule, sizes, seed):
    """Tensors for an 8-bit rule (`make_tensors`: random codes, scales and values): the tensor
    of 1000 elements misaligned, the largest with specials in its first 8 elements and first 8
    scales; in every tensor of 1000 elements or more, block 1 all zeros (codes, scales, values:
    a new scale of 0, whose codes are NaN's, 0), a NaN in block 2 and an infinity in block 3."""
    tensors = make_tensors(rule, sizes, np.random.default_rng(seed),
                           misaligned=[t for t, n in enumerate(sizes) if n == 1000],
                           specials=(sizes.index(max(sizes)),))
    for t, n in zip(tensors, sizes, strict=True):
        if n < 1000:
            continue
        for slot in rule.slots:
            a = t[slot.name]
            if slot.per_block:
                a[1:4] = [0.0, np.nan, np.inf]
            else:
                a[256:512] = 0
                if slot.dtype is not U8:
                    a[600], a[900] = np.nan, np.inf
    return tensors


def interpreter_sums(rule, arrays, scalars, per_tensor):
    """The interpreter's value of each of `rule`'s reductions over one tensor."""
    readers = [Slot(s.name, s.dtype, False, s.init, s.code_map, s.per_block) for s in rule.slots]
    names = [f"{rule.name}_sum_{k}" for k in range(len(rule.reductions))]
    sums = UpdateRule(f"{rule.name}_sums", readers + [Slot(n, F64, True) for n in names],
                      dict(zip(names, rule.reductions, strict=True)))
    n = arrays[rule.numel_slot.name].size
    out = evaluate(sums, {**arrays, **{name: np.zeros(n) for name in names}}, scalars, per_tensor)
    return [out[name][0] for name in names]


def decoded(rule, slot, codes):
    return CODE_MAPS[rule.slot(slot).code_map].decode(codes)


INT8_RUNS = [pytest.param(lib, r, id=f"{lib}-{r.name}") for lib, rules in
             (("int8", INT8), ("int8_small", INT8_SMALL)) for r in rules if not r.reductions]


@pytest.mark.parametrize(("lib", "rule"), INT8_RUNS)
def test_int8_rules_are_bit_exact(libs, lib, rule):
    """The block-structured update gives the interpreter's codes, scales and values, bit for
    bit: blocks split by the end of a tensor, blocks of zeros, NaN and infinities, misaligned
    tensors, groups of 16 to 128 threads per block of 256."""
    sizes = INT8_SIZES[lib]
    tensors = int8_tensors(rule, sizes, int(rule.key[:8], 16))
    pt = first_flags(rule, len(sizes))
    scalars = scalars_for(rule)
    want = expected(rule, tensors, pt, scalars)
    libs[lib].run(rule, tensors, pt, scalars)
    for t, (got, exp) in enumerate(zip(tensors, want, strict=True)):
        for slot, value in exp.items():
            assert_matches(got[slot], value, rule.slot(slot).dtype, exact=True,
                           what=f"{rule.name} tensor {t} ({sizes[t]} elements) slot {slot}")


def test_codes_match_the_code_maps(libs):
    """ENCODE, ENCODE_SR and DECODE give `CodeMap.encode`, `encode_stochastic` and `decode`:
    every code, ties between codes, their neighbours, both subnormal ranges, specials, with
    three keys (one a tensor of its own, misaligned)."""
    rule = coding_rule()
    x = code_values()
    sizes = [x.size] * 3
    tensors = make_tensors(rule, sizes, np.random.default_rng(1), misaligned=(1,))
    for t in tensors:
        t["x"][...] = x
        t["c"][...] = np.arange(x.size) % 256
    pt = np.array([[0.0], [12345.0], [2.0**53 - 1]])
    want = expected(rule, tensors, pt, {})
    assert (want[0]["signed_code"] != want[0]["signed_sr_code"]).any()  # the draws differ
    libs["int8"].run(rule, tensors, pt, {})
    for t, (got, exp) in enumerate(zip(tensors, want, strict=True)):
        for slot, value in exp.items():
            assert_matches(got[slot], value, rule.slot(slot).dtype, exact=True,
                           what=f"tensor {t} slot {slot}")


@pytest.mark.parametrize(("lib", "rule"), [
    pytest.param(lib, r, id=f"{lib}-{r.name}") for lib, rules in
    (("int8", INT8_CLIP), ("int8_small", [r for r in INT8_SMALL if r.reductions])) for r in rules])
def test_int8_rules_with_reductions(libs, lib, rule):
    """Given the interpreter's sums (planted as the totals tensor_sums writes), the update gives
    the interpreter's bits; all three launches give values within the sums' tolerance and codes
    at most one code apart."""
    library = libs[lib]
    info = library.info(rule)
    sizes = INT8_SIZES[lib]
    pt = first_flags(rule, len(sizes))
    scalars = scalars_for(rule)
    tensors = int8_tensors(rule, sizes, 7)
    want = expected(rule, tensors, pt, scalars)
    rows = first_chunks(sizes, info.chunk)
    partials = np.full((sum(-(-n // info.chunk) for n in sizes), info.n_reductions), np.nan)
    for t, (n, row) in enumerate(zip(sizes, rows, strict=True)):
        if n:
            partials[row] = interpreter_sums(rule, tensors[t], scalars,
                                             dict(zip(rule.per_tensor_names, pt[t])))
    library.run(rule, tensors, pt, scalars, partials=partials, kernels=[info.update])
    for t, (got, exp) in enumerate(zip(tensors, want, strict=True)):
        for slot, value in exp.items():
            assert_matches(got[slot], value, rule.slot(slot).dtype, exact=True,
                           what=f"{rule.name} tensor {t} slot {slot}, planted sums")
    tensors = int8_tensors(rule, sizes, 7)
    library.run(rule, tensors, pt, scalars)
    for t, (got, exp) in enumerate(zip(tensors, want, strict=True)):
        for slot, value in exp.items():
            what = f"{rule.name} tensor {t} slot {slot}"
            dtype = rule.slot(slot).dtype
            if dtype is U8:  # the largest step between neighbouring codes is 1/16
                apart = np.abs(decoded(rule, slot, got[slot]) - decoded(rule, slot, value))
                assert apart.size == 0 or apart.max() <= 1 / 16, what
            else:
                assert_matches(got[slot], value, dtype, exact=False, what=what)


def test_int8_kernel_leaves_other_chunks_and_blocks_alone(libs):
    """Each block's scale is written once, at its own index, and nothing past a tensor's last
    block: a scale array with guard values after it keeps them."""
    rule = INT8[0]
    lib = libs["int8"]
    sizes = [257, CHUNK + 300]
    tensors = int8_tensors(rule, sizes, 3)
    guards = {}
    for t in tensors:
        for slot in rule.slots:
            if slot.per_block or slot.dtype is U8:
                a = t[slot.name]
                buffer = np.full(a.size + 64, 77, a.dtype)
                buffer[: a.size] = a
                t[slot.name] = buffer[: a.size]
                guards[id(buffer)] = buffer
    lib.run(rule, tensors, first_flags(rule, len(sizes)), scalars_for(rule))
    for buffer in guards.values():
        assert (buffer[-64:] == 77).all()


@pytest.mark.parametrize("rule", CLIP, ids=[r.name for r in CLIP])
def test_clip_rules_match_within_tolerance(libs, rule):
    rng = np.random.default_rng(7)
    sizes = [1000, CHUNK + 5, 3, 2 * CHUNK + 17]
    tensors, result = run_and_check(libs["production"], rule, sizes, rng, exact=False,
                                    misaligned=(2,))
    assert result.n_chunks == 1 + 2 + 1 + 3
    assert np.isfinite(result.partials).all()


def test_partials_totals_and_clipping(libs):
    """partial_sums writes each chunk's sum, tensor_sums each tensor's total over the partial of
    its first chunk (the other rows stay), neither writes a tensor; the update clips exactly the
    tensors whose norm exceeds clip_norm."""
    rule = sgd_rule(False, False, False, True, F32, F32)
    lib = libs["small"]
    info = lib.info(rule)
    rng = np.random.default_rng(3)
    sizes = [20000, 50, 700]  # 79 chunks of 256 for the first tensor: more than 64 threads
    tensors = make_tensors(rule, sizes, rng)
    tensors[1]["grad"] *= 0.01  # this one stays below the clip norm
    grads = [t["grad"].astype(np.float64) for t in tensors]
    params = [t["param"].copy() for t in tensors]
    scalars = {**scalars_for(rule), "clip_norm": 5.0, "lr": 1.0, "scale": 1.0}
    pt = np.zeros((3, 0))
    want = expected(rule, tensors, pt, scalars)
    chunk = SMALL["chunk"]
    partials = lib.run(rule, tensors, pt, scalars, kernels=[info.partial_sums]).partials
    rows = [g[start:start + chunk] ** 2 for g in grads for start in range(0, g.size, chunk)]
    assert len(rows) == partials.shape[0]
    for row, terms in enumerate(rows):
        assert_sum_within_bound(partials[row, 0], terms, info.vec, f"chunk {row}")
    chunk_sums = partials.copy()
    lib.run(rule, tensors, pt, scalars, partials=partials, kernels=[info.tensor_sums])
    first = first_chunks(sizes, chunk)
    for t, g in enumerate(grads):
        assert_sum_within_bound(partials[first[t], 0], g**2, info.vec, f"tensor {t}")
    others = np.setdiff1d(np.arange(len(rows)), first)
    assert partials[others].tobytes() == chunk_sums[others].tobytes()
    for t, p in zip(tensors, params, strict=True):
        assert t["param"].tobytes() == p.tobytes()
    lib.run(rule, tensors, pt, scalars)
    for t, g, p, exp in zip(tensors, grads, params, want, strict=True):
        norm = np.sqrt(np.sum(g**2))
        step = p - t["param"]
        if norm > 5.0:
            np.testing.assert_allclose(np.linalg.norm(step.astype(np.float64)), 5.0, rtol=1e-5)
        else:
            np.testing.assert_array_equal(step, p - (p - g.astype(np.float32)))
        assert_matches(t["param"], exp["param"], F32, exact=False)


@pytest.mark.parametrize(("low", "high"), [(-20, 20), (-75, 70), (-80, -64)])
def test_sums_over_a_large_dynamic_range(libs, low, high):
    """Gradients from 2^low to 2^high, in tensors of more chunks than the block has threads:
    squares above 2^128 overflow float32 and below 2^-126 lose bits or vanish, so the runs that
    float32 cannot sum accurately are summed again in float64; every total stays within the
    bound of the exact sum (finite, nonzero), the same bits on every run, and the clipped
    update matches the interpreter."""
    rule = sgd_rule(False, False, False, True, F32, F32)
    lib = libs["small"]
    info = lib.info(rule)
    sizes = [70 * SMALL["chunk"] + 1, 3000, 37]
    scalars = {**scalars_for(rule), "clip_norm": 5.0}
    pt = np.zeros((len(sizes), 0))
    runs = []
    for _ in range(2):
        tensors = make_tensors(rule, sizes, np.random.default_rng(1))
        for t, n in zip(tensors, sizes, strict=True):
            t["grad"][...] = wide_range(np.random.default_rng(n), n, low, high)
        runs.append(lib.run(rule, tensors, pt, scalars, kernels=info.kernels[:2]).partials)
    assert runs[0].tobytes() == runs[1].tobytes()
    first = first_chunks(sizes, SMALL["chunk"])
    for t, row in enumerate(first):
        terms = (scalars["scale"] * tensors[t]["grad"]).astype(np.float64) ** 2
        assert_sum_within_bound(runs[0][row, 0], terms, info.vec, f"tensor {t}")
        assert 0 < runs[0][row, 0] < np.inf
    want = expected(rule, tensors, pt, scalars)
    lib.run(rule, tensors, pt, scalars)
    for t, exp in zip(tensors, want, strict=True):
        assert_matches(t["param"], exp["param"], F32, exact=False)


@pytest.mark.parametrize("rule", BUCKETED + BUCKETED_CLIP,
                         ids=[r.name for r in BUCKETED + BUCKETED_CLIP])
def test_views_into_buckets_match_aligned_tensors(libs, rule):
    """Tensors that are views at odd offsets into one buffer per slot (the gradient alone, as in
    DDP, or every slot, as in FSDP) take the coalesced scalar path where a slot is not aligned
    for wide accesses: the interpreter's bits, and the aligned copies' bits (within the sum
    tolerance where the rule reduces: its runs group other elements)."""
    lib = libs["small"]
    info = lib.info(rule)
    # from element 1: offsets 1, 1001, 1004, then 1008 (aligned for every VEC), 1525, ...
    sizes = [1000, 3, 4, 517, 0, 2 * SMALL["chunk"] + 17, 1, 255]
    exact = not rule.reductions
    for bucketed in ({"grad"}, {s.name for s in rule.slots}):
        views, copies = bucket_views(rule, sizes, np.random.default_rng(2), bucketed)
        assert all(pack_aligned(a, info.vec) for c in copies for a in c.values())
        offsets = {pack_aligned(v[s], info.vec) for v in views for s in bucketed if v[s].size}
        assert offsets == {True, False}  # both paths, in one launch
        pt = first_flags(rule, len(sizes))
        scalars = scalars_for(rule)
        want = expected(rule, copies, pt, scalars)
        lib.run(rule, views, pt, scalars)
        lib.run(rule, copies, pt, scalars)
        for t, (view, copy, exp) in enumerate(zip(views, copies, want, strict=True)):
            for slot, value in exp.items():
                dtype = rule.slot(slot).dtype
                what = f"{rule.name} {sorted(bucketed)} tensor {t} slot {slot}"
                assert_matches(view[slot], value, dtype, exact=exact, what=what)
                assert_matches(view[slot], copy[slot], dtype, exact=exact, what=what)


@pytest.mark.parametrize("geometry", ["production", "small"])
def test_clip_is_deterministic(libs, geometry):
    """Same inputs, same bits: run concurrently-scheduled threads twice and compare."""
    rule = sgd_rule(True, False, True, True, F32, F32)
    lib = libs[geometry]
    if geometry == "production":
        sizes = [3 * CHUNK + 11, 999, 5]
    else:  # a tensor with more chunks than the block has threads
        sizes = [3 * SMALL["chunk"] + 11, 70 * SMALL["chunk"] + 1, 999, 5]
    runs = []
    for _ in range(2):
        tensors = make_tensors(rule, sizes, np.random.default_rng(11))
        result = lib.run(rule, tensors, first_flags(rule, len(sizes)), scalars_for(rule))
        runs.append((tensors, result.partials))
    (t1, p1), (t2, p2) = runs
    assert p1.tobytes() == p2.tobytes()
    for a, b in zip(t1, t2, strict=True):
        for slot in a:
            assert a[slot].tobytes() == b[slot].tobytes()


@pytest.mark.parametrize("geometry", ["production", "small"])
def test_every_op_matches_the_interpreter(libs, geometry):
    rule = ops_rule()
    # this test covers every lowering but those of 8-bit state (test_int8_rules_are_bit_exact)
    assert {n.op for r in (rule, codes_rule()) for n in r.nodes} == set(Op)
    rng = np.random.default_rng(5)
    sizes = [300, 1000, 5, 4000]
    tensors = make_tensors(rule, sizes, rng, misaligned=(1,), specials=(0, 3))
    pt = first_flags(rule, len(sizes))
    scalars = scalars_for(rule)
    want = expected(rule, tensors, pt, scalars)
    # w adds sum(x * x) / (sum(w * w) + 1): the first in float32 runs, as far as sum_bound
    vec = libs[geometry].info(rule).vec
    atol = [sum_bound(t["x"].astype(np.float64) ** 2, vec)
            / (np.sum(t["w"].astype(np.float64) ** 2) + 1.0) for t in tensors]
    libs[geometry].run(rule, tensors, pt, scalars)
    for t, (got, exp) in enumerate(zip(tensors, want, strict=True)):
        for slot, value in exp.items():
            # only w depends on the sums, whose order of addition differs from numpy's
            assert_matches(got[slot], value, rule.slot(slot).dtype, exact=slot != "w",
                           what=f"tensor {t} slot {slot}", atol=atol[t])


def test_half_conversions_round_to_nearest_even(libs):
    """float32 and float64 to float16 / bfloat16, against numpy and ml_dtypes: ties, subnormals,
    overflow, and random bit patterns."""
    rule = casts_rule()
    rng = np.random.default_rng(9)
    n = 1 << 16
    f = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32).copy()
    ties = (np.arange(1, 2049) + 0.5) * 2.0**-10  # halfway between float16 neighbours
    f[: ties.size] = ties
    f[ties.size: 2 * ties.size] = -ties * 2.0**-14  # ties among subnormals
    f[5000:5008] = [65519.0, 65520.0, 65536.0, 3.4e38, -0.0, 2.0**-25, 2.0**-24 * 1.5, 1e-45]
    d = rng.standard_normal(n) * np.exp2(rng.integers(-30, 20, n))
    d[:3] = [1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-30, 2.0**-24 * 0.5000001]  # double rounding
    t = {"f": f, "d": d}
    for name in ("hf", "bf", "hd", "bd"):
        t[name] = np.zeros(n, rule.slot(name).dtype.to_numpy())
    want = expected(rule, [t], np.zeros((1, 0)), {})[0]
    libs["production"].run(rule, [t], np.zeros((1, 0)), {})
    for name, value in want.items():
        assert_matches(t[name], value, rule.slot(name).dtype, exact=True, what=name)


def test_denormals_are_kept(libs):
    """A float32 update whose result is subnormal stays subnormal (no flush to zero)."""
    rule = sgd_rule(False, False, False, False, F32, F32)
    tiny = np.float32(1e-40)
    t = {"param": np.full(64, 2 * tiny, np.float32), "grad": np.full(64, tiny, np.float32)}
    libs["production"].run(rule, [t], np.zeros((1, 0)), {"lr": 1.0, "scale": 1.0})
    assert (t["param"] == tiny).all() and tiny != 0


def test_update_reads_the_total_of_its_own_tensor(libs):
    """tensor_sums adds each tensor's chunk partials (planted by hand, partial_sums skipped)
    into the row of its first chunk, and every block of the update reads the total there: the
    other rows are never read (NaN when tensor_sums is skipped too)."""
    rule = sgd_rule(False, False, False, True, F64, F64)
    lib = libs["small"]
    info = lib.info(rule)
    sizes = [5000, 300]  # 20 and 2 chunks of 256
    per_chunk = np.concatenate([np.full((20, 1), 4.0), np.full((2, 1), 5e-7)])
    totals = np.full((22, 1), np.nan)
    totals[[0, 20]] = [[80.0], [1e-6]]
    scalars = {**scalars_for(rule), "clip_norm": 1.0}
    for partials, kernels in ((per_chunk, [info.tensor_sums, info.update]),
                              (totals, [info.update])):
        tensors = make_tensors(rule, sizes, np.random.default_rng(1))
        before = [t["param"].copy() for t in tensors]
        lib.run(rule, tensors, np.zeros((2, 0)), scalars, partials=partials, kernels=kernels)
        g0 = scalars["scale"] * tensors[0]["grad"]
        factor = 1.0 / np.sqrt(80.0)  # norm from the planted partials: 20 chunks x 4.0
        np.testing.assert_allclose(tensors[0]["param"],
                                   before[0] - scalars["lr"] * g0 * factor, rtol=1e-12)
        g1 = scalars["scale"] * tensors[1]["grad"]  # planted norm 1e-3 < clip_norm: unclipped
        np.testing.assert_allclose(tensors[1]["param"], before[1] - scalars["lr"] * g1,
                                   rtol=1e-12)


# -- the capturable variant ------------------------------------------------------------------------
@pytest.mark.parametrize(("rule", "formulas"), CAPTURABLE, ids=[r.name for r, _ in CAPTURABLE])
def test_capturable_kernels_match_the_plain_ones(libs, rule, formulas):
    """With lr_source null, the capturable kernels give the plain kernels' bits. With lr_source
    pointing at a float32 learning rate and lr_arg 1 (or 1/4 of 4 lr: an exact product), the
    plain kernels' bits given that learning rate; given another one at lr_source, other bits
    (when the rule has an lr: the kernels read it)."""
    lib = libs["capturable"]
    sizes = [1000, 3, 517, 0, 3 * SMALL["chunk"] + 1, 1]
    scalars = scalars_for(rule)
    lr = float(np.float32(0.375))

    def run(capturable, lr_arg, lr_source=None):
        tensors = make_tensors(rule, sizes, np.random.default_rng(5), misaligned=(1, 2))
        source = None if lr_source is None else np.array([lr_source], np.float32)
        result = lib.run(rule, tensors, first_flags(rule, len(sizes)), {**scalars, "lr": lr_arg},
                         capturable=capturable, lr_source=source)
        return [t[s.name].tobytes() for t in tensors for s in rule.slots], \
            result.partials.tobytes()

    plain = run(False, lr)
    assert run(True, lr) == plain
    assert run(True, 1.0, lr) == plain
    assert run(True, 0.25, 4 * lr) == plain
    assert (run(True, 1.0, 2 * lr) != plain) == (LR in rule.scalar_names)


PREPARE_CONFIGS = [
    ("adam", {"betas": (0.9, 0.999)}),
    ("adam", {"betas": (0.0, 0.0), "lr": 0.5}),
    ("adamw", {"betas": (0.5, 0.99), "lr": 0.3}),
    ("adagrad", {"lr_decay": 0.1}),
    ("adagrad", {"lr_decay": 0.0, "lr": 2.0, "lr_mult": 0.5}),
]


@pytest.mark.parametrize(("name", "config"), PREPARE_CONFIGS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(PREPARE_CONFIGS)])
def test_prepare_computes_the_optimizers_tensor_values(libs, name, config):
    """prepare increments every tensor's step count and computes what the optimizer's
    `tensor_values` computes on the host, in float64, for steps 1 to 10000 (40 blocks); with
    lr_source, lr is lr_arg times *lr_source."""
    lib = libs["capturable"]
    rule = PREPARE[name]
    opt = registry.configure(OPTIMIZERS[name], **{k: v for k, v in config.items()
                                                  if k != "lr_mult"})
    group = opt.param_groups[0]
    group["lr_mult"] = config.get("lr_mult", 1.0)
    inputs = opt.scalars(group)
    steps = np.arange(10000, dtype=np.float32)
    values = lib.prepare(rule, steps, inputs)
    np.testing.assert_array_equal(steps, np.arange(1, 10001))
    want = opt.tensor_values(group, steps.astype(np.float64))
    for j, value in enumerate(rule.per_tensor_names):
        np.testing.assert_allclose(values[:, j], want[value], rtol=1e-12, atol=0, err_msg=value)
    lr = float(np.float32(inputs[LR]))
    given = lib.prepare(rule, np.arange(10000, dtype=np.float32), {**inputs, LR: lr})
    live = lib.prepare(rule, np.arange(10000, dtype=np.float32), {**inputs, LR: 1.0},
                       lr_source=np.array([lr], np.float32))
    assert live.tobytes() == given.tobytes()


def test_prepare_sets_first_on_a_tensors_first_step(libs):
    """SGD with momentum: `first` (no formula) is 1 where the count was 0, else 0."""
    lib = libs["capturable"]
    rule = PREPARE["sgd"]
    assert rule.per_tensor_names == (FIRST,)
    before = np.array([0, 1, 0, 7, 2] * 60, np.float32)  # 300 tensors: two blocks
    steps = before.copy()
    values = lib.prepare(rule, steps, {})
    np.testing.assert_array_equal(steps, before + 1)
    np.testing.assert_array_equal(values[:, 0], (before == 0).astype(np.float64))
