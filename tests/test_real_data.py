"""Compact state and bfloat16 parameters on real data: sklearn's handwritten digits.

A small MLP (64-64-10, tanh) trained full-batch by `stepjit.torch.AdamW` for 300 steps from the
same initialization; the final training loss of each storage choice against float32.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (the test extra) "
                                                          "bundles the digits")

import stepjit.torch as st  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    x, y = datasets.load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def final_loss(digits, dtype, **storage) -> float:
    x, y = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 10)).to(dtype)
    opt = st.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, **storage)
    inputs = x.to(dtype)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs).float(), y).backward()
        opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(inputs).float(), y))


def test_bfloat16_parameters_need_stochastic_rounding_or_a_master_copy(digits):
    full = final_loss(digits, torch.float32)
    nearest = final_loss(digits, torch.bfloat16)
    stochastic = final_loss(digits, torch.bfloat16, stochastic_rounding=True)
    master = final_loss(digits, torch.bfloat16, master_weights=True)
    # AdamW's steps of about lr = 1e-3 are below half the spacing of most weights in bfloat16:
    # rounded to nearest they are lost, and the loss ends far above float32's
    assert nearest > 1.2 * full
    assert abs(stochastic - full) <= 0.02 * full
    assert abs(master - full) <= 0.02 * full


def test_bfloat16_state_ends_within_two_percent_of_float32_state(digits):
    full = final_loss(digits, torch.float32)
    compact = final_loss(digits, torch.float32, state_dtype="bfloat16")
    assert abs(compact - full) <= 0.02 * full
