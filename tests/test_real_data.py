"""Compact state and bfloat16 parameters on real data, against float32 storage.

Three models, each trained by `stepjit.torch.AdamW` from one seeded initialization on fixed
batches (CPU, one torch thread, so every run is deterministic); what is compared is the final
training loss of each storage choice against float32 storage:
  - sklearn's handwritten digits (1797 8x8 images), full batch: a small MLP (64-64-10, tanh)
    and a small CNN (3x3 conv to 8 channels, relu, 2x2 max-pool, linear to 10 classes);
  - a character-level language model of the standard library's own source (textwrap.py,
    string.py and argparse.py, about 130k characters): an embedding of 32 per character, the
    8 previous characters concatenated, one tanh layer of 128 and a softmax over the characters,
    trained on 256-window minibatches and scored on every window of the text.
"""

from __future__ import annotations

import functools
import inspect

import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (the test extra) "
                                                          "bundles the digits")

import stepjit.torch as st  # noqa: E402

COMPACT = ["bfloat16", "int8"]
"""The compact `state_dtype`s, each checked against float32 state."""

nn = torch.nn
F = torch.nn.functional


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the same sums in the same order on every run, and no oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = datasets.load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


CONTEXT = 8  # characters the language model sees before the one it predicts


@functools.cache
def stdlib_text() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor,
                                                                         torch.Tensor], int]:
    """(500 fixed minibatches of 256 windows, every window of the text, the vocabulary size)."""
    import argparse
    import string
    import textwrap
    try:
        text = "".join(inspect.getsource(m) for m in (textwrap, string, argparse))
    except OSError:  # an install that ships bytecode only
        pytest.skip("the standard library's sources are not installed")
    vocabulary = {c: i for i, c in enumerate(sorted(set(text)))}
    codes = torch.tensor([vocabulary[c] for c in text])
    starts = torch.arange(len(codes) - CONTEXT)

    def windows(at):
        return codes[at[..., None] + torch.arange(CONTEXT)], codes[at + CONTEXT]

    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(0))
    batches = [windows(at) for at in order[:500 * 256].reshape(500, 256)]
    return batches, windows(starts), len(vocabulary)


def train(model: nn.Module, batches, steps: int, lr: float, whole, dtype, weight_decay=0.0,
          **storage) -> tuple[float, float]:
    """(loss before, loss after) on `whole` of `model` cast to `dtype` and trained `steps` steps
    by AdamW with `storage` options, cycling through `batches`."""
    model = model.to(dtype)
    opt = st.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **storage)

    def loss(inputs, targets):
        if inputs.is_floating_point():
            inputs = inputs.to(dtype)
        return F.cross_entropy(model(inputs).float(), targets)

    with torch.no_grad():
        before = float(loss(*whole))
    for i in range(steps):
        opt.zero_grad()
        loss(*batches[i % len(batches)]).backward()
        opt.step()
    with torch.no_grad():
        return before, float(loss(*whole))


@functools.cache
def mlp(dtype=torch.float32, **storage) -> tuple[float, float]:
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return train(model, [(x, y)], 300, 1e-3, (x, y), dtype, **storage)


@functools.cache
def cnn(dtype=torch.float32, **storage) -> tuple[float, float]:
    x, y = digits()
    images = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 10))
    # 200 full-batch steps take the loss from 2.300 to 0.150 (bfloat16 state: 0.1495), far enough
    # from 0, where a 2% margin would be a margin on noise
    return train(model, [(images, y)], 200, 3e-3, (images, y), dtype, weight_decay=1e-2,
                 **storage)


@functools.cache
def char_lm(dtype=torch.float32, **storage) -> tuple[float, float]:
    batches, whole, vocabulary = stdlib_text()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocabulary, 32), nn.Flatten(),
                          nn.Linear(32 * CONTEXT, 128), nn.Tanh(), nn.Linear(128, vocabulary))
    # 1000 steps (two passes over the 500 batches) at lr = 5e-4; measured with CPython 3.11.7:
    # 4.558 before, float32 1.622, bfloat16 state 1.628 (+0.4%), bfloat16 parameters with stochastic
    # rounding 1.622, with a master copy 1.622, rounded to nearest 1.825
    return train(model, batches, 1000, 5e-4, whole, dtype, weight_decay=1e-2, **storage)


def test_bfloat16_parameters_need_stochastic_rounding_or_a_master_copy():
    full = mlp()[1]
    nearest = mlp(torch.bfloat16)[1]
    stochastic = mlp(torch.bfloat16, stochastic_rounding=True)[1]
    master = mlp(torch.bfloat16, master_weights=True)[1]
    # AdamW's steps of about lr = 1e-3 are below half the spacing of most weights in bfloat16:
    # rounded to nearest they are lost, and the loss ends far above float32's
    assert nearest > 1.2 * full
    assert abs(stochastic - full) <= 0.02 * full
    assert abs(master - full) <= 0.02 * full


@pytest.mark.parametrize("state_dtype", COMPACT)
def test_compact_state_ends_within_two_percent_of_float32_state(state_dtype):
    full = mlp()[1]
    compact = mlp(state_dtype=state_dtype)[1]
    assert abs(compact - full) <= 0.02 * full


@pytest.mark.parametrize("state_dtype", COMPACT)
def test_cnn_compact_state_ends_within_two_percent_of_float32_state(state_dtype):
    before, full = cnn()
    assert full < 0.7 * before  # it learned: the margin below is on a trained model
    compact = cnn(state_dtype=state_dtype)[1]
    assert abs(compact - full) <= 0.02 * full


@pytest.mark.parametrize("state_dtype", COMPACT)
def test_char_lm_compact_state_ends_within_two_percent_of_float32_state(state_dtype):
    before, full = char_lm()
    assert full < 0.7 * before
    compact = char_lm(state_dtype=state_dtype)[1]
    assert abs(compact - full) <= 0.02 * full


def test_char_lm_bfloat16_parameters_need_stochastic_rounding_or_a_master_copy():
    before, full = char_lm()
    assert full < 0.7 * before
    nearest = char_lm(torch.bfloat16)[1]
    stochastic = char_lm(torch.bfloat16, stochastic_rounding=True)[1]
    master = char_lm(torch.bfloat16, master_weights=True)[1]
    # rounded to nearest, the embedding's updates (weights of order 1, whose half-spacing in
    # bfloat16 is 2^-9 or more, against steps of about 5e-4) and many of the layers' are lost:
    # measured 1.825 against 1.622 (+12.5%); 5% leaves room for other versions of the text
    # while staying far above the 0.02% by which stochastic rounding and the master copy differ
    assert nearest > 1.05 * full
    assert abs(stochastic - full) <= 0.02 * full
    assert abs(master - full) <= 0.02 * full
