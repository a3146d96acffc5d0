"""stepjit's torch optimizers inside real CPU training loops, beside torch's own optimizers.

    python tools/bench_torch.py             # all models and optimizers: ~1 min on 2 idle cores
    python tools/bench_torch.py --quick     # a smoke run: seconds
    python tools/bench_torch.py --models cnn,mlp,transformer --optims sgd,adamw --reps 30 \
        --json out.json                     # --budget SECONDS caps a loaded machine's run

Models (float32, torch's default threads, dropout off): a small CNN on 28x28 images (per-step
overhead dominates), the 4.5M-parameter MLP (bandwidth dominates) and an 8-layer
nn.TransformerEncoder with ~100 parameter tensors. Optimizers: SGD (momentum 0.9, weight decay
1e-4) and AdamW (lr 1e-3, weight decay 1e-2), each as torch for-loop (foreach=False), torch
foreach, torch fused and stepjit.torch.SGD / stepjit.torch.AdamW.

Each competitor trains its own deepcopy of one model on the same batches; an iteration is
zero_grad() (set_to_none) -> forward -> backward -> step(), and both step() alone and the whole
iteration are timed. After untimed warm-up steps (stepjit compiles on its first), competitors run
round-robin in many short rounds (order rotated, one untimed step after each switch). Times are
medians of all timed steps; a ratio "x" is the median over rounds of that round's other/stepjit
(>1: stepjit faster), so a noisy machine slows all alike. Then stepjit's parameters are compared
with torch for-loop's after a few identical steps (fused's difference shows the rounding noise);
beyond tolerance the exit status is 1. A missing or failing stepjit class is "not available".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import stepjit
import stepjit.torch

OPTIMS = {  # name: (torch class, stepjit.torch class name, hyperparameters common to both)
    "sgd": (torch.optim.SGD, "SGD", dict(lr=0.01, momentum=0.9, weight_decay=1e-4)),
    "adamw": (torch.optim.AdamW, "AdamW", dict(lr=1e-3, weight_decay=1e-2)),
}
TORCH_VARIANTS = {"torch for-loop": dict(foreach=False), "torch foreach": dict(foreach=True),
                  "torch fused": dict(fused=True)}
CHECK_STEPS, CHECK_TOL = 5, {"sgd": 1e-5, "adamw": 1e-4}


def make_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                         *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def make_mlp(width: int = 1024, depth: int = 6) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=1000, d_model=128, nhead=4, layers=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


MODELS = {  # name: (constructor, input description, one batch of inputs)
    "cnn": (make_cnn, "batch 32 x 1x28x28", lambda: torch.randn(32, 1, 28, 28)),
    "mlp": (make_mlp, "batch 64 x 256", lambda: torch.randn(64, 256)),
    "transformer": (TransformerClassifier, "batch 8 x 32 tokens",
                    lambda: torch.randint(0, 1000, (8, 32))),
}


def make_optimizer(optim: str, competitor: str, params) -> torch.optim.Optimizer:
    torch_cls, stepjit_name, kw = OPTIMS[optim]
    if competitor == "stepjit":
        cls = getattr(stepjit.torch, stepjit_name, None)
        if cls is None:
            raise LookupError(f"stepjit.torch.{stepjit_name} does not exist")
        return cls(params, **kw)
    return torch_cls(params, **kw, **TORCH_VARIANTS[competitor])


def advance(run, data) -> tuple[float, float]:
    """One zero_grad -> forward -> backward -> step of a run on its next batch; seconds of
    (step alone, whole iteration)."""
    model, opt, k = run
    run[2] += 1
    x, y = data[k % len(data)]
    t0 = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return t2 - t1, t2 - t0


def cpu_marks() -> tuple[float, float, float]:
    """(wall clock, this process's CPU time, all processes' busy CPU time from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    except (OSError, ValueError):
        busy = float("nan")
    return time.perf_counter(), time.process_time(), busy


def others_share(marks: tuple) -> float:
    """The share of the CPUs other processes kept busy since `marks`: the noise on a run."""
    (w0, o0, b0), (w1, o1, b1) = marks, cpu_marks()
    return max(0.0, (b1 - b0 - (o1 - o0)) / ((w1 - w0) * os.cpu_count()))


def setup(base, optim, competitors, data, steps, unavailable) -> dict:
    """{competitor: [model copy, optimizer, steps taken]} after `steps` untimed steps each; a
    stepjit optimizer that is missing or fails is left out, and why goes into `unavailable`."""
    runs = {}
    for name in competitors:
        model = copy.deepcopy(base)
        try:
            runs[name] = [model, make_optimizer(optim, name, model.parameters()), 0]
            for _ in range(steps):
                advance(runs[name], data)
        except Exception as e:  # stepjit's classes are work in progress: say why, go on
            if name != "stepjit":
                raise
            runs.pop(name)
            unavailable[optim] = f"{type(e).__name__}: {e}"
    return runs


def bench_pair(base, data, optim, args, unavailable, seconds) -> dict:
    """Round-robin timing of every competitor on one (model, optimizer): `args.reps` rounds,
    fewer (at least 3) once `seconds` have passed. {competitor: medians and ratios}."""
    deadline = time.perf_counter() + seconds
    runs = setup(base, optim, [*TORCH_VARIANTS, "stepjit"], data, args.warmup, unavailable)
    names = list(runs)
    samples = {n: ([], []) for n in names}  # every timed (step, train)
    per_round = {n: ([], []) for n in names}  # each round's medians
    for r in range(args.reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            advance(runs[name], data)  # untimed: caches and allocator back to this model
            times = [advance(runs[name], data) for _ in range(args.steps)]
            for i in range(2):
                samples[name][i].extend(t[i] for t in times)
                per_round[name][i].append(statistics.median(t[i] for t in times))
        if r + 1 >= 3 and time.perf_counter() > deadline:
            break
    out = {n: dict(step=1e3 * statistics.median(s[0]), train=1e3 * statistics.median(s[1]),
                   rounds=r + 1) for n, s in samples.items()}
    if "stepjit" in runs:
        for i, key in enumerate(("step", "train")):
            out["stepjit"][f"best_{key}"] = min(TORCH_VARIANTS, key=lambda n: out[n][key])
            for n in TORCH_VARIANTS:
                ratios = [a / b for a, b in zip(per_round[n][i], per_round["stepjit"][i])]
                q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                out[n][f"x_{key}"], out[n][f"x_{key}_iqr"] = statistics.median(ratios), [q1, q3]
    return out


def check_pair(base, data, optim) -> dict:
    """max|param - for-loop param| after CHECK_STEPS identical steps, for stepjit and fused."""
    runs = setup(base, optim, ["torch for-loop", "torch fused", "stepjit"], data, CHECK_STEPS, {})
    ref = list(runs["torch for-loop"][0].parameters())

    def diff(name):
        return max((a - b).abs().max().item() for a, b in zip(runs[name][0].parameters(), ref))

    got = diff("stepjit") if "stepjit" in runs else None
    return dict(stepjit=got, fused=diff("torch fused"), tol=CHECK_TOL[optim],
                ok=None if got is None else got <= CHECK_TOL[optim])


def report(results: list, checks: list, unavailable: dict) -> None:
    print("\nmedians in ms; x = this/stepjit, median of per-round ratios (>1: stepjit faster)")
    print(f"{'model':<12}{'optim':<7}{'competitor':<16}{'step ms':>9}{'train ms':>10}"
          f"{'x step':>8}{'x train':>8}{'rounds':>7}")
    for r in results:
        xs = [f"{r[k]:.2f}" if k in r else "-" for k in ("x_step", "x_train")]
        print(f"{r['model']:<12}{r['optim']:<7}{r['competitor']:<16}{r['step']:9.3f}"
              f"{r['train']:10.3f}{xs[0]:>8}{xs[1]:>8}{r['rounds']:7d}")
    for optim, why in unavailable.items():
        print(f"stepjit {optim}: not available ({why})")

    print("\nstepjit speed-up (median of per-round ratios [quartiles]; >1: stepjit faster); "
          "others: CPU share other processes took meanwhile")
    print(f"{'model':<12}{'optim':<6}{'vs fused step':>20} {'vs fused train':>20} "
          f"{'vs best torch step':>29} {'vs best torch train':>29}{'others':>8}")
    by_key = {(r["model"], r["optim"], r["competitor"]): r for r in results}
    for (model, optim, comp), s in by_key.items():
        if comp != "stepjit":
            continue
        cells = []
        for vs, key in [("fused", "step"), ("fused", "train"), ("best", "step"), ("best", "train")]:
            name = "torch fused" if vs == "fused" else s[f"best_{key}"]
            o = by_key[model, optim, name]
            (q1, q3), who = o[f"x_{key}_iqr"], "" if vs == "fused" else f" ({name[6:]})"
            cells.append(f"{o[f'x_{key}']:.2f} [{q1:.2f}-{q3:.2f}]{who}")
        print(f"{model:<12}{optim:<6}{cells[0]:>20} {cells[1]:>20} {cells[2]:>29} {cells[3]:>29}"
              f"{s['others_cpu']:8.0%}")

    print(f"\ncorrectness: max |param - torch for-loop param| after {CHECK_STEPS} identical steps")
    for c in checks:
        verdict = ("stepjit not available" if c["ok"] is None else
                   f"stepjit {c['stepjit']:.2e} (tol {c['tol']:.0e}) "
                   f"{'ok' if c['ok'] else 'FAIL'}")
        print(f"  {c['model']:<12}{c['optim']:<7}{verdict}; torch fused {c['fused']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: %(default)s")
    ap.add_argument("--optims", default=",".join(OPTIMS), help="comma-separated: %(default)s")
    ap.add_argument("--reps", type=int, default=30, help="round-robin rounds (default 30)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per competitor per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round")
    ap.add_argument("--budget", type=float, default=120, metavar="SECONDS",
                    help="end each pair's rounds early (after 3) once its share is spent")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 1 step: a smoke run")
    ap.add_argument("--json", metavar="PATH", help="write the results to this file")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.steps, args.warmup = 3, 1, 2
    models, optims = args.models.split(","), args.optims.split(",")
    for bad in set(models) - set(MODELS) | set(optims) - set(OPTIMS):
        ap.error(f"unknown model or optimizer {bad!r}")
    marks = cpu_marks()
    print(f"stepjit {stepjit.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads on {os.cpu_count()} CPUs; "
          f"up to {args.reps} rounds x {args.steps} steps, {args.warmup} warm-up")
    results, info, checks, unavailable = [], {}, [], {}
    for model in models:
        make, shape, inputs = MODELS[model]
        torch.manual_seed(0)
        base = make()
        data = [(inputs(), torch.randint(0, 10, (len(inputs()),))) for _ in range(4)]
        ps = list(base.parameters())
        info[model] = dict(tensors=len(ps), params=sum(p.numel() for p in ps), input=shape)
        print(f"{model}: {len(ps)} tensors, {info[model]['params']:,} parameters, {shape}")
        for optim in optims:
            share = args.budget / (len(models) * len(optims))
            pair_marks = cpu_marks()
            timed = bench_pair(base, data, optim, args, unavailable, share)
            noise = others_share(pair_marks)
            for comp, r in timed.items():
                results.append(dict(model=model, optim=optim, competitor=comp, **r,
                                    others_cpu=noise))
            checks.append(dict(model=model, optim=optim, **check_pair(base, data, optim)))
    report(results, checks, unavailable)
    wall, others = time.perf_counter() - marks[0], others_share(marks)
    print(f"\nwall time {wall:.1f} s; other processes kept {others:.0%} of the CPUs busy"
          + (": a noisy run, trust only ratios with tight quartiles" if others > 0.1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stepjit=stepjit.__version__, torch=torch.__version__,
                           threads=torch.get_num_threads(), others_cpu_share=others,
                           reps=args.reps, steps=args.steps, warmup=args.warmup, wall_s=wall,
                           models=info, unavailable=unavailable, ms=results, checks=checks),
                      f, indent=2)
    failed = [f"{c['model']}/{c['optim']}" for c in checks if c["ok"] is False]
    if failed:
        sys.exit(f"stepjit's parameters differ from torch's for-loop beyond tolerance: {failed}")


if __name__ == "__main__":
    main()
