"""Every op of the IR, enumerated from its record (`stepjit.ir.OPS`), on every backend.

For each op and each dtype its record accepts, a small rule applies the op to tensors of special
values (signed zeros, infinities, NaN, denormals, the extremes, operands that tie, sums,
products and conversions that round half-way) and random ones. Per backend:

- reference: the interpreter reproduces the record's examples, its stated special cases (and,
  for leaves, the input rounded to the leaf's dtype);
- llvm, and llvm-no-f16c where float16 is involved: the rule runs; results match the interpreter
  bit for bit, or within the record's ulps (exp, log, tanh), or within the float64 summation bound
  (sum); the examples bit for bit;
- cuda-host: the generated CUDA C, compiled by g++ with the emulated CUDA built-ins, the same;
- nvrtc: the generated CUDA C compiles for sm_75, and the kernel of an op promised bit for bit
  has no flush-to-zero and no fused multiply-add instruction.

A new op is tested from its record alone (a new leaf needs its inputs in LEAF_CASES).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cuda_host.harness import HostLibrary, compiler

from stepjit import codegen
from stepjit.codegen import cuda
from stepjit.codegen import llvm as llvm_codegen
from stepjit.ir import (
    CODE_MAPS,
    OPS,
    DType,
    Expr,
    Op,
    Slot,
    UpdateRule,
    apply,
    dtypes,
    evaluate,
    per_tensor,
    scalar,
    tensor,
)
from stepjit.ir.ops import Kind, Result
from stepjit.runtime import cpu, gpu

ml_dtypes = pytest.importorskip("ml_dtypes")

F16, BF16, F32, F64, BOOL = DType.F16, DType.BF16, DType.F32, DType.F64, DType.BOOL
FLOATS = (F16, BF16, F32, F64)
SRC = Path(__file__).resolve().parents[1] / "src"
GEOMETRY = {"block": 64, "chunk": 256}  # the host harness: several chunks per tensor
ARCH = "sm_75"


# -- inputs ----------------------------------------------------------------------------------------
def finfo(dtype: DType):
    return ml_dtypes.finfo(dtype.to_numpy())


def rounded(values, dtype: DType) -> np.ndarray:
    """float64 `values` rounded to `dtype` as the interpreter rounds them."""
    with np.errstate(all="ignore"):
        return dtypes.rounded(np.asarray(values, np.float64), dtype)


def specials(dtype: DType) -> np.ndarray:
    """Values every op meets: zeros, infinities, NaN, denormals, extremes, exp's range edges."""
    if dtype is BOOL:
        return np.array([0.0, 1.0])
    fi = finfo(dtype)
    tiny, normal, big, eps = (float(x) for x in (fi.smallest_subnormal, fi.smallest_normal,
                                                 fi.max, fi.eps))
    edge = np.log(big)  # exp overflows above, and gives denormals below -edge
    return np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 0.5, -2.5, 3.0, 1 / 3,
                     tiny, -tiny, normal - tiny, normal, -normal, big, -big, 1 + eps,
                     1 - eps / 2, edge, -edge, -1.05 * edge, 20.0, -20.0, 1e-5])


def conversion_ties(dtype: DType) -> np.ndarray:
    """Values half-way between neighbours of each narrower float type (normal and subnormal),
    and, from float64, values just off a tie (which rounding twice gets wrong)."""
    out = []
    for target in FLOATS:
        ft = finfo(target)
        if dtype is BOOL or ft.nmant >= finfo(dtype).nmant:
            continue
        q, s = 2.0 ** -(ft.nmant + 1), float(ft.smallest_subnormal)
        out += [1 + q, 1 + 3 * q, -(1 + 5 * q), 2 * (1 + 7 * q), s / 2, 1.5 * s, -2.5 * s]
        if dtype is F64:
            out += [(1 + q) * (1 + 2.0**-40), -(1 + 3 * q) * (1 - 2.0**-40), s / 2 * (1 + 2**-30)]
    return np.array(out)


def arithmetic_ties(dtype: DType) -> tuple[np.ndarray, np.ndarray]:
    """Operand pairs whose exact sum or product lies half-way between two neighbours."""
    fi = finfo(dtype)
    eps, p = float(fi.eps), fi.nmant + 1
    k = p // 2
    a = [1.0, 1 + eps, 1 + 2 * eps, 1 + 3 * eps, -(1 + eps), 1 + 2.0**-k, -(1 + 2.0**-k)]
    b = [eps / 2, eps / 2, eps / 2, eps / 2, -eps / 2, 1 + 2.0 ** -(p - k), 1 + 2.0 ** -(p - k)]
    return np.array(a), np.array(b)


def random_values(dtype: DType, n: int, rng: np.random.Generator) -> np.ndarray:
    if dtype is BOOL:
        return (rng.random(n) < 0.5).astype(np.float64)
    wide = rng.standard_normal(n) * np.exp2(rng.integers(-12, 12, n))
    exp_range = rng.uniform(-1.2, 1.2, n) * np.log(float(finfo(dtype).max))
    return np.concatenate([wide, exp_range])


def operand_columns(arity: int, dtype: DType, rng) -> list[np.ndarray]:
    """float64 columns, one per operand: every pair of specials, ties, random values."""
    s = specials(dtype)
    if arity == 1:
        ties = () if dtype is BOOL else (*arithmetic_ties(dtype), conversion_ties(dtype))
        return [np.concatenate([s, *ties, random_values(dtype, 1000, rng)])]
    pairs = np.array(list(itertools.product(s, s))).T
    columns = [np.concatenate([pairs[0], random_values(dtype, 500, rng)]),
               np.concatenate([pairs[1], random_values(dtype, 500, rng)])]
    if dtype is not BOOL:
        a, b = arithmetic_ties(dtype)
        columns = [np.concatenate([columns[0], a, b]), np.concatenate([columns[1], b, a])]
    for _ in range(arity - 2):
        columns.append(rng.permutation(columns[0]))
    return columns


# -- cases -----------------------------------------------------------------------------------------
@dataclass
class Run:
    """One launch: the tensors (slot name -> array), their per-tensor values, the scalars."""

    tensors: list[dict[str, np.ndarray]]
    per_tensor: np.ndarray
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass
class Case:
    """One op in one dtype: its rule, runs compared with the interpreter, and runs with the
    outputs the op's record states (bit for bit on every backend)."""

    op: Op
    dtype: DType
    rule: UpdateRule
    runs: list[Run]
    stated: list[tuple[Run, list[dict[str, np.ndarray]]]]

    @property
    def dtypes(self) -> set[DType]:
        return {s.dtype for s in self.rule.slots} | {n.dtype for n in self.rule.nodes}


def _one_tensor(rule: UpdateRule, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(next(iter(columns.values())))
    return {s.name: rounded(columns[s.name], s.dtype) if s.name in columns
            else np.zeros(s.length(n), s.dtype.to_numpy()) for s in rule.slots}


def elementwise_case(op: Op, dtype: DType, rng) -> Case:
    """op(a0, a1, ...) of `dtype` operands (a bool condition first where the op has one)."""
    info = OPS[op]
    kinds = [BOOL if info.condition and i == 0 else dtype for i in range(info.arity)]
    names = [f"a{i}" for i in range(info.arity)]
    expr = apply(op, *(tensor(n, d) for n, d in zip(names, kinds)))
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot(n, d) for n, d in zip(names, kinds)]
                      + [Slot("out", expr.dtype, True)], {"out": expr})
    values = operand_columns(info.arity - info.condition, dtype, rng)
    if info.condition:  # every operand combination under both outcomes
        n = len(values[0])
        values = [np.repeat([1.0, 0.0], n)] + [np.tile(v, 2) for v in values]
    run = Run([_one_tensor(rule, dict(zip(names, values)))], np.zeros((1, 0)))
    stated = []
    if info.examples and dtype is not BOOL:
        columns = dict(zip(names, np.array([x for x, _ in info.examples]).T))
        want = rounded([y for _, y in info.examples], expr.dtype)
        stated.append((Run([_one_tensor(rule, columns)], np.zeros((1, 0))), [{"out": want}]))
    return Case(op, dtype, rule, [run], stated)


def conversion_case(op: Op, dtype: DType, rng) -> Case:
    """op(x) of a `dtype` operand, to every other dtype (an op whose result dtype is given)."""
    info = OPS[op]
    x = tensor("x", dtype)
    targets = [d for d in DType if d is not dtype and d in info.accepts]  # codes are no numbers
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("x", dtype)]
                      + [Slot(f"to_{d}", d, True) for d in targets],
                      {f"to_{d}": Expr(op, d, (x,)) for d in targets})
    (values,) = operand_columns(1, dtype, rng)
    run = Run([_one_tensor(rule, {"x": values})], np.zeros((1, 0)))
    stated = []
    if info.examples and dtype is not BOOL:
        xs = [x for (x,), _ in info.examples]
        want = {f"to_{d}": rounded([y for _, y in info.examples], d) for d in targets}
        stated.append((Run([_one_tensor(rule, {"x": np.array(xs)})], np.zeros((1, 0))), [want]))
    return Case(op, dtype, rule, [run], stated)


def reduction_case(op: Op, dtype: DType, rng) -> Case:
    """op(x) over tensors of several sizes (several chunks on every backend); each example is a
    tensor of its own, whose elements are the example's operands."""
    info = OPS[op]
    expr = apply(op, tensor("x", dtype))
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("x", dtype), Slot("out", expr.dtype, True)],
                      {"out": expr})
    sizes = [1000, 3, 70001, 1, 0]
    tensors = [_one_tensor(rule, {"x": rng.standard_normal(n) * np.exp2(rng.integers(-8, 8, n))})
               for n in sizes]
    run = Run(tensors, np.zeros((len(sizes), 0)))
    stated = []
    if info.examples:
        tensors = [_one_tensor(rule, {"x": np.array(x)}) for x, _ in info.examples]
        want = [{"out": rounded([y] * len(x), expr.dtype)} for x, y in info.examples]
        stated.append((Run(tensors, np.zeros((len(tensors), 0))), want))
    return Case(op, dtype, rule, [run], stated)


def code_values() -> np.ndarray:
    """float32 values at and around every value of each code map: the values, the midpoints
    between neighbours (ties) and their float32 neighbours, both signs, out of range, specials."""
    out = [specials(F32), [1.5, 1 + 2.0**-20, -1 - 2.0**-20, 2.0**-40, -(2.0**-40)]]
    for code_map in CODE_MAPS.values():
        v = code_map.magnitudes().astype(np.float32)
        mid = ((v[:-1].astype(np.float64) + v[1:]) / 2).astype(np.float32)
        for x in (v, mid):
            out += [x, -x, np.nextafter(x, np.float32(2)), np.nextafter(x, np.float32(-2))]
    return np.concatenate(out).astype(np.float64)


def coded_case(op: Op, dtype: DType, rng) -> Case:
    """ENCODE (ENCODE_SR: with a float64 key per tensor, one tensor per key) of float32 values
    around every code (ties included), or DECODE of every code, in each code map; the
    record's examples are in the signed map (ENCODE_SR: keys 0 and 7 whose draws cannot
    change them)."""
    info = OPS[op]
    operands = (tensor("x", dtype),) + ((per_tensor("key", F64),) if info.indexed else ())
    outputs = {name: Expr(op, info.produces, operands, name) for name in CODE_MAPS}
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("x", dtype)]
                      + [Slot(n, info.produces, True) for n in outputs], outputs)
    values = (np.arange(256.0) if dtype is DType.U8
              else np.concatenate([code_values(), random_values(F32, 500, rng)]))
    keys = np.array([[0.0], [12345.0], [2.0**53 - 1]]) if info.indexed else np.zeros((1, 0))
    run = Run([_one_tensor(rule, {"x": values}) for _ in keys], keys)
    stated = []
    if info.indexed:  # one tensor per example, its key in the table
        tensors = [_one_tensor(rule, {"x": np.array([x])}) for (x, _), _ in info.examples]
        want = [{"signed": rounded([y], info.produces)} for _, y in info.examples]
        keys = np.array([[k] for (_, k), _ in info.examples])
        stated.append((Run(tensors, keys), want))
    else:
        xs = np.array([x for (x,), _ in info.examples])
        want = {"signed": rounded([y for _, y in info.examples], info.produces)}
        stated.append((Run([_one_tensor(rule, {"x": xs})], np.zeros((1, 0))), [want]))
    return Case(op, dtype, rule, [run], stated)


def block_case(op: Op, dtype: DType, rng) -> Case:
    """A block reduction over tensors of several sizes (partial last blocks, several chunks),
    some blocks holding NaN, an infinity or only zeros: the value each element reads, and the
    one per-block slot stores; each example is a tensor of its own."""
    info = OPS[op]
    expr = apply(op, tensor("x", dtype))
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("x", dtype), Slot("out", dtype, True),
                                              Slot("scale", dtype, True, per_block=True)],
                      {"out": expr, "scale": expr})
    tensors = []
    for n in [1000, 3, 70001, 1, 0, 256, 257, 512]:
        x = rng.standard_normal(n) * np.exp2(rng.integers(-8, 8, n))
        x[300:310:3] = [np.nan, np.inf, -0.0, 1e-42][: len(x[300:310:3])]
        x[600:856] = 0.0
        tensors.append(_one_tensor(rule, {"x": x}))
    run = Run(tensors, np.zeros((len(tensors), 0)))
    examples = [_one_tensor(rule, {"x": np.array(x)}) for x, _ in info.examples]
    want = [{"out": rounded([y] * len(x), dtype), "scale": rounded([y], dtype)}
            for x, y in info.examples]
    return Case(op, dtype, rule, [run],
                [(Run(examples, np.zeros((len(examples), 0))), want)])


def leaf_values(dtype: DType) -> np.ndarray:
    """Values a leaf holds (before rounding to its dtype): specials and conversion ties."""
    if dtype is BOOL:
        return np.array([0.0, 1.0, -0.0, np.nan, 2.5])
    return np.concatenate([specials(dtype), conversion_ties(F64)])


def _stated_leaf(op: Op, dtype: DType, rule: UpdateRule, run: Run, want) -> Case:
    return Case(op, dtype, rule, [run], [(run, want)])


def tensor_leaf(op: Op, dtype: DType, rng) -> Case:
    x = Expr(op, dtype, arg="x")
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("x", dtype), Slot("out", dtype, True)],
                      {"out": x})
    values = np.concatenate([leaf_values(dtype), random_values(dtype, 100, rng)])
    run = Run([_one_tensor(rule, {"x": values})], np.zeros((1, 0)))
    return _stated_leaf(op, dtype, rule, run, [{"out": run.tensors[0]["x"]}])


def literal_leaf(op: Op, dtype: DType, rng) -> Case:
    values = leaf_values(dtype)
    outputs = {f"c{i}": Expr(op, dtype, arg=float(v)) for i, v in enumerate(values)}
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot(n, dtype, True) for n in outputs], outputs)
    run = Run([_one_tensor(rule, {n: np.zeros(2) for n in outputs})], np.zeros((1, 0)))
    want = {n: rounded([v, v], dtype) for n, v in zip(outputs, values)}
    return _stated_leaf(op, dtype, rule, run, [want])


def argument_leaf(op: Op, dtype: DType, rng) -> Case:
    """A scalar: one launch per value."""
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("out", dtype, True)],
                      {"out": Expr(op, dtype, arg="value")})
    runs = [Run([_one_tensor(rule, {"out": np.zeros(3)})], np.zeros((1, 0)), {"value": float(v)})
            for v in leaf_values(dtype)]
    return Case(op, dtype, rule, runs,
                [(r, [{"out": rounded([r.scalars["value"]] * 3, dtype)}]) for r in runs])


def per_tensor_leaf(op: Op, dtype: DType, rng) -> Case:
    """A per-tensor value: one tensor per value, in one launch."""
    values = leaf_values(dtype)
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("out", dtype, True)],
                      {"out": Expr(op, dtype, arg="value")})
    run = Run([_one_tensor(rule, {"out": np.zeros(2)}) for _ in values], values[:, None].copy())
    return _stated_leaf(op, dtype, rule, run, [{"out": rounded([v, v], dtype)} for v in values])


def indexed_case(op: Op, dtype: DType, rng) -> Case:
    """An op that reads the element's index (stochastic rounding): a `dtype` value and a
    float64 key per tensor, one tensor per key; no stated outputs (the record defines the bits
    through its definition, which the interpreter runs)."""
    x, key = tensor("x", dtype), per_tensor("key", F64)
    expr = Expr(op, BF16, (x, key))
    rule = UpdateRule(f"{op.value}_{dtype}", [Slot("x", dtype), Slot("out", BF16, True)],
                      {"out": expr})
    (values,) = operand_columns(1, dtype, rng)
    keys = np.array([[0.0], [12345.0], [2.0**53 - 1]])
    run = Run([_one_tensor(rule, {"x": values}) for _ in keys], keys)
    return Case(op, dtype, rule, [run], [])


LEAF_CASES = {
    Op.TENSOR: tensor_leaf,
    Op.CONST: literal_leaf,
    Op.SCALAR: argument_leaf,
    Op.PER_TENSOR: per_tensor_leaf,
}
"""How to feed each leaf: where its value comes from is what makes it a leaf."""


def build_case(op: Op, dtype: DType) -> Case:
    rng = np.random.default_rng(zlib.crc32(f"{op.value}-{dtype}".encode()))
    info = OPS[op]
    if info.kind is Kind.LEAF:
        return LEAF_CASES[op](op, dtype, rng)
    if info.produces is not None:
        return coded_case(op, dtype, rng)
    if info.indexed:
        return indexed_case(op, dtype, rng)
    if info.kind is Kind.BLOCK:
        return block_case(op, dtype, rng)
    if info.kind is Kind.REDUCE:
        return reduction_case(op, dtype, rng)
    if info.result is Result.GIVEN:
        return conversion_case(op, dtype, rng)
    return elementwise_case(op, dtype, rng)


CASES = {f"{op.value}-{d}": build_case(op, d)
         for op in Op for d in DType if d in OPS[op].accepts}
BACKENDS = ("reference", "llvm", "llvm-no-f16c", "cuda-host", "nvrtc")


def _applies(case: Case, backend: str) -> bool:
    return backend != "llvm-no-f16c" or F16 in case.dtypes


PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}")
          for name, case in CASES.items() for backend in BACKENDS if _applies(case, backend)]


# -- backends --------------------------------------------------------------------------------------
def _copy(run: Run) -> list[dict[str, np.ndarray]]:
    return [{k: v.copy() for k, v in t.items()} for t in run.tensors]


def _written(rule: UpdateRule, tensors) -> list[dict[str, np.ndarray]]:
    return [{slot: t[slot] for slot, _ in rule.outputs} for t in tensors]


def run_reference(rule: UpdateRule, run: Run) -> list[dict[str, np.ndarray]]:
    names = rule.per_tensor_names
    return [evaluate(rule, t, run.scalars, dict(zip(names, row)))
            for t, row in zip(run.tensors, run.per_tensor)]


def run_llvm(backend: cpu.LLVMBackend, rule: UpdateRule, run: Run):
    tensors = _copy(run)
    launch = backend.bind(backend.compile(rule),
                          [tuple(t[s.name] for s in rule.slots) for t in tensors],
                          np.ascontiguousarray(run.per_tensor, np.float64))
    launch(tuple(run.scalars[n] for n in rule.scalar_names))
    return _written(rule, tensors)


def run_cuda_host(lib: HostLibrary, rule: UpdateRule, run: Run):
    tensors = _copy(run)
    lib.run(rule, tensors, run.per_tensor, run.scalars)
    return _written(rule, tensors)


@pytest.fixture(scope="module")
def llvm_backends():
    return {"llvm": cpu.LLVMBackend(), "llvm-no-f16c": cpu.LLVMBackend(f16_native=False)}


@pytest.fixture(scope="module")
def host_library(tmp_path_factory):
    """Every case's kernels, compiled by g++ into two libraries in parallel."""
    if compiler() is None:
        pytest.skip("no host C++ compiler (g++)")
    rules = [c.rule for c in CASES.values()]
    work = tmp_path_factory.mktemp("ops_host")
    pending = [HostLibrary.start(rules[i::2], work, f"ops{i}", **GEOMETRY) for i in range(2)]
    libs = [p.finish() for p in pending]
    return {rule.key: lib for lib in libs for rule in rules if rule.key in lib.infos}


@pytest.fixture(scope="module")
def ptx_by_rule():
    """The PTX of every case's kernels, one NVRTC program per operand dtype, compiled in
    parallel (NVRTC needs no GPU)."""
    gpu = pytest.importorskip("stepjit.runtime.gpu")
    try:
        gpu.nvrtc_version()
    except Exception as exc:  # ImportError, or a CuPy without a loadable NVRTC library
        pytest.skip(f"NVRTC is not available: {exc}")
    if not gpu.include_dirs():
        pytest.skip("cuda_fp16.h not found (install nvidia-cuda-runtime or a CUDA toolkit)")
    groups: dict[DType, list[UpdateRule]] = {}
    for case in CASES.values():
        groups.setdefault(case.dtype, []).append(case.rule)

    def build(rules):
        source = "\n".join(gpu.render(r, **GEOMETRY) for r in rules)
        return gpu.nvrtc_compile(source, ARCH, name="ops.cu").ptx

    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        ptx = dict(zip(groups, pool.map(build, groups.values())))
    return {r.key: ptx[d] for d, rules in groups.items() for r in rules}


# -- comparisons -----------------------------------------------------------------------------------
def ordered(a: np.ndarray) -> np.ndarray:
    """Integers whose order and differences follow the floats (distances in ulps)."""
    int_type = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    bits = a.view(int_type).astype(np.int64)
    return np.where(bits < 0, np.iinfo(int_type).min - bits, bits)


def assert_same(got: np.ndarray, want: np.ndarray, ulps: int, what: str) -> None:
    """Equal bits (any NaN matching any NaN), or at most `ulps` apart."""
    assert got.dtype == want.dtype, what
    if want.dtype in (np.bool_, np.uint8):
        bad = np.flatnonzero(got != want)
    else:
        g, w = got.astype(np.float64), want.astype(np.float64)
        nan = np.isnan(w)
        far = np.abs(ordered(got) - ordered(want)) > ulps
        bad = np.flatnonzero((np.isnan(g) != nan) | (~nan & far))
    assert bad.size == 0, (f"{what}: {bad.size} of {want.size} differ, e.g. at {bad[:4]}: "
                           f"got {got[bad[:4]]}, want {want[bad[:4]]}")


def assert_sum_close(got, want, x: np.ndarray, what: str) -> None:
    """Two float64 sums of `x` in different orders: each within (n - 1) eps sum|x| of the exact
    sum, so within twice that of each other."""
    bound = 2 * max(x.size - 1, 0) * np.finfo(np.float64).eps * np.abs(x).sum()
    assert np.all(np.abs(got - want) <= bound), f"{what}: {got[:1]} vs {want[:1]}"


def check_run(case: Case, got, want, run: Run, *, stated: bool, what: str) -> None:
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        for slot, value in w.items():
            where = f"{what} tensor {t} slot {slot}"
            if case.rule.slot(slot).dtype is BOOL or stated:
                assert_same(g[slot], value, 0, where)
            elif OPS[case.op].kind is Kind.REDUCE:
                assert_sum_close(g[slot], value, run.tensors[t]["x"], where)
            else:
                assert_same(g[slot], value, OPS[case.op].tolerance(case.rule.slot(slot).dtype),
                            where)


def _entry(ptx: str, name: str) -> str:
    """The PTX of the kernel `name`, up to the next kernel."""
    start = ptx.index(f".entry {name}(")
    end = ptx.find(".entry ", start + 1)
    return ptx[start:] if end < 0 else ptx[start:end]


# -- the test --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_op(name, backend, request):
    case = CASES[name]
    rule = case.rule
    if backend == "nvrtc":
        ptx = request.getfixturevalue("ptx_by_rule")[rule.key]
        body = _entry(ptx, cuda.describe(rule, **GEOMETRY).update)
        if OPS[case.op].ulps == 0:
            assert ".ftz" not in body and "fma.rn" not in body and "mad.rn" not in body
        return
    if backend == "reference":
        runner = run_reference
    elif backend.startswith("llvm"):
        llvm_backend = request.getfixturevalue("llvm_backends")[backend]
        runner = lambda rule, run: run_llvm(llvm_backend, rule, run)
    else:
        lib = request.getfixturevalue("host_library")[rule.key]
        runner = lambda rule, run: run_cuda_host(lib, rule, run)
    for k, (run, want) in enumerate(case.stated):
        check_run(case, runner(rule, run), want, run, stated=True, what=f"{name} stated {k}")
    if backend != "reference":
        for k, run in enumerate(case.runs):
            check_run(case, runner(rule, run), run_reference(rule, run), run, stated=False,
                      what=f"{name} run {k}")


# -- the records drive the checks ------------------------------------------------------------------
def test_every_op_has_a_record_and_every_backend_spells_it():
    assert OPS.keys() == set(Op)
    assert llvm_codegen.LLVM_OPS.keys() == set(Op)
    assert cuda.CUDA_OPS.keys() == set(Op)
    assert {c.op for c in CASES.values()} == set(Op)


def _build(op: Op, operands: list[Expr]) -> Expr:
    info = OPS[op]
    if info.produces is not None:  # a code map's op: its arg names the map
        return Expr(op, info.produces, tuple(operands), "signed")
    if info.result is Result.GIVEN:
        return Expr(op, F32, tuple(operands))
    return apply(op, *operands)


@pytest.mark.parametrize("op", [op for op in Op if OPS[op].kind is not Kind.LEAF],
                         ids=lambda op: op.value)
def test_expression_checks_follow_the_record(op):
    """Operands of an accepted dtype build a node of the record's result dtype; any other
    dtype is a TypeError naming the op."""
    info = OPS[op]
    if info.indexed:  # a float32 value and a float64 key, to its result; nothing else
        result, arg = (info.produces, "signed") if info.produces else (BF16, None)
        assert Expr(op, result, (tensor("x", F32), per_tensor("k", F64)), arg).dtype is result
        for x, k, out in [(F64, F64, result), (F32, F32, result), (F32, F64, F16)]:
            with pytest.raises(TypeError, match=op.value):
                Expr(op, out, (tensor("x", x), per_tensor("k", k)), arg)
        return
    if info.produces is not None:  # a code map's op: a map it knows, and its result dtype
        x = tensor("x", next(iter(info.accepts)))
        with pytest.raises(ValueError, match="unknown code map 'ternary'"):
            Expr(op, info.produces, (x,), "ternary")
        with pytest.raises(TypeError, match=f"{op.value} gives {info.produces}"):
            Expr(op, F64, (x,), "signed")
    for dtype in DType:
        operands = [tensor(f"a{i}", BOOL if info.condition and i == 0 else dtype)
                    for i in range(info.arity)]
        if dtype in info.accepts:
            node = _build(op, operands)
            assert info.result is Result.GIVEN or node.dtype is info.result_dtype(dtype)
        else:
            with pytest.raises(TypeError, match=op.value):
                _build(op, operands)
    with pytest.raises(TypeError, match="operands"):
        _build(op, [tensor("a", F64)] * (info.arity + 1))


def test_names_of_the_c_math_functions_are_reserved():
    for info in OPS.values():
        if info.libm:
            for name in (info.libm, info.libm + "f"):
                assert cuda.c_name(name) == f"{name}_arg"
    x = scalar("expf", F32)
    rule = UpdateRule("shadow", [Slot("p", F32, True)], {"p": (tensor("p", F32) * x).exp()})
    assert "expf(" in gpu.render(rule) and "expf_arg" in gpu.render(rule)


def test_an_op_a_backend_lacks_is_refused_by_name(monkeypatch):
    rule = UpdateRule("uses_tanh", [Slot("p", F32, True)], {"p": tensor("p", F32).tanh()})
    monkeypatch.delitem(llvm_codegen.LLVM_OPS, Op.TANH)
    with pytest.raises(codegen.UnsupportedOp, match="llvm backend cannot lower tanh"):
        llvm_codegen.lower(rule)
    monkeypatch.delitem(cuda.CUDA_OPS, Op.TANH)
    with pytest.raises(codegen.UnsupportedOp, match="cuda backend cannot lower tanh"):
        gpu.render(rule)


def test_max_and_min_keep_the_second_operand_on_a_tie():
    """maximum(+0, -0) is -0 and maximum(-0, +0) is +0 (minimum alike), in every float dtype,
    float16 included (numpy's own float16 loops keep the first)."""
    for op in (Op.MAX, Op.MIN):
        for dtype in FLOATS:
            rule = CASES[f"{op.value}-{dtype}"].rule
            run = Run([_one_tensor(rule, {"a0": [0.0, -0.0], "a1": [-0.0, 0.0]})],
                      np.zeros((1, 0)))
            out = run_reference(rule, run)[0]["out"]
            assert list(np.signbit(out)) == [True, False]


# -- the C math library in the JIT ----------------------------------------------------------------
def test_the_jit_resolves_the_c_math_functions_it_was_given():
    """In a fresh process: kernels calling exp, log and tanh need only the registered C math
    functions, at the C library's addresses, and run."""
    script = """
import ctypes, ctypes.util
import llvmlite.binding as llvm
import numpy as np
from stepjit.codegen.llvm import LIBM_SYMBOLS
from stepjit.ir import DType, Slot, UpdateRule, tensor
from stepjit.runtime import cpu

rules = []
for d in (DType.F32, DType.F64):
    x = tensor("x", d)
    rules.append(UpdateRule(f"t_{d}", [Slot("x", d, True)], {"x": x.exp() + x.log() + x.tanh()}))
obj = cpu._target_machine().emit_object(cpu.optimize(cpu.lower_text(rules[0])))
needed = set(cpu.undefined_symbols(obj))
assert needed and needed <= set(LIBM_SYMBOLS), needed
assert set(cpu.register_libm_symbols()) == set(LIBM_SYMBOLS)
libm = ctypes.CDLL(ctypes.util.find_library("m"))
for name in LIBM_SYMBOLS:
    assert llvm.address_of_symbol(name) == ctypes.cast(getattr(libm, name), ctypes.c_void_p).value
backend = cpu.LLVMBackend()
for rule, d in zip(rules, (np.float32, np.float64)):
    x = np.array([0.5, 2.0], d)
    want = np.exp(x) + np.log(x) + np.tanh(x)
    backend.bind(backend.compile(rule), [(x,)], np.zeros((1, 0)))(())
    np.testing.assert_allclose(x, want, rtol=1e-6)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "",
                              "STEPJIT_CACHE_DIR": os.environ["STEPJIT_CACHE_DIR"]})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
