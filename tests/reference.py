"""An independent float64 implementation of the SGD semantics, written without the IR.

Plain numpy, one tensor at a time, term by term as the semantics page states them:

    g = scale * g
    if clip_norm > 0 and ||g|| > clip_norm:  g = g * (clip_norm / ||g||)     (per tensor)
    if weight_decay * decay_mult > 0:        g = g + weight_decay * decay_mult * p
    if momentum > 0:  b = g on the tensor's first step, else momentum * b + (1 - dampening) * g
    p = p - lr * lr_mult * (g | b | g + momentum * b)     (vanilla | momentum | nesterov)

Tests compare a backend with this, within the tolerances of the semantics page (see
`assert_matches`). The reference also records, per tensor, the largest magnitude of the terms it
combined: rounding errors in a lower precision are proportional to those magnitudes, not to the
result, so they give the absolute part of a tolerance for elements that end up near zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReferenceSGD:
    """One parameter group of SGD in float64.

    `params[i]` and `buffers[i]` (None until the tensor's first step with momentum) are float64
    arrays; tests may overwrite them between steps (for example with a backend's current values).
    """

    params: list[np.ndarray]
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    scale: float = 1.0
    clip_norm: float = 0.0
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    buffers: list[np.ndarray | None] = field(default_factory=list)
    param_scale: list[float] = field(default_factory=list)
    buffer_scale: list[float] = field(default_factory=list)
    # per element, of the last step: the largest magnitude among the parameter, the update and
    # every term of the update (times lr_eff)
    magnitude: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = [np.array(p, dtype=np.float64) for p in self.params]
        self.buffers = [None] * len(self.params)
        self.param_scale = [_maxabs(p) for p in self.params]
        self.buffer_scale = [0.0] * len(self.params)
        self.magnitude = [np.abs(p) for p in self.params]

    def load(self, params: Sequence[np.ndarray], buffers: Sequence[np.ndarray | None]) -> None:
        """Continue from these values (a buffer None: that tensor's next step is its first)."""
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.buffers = [None if b is None else np.array(b, dtype=np.float64) for b in buffers]
        self.param_scale = [_maxabs(p) for p in self.params]
        self.buffer_scale = [0.0 if b is None else _maxabs(b) for b in self.buffers]
        self.magnitude = [np.abs(p) for p in self.params]

    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        """One step; `grads[i]` None means parameter i has no gradient and is skipped."""
        assert len(grads) == len(self.params)
        for i, grad in enumerate(grads):
            if grad is not None:
                with np.errstate(all="ignore"):  # non-finite gradients propagate
                    self._update(i, np.asarray(grad, dtype=np.float64))

    def _update(self, i: int, g: np.ndarray) -> None:
        p, b = self.params[i], self.buffers[i]
        lr_eff = self.lr * self.lr_mult
        wd_eff = self.weight_decay * self.decay_mult
        mu = self.momentum
        terms = []  # every intermediate the update combines, for the tolerance scales

        g = self.scale * g
        if self.clip_norm > 0:
            norm = np.sqrt(np.sum(g * g, dtype=np.float64))
            if norm > self.clip_norm:
                g = g * (self.clip_norm / norm)
        if wd_eff > 0:
            terms += [g, wd_eff * p]
            g = g + wd_eff * p
        terms.append(g)
        if mu > 0:
            if b is None:
                b = g.copy()
            else:
                terms.append(mu * b)
                b = mu * b + (1.0 - self.dampening) * g
            terms.append(b)
            self.buffers[i] = b
            self.buffer_scale[i] = max(self.buffer_scale[i], *map(_maxabs, terms))
            u = lr_eff * (g + mu * b) if self.nesterov else lr_eff * b
        else:
            u = lr_eff * g
        self.params[i] = p - u
        magnitude = np.maximum(np.abs(p), np.abs(u))
        for term in terms:
            magnitude = np.maximum(magnitude, lr_eff * np.abs(term))
        self.magnitude[i] = magnitude
        self.param_scale[i] = max(
            self.param_scale[i], lr_eff * max(map(_maxabs, terms)), _maxabs(u),
            _maxabs(self.params[i]),
        )


def _maxabs(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


# -- tolerances (semantics page, "Tolerances") ---------------------------------------------------
RTOL = {"float64": 1e-12, "float32": 1e-5}


def assert_matches(got: np.ndarray, ref: np.ndarray, scale: float, what: str) -> None:
    """`got` (float32 or float64) equals the float64 `ref` within the relative tolerance.

    The absolute part is the same relative tolerance times `scale`, the largest magnitude of the
    terms this tensor's trajectory combined: an element that ends near zero through cancellation
    carries rounding errors of the size of those terms, not of itself.
    """
    name = np.dtype(got.dtype).name
    rtol = RTOL[name]
    assert got.shape == ref.shape, what
    np.testing.assert_allclose(
        got.astype(np.float64), ref, rtol=rtol, atol=rtol * max(scale, 1e-30), err_msg=what
    )


def assert_within_one_ulp(
    got: np.ndarray, ref: np.ndarray, what: str, magnitude: np.ndarray | None = None
) -> None:
    """A half-precision `got` is within one unit in the last place of `ref` rounded to its type.

    `magnitude` (per element: the largest term the step combined) adds the rounding error of the
    float32 compute type, a few float32 ulps of that magnitude. It matters only where p - u
    cancels to far below its terms; float16 never needs it for updates well below 1 (its
    subnormal spacing, 6e-8, exceeds that error), bfloat16 does (it has float32's exponent
    range, so its ulp near zero is tiny).
    """
    ref_rounded = ref.astype(got.dtype)
    ulp = np.abs(np.spacing(ref_rounded)).astype(np.float64)
    if magnitude is not None:
        ulp = ulp + 8 * float(np.finfo(np.float32).eps) / 2 * magnitude
    err = np.abs(got.astype(np.float64) - ref_rounded.astype(np.float64))
    both_nan = np.isnan(got.astype(np.float64)) & np.isnan(ref)
    bad = ~((err <= ulp) | both_nan)
    if bad.any():
        idx = np.argwhere(bad)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ by more than one ulp, "
            f"first at {idx}: got {got[bad][:5]}, reference {ref[bad][:5]}"
        )
