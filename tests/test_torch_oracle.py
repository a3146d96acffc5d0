"""torch.optim.SGD as an outside oracle: with scale=1 and clip_norm=0, fed the same gradients,
the parameters and momentum buffers follow torch's, for a learning rate changed every step."""

from __future__ import annotations

import numpy as np
import pytest

import stepjit

torch = pytest.importorskip("torch")

SHAPES = [(3, 5, 2), (7,), (1,), (1001,), (0,)]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
CASES = [
    pytest.param(dict(momentum=0.0), id="vanilla"),
    pytest.param(dict(momentum=0.0, weight_decay=1e-2), id="vanilla-decay"),
    pytest.param(dict(momentum=0.9), id="momentum"),
    pytest.param(dict(momentum=0.9, dampening=0.3, weight_decay=1e-2), id="momentum-damped-decay"),
    pytest.param(dict(momentum=0.5, dampening=1.0), id="momentum-fully-damped"),
    pytest.param(dict(momentum=0.9, nesterov=True), id="nesterov"),
    pytest.param(dict(momentum=0.9, nesterov=True, weight_decay=1e-2), id="nesterov-decay"),
]


def _close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    # Inputs are O(1) (standard normal parameters and gradients, no scaling or clipping), so the
    # rounding error of an element is about rtol times that scale even when the element itself
    # ends up near zero through cancellation: the absolute tolerance is rtol times the largest
    # magnitude in the tensor (at least 1).
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("hyper", CASES)
def test_matches_torch_sgd(backend, hyper, dtype):
    rng = np.random.default_rng(7)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    mine = [stepjit.Parameter(a.copy()) for a in init]
    theirs = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    # a second group with multipliers: torch has none, so it gets lr * lr_mult and
    # weight_decay * decay_mult directly
    mult = {"lr_mult": 0.5, "decay_mult": 2.0}
    opt = stepjit.optim.SGD(
        [{"params": mine[:3]}, {"params": mine[3:], **mult}], lr=0.1, **hyper, backend=backend
    )
    wd = hyper.get("weight_decay", 0.0)
    ref = torch.optim.SGD(
        [{"params": theirs[:3]}, {"params": theirs[3:], "weight_decay": wd * 2.0}],
        lr=0.1, foreach=False, **hyper,
    )
    for t in range(12):
        lr = 0.1 * (1.0 + 0.5 * np.cos(0.9 * t))
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
        ref.param_groups[0]["lr"] = lr
        ref.param_groups[1]["lr"] = lr * 0.5
        for i, (p, q) in enumerate(zip(mine, theirs)):
            if i == 1 and t in (0, 3, 8):  # no gradient this step: both optimizers skip it
                p.grad, q.grad = None, None
                continue
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad, q.grad = g, torch.from_numpy(g.copy())
        opt.step()
        ref.step()

    rtol = RTOL[dtype]
    for i, (p, q) in enumerate(zip(mine, theirs)):
        what = f"parameter {i} {p.shape}"
        assert p.data.dtype == dtype
        _close(p.data, q.detach().numpy(), rtol, what)
        theirs_buf = ref.state[q].get("momentum_buffer") if q in ref.state else None
        mine_buf = opt.state.get(p, {}).get("momentum_buffer")
        if theirs_buf is None:
            assert mine_buf is None, what
        else:
            assert mine_buf is not None, what
            _close(mine_buf, theirs_buf.numpy(), rtol, what + " momentum_buffer")


@pytest.mark.parametrize("hyper", CASES[2:])
def test_momentum_changed_every_step_matches_torch(backend, hyper):
    """momentum (nonzero to nonzero) and dampening edited between steps, as a schedule would."""
    rng = np.random.default_rng(8)
    init = rng.standard_normal(64)
    p = stepjit.Parameter(init.copy())
    q = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = stepjit.optim.SGD([p], lr=0.05, **hyper, backend=backend)
    ref = torch.optim.SGD([q], lr=0.05, foreach=False, **hyper)
    for t in range(10):
        mu = 0.5 + 0.4 * np.sin(t) ** 2
        for group in (opt.param_groups[0], ref.param_groups[0]):
            group["momentum"] = mu
            group["lr"] = 0.05 + 0.01 * t
        g = rng.standard_normal(64)
        p.grad, q.grad = g, torch.from_numpy(g.copy())
        opt.step()
        ref.step()
    _close(p.data, q.detach().numpy(), 1e-12, "parameter")
    _close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"].numpy(), 1e-12,
           "momentum_buffer")
