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


def test_docstring_example_runs():
    failures, tried = doctest.testmod(adagrad, raise_on_error=False, verbose=False)
    assert tried > 0 and failures == 0
