"""The IR: interned nodes, dtype discipline, structural keys, rule text and the interpreter."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from stepjit.ir import (
    DType,
    Expr,
    Op,
    Slot,
    UpdateRule,
    const,
    evaluate,
    maximum,
    minimum,
    per_tensor,
    scalar,
    sqrt,
    tensor,
    where,
)
from stepjit.optim.sgd import sgd_rule

F16, F32, F64, BOOL = DType.F16, DType.F32, DType.F64, DType.BOOL


# -- interning -----------------------------------------------------------------------------------
def test_same_expression_is_the_same_object():
    def build():
        p, g = tensor("param", F32), tensor("grad", F16).cast(F32)
        return p - scalar("lr", F32) * (g + 0.5 * p)

    a, b = build(), build()
    assert a is b
    assert tensor("x", F32) is tensor("x", F32)
    assert const(1, F32) is const(1.0, F32)
    assert tensor("x", F32) is not tensor("x", F64)
    assert tensor("x", F32) is not scalar("x", F32)
    assert const(1.0, F32) is not const(2.0, F32)


def test_signed_zero_constants_are_distinct():
    assert const(0.0, F32) is not const(-0.0, F32)
    assert math.copysign(1.0, const(-0.0, F32).arg) == -1.0
    x = tensor("x", F64)
    zero = UpdateRule("z", [Slot("x", F64, written=True)], {"x": x * 0.0})
    neg_zero = UpdateRule("z", [Slot("x", F64, written=True)], {"x": x * -0.0})
    assert zero.key != neg_zero.key
    out = evaluate(neg_zero, {"x": np.array([1.0])}, {})["x"]
    assert math.copysign(1.0, out[0]) == -1.0


def test_nan_constant_is_interned():
    assert const(math.nan, F32) is const(float("nan"), F32)


def test_deep_shared_chain_builds_and_hashes_fast():
    """Each node uses the previous one twice: 2**3000 paths, 3000 nodes."""
    t0 = time.perf_counter()
    x = tensor("x", F64)
    e = x
    for i in range(3000):
        e = e * e + (e - float(i % 7))
    rule = UpdateRule("deep", [Slot("x", F64), Slot("y", F64, written=True)], {"y": e})
    hash(e)
    assert {e: 1}[e] == 1
    assert len(rule.nodes) < 4 * 3000 + 10
    key = rule.key
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed
    # built again: the same nodes (interned), the same key
    e2 = x
    for i in range(3000):
        e2 = e2 * e2 + (e2 - float(i % 7))
    assert e2 is e
    assert UpdateRule("deep", [Slot("x", F64), Slot("y", F64, written=True)], {"y": e2}).key == key


# -- dtype discipline ----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["add", "sub", "mul", "truediv", "lt", "gt"])
def test_binary_ops_on_mismatched_dtypes_raise(op):
    a, b = tensor("a", F32), tensor("b", F64)
    with pytest.raises(TypeError, match="dtype"):
        getattr(a, f"__{op}__")(b)


@pytest.mark.parametrize("fn", [maximum, minimum])
def test_max_min_on_mismatched_dtypes_raise(fn):
    with pytest.raises(TypeError):
        fn(tensor("a", F16), tensor("b", F32))


def test_where_needs_bool_condition_and_equal_branches():
    a, b = tensor("a", F32), tensor("b", F64)
    with pytest.raises(TypeError):
        where(a < 1.0, a, b)
    with pytest.raises(TypeError):
        where(a, a, a)


def test_python_numbers_take_the_other_side_dtype_and_bools_are_refused():
    a = tensor("a", F16)
    assert (a + 1).dtype is F16
    assert (2.0 * a).src[0] is const(2.0, F16)
    assert (a < 0.5).dtype is BOOL
    with pytest.raises(TypeError):
        a + True
    with pytest.raises(TypeError):
        a + "1"


def test_expression_has_no_truth_value():
    with pytest.raises(TypeError, match="truth"):
        bool(tensor("a", F32) < 1.0)


def test_nested_sums_are_rejected():
    x = tensor("x", F32).cast(F64)
    s = (x * x).sum()
    assert s.dtype is F64 and not s.elementwise
    with pytest.raises(ValueError, match="sum"):
        (x * s).sum()
    with pytest.raises(TypeError, match="float64"):
        Expr(Op.SUM, F64, (tensor("x", F32),))


def test_leaf_names_must_be_identifiers():
    with pytest.raises(ValueError):
        tensor("not a name", F32)


# -- rules and structural keys -------------------------------------------------------------------
def _rule(dtype: DType, decay: bool, name: str = "r") -> UpdateRule:
    p, g = tensor("param", dtype), tensor("grad", dtype)
    if decay:
        g = g + scalar("weight_decay", dtype) * p
    return UpdateRule(
        name, [Slot("param", dtype, written=True), Slot("grad", dtype)],
        {"param": p - scalar("lr", dtype) * g},
    )


def test_structural_key_equal_for_equal_structure():
    assert _rule(F32, True).key == _rule(F32, True).key
    assert _rule(F32, True).text == _rule(F32, True).text


def test_structural_key_differs_by_term_dtype_and_name():
    keys = {_rule(F32, True).key, _rule(F32, False).key, _rule(F64, True).key,
            _rule(F32, True, "other").key}
    assert len(keys) == 4


def test_sgd_rule_keys():
    base = sgd_rule(True, False, True, False, F32, F32)
    assert base.key == sgd_rule(True, False, True, False, F32, F32).key
    variants = [
        sgd_rule(False, False, True, False, F32, F32),
        sgd_rule(True, True, True, False, F32, F32),
        sgd_rule(True, False, False, False, F32, F32),
        sgd_rule(True, False, True, True, F32, F32),
        sgd_rule(True, False, True, False, F64, F64),
        sgd_rule(True, False, True, False, F32, F16),
        sgd_rule(True, False, True, False, F16, F16),
    ]
    assert len({base.key, *(r.key for r in variants)}) == 1 + len(variants)
    # hyperparameters are arguments, never literals in the rule
    assert base.scalar_names == ("dampening", "lr", "momentum", "scale", "weight_decay")
    assert base.per_tensor_names == ("first",)
    assert sgd_rule(True, False, True, True, F32, F32).reductions


def test_rule_checks_its_outputs():
    x = tensor("x", F32)
    with pytest.raises(ValueError, match="not a written slot"):
        UpdateRule("r", [Slot("x", F32)], {"x": x + 1.0})
    with pytest.raises(TypeError):
        UpdateRule("r", [Slot("x", F32, written=True)], {"x": x.cast(F64)})
    with pytest.raises(ValueError, match="without an output"):
        UpdateRule("r", [Slot("x", F32, written=True), Slot("y", F32, written=True)],
                   {"x": x})
    with pytest.raises(TypeError, match="matches no slot"):
        UpdateRule("r", [Slot("x", F32, written=True)], {"x": tensor("y", F32)})


def test_rule_text_lists_one_line_per_node():
    rule = sgd_rule(True, True, True, True, F16, F32)
    lines = rule.text.splitlines()
    node_lines = [ln for ln in lines if ln.lstrip().startswith("%")]
    assert len(node_lines) == len(rule.nodes)
    for i, (ln, n) in enumerate(zip(node_lines, rule.nodes)):
        assert ln.lstrip().startswith(f"%{i} ")
        assert ln.rstrip().endswith(str(n.dtype)) or ln.rstrip().endswith("(per tensor)")
        if n.op is not Op.CONST:
            assert n.op.value in ln
    assert lines[0].startswith(f"rule {rule.name}(")
    assert [ln.split()[0] for ln in lines[-2:]] == ["param", "momentum_buffer"]
    # the node list is a topological order without duplicates
    seen = set()
    for n in rule.nodes:
        assert all(id(s) in seen for s in n.src)
        assert id(n) not in seen
        seen.add(id(n))


# -- the interpreter ------------------------------------------------------------------------------
def _eval_one(expr: Expr, x: np.ndarray, y: np.ndarray, out_dtype: DType) -> np.ndarray:
    dt = DType.from_numpy(x.dtype)
    rule = UpdateRule(
        "t", [Slot("x", dt), Slot("y", dt), Slot("out", out_dtype, written=True)], {"out": expr}
    )
    out = np.zeros(x.shape, out_dtype.to_numpy())
    return evaluate(rule, {"x": x, "y": y, "out": out}, {"s": 2.5}, {"k": 1.0})["out"]


VALUES = np.array([-2.5, -1.0, -0.0, 0.0, 0.3, 1.0, 7.25, np.inf, -np.inf, np.nan])
OTHER = np.array([1.5, 0.0, 2.0, -0.0, 0.3, np.nan, -3.0, 1.0, np.inf, 4.0])

def _second_on_a_tie(fn):
    """numpy's maximum / minimum, with a tie (+0 and -0) giving the second operand in every
    dtype, as the IR states (numpy's own float16 loops keep the first)."""

    def ref(x, y):
        out = fn(x, y)
        out[x == y] = y[x == y]
        return out

    return ref


BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / b, np.divide),
    "max": (maximum, _second_on_a_tie(np.maximum)),
    "min": (minimum, _second_on_a_tie(np.minimum)),
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", BINARY)
def test_binary_ops_match_numpy(name, dtype):
    build, ref = BINARY[name]
    x, y = VALUES.astype(dtype), OTHER.astype(dtype)
    dt = DType.from_numpy(dtype)
    got = _eval_one(build(tensor("x", dt), tensor("y", dt)), x, y, dt)
    with np.errstate(all="ignore"):
        want = ref(x, y)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(got, want)
    # signed zeros too
    assert np.array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "name, build, ref",
    [
        ("neg", lambda x: -x, np.negative),
        ("abs", abs, np.abs),
        ("sqrt", sqrt, np.sqrt),
        ("cast16", lambda x: x.cast(F16).cast(x.dtype), lambda a: a.astype(np.float16)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unary_ops_match_numpy(name, build, ref, dtype):
    x = VALUES.astype(dtype)
    dt = DType.from_numpy(dtype)
    got = _eval_one(build(tensor("x", dt)), x, x, dt)
    with np.errstate(all="ignore"):
        want = ref(x).astype(dtype)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_compare_and_where_match_numpy():
    x, y = VALUES, OTHER
    xe, ye = tensor("x", F64), tensor("y", F64)
    got = _eval_one(xe < ye, x, y, BOOL)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, np.less(x, y))  # false when either is NaN
    np.testing.assert_array_equal(_eval_one(xe > ye, x, y, BOOL), np.greater(x, y))
    got = _eval_one(where(xe < ye, xe, ye * 2.0), x, y, F64)
    np.testing.assert_array_equal(got, np.where(x < y, x, y * 2.0))


def test_leaves_and_sum_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1001).astype(np.float32)
    y = rng.standard_normal(1001).astype(np.float32)
    xe, ye = tensor("x", F32), tensor("y", F32)
    s = scalar("s", F32)
    k = per_tensor("k", BOOL)
    norm = (xe.cast(F64) * xe.cast(F64)).sum().sqrt()
    expr = where(k, s * xe + ye, ye) / norm.cast(F32)
    got = _eval_one(expr, x, y, F32)
    n64 = np.sqrt(np.sum(x.astype(np.float64) ** 2))
    want = (np.float32(2.5) * x + y) / np.float32(n64)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_sum_of_an_empty_tensor_is_zero():
    xe = tensor("x", F32)
    n = (xe.cast(F64) * xe.cast(F64)).sum()
    got = _eval_one(xe + n.cast(F32), np.zeros(0, np.float32), np.zeros(0, np.float32), F32)
    assert got.shape == (0,)


def test_uniform_output_is_broadcast_over_the_tensor():
    x = np.arange(5.0)
    got = _eval_one(const(3.0, F64) + scalar("s", F64), x, x, F64)
    np.testing.assert_array_equal(got, np.full(5, 5.5))


def test_evaluate_writes_nothing_in_place():
    rule = sgd_rule(True, False, False, False, F64, F64)
    p, g, b = np.ones(3), np.full(3, 2.0), np.full(3, 0.5)
    out = evaluate(rule, {"param": p, "grad": g, "momentum_buffer": b},
                   dict(lr=0.1, momentum=0.9, dampening=0.0, scale=1.0, weight_decay=0.0),
                   {"first": 0.0})
    assert p.tolist() == [1.0] * 3 and b.tolist() == [0.5] * 3
    np.testing.assert_allclose(out["momentum_buffer"], 0.9 * 0.5 + 2.0)
    np.testing.assert_allclose(out["param"], 1.0 - 0.1 * (0.9 * 0.5 + 2.0))
