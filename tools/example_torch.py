"""A small torch model trained on synthetic data with `stepjit.torch.SGD`, step for step beside
`torch.optim.SGD`: the losses and the parameters agree.

    python tools/example_torch.py [--steps N]
"""

from __future__ import annotations

import argparse
import copy

import torch

import stepjit.torch


def make_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def train(steps: int = 50, batch: int = 64) -> list[tuple[float, float, float]]:
    """(loss with torch.optim.SGD, loss with stepjit.torch.SGD, max |param difference|) per step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    reference = torch.optim.SGD(model.parameters(), **kw)
    ours = stepjit.torch.SGD(twin.parameters(), **kw)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in (reference, ours)]
    x, y = make_data()
    history = []
    for step in range(steps):
        idx = slice((step * batch) % len(x), (step * batch) % len(x) + batch)
        losses = []
        for net, opt, sched in zip((model, twin), (reference, ours), schedules):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(),
                                                                twin.parameters()))
        history.append((losses[0], losses[1], diff))
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description="stepjit.torch.SGD against torch.optim.SGD")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    for step, (a, b, diff) in enumerate(train(args.steps)):
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss torch {a:.6f}  stepjit {b:.6f}  max |dparam| {diff:.2e}")


if __name__ == "__main__":
    main()
