"""An optimizer's CPU kernel alone, per element: float32, bfloat16 and int8 state side by side.

    STEPJIT_NUM_THREADS=1 python tools/bench_kernel.py [--optimizer adamw] [--numel N] [--reps R]

Compiles the update rule of each state dtype (`stepjit.optim.rule_for`; SGD and LARS with
momentum, so that they keep state) for float32 parameters, binds it to one tensor of N elements
(default 256K: parameter, gradient and state stay in cache) and times kernel launches directly,
interleaved launch by launch, without a Python step() around them: what the arithmetic costs,
which is what to measure when changing the code generator. Prints nanoseconds per element
(the 10th percentile of the launches: the machine is shared, and interference only adds) and
each row against float32 state.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stepjit.optim import registry
from stepjit.runtime import cpu

STATES = ("float32", "bfloat16", "int8")
STATEFUL = {"sgd": {"momentum": 0.9}, "lars": {"momentum": 0.9}}
"""Hyperparameters that give an optimizer state to store (SGD and LARS keep none by default)."""

SCALARS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2,
           "scale": 1.0, "momentum": 0.9, "alpha": 0.99}
"""Hyperparameter values by name (0.5 for any other): only their structure sets the speed."""


def launch(optimizer: str, state_dtype: str, numel: int, rng) -> tuple:
    """(a bound launch of the rule over one tensor, its scalars)."""
    rule = registry.rule_for(optimizer, "float32", state_dtype=state_dtype,
                             **STATEFUL.get(optimizer, {}))
    backend = cpu.LLVMBackend()
    data = {"param": rng.standard_normal(numel), "grad": rng.standard_normal(numel)}
    tensors = tuple(data[s.name].astype(np.float32) if s.name in data
                    else np.zeros(s.length(numel), s.dtype.to_numpy()) for s in rule.slots)
    per_tensor = np.full((1, len(rule.per_tensor)), 0.5)
    bound = backend.bind(backend.compile(rule), [tensors], per_tensor)
    scalars = [SCALARS.get(name, 0.5) for name, _ in rule.scalars]
    bound(scalars)  # warm
    return bound, scalars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adamw", choices=sorted(registry.OPTIMIZERS))
    parser.add_argument("--numel", type=int, default=1 << 18)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    launches = {s: launch(args.optimizer, s, args.numel, rng) for s in STATES}
    times: dict[str, list[float]] = {s: [] for s in STATES}
    for _ in range(args.reps):
        for state, (bound, scalars) in launches.items():
            t0 = time.perf_counter()
            bound(scalars)
            times[state].append(time.perf_counter() - t0)
    ns = {s: float(np.percentile(t, 10)) * 1e9 / args.numel for s, t in times.items()}
    print(f"{args.optimizer}, {args.numel} float32 parameters, {cpu.num_threads()} threads, "
          f"10th percentile of {args.reps} launches each")
    print(f"{'state':<10} {'ns/element':>10} {'vs float32':>11}")
    for state, value in ns.items():
        print(f"{state:<10} {value:>10.3f} {ns['float32'] / value:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
