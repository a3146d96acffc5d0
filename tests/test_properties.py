"""Property tests: random shapes (empty ones included), dtypes and hyperparameters; stepjit
against the float64 reference of the semantics, within its tolerances."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trajectory import Setup, run_and_compare

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    # `backend` is a plain string: sharing it between examples is harmless
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([np.float16, np.float32, np.float64, ml_dtypes.bfloat16])


@st.composite
def hyperparameters(draw, dtype):
    half = np.dtype(dtype).itemsize == 2
    nesterov = draw(st.booleans())
    momentum = draw(st.floats(0.05, 0.95) if nesterov else st.sampled_from([0.0, 0.5, 0.9]))
    dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.3, 1.0]))
    # Half types are checked to one ulp per step while computing in float32: keep each update
    # small next to the parameter (learning rate times buffer well below 1), so that float32
    # rounding of the update stays far below a half-precision ulp even where p - u cancels.
    # (a learning rate below float32's smallest normal number is refused: see test_reliability)
    lr = draw(st.just(0.0) | st.floats(1e-30, 0.05 if half else 1.0))
    return dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=draw(st.sampled_from([0.0, 1e-4, 1e-2, 0.1])),
        scale=draw(st.sampled_from([1.0, 0.5, 2.0, 1e-3])),
        clip_norm=draw(st.sampled_from([0.0, 1e-3, 0.5, 5.0, 1e6])),
    )


@st.composite
def setups(draw):
    dtype = draw(dtypes)
    n_groups = draw(st.integers(1, 2))
    group_shapes = [draw(st.lists(shapes, min_size=1, max_size=3)) for _ in range(n_groups)]
    overrides = [{}] + [
        {"lr_mult": draw(st.sampled_from([0.0, 0.5, 2.0])),
         "decay_mult": draw(st.sampled_from([0.0, 1.0, 3.0]))}
        for _ in range(n_groups - 1)
    ]
    steps = draw(st.integers(1, 6))
    holes = draw(st.sets(st.tuples(st.integers(0, steps - 1), st.integers(0, n_groups - 1),
                                   st.integers(0, 2)), max_size=4))
    return Setup(
        **draw(hyperparameters(dtype)),
        groups=overrides,
        shapes=group_shapes,
        dtype=dtype,
        steps=steps,
        missing=lambda t, gi, i: (t, gi, i) in holes,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@PROPERTY_SETTINGS
@given(setup=setups())
def test_sgd_matches_reference(backend, setup):
    run_and_compare(backend, setup)


@PROPERTY_SETTINGS
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    grad_dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    shape=shapes,
    hyper=hyperparameters(np.float32),
    seed=st.integers(0, 2**32 - 1),
)
def test_sgd_matches_reference_with_other_gradient_dtypes(
    backend, dtype, grad_dtype, shape, hyper, seed
):
    setup = Setup(**hyper, shapes=[[shape, (5,)]], dtype=dtype, grad_dtype=grad_dtype, steps=4,
                  seed=seed)
    run_and_compare(backend, setup)
