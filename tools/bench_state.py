"""Compact optimizer state on the CPU: one AdamW step over 16M float32 parameters.

    python tools/bench_state.py [--numel N] [--rounds R] [--steps S]

Side by side in one run, interleaved round by round (a noisy machine slows every row alike):
torch.optim.AdamW(fused=True), stepjit's AdamW with float32 state and with bfloat16 state
(`state_dtype="bfloat16"`), all on torch tensors through `stepjit.torch.AdamW`. Prints the
median milliseconds per step, the bytes of optimizer state per parameter, the bytes each step
moves per parameter, and each row's speed against torch fused.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import stepjit.torch as st


def make(kind: str, numel: int):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel) * 1e-2
    if kind == "torch fused":
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    else:
        opt = st.AdamW([p], lr=1e-3, state_dtype="bfloat16" if "bfloat16" in kind else None)
    opt.step()  # state allocated, kernels compiled
    return p, opt


def state_bytes(opt, p) -> int:
    return sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round and row")
    args = parser.parse_args()
    kinds = ["torch fused", "stepjit float32 state", "stepjit bfloat16 state"]
    runs = {k: make(k, args.numel) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            _, opt = runs[kind]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[kind].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["torch fused"])
    print(f"AdamW, {args.numel} float32 parameters, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'':24} {'ms/step':>8} {'state B/param':>14} {'moved B/param':>14} {'vs fused':>9}")
    for kind in kinds:
        p, opt = runs[kind]
        ms = 1e3 * statistics.median(times[kind])
        state = state_bytes(opt, p) / args.numel
        moved = 4 * 2 + 4 + 2 * state  # param read and written, grad read, state both ways
        print(f"{kind:24} {ms:8.2f} {state:14.0f} {moved:14.0f} "
              f"{base / statistics.median(times[kind]):8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
