"""The numerics of the generated CUDA source, run on the host (no GPU).

The kernels are compiled unchanged by g++ with tests/cuda_host/cuda_host.h (threads, barriers,
shuffles and half types of a CUDA block), launched on real multi-tensor tables built by the CUDA
backend's own table builder, and compared with the reference interpreter (`stepjit.ir.evaluate`).
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_host.harness import HostLibrary, compiler
from cuda_rules import optimizer_cases

from stepjit.codegen import cuda
from stepjit.ir import (
    DType,
    Op,
    Slot,
    UpdateRule,
    evaluate,
    maximum,
    minimum,
    per_tensor,
    scalar,
    tensor,
    where,
)
from stepjit.optim.optimizer import _accumulate_rule, _zero_rule
from stepjit.optim.sgd import sgd_rule

pytestmark = pytest.mark.skipif(compiler() is None, reason="no host C++ compiler (g++)")

F16, BF16, F32, F64, BOOL = DType.F16, DType.BF16, DType.F32, DType.F64, DType.BOOL
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
    new_b = where(b < 0.0, (b.cast(F32) * a).cast(BF16) + b * b, minimum(b, 0.25))
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
PLAIN = [c.rule for c in CASES if not c.rule.reductions] + [
    _accumulate_rule(F32, BF16),
    _accumulate_rule(F64, F32),
    _accumulate_rule(F32, F16),
    _zero_rule(F16),
    _zero_rule(BF16),
    _zero_rule(F64),
]


def _smallest_and_largest(cases) -> list[UpdateRule]:
    """Per optimizer, its rule with the fewest nodes and its rule with the most."""
    by_optimizer: dict[str, list[UpdateRule]] = {}
    for c in cases:
        by_optimizer.setdefault(c.optimizer, []).append(c.rule)
    picked = {}
    for rules in by_optimizer.values():
        rules.sort(key=lambda r: len(r.nodes))
        picked.update({rules[0].key: rules[0], rules[-1].key: rules[-1]})
    return list(picked.values())


# a rule with a reduction takes two emulated launches over many chunks (about a second): per
# optimizer, its smallest and its largest such rule run here (test_cuda_compile compiles all)
CLIP = _smallest_and_largest([c for c in CASES if c.rule.reductions])
PRODUCTION = list({r.key: r for r in [*PLAIN, *CLIP, *PINNED]}.values())
SMALL_RULES = [
    sgd_rule(True, False, True, True, F32, F32),
    sgd_rule(False, False, False, True, F32, F32),
    sgd_rule(False, False, False, True, F64, F64),
    sgd_rule(True, False, False, False, F16, F32),
]


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """Both libraries, compiled in parallel: production geometry and a small one."""
    work = tmp_path_factory.mktemp("cuda_host")
    pending = [
        HostLibrary.start(PRODUCTION + [ops_rule(), casts_rule()], work, "production"),
        HostLibrary.start(SMALL_RULES + [ops_rule()], work, "small", **SMALL),
    ]
    production, small = (p.finish() for p in pending)
    return {"production": production, "small": small}


# -- data ------------------------------------------------------------------------------------------
# kernel arguments: an optimizer rule's come from its configuration (`registry.example_scalars`;
# the rules above, and every structure in every dtype), a hand-written rule's from OWN_SCALARS
SCALARS = {c.rule.key: dict(c.scalars) for c in [*optimizer_cases(), *CASES]}
OWN_SCALARS = {"a": 0.75, "s": -1.5}
# per-tensor values of the hand-written rules; any other (an optimizer's `tensor_values`: bias
# corrections, a decayed learning rate) comes from the host: positive, differing per tensor
FLAGS, OWN_VALUES = ("first", "flag"), ("k",)


def scalars_for(rule: UpdateRule) -> dict[str, float]:
    known = SCALARS.get(rule.key, OWN_SCALARS)
    return {n: known[n] for n in rule.scalar_names}


def make_tensors(rule, sizes, rng, misaligned=(), specials=()):
    """One dict slot -> array per size; tensors listed in `misaligned` get views that are
    not aligned for wide loads; those in `specials` get NaN, infinities, zeros, denormals."""
    tensors = []
    for t, n in enumerate(sizes):
        arrays = {}
        for slot in rule.slots:
            values = rng.standard_normal(n) * 2.0
            if t in specials and n >= 8:
                tiny = {F32: 1e-40, F64: 1e-310, F16: 1e-6, BF16: 1e-39}[slot.dtype]
                values[:8] = [np.nan, np.inf, -np.inf, -0.0, 0.0, tiny, -tiny, 7e4]
            np_dtype = slot.dtype.to_numpy()
            if t in misaligned:
                buf = np.empty(n + 1, np_dtype)
                arr = buf[1:]
            else:
                arr = np.empty(n, np_dtype)
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
    return np.asarray(a).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize])


def assert_matches(actual, want, dtype, *, exact, what=""):
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
        np.testing.assert_allclose(a[~nan], e[~nan], rtol=rtol, atol=rtol * 1e-2 * scale,
                                   err_msg=what)


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


SIZES = [1000, 3, CHUNK + 5, 0, 2 * CHUNK + 17, 1]


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", PLAIN, ids=[r.name for r in PLAIN])
def test_elementwise_rules_are_bit_exact(libs, rule):
    """Without reductions the kernel rounds exactly as the interpreter: identical bits."""
    rng = np.random.default_rng(int(rule.key[:8], 16))
    run_and_check(libs["production"], rule, SIZES, rng, exact=True, misaligned=(1, 2))


@pytest.mark.parametrize("rule", CLIP, ids=[r.name for r in CLIP])
def test_clip_rules_match_within_tolerance(libs, rule):
    rng = np.random.default_rng(7)
    sizes = [1000, CHUNK + 5, 3, 2 * CHUNK + 17]
    tensors, result = run_and_check(libs["production"], rule, sizes, rng, exact=False,
                                    misaligned=(2,))
    assert result.n_chunks == 1 + 2 + 1 + 3
    assert np.isfinite(result.partials).all()


def test_clipping_happens_and_partials_are_chunk_sums(libs):
    """Per-chunk partials from the first launch are the float64 sums of each chunk; the second
    launch clips exactly the tensors whose norm exceeds clip_norm."""
    rule = sgd_rule(False, False, False, True, F32, F32)
    lib = libs["small"]
    rng = np.random.default_rng(3)
    sizes = [20000, 50, 700]  # 79 chunks of 256 for the first tensor: more than 64 threads
    tensors = make_tensors(rule, sizes, rng)
    tensors[1]["grad"] *= 0.01  # this one stays below the clip norm
    grads = [t["grad"].copy() for t in tensors]
    params = [t["param"].copy() for t in tensors]
    scalars = {**scalars_for(rule), "clip_norm": 5.0, "lr": 1.0, "scale": 1.0}
    pt = np.zeros((3, 0))
    want = expected(rule, tensors, pt, scalars)
    result = lib.run(rule, tensors, pt, scalars)
    chunk = SMALL["chunk"]
    row = 0
    for g in grads:
        g2 = g.astype(np.float64) ** 2
        for start in range(0, g.size, chunk):
            np.testing.assert_allclose(result.partials[row, 0], g2[start:start + chunk].sum(),
                                       rtol=1e-13)
            row += 1
    assert row == result.n_chunks
    for t, g, p, exp in zip(tensors, grads, params, want, strict=True):
        norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
        step = p - t["param"]
        if norm > 5.0:
            np.testing.assert_allclose(np.linalg.norm(step.astype(np.float64)), 5.0, rtol=1e-5)
        else:
            np.testing.assert_array_equal(step, p - (p - g))
        assert_matches(t["param"], exp["param"], F32, exact=False)


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
    assert {n.op for n in rule.nodes} == set(Op)  # this test covers every lowering
    rng = np.random.default_rng(5)
    sizes = [300, 1000, 5, 4000]
    tensors = make_tensors(rule, sizes, rng, misaligned=(1,), specials=(0, 3))
    pt = first_flags(rule, len(sizes))
    scalars = scalars_for(rule)
    want = expected(rule, tensors, pt, scalars)
    libs[geometry].run(rule, tensors, pt, scalars)
    for t, (got, exp) in enumerate(zip(tensors, want, strict=True)):
        for slot, value in exp.items():
            # only w depends on the sums, whose order of addition differs from numpy's
            assert_matches(got[slot], value, rule.slot(slot).dtype, exact=slot != "w",
                           what=f"tensor {t} slot {slot}")


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


def test_update_adds_the_partials_of_its_own_tensor(libs):
    """The second launch takes each tensor's norm from the partials of that tensor's chunks
    (here planted by hand, the first launch skipped) and every block agrees on it."""
    rule = sgd_rule(False, False, False, True, F64, F64)
    lib = libs["small"]
    sizes = [5000, 300]  # 20 and 2 chunks of 256
    tensors = make_tensors(rule, sizes, np.random.default_rng(1))
    before = [t["param"].copy() for t in tensors]
    partials = np.concatenate([np.full((20, 1), 4.0), np.full((2, 1), 1e-6)])
    scalars = {**scalars_for(rule), "clip_norm": 1.0}
    lib.run(rule, tensors, np.zeros((2, 0)), scalars, partials=partials, update_only=True)
    g0 = scalars["scale"] * tensors[0]["grad"]
    factor = 1.0 / np.sqrt(80.0)  # norm from the planted partials: 20 chunks x 4.0
    np.testing.assert_allclose(tensors[0]["param"], before[0] - scalars["lr"] * g0 * factor,
                               rtol=1e-12)
    g1 = scalars["scale"] * tensors[1]["grad"]  # planted norm 1.4e-3 < clip_norm: unclipped
    np.testing.assert_allclose(tensors[1]["param"], before[1] - scalars["lr"] * g1, rtol=1e-12)
