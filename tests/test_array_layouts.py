"""Arrays the kernels cannot take as they are: a clear error, nothing modified, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

import stepjit


def _snapshot(params):
    return [(p.data.copy(), None if p.grad is None else p.grad.copy()) for p in params]


def _assert_unchanged(params, snap):
    for p, (data, grad) in zip(params, snap):
        np.testing.assert_array_equal(p.data, data)
        if grad is not None:
            np.testing.assert_array_equal(p.grad, grad)


def test_a_parameter_with_gaps_is_refused(backend):
    good = stepjit.Parameter(np.ones(4, np.float32))
    good.grad = np.ones(4, np.float32)
    p = stepjit.Parameter(np.ones((4, 6), np.float32)[:, ::2])
    p.grad = np.ones((4, 3), np.float32)
    opt = stepjit.optim.SGD([good, p], lr=0.1, backend=backend)
    snap = _snapshot([good, p])
    with pytest.raises(ValueError, match=r"parameter 1: parameter has gaps or overlaps in memory "
                                         r"\(strides \(6, 2\)\); pass a dense array"):
        opt.step()
    _assert_unchanged([good, p], snap)


def test_a_gradient_laid_out_unlike_its_parameter_is_refused(backend):
    p = stepjit.Parameter(np.ones((3, 4), np.float64))
    p.grad = np.ones((4, 3), np.float64).T
    opt = stepjit.optim.SGD([p], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"gradient is laid out differently from the parameter "
                                         r"\(strides \(1, 3\), the parameter's \(4, 1\)\)"):
        opt.step()
    np.testing.assert_array_equal(p.data, 1.0)


@pytest.mark.parametrize("order", [(1, 0, 2), (2, 0, 1), (0, 2, 1)])
def test_dense_layouts_update_in_place_with_state_in_the_same_layout(backend, order):
    """A transposed view of a contiguous array (any order of its dimensions) is updated where it
    lies, its momentum laid out the same way, matching the same update on C-ordered copies."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 4, 5))
    data = base.transpose(order)
    assert not data.flags.c_contiguous and data.base is base
    p = stepjit.Parameter(data)
    c = stepjit.Parameter(np.ascontiguousarray(data))
    opt = stepjit.optim.SGD([p], lr=0.1, momentum=0.9, backend=backend)
    ref = stepjit.optim.SGD([c], lr=0.1, momentum=0.9, backend=backend)
    for _ in range(3):
        g = rng.standard_normal(base.shape).transpose(order)
        p.grad, c.grad = g, np.ascontiguousarray(g)
        opt.step()
        ref.step()
    assert p.data.base is base  # updated in place, never copied
    np.testing.assert_array_equal(p.data, c.data)
    buf = opt.state[p]["momentum_buffer"]
    assert buf.strides == data.strides
    np.testing.assert_array_equal(buf, ref.state[c]["momentum_buffer"])


def test_unaligned_array_is_refused(backend):
    raw = np.zeros(4 * 100 + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, dtype=np.float32, count=100, offset=1)
    assert not unaligned.flags.aligned
    p = stepjit.Parameter(np.ones(100, np.float32))
    p.grad = unaligned
    opt = stepjit.optim.SGD([p], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="gradient is not aligned"):
        opt.step()
    np.testing.assert_array_equal(p.data, 1.0)


def test_overlapping_parameters_are_refused(backend):
    base = np.zeros(10, np.float32)
    a, b = stepjit.Parameter(base[:6]), stepjit.Parameter(base[4:])
    a.grad, b.grad = np.ones(6, np.float32), np.ones(6, np.float32)
    opt = stepjit.optim.SGD([a, b], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="parameter 0 and .*parameter 1 overlap"):
        opt.step()
    np.testing.assert_array_equal(base, 0.0)


def test_adjacent_views_are_fine(backend):
    base = np.zeros(10, np.float32)
    a, b = stepjit.Parameter(base[:5]), stepjit.Parameter(base[5:])
    a.grad, b.grad = np.ones(5, np.float32), np.full(5, 2.0, np.float32)
    stepjit.optim.SGD([a, b], lr=0.5, backend=backend).step()
    np.testing.assert_array_equal(base, [-0.5] * 5 + [-1.0] * 5)


def test_empty_parameters_step(backend):
    e = stepjit.Parameter(np.zeros((0, 3), np.float32))
    e.grad = np.zeros((0, 3), np.float32)
    x = stepjit.Parameter(np.ones(2, np.float32))
    x.grad = np.ones(2, np.float32)
    opt = stepjit.optim.SGD([e, x], lr=0.5, momentum=0.9, clip_norm=1.0, backend=backend)
    opt.step()
    assert opt.state[e]["momentum_buffer"].shape == (0, 3)
    np.testing.assert_allclose(x.data, 1 - 0.5 / np.sqrt(2), rtol=1e-6)


def test_in_place_edits_keep_the_table(backend):
    """`p.grad[...] = g` and `p.data -= x` reuse the cached table and still see the new values."""
    p = stepjit.Parameter(np.zeros(3, np.float32))
    p.grad = np.ones(3, np.float32)
    opt = stepjit.optim.SGD([p], lr=1.0, backend=backend)
    opt.step()
    plan = opt._plans[("step", 0)]
    p.grad[...] = 2.0
    p.grad += 1.0
    p.data -= 10.0
    opt.step()
    assert opt._plans[("step", 0)] is plan
    np.testing.assert_array_equal(p.data, -14.0)


def test_a_new_gradient_array_is_picked_up(backend):
    p = stepjit.Parameter(np.zeros(3, np.float32))
    opt = stepjit.optim.SGD([p], lr=1.0, backend=backend)
    for k in range(1, 4):
        p.grad = np.full(3, float(k), np.float32)
        opt.step()
    np.testing.assert_array_equal(p.data, -6.0)


def test_data_moved_to_another_device_is_named(backend):
    """A parameter whose data leaves the optimizer's device: a clear error before any write."""

    a, b = stepjit.Parameter(np.ones(3, np.float32)), stepjit.Parameter(np.ones(3, np.float32))
    a.grad, b.grad = np.ones(3, np.float32), np.ones(3, np.float32)
    opt = stepjit.optim.SGD([a, b], lr=0.1, momentum=0.9, backend=backend)
    opt._device = "cuda:0"  # as if b had been created on a GPU and a moved to the host
    with pytest.raises(ValueError, match="parameter 0: parameter is on cpu, but the optimizer "
                                         "runs on cuda:0"):
        opt.step()
    assert opt.state == {}
