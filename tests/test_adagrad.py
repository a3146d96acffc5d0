"""Adagrad: what the table-driven tests (test_family.py) do not cover."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import stepjit
from stepjit.optim import Adagrad, adagrad

torch = pytest.importorskip("torch")


def test_the_accumulator_starts_at_its_initial_value(backend):
    p = stepjit.Parameter(np.ones(3))
    p.grad = np.array([1.0, 2.0, 0.0])
    opt = Adagrad([p], lr=0.1, initial_accumulator_value=0.25, eps=0.0, backend=backend)
    opt.step()
    np.testing.assert_array_equal(opt.state[p]["sum"], [1.25, 4.25, 0.25])
    np.testing.assert_allclose(p.data, 1 - 0.1 * p.grad / np.sqrt([1.25, 4.25, 0.25]))


def test_torch_checkpoint_continues_like_torch(backend):
    """lr_decay uses each tensor's own step count, loaded from torch's `step`."""
    rng = np.random.default_rng(4)
    init = rng.standard_normal((6, 2))
    q = torch.nn.Parameter(torch.from_numpy(init.copy()))
    hyper = dict(lr=0.05, lr_decay=0.3, initial_accumulator_value=0.1, weight_decay=0.01)
    ref = torch.optim.Adagrad([q], **hyper, foreach=False)
    for _ in range(3):
        q.grad = torch.from_numpy(rng.standard_normal(init.shape))
        ref.step()
    p = stepjit.Parameter(q.detach().numpy().copy())
    opt = Adagrad([p], **hyper, backend=backend)
    opt.load_state_dict(ref.state_dict())
    for _ in range(3):
        g = rng.standard_normal(init.shape)
        p.grad, q.grad = g, torch.from_numpy(g.copy())
        opt.step()
        ref.step()
    np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state[p]["sum"], ref.state[q]["sum"].numpy(), rtol=1e-12)
    assert int(opt.state[p]["step"]) == 6


def test_docstring_example_runs():
    failures, tried = doctest.testmod(adagrad, raise_on_error=False, verbose=False)
    assert tried > 0 and failures == 0
