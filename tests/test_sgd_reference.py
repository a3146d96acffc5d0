"""A table of SGD configurations, each stepped against the float64 reference of the semantics.

Every case: two parameter groups (the second with its own learning rate, and in half the cases
lr_mult=0.5, decay_mult=2), five tensors of different shapes (including empty, one element and an
odd size), ten steps with the learning rate changed before every step, and gradients missing for
some tensors on some steps. The full product of update terms runs in float32; float64 and the half
types run a slice of it.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from trajectory import Setup, run_and_compare

SHAPES = [(3, 5, 2), (7,), (1,), (1001,), (0,)]
LAYOUT = (SHAPES[:3], SHAPES[3:])  # group 0, group 1
MULTS = {"default_mult": {}, "mult": {"lr_mult": 0.5, "decay_mult": 2.0}}
KINDS = {
    "vanilla": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
}
CLIPS = {"noclip": 0.0, "clipped": 0.05, "clip_not_reached": 1e6}


def missing(t: int, gi: int, i: int) -> bool:
    """Group 0's (7,) tensor has no gradient on steps 0, 4, 7 (so its first step is step 1);
    group 1's (1001,) tensor has none on step 5."""
    return (gi, i) == (0, 1) and t in (0, 4, 7) or (gi, i) == (1, 0) and t == 5


def _configs():
    for kind, damp, wd, scale, clip, mult in itertools.product(
        KINDS, (0.0, 0.3), (0.0, 1e-2), (1.0, 0.5), CLIPS, MULTS
    ):
        if kind == "nesterov" and damp:
            continue
        cfg = dict(
            **KINDS[kind], dampening=damp, weight_decay=wd, scale=scale, clip_norm=CLIPS[clip]
        )
        name = f"{kind}-d{damp}-wd{wd}-s{scale}-{clip}-{mult}"
        yield pytest.param(cfg, MULTS[mult], id=name)


CONFIGS = list(_configs())


def _slice(every: int, offset: int = 0) -> list:
    """Every `every`-th configuration: a deterministic slice that still covers every term."""
    return CONFIGS[offset::every]


def _setup(cfg: dict, mult: dict, dtype, seed: int) -> Setup:
    return Setup(
        **cfg, groups=({}, mult), shapes=LAYOUT, dtype=dtype, missing=missing, seed=seed
    )


def test_table_covers_every_term():
    ids = [c.id for c in CONFIGS]
    assert len(ids) == len(set(ids)) == 5 * 2 * 2 * 3 * 2
    for sl in (_slice(5), _slice(7, 3), _slice(11, 5)):
        names = " ".join(c.id for c in sl)
        for term in (*KINDS, "d0.3", "wd0.01", "s0.5", *CLIPS, *MULTS):
            assert term in names, term


@pytest.mark.parametrize("cfg, mult", CONFIGS)
def test_float32(backend, cfg, mult):
    run_and_compare(backend, _setup(cfg, mult, np.float32, seed=1))


@pytest.mark.parametrize("cfg, mult", _slice(5))
def test_float64(backend, cfg, mult):
    run_and_compare(backend, _setup(cfg, mult, np.float64, seed=2))


@pytest.mark.parametrize("cfg, mult", _slice(7, 3))
def test_float16_per_step(backend, cfg, mult):
    opt = run_and_compare(backend, _setup(cfg, mult, np.float16, seed=3))
    for st in opt.state.values():
        for buf in st.values():
            assert buf.dtype == np.float32  # half params keep float32 state


@pytest.mark.parametrize("cfg, mult", _slice(11, 5))
def test_bfloat16_per_step(backend, cfg, mult):
    run_and_compare(backend, _setup(cfg, mult, ml_dtypes.bfloat16, seed=4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2, scale=0.5, clip_norm=0.05),
        dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, clip_norm=1e6),
    ],
    ids=["nesterov-clipped", "momentum-damped"],
)
def test_single_tensor(backend, cfg, shape, dtype):
    """One tensor alone in its group (an empty one: a group with nothing to compute); on steps
    2 and 3 the group has no gradient at all."""
    setup = Setup(
        **cfg, shapes=[[shape]], dtype=dtype, missing=lambda t, gi, i: t in (2, 3), seed=5
    )
    run_and_compare(backend, setup)


@pytest.mark.parametrize("dtype, grad_dtype", [
    (np.float32, np.float16), (np.float32, np.float64), (np.float64, np.float32),
    (np.float16, np.float32),
])
def test_gradient_of_another_float_dtype(backend, dtype, grad_dtype):
    """A gradient is converted to the compute type first, whatever float type it has."""
    setup = Setup(
        momentum=0.9, weight_decay=1e-2, clip_norm=0.5, shapes=[[(33,), (4, 4)]], dtype=dtype,
        grad_dtype=grad_dtype, seed=6,
    )
    run_and_compare(backend, setup)
