"""Bad input: a clear error naming the culprit, and nothing changes.

Checked at construction, in add_param_group, and at the start of every step(): a failed step()
leaves every parameter and buffer of every group byte-identical, and the next good step continues
as if the failed one had never been tried.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from reference import ReferenceSGD, assert_matches

import stepjit

SGD = stepjit.optim.SGD
P = stepjit.Parameter


def _p(n=3, dtype=np.float32):
    return P(np.ones(n, dtype))


def _value_pattern(name: str, value) -> str:
    return rf"\b{re.escape(name)}\b.*{re.escape(str(value))}"


# -- params --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, kind",
    [
        (lambda: _p(), "Parameter"),
        (lambda: {_p()}, "set"),
        (lambda: {"params": [_p()]}, "dict"),
        (lambda: np.ones(3, np.float32), "ndarray"),
    ],
    ids=["parameter", "set", "dict", "array"],
)
def test_params_must_be_a_sequence(backend, params, kind):
    with pytest.raises(TypeError, match=kind):
        SGD(params(), lr=0.1, backend=backend)


@pytest.mark.parametrize("params", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_params(backend, params):
    with pytest.raises(ValueError, match="empty"):
        SGD(params, lr=0.1, backend=backend)


@pytest.mark.parametrize(
    "element, type_name",
    [(np.ones(3), "numpy.ndarray"), (3.0, "float"), ("w", "str"), ([1.0], "list")],
    ids=["ndarray", "float", "str", "list"],
)
def test_element_that_is_not_a_parameter(backend, element, type_name):
    with pytest.raises(TypeError, match=rf"parameter 1\b.*\b{re.escape(type_name)}\b"):
        SGD([_p(), element], lr=0.1, backend=backend)
    opt = SGD([_p()], lr=0.1, backend=backend)
    with pytest.raises(TypeError, match=re.escape(type_name)):
        opt.add_param_group({"params": [element]})
    assert len(opt.param_groups) == 1


def test_same_parameter_twice(backend):
    a, b = _p(), _p()
    with pytest.raises(ValueError, match="more than one group"):
        SGD([{"params": [a, b]}, {"params": [a]}], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="more than one group"):
        SGD([a, b, a], lr=0.1, backend=backend)
    opt = SGD([a], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="more than one group"):
        opt.add_param_group({"params": [b, a]})
    assert len(opt.param_groups) == 1


def test_parameter_rejects_non_arrays():
    with pytest.raises(TypeError, match="list"):
        P([1.0, 2.0])
    p = _p()
    with pytest.raises(TypeError, match="float"):
        p.grad = 1.0
    with pytest.raises(TypeError, match="str"):
        p.data = "x"


# -- hyperparameters -----------------------------------------------------------------------------
def test_lr_is_required(backend):
    with pytest.raises(ValueError, match=r"\blr\b"):
        SGD([_p()], backend=backend)
    with pytest.raises(ValueError, match=r"\blr\b"):
        SGD([_p()], lr=stepjit.optim.required, backend=backend)


NEGATIVE_OK_NOT = ["lr", "momentum", "weight_decay", "clip_norm", "lr_mult", "decay_mult"]
BAD_VALUES = (
    [(name, v) for name in NEGATIVE_OK_NOT for v in (-0.1, math.nan, math.inf, -math.inf)]
    + [("dampening", v) for v in (-0.1, 1.5, math.nan, math.inf)]
    + [("scale", v) for v in (0.0, -1.0, math.nan, math.inf)]
)


@pytest.mark.parametrize("name, value", BAD_VALUES, ids=lambda x: str(x))
def test_invalid_hyperparameter(backend, name, value):
    pattern = _value_pattern(name, value)
    if name in ("lr_mult", "decay_mult"):  # set per group
        with pytest.raises(ValueError, match=pattern):
            SGD([{"params": [_p()], name: value}], lr=0.1, backend=backend)
    else:
        with pytest.raises(ValueError, match=pattern):
            SGD([_p()], **{"lr": 0.1, name: value}, backend=backend)
    opt = SGD([_p()], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": [_p()], name: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("hyper", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.5)])
def test_nesterov_needs_momentum_and_no_dampening(backend, hyper):
    with pytest.raises(ValueError, match="[Nn]esterov"):
        SGD([_p()], lr=0.1, nesterov=True, **hyper, backend=backend)


# -- at step(): nothing changes ------------------------------------------------------------------
def _build(backend, dtype=np.float64):
    """Two groups with momentum, after one good step (buffers exist); group 1 parameter 2 has
    never had a gradient (its first step would create its buffer)."""
    rng = np.random.default_rng(0)
    shapes = [[(4,), (2, 3)], [(5,), (3,), (6,)]]
    params = [[P(rng.standard_normal(s).astype(dtype)) for s in g] for g in shapes]
    opt = SGD([{"params": params[0]}, {"params": params[1], "lr_mult": 0.5}], lr=0.1,
              momentum=0.9, weight_decay=1e-2, backend=backend)
    for p in params[0] + params[1][:2]:
        p.grad = rng.standard_normal(p.shape).astype(dtype)
    opt.step()
    for p in params[0] + params[1]:
        p.grad = rng.standard_normal(p.shape).astype(dtype)
    return opt, params


def _snapshot(opt):
    return [
        [(p.data.tobytes(), sorted((k, v.tobytes()) for k, v in opt.state.get(p, {}).items()))
         for p in g["params"]]
        for g in opt.param_groups
    ]


def _bad_grad_shape(opt, d):
    d.grad = np.zeros(4)
    return r"param group 1, parameter 1\b.*shape \(4,\).*\(3,\)", ValueError


def _read_only_flag(opt, d):
    d.data.flags.writeable = False
    d.grad = np.ones(3)
    return r"param group 1, parameter 1\b.*read-only", ValueError


def _read_only_data(opt, d):
    ro = d.data.copy()
    ro.flags.writeable = False
    d.data = ro
    return r"param group 1, parameter 1\b.*read-only", ValueError


def _grad_is_param(opt, d):
    d.grad = d.data
    return r"param group 1, parameter 1\b.*share memory", ValueError


def _grad_views_param(opt, d):
    d.grad = d.data.view()
    return r"param group 1, parameter 1\b.*share memory", ValueError


def _grad_dtype(dtype):
    def make(opt, d):
        d.grad = np.ones(3, dtype)
        return rf"param group 1, parameter 1\b.*gradient.*{np.dtype(dtype).name}", TypeError
    make.__name__ = f"grad_{np.dtype(dtype).name}"
    return make


def _param_dtype(dtype):
    def make(opt, d):
        d.data = np.ones(3, dtype)
        return rf"param group 1, parameter 1\b.*parameter.*{np.dtype(dtype).name}", TypeError
    make.__name__ = f"param_{np.dtype(dtype).name}"
    return make


def _edit(**changes):
    def make(opt, d):
        opt.param_groups[1].update(changes)
        name, value = next(iter(changes.items()))
        if "nesterov" in changes:
            return r"param group 1\b.*[Nn]esterov", ValueError
        return rf"param group 1\b.*{_value_pattern(name, value)}", ValueError
    make.__name__ = "edit_" + "_".join(f"{k}={v}" for k, v in changes.items())
    return make


STEP_ERRORS = [
    _bad_grad_shape, _read_only_flag, _read_only_data, _grad_is_param, _grad_views_param,
    *(_grad_dtype(t) for t in (np.int32, np.int64, np.bool_, np.complex64, np.complex128)),
    *(_param_dtype(t) for t in (np.int64, np.bool_, np.complex128)),
    _edit(lr=-1.0), _edit(momentum=math.nan), _edit(dampening=2.0), _edit(weight_decay=math.inf),
    _edit(scale=0.0), _edit(clip_norm=-1.0), _edit(lr_mult=-0.5), _edit(decay_mult=math.nan),
    _edit(nesterov=True, dampening=0.5), _edit(nesterov=True, momentum=0.0),
]


@pytest.mark.parametrize("make_bad", STEP_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_failed_step_changes_nothing(backend, make_bad):
    opt, params = _build(backend)
    twin, twin_params = _build(backend)  # the same trajectory, never given bad input
    d = params[1][1]
    good_data, good_grad = d.data, d.grad
    groups_before = [dict(g) for g in opt.param_groups]

    pattern, error = make_bad(opt, d)
    before = _snapshot(opt)  # (after: some bad inputs replace d.data itself)
    with pytest.raises(error, match=pattern):
        opt.step()
    assert _snapshot(opt) == before
    assert "momentum_buffer" not in opt.state.get(params[1][2], {})
    with pytest.raises(error, match=pattern):  # still refused, still nothing changed
        opt.step()
    assert _snapshot(opt) == before

    # put the good input back: the next step continues as if nothing had happened
    good_data.flags.writeable = True
    d.data, d.grad = good_data, good_grad
    opt.param_groups[:] = [{**g, "params": mine["params"]}
                           for g, mine in zip(groups_before, opt.param_groups)]
    opt.step()
    twin.step()
    assert _snapshot(opt) == _snapshot(twin)


def test_overlapping_parameters_are_refused(backend):
    base = np.zeros(8)
    a, b = P(base[:5]), P(base[3:])
    opt = SGD([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = np.ones(5), np.ones(5)
    with pytest.raises(ValueError, match="overlap"):
        opt.step()
    assert not base.any()


# -- non-finite gradients are not bad input ------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_non_finite_gradients_propagate(backend, dtype, clip_norm):
    rng = np.random.default_rng(1)
    a, b = (P(rng.standard_normal(6).astype(dtype)) for _ in range(2))
    opt = SGD([a, b], lr=0.1, momentum=0.9, weight_decay=1e-2, clip_norm=clip_norm,
              backend=backend)
    ref = ReferenceSGD([a.data, b.data], lr=0.1, momentum=0.9, weight_decay=1e-2,
                       clip_norm=clip_norm)
    for t in range(3):
        ga = rng.standard_normal(6).astype(dtype)
        if t == 1:
            ga[0], ga[1] = np.nan, np.inf
        a.grad, b.grad = ga, rng.standard_normal(6).astype(dtype)
        before = b.data.copy()
        opt.step()
        ref.step([a.grad, b.grad])
        assert not np.array_equal(b.data, before)  # no skip
    assert np.isnan(a.data[0]) and np.isnan(opt.state[a]["momentum_buffer"][0])
    assert not np.isfinite(a.data[1])
    if clip_norm:  # the norm is NaN: `n > clip_norm` is false, so nothing is clipped
        assert np.isnan(ref.params[0][2:]).sum() == 0
    for i, p in enumerate((a, b)):
        assert_matches(p.data, ref.params[i], ref.param_scale[i], f"parameter {i}")
    assert np.isfinite(b.data).all()
