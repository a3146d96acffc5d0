"""A torch training step (forward, backward, optimizer) with stepjit.torch.SGD beside
torch.optim.SGD in its for-loop, foreach and fused forms, on the CPU. Interleaved medians.

    python tools/bench_torch.py [--reps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import stepjit.torch


def make_model(width: int = 1024, depth: int = 6) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Linear(256, width), torch.nn.ReLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = make_model()
    n_params = sum(p.numel() for p in base.parameters())
    n_tensors = len(list(base.parameters()))
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    kw = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
    makers = {
        "torch for-loop": lambda ps: torch.optim.SGD(ps, foreach=False, **kw),
        "torch foreach": lambda ps: torch.optim.SGD(ps, foreach=True, **kw),
        "torch fused": lambda ps: torch.optim.SGD(ps, fused=True, **kw),
        "stepjit": lambda ps: stepjit.torch.SGD(ps, **kw),
    }
    runs = {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        runs[name] = (model, make(model.parameters()))

    def train_step(model, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    samples = {name: {"train": [], "optimizer": []} for name in runs}
    for _ in range(args.reps):
        for name, (model, opt) in runs.items():
            train_step(model, opt)  # untimed warm-up of this competitor
            t0 = time.perf_counter()
            train_step(model, opt)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            samples[name]["train"].append(t1 - t0)
            samples[name]["optimizer"].append(t2 - t1)
    result = {name: {k: 1e3 * statistics.median(v) for k, v in s.items()}
              for name, s in samples.items()}
    print(f"MLP: {n_tensors} tensors, {n_params / 1e6:.1f}M parameters, batch 64, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'optimizer':<16} {'train step ms':>14} {'optimizer.step ms':>18}")
    for name, r in result.items():
        print(f"{name:<16} {r['train']:14.3f} {r['optimizer']:18.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tensors=n_tensors, params=n_params, ms=result), f, indent=2)


if __name__ == "__main__":
    main()
