"""The examples of the SGD documentation, run as written in stepjit terms, and the behaviour the
semantics page adds to them (accumulation, zero_grad, untouched gradients, state_dict, repr)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import ReferenceSGD, assert_matches

import stepjit

SGD = stepjit.optim.SGD


def _grads(rng, shape, n, dtype=np.float64):
    return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]


# -- the three algorithms, as the documentation defines them ------------------------------------
def _seed_formula(kind: str, lr: float, momentum: float, x0, grads):
    """The documentation's updates, with its m_t = momentum * m_{t-1} + lr * g (constant lr)."""
    x, m_prev = x0.copy(), np.zeros_like(x0)
    for g in grads:
        m = momentum * m_prev + lr * g
        if kind == "vanilla":
            x = x - lr * g
        elif kind == "momentum":
            x = x - m
        else:
            x = x - ((1 + momentum) * m - momentum * m_prev)
        m_prev = m
    return x


@pytest.mark.parametrize("kind", ["vanilla", "momentum", "nesterov"])
def test_construction_examples_follow_the_documented_updates(backend, kind):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 3))
    x = stepjit.Parameter(x0.copy())
    if kind == "vanilla":
        opt = SGD([x], lr=0.1, backend=backend)  # vanilla_sgd = torch.optim.SGD(lr=0.1)
    elif kind == "momentum":
        opt = SGD([x], lr=0.1, momentum=0.9, backend=backend)
    else:
        opt = SGD([x], lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    grads = _grads(rng, (1, 3), 6)
    for g in grads:
        x.grad = g
        opt.step()
    want = _seed_formula(kind, 0.1, 0.9, x0, grads)
    np.testing.assert_allclose(x.data, want, rtol=1e-12, atol=1e-12)
    group = opt.param_groups[0]
    assert group["lr"] == 0.1
    assert group["momentum"] == (0 if kind == "vanilla" else 0.9)
    assert group["nesterov"] is (kind == "nesterov")
    # VanillaSGD allocates no buffer; the others keep one per parameter
    assert ("momentum_buffer" in opt.state.get(x, {})) is (kind != "vanilla")


def test_defaults_are_the_documented_ones(backend):
    opt = SGD([stepjit.Parameter(np.zeros(2))], lr=0.5, backend=backend)
    group = opt.param_groups[0]
    expected = dict(momentum=0, dampening=0, weight_decay=0, nesterov=False, scale=1, clip_norm=0,
                    lr_mult=1, decay_mult=1)
    assert {k: group[k] for k in expected} == expected


# -- add_param_group ----------------------------------------------------------------------------
def test_add_param_group_overriding_lr_and_weight_decay(backend):
    rng = np.random.default_rng(1)
    a, b = (stepjit.Parameter(rng.standard_normal(5)) for _ in range(2))
    opt = SGD([a], lr=0.1, momentum=0.9, backend=backend)
    param_group1 = {"params": [b], "lr": 0.01, "weight_decay": 0.0001}
    opt.add_param_group(param_group1)
    group = opt.param_groups[1]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.01, 0.0001, 0.9)
    assert group["params"] == [b]
    refs = [ReferenceSGD([a.data], lr=0.1, momentum=0.9),
            ReferenceSGD([b.data], lr=0.01, momentum=0.9, weight_decay=0.0001)]
    for _ in range(4):
        for p, ref in zip((a, b), refs):
            p.grad = rng.standard_normal(5)
            ref.step([p.grad])
        opt.step()
    for p, ref in zip((a, b), refs):
        assert_matches(p.data, ref.params[0], ref.param_scale[0], "param")
        assert_matches(opt.state[p]["momentum_buffer"], ref.buffers[0], ref.buffer_scale[0], "buf")


@pytest.mark.parametrize("mult", [dict(lr_mult=1, decay_mult=1), dict(lr_mult=0.5, decay_mult=2)])
def test_add_param_group_with_multipliers(backend, mult):
    rng = np.random.default_rng(2)
    a, b = (stepjit.Parameter(rng.standard_normal(5).astype(np.float32)) for _ in range(2))
    opt = SGD([a], lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    param_group2 = {"params": [b], **mult}  # inherits the defaults, scales lr and weight decay
    opt.add_param_group(param_group2)
    group = opt.param_groups[1]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.1, 1e-2, 0.9)
    assert (group["lr_mult"], group["decay_mult"]) == (mult["lr_mult"], mult["decay_mult"])
    ref = ReferenceSGD([b.data], lr=0.1, momentum=0.9, weight_decay=1e-2, **mult)
    for _ in range(4):
        a.grad = rng.standard_normal(5).astype(np.float32)
        b.grad = rng.standard_normal(5).astype(np.float32)
        ref.step([b.grad])
        opt.step()
    assert_matches(b.data, ref.params[0], ref.param_scale[0], "param")


# -- accumulate_grad ------------------------------------------------------------------------------
def test_accumulate_grad_loop_of_the_documentation(backend):
    x = stepjit.Parameter(np.ones((1, 3), np.float32))
    opt = SGD([x], lr=0.1, backend=backend)
    for _ in range(10):
        x.grad = np.ones((1, 3), np.float32)  # y = x + 1; y.backward()
        opt.accumulate_grad()
    opt.step()
    # one step with the sum of the ten gradients
    np.testing.assert_allclose(x.data, 1.0 - 0.1 * 10.0, rtol=0, atol=1e-6)


def test_accumulation_example_of_the_semantics(backend):
    """x = 1, SGD(lr=0.1); twice: three times (gradient 1, accumulate_grad()), then step()."""
    x = stepjit.Parameter(np.ones(1))
    opt = SGD([x], lr=0.1, backend=backend)
    for _ in range(2):
        for _ in range(3):
            x.grad = np.ones(1)
            opt.accumulate_grad()
        opt.step()
    # 0.4 in decimal arithmetic. In float64 each step subtracts fl(0.1 * 3) =
    # 0.30000000000000004, so (1 - that) - that is 0.3999999999999999, two ulps below fl(0.4)
    # (a fused multiply-add may land one ulp closer): 0.4 to within a few ulps.
    assert x.data[0] == pytest.approx(0.4, rel=1e-15, abs=0)
    assert x.data.dtype == np.float64


def test_accumulation_example_float32(backend):
    x = stepjit.Parameter(np.ones(1, np.float32))
    opt = SGD([x], lr=0.1, backend=backend)
    for _ in range(2):
        for _ in range(3):
            x.grad = np.ones(1, np.float32)
            opt.accumulate_grad()
        opt.step()
    np.testing.assert_allclose(x.data, 0.4, rtol=1e-6)


def test_accumulation_matches_one_step_with_the_sum(backend):
    """Accumulated gradients of mixed dtypes, one step with momentum, the next accumulation
    starts afresh; `.grad` None at step() does not matter while an accumulation is pending."""
    rng = np.random.default_rng(3)
    p = stepjit.Parameter(rng.standard_normal(17))
    opt = SGD([p], lr=0.1, momentum=0.9, backend=backend)
    ref = ReferenceSGD([p.data], lr=0.1, momentum=0.9)
    for n in (3, 1, 4):
        gs = [rng.standard_normal(17).astype(dt) for dt in (np.float64, np.float32)[: n % 2 + 1]]
        gs = (gs * n)[:n]
        for g in gs:
            p.grad = g
            opt.accumulate_grad()
        p.grad = None
        opt.step()
        ref.step([np.sum([g.astype(np.float64) for g in gs], axis=0)])
    assert_matches(p.data, ref.params[0], ref.param_scale[0], "param")


def test_zero_grad_does_not_touch_a_pending_accumulation(backend):
    """A framework whose backward() adds into .grad calls zero_grad() between passes."""
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal(9)
    p = stepjit.Parameter(x0.copy())
    opt = SGD([p], lr=0.1, backend=backend)
    p.grad = np.zeros(9)
    gs = _grads(rng, 9, 3)
    for g in gs:
        p.grad += g  # backward() accumulating in place
        opt.accumulate_grad()
        opt.zero_grad()
        assert not p.grad.any()
    opt.step()
    np.testing.assert_allclose(p.data, x0 - 0.1 * sum(gs), rtol=1e-12, atol=1e-14)
    # and zero_grad(reset=True) keeps a pending accumulation too
    for g in gs[:2]:
        p.grad = g
        opt.accumulate_grad()
    opt.zero_grad(reset=True)
    before = p.data.copy()
    opt.step()
    np.testing.assert_allclose(p.data, before - 0.1 * (gs[0] + gs[1]), rtol=1e-12, atol=1e-14)


# -- zero_grad ----------------------------------------------------------------------------------
def test_zero_grad_reset_true_skips_tensors_without_a_new_gradient(backend):
    """The documentation's m1/m2 example: m2 gets a gradient only on some iterations."""
    rng = np.random.default_rng(5)
    m1 = [stepjit.Parameter(rng.standard_normal((3, 3))), stepjit.Parameter(rng.standard_normal(3))]
    m2 = [stepjit.Parameter(rng.standard_normal((3, 3))), stepjit.Parameter(rng.standard_normal(3))]
    opt = SGD(m1 + m2, lr=0.1, momentum=0.9, backend=backend)
    for i in range(4):
        opt.zero_grad(reset=True)
        assert all(p.grad is None for p in m1 + m2)
        used = m1 + m2 if i == 2 else m1
        for p in used:
            p.grad = rng.standard_normal(p.shape)  # x.backward()
        before = {p: p.data.copy() for p in m1 + m2}
        opt.step()
        for p in m1 + m2:
            moved = not np.array_equal(p.data, before[p])
            assert moved is (p in used)
    assert all("momentum_buffer" in opt.state[p] for p in m2)


def test_zero_grad_reset_false_zeroes_in_place(backend):
    p = stepjit.Parameter(np.ones(4, np.float32))
    q = stepjit.Parameter(np.ones((2, 2)))
    opt = SGD([p, q], lr=0.1, backend=backend)
    gp, gq = np.full(4, 3.0, np.float32), np.full((2, 2), -2.0)
    p.grad, q.grad = gp, gq
    opt.zero_grad()
    assert p.grad is gp and q.grad is gq  # the same memory, now zero
    assert not gp.any() and not gq.any()
    opt.step()  # vanilla SGD with a zero gradient changes nothing
    np.testing.assert_array_equal(p.data, 1.0)
    np.testing.assert_array_equal(q.data, 1.0)


# -- gradients are inputs only --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_step_and_accumulate_never_modify_gradients(backend, dtype):
    rng = np.random.default_rng(6)
    ps = [stepjit.Parameter(rng.standard_normal(s).astype(dtype)) for s in ((5,), (2, 3), (0,))]
    opt = SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, scale=0.5, clip_norm=0.1,
              backend=backend)
    for _ in range(3):
        for p in ps:
            p.grad = rng.standard_normal(p.shape).astype(dtype)
        saved = [p.grad.copy() for p in ps]
        opt.accumulate_grad()
        opt.step()
        opt.step()  # a step without accumulation reads .grad
        for p, g in zip(ps, saved):
            assert p.grad.tobytes() == g.tobytes()


# -- state_dict ----------------------------------------------------------------------------------
def _two_group_opt(backend, data):
    ps = [stepjit.Parameter(d.copy()) for d in data]
    opt = SGD([{"params": ps[:2]}, {"params": ps[2:], "lr_mult": 0.5}], lr=0.1, momentum=0.9,
              nesterov=True, weight_decay=1e-3, backend=backend)
    return ps, opt


def test_state_dict_layout_and_round_trip(backend):
    rng = np.random.default_rng(7)
    data = [rng.standard_normal(s).astype(np.float32) for s in ((4,), (2, 3), (5,))]
    grads = [[rng.standard_normal(d.shape).astype(np.float32) for d in data] for _ in range(6)]
    ps, opt = _two_group_opt(backend, data)
    for t in range(3):
        for p, g in zip(ps, grads[t]):
            p.grad = None if (t == 0 and p is ps[1]) else g
        opt.param_groups[0]["lr"] = 0.1 * (t + 1)
        opt.step()

    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    assert sd["param_groups"][0]["lr"] == pytest.approx(0.3)
    assert sd["param_groups"][1]["lr_mult"] == 0.5
    assert set(sd["state"]) == {0, 1, 2}
    for i, p in enumerate(ps):
        buf = sd["state"][i]["momentum_buffer"]
        assert buf.shape == p.shape and buf.dtype == np.float32
        np.testing.assert_array_equal(buf, opt.state[p]["momentum_buffer"])
        assert buf is not opt.state[p]["momentum_buffer"]  # a copy

    # a fresh optimizer over copies of the current parameters continues identically
    ps2, opt2 = _two_group_opt(backend, [p.data for p in ps])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.3)
    sd["state"][0]["momentum_buffer"][...] = 123.0  # loading copied the buffers
    for t in range(3, 6):
        for o, qs in ((opt, ps), (opt2, ps2)):
            o.param_groups[0]["lr"] = 0.1 * (t + 1)
            for q, g in zip(qs, grads[t]):
                q.grad = g
            o.step()
    for p, q in zip(ps, ps2):
        assert p.data.tobytes() == q.data.tobytes()
        assert (opt.state[p]["momentum_buffer"].tobytes()
                == opt2.state[q]["momentum_buffer"].tobytes())


def test_load_state_dict_checks_before_changing_anything(backend):
    rng = np.random.default_rng(8)
    data = [rng.standard_normal(s) for s in ((4,), (2, 3), (5,))]
    ps, opt = _two_group_opt(backend, data)
    for p in ps:
        p.grad = rng.standard_normal(p.shape)
    opt.step()
    before = {p: opt.state[p]["momentum_buffer"].copy() for p in ps}
    groups_before = [dict(g) for g in opt.param_groups]

    bad_shape = opt.state_dict()
    bad_shape["param_groups"][0]["lr"] = 7.0
    bad_shape["state"][2]["momentum_buffer"] = np.zeros(6)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad_shape)
    bad_groups = opt.state_dict()
    bad_groups["param_groups"].pop()
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(bad_groups)
    bad_count = opt.state_dict()
    bad_count["param_groups"][0]["params"] = [0]
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(bad_count)

    assert [dict(g) for g in opt.param_groups] == groups_before
    for p in ps:
        np.testing.assert_array_equal(opt.state[p]["momentum_buffer"], before[p])


# -- repr ----------------------------------------------------------------------------------------
def test_repr_is_readable(backend):
    p = stepjit.Parameter(np.zeros((2, 3), np.float32))
    opt = SGD([p], lr=0.1, momentum=0.9, backend=backend)
    opt.add_param_group({"params": [stepjit.Parameter(np.zeros(4))], "lr_mult": 0.5})
    text = repr(opt)
    assert text.startswith("SGD")
    assert backend in text
    for needle in ("param group 0", "param group 1", "lr: 0.1", "momentum: 0.9", "lr_mult: 0.5"):
        assert needle in text, needle
    assert "\n" in text and len(text) < 2000
    assert "(2, 3)" in repr(p) and "float32" in repr(p)
    assert opt.backend == backend
