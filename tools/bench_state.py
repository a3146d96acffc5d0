"""Compact optimizer state on the CPU: one AdamW step over 16M float32 parameters.

    python tools/bench_state.py [--numel N] [--rounds R] [--steps S]

Side by side in one run, interleaved round by round (a noisy machine slows every row alike):
torch.optim.AdamW(fused=True), stepjit's AdamW with float32 state and with bfloat16 state
(`state_dtype="bfloat16"`), all on torch tensors through `stepjit.torch.AdamW`; then bfloat16
parameters: torch fused, and stepjit with stochastic rounding (float32 and bfloat16 state).
Prints the median milliseconds per step, the bytes of optimizer state per parameter, the bytes
each step moves per parameter, and each row's speed against torch fused on the same parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import stepjit.torch as st

KINDS = {  # row -> (parameter dtype, optimizer options; None: torch's fused AdamW)
    "torch fused": (torch.float32, None),
    "stepjit float32 state": (torch.float32, {}),
    "stepjit bfloat16 state": (torch.float32, {"state_dtype": "bfloat16"}),
    "bf16 params: torch fused": (torch.bfloat16, None),
    "bf16 params: stepjit SR": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16 params: SR, bf16 state": (torch.bfloat16, {"stochastic_rounding": True,
                                                     "state_dtype": "bfloat16"}),
}


def make(kind: str, numel: int):
    dtype, options = KINDS[kind]
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel, dtype=dtype))
    p.grad = torch.randn(numel, dtype=dtype) * 1e-2
    if options is None:
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    else:
        opt = st.AdamW([p], lr=1e-3, **options)
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
    kinds = list(KINDS)
    runs = {k: make(k, args.numel) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            _, opt = runs[kind]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[kind].append((time.perf_counter() - t0) / args.steps)
    print(f"AdamW, {args.numel} parameters, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'':28} {'ms/step':>8} {'state B/param':>14} {'moved B/param':>14} {'vs fused':>9}")
    for kind in kinds:
        p, opt = runs[kind]
        fused = "torch fused" if p.dtype == torch.float32 else "bf16 params: torch fused"
        ms = 1e3 * statistics.median(times[kind])
        state = state_bytes(opt, p) / args.numel
        size = p.element_size()
        moved = 3 * size + 2 * state  # param read and written, grad read, state both ways
        print(f"{kind:28} {ms:8.2f} {state:14.0f} {moved:14.0f} "
              f"{statistics.median(times[fused]) / statistics.median(times[kind]):8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
