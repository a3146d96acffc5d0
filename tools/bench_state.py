"""Compact optimizer state on the CPU: one AdamW step over 16M float32 parameters.

    python tools/bench_state.py [--numel N] [--rounds R] [--steps S]

Side by side in one run, interleaved round by round (a noisy machine slows every row alike):
torch.optim.AdamW(fused=True), stepjit's AdamW (through `stepjit.torch.AdamW`) with float32,
bfloat16 and int8 state (`state_dtype=`), and the competitors that are installed: bitsandbytes'
AdamW and AdamW8bit, torchao's AdamW8bit; then bfloat16 parameters: torch fused, stepjit with
stochastic rounding (SR; float32, bfloat16 and int8 state) and torchao's _AdamW with SR.
A row whose optimizer cannot be built (package not installed, option not supported yet) prints
why and is skipped. Slow rows time fewer steps per round (at least one, see SLOW_S) and drop out
after BUDGET_S seconds of timing (once they have 3 rounds), so a default run takes ~2 minutes.
Prints the median milliseconds per step over the rounds, the steps timed, the bytes of optimizer
state per parameter (every tensor in its state but "step": scales and code tables too), the
bytes each step moves per parameter, each row's speed against torch fused on the same parameter
dtype, and then the speed ratios that the int8 and SR rows aim at (TARGETS).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import statistics
import time
import warnings

import torch

import stepjit.torch as st

SLOW_S = 0.5  # a row stops its round's steps after this many seconds
BUDGET_S = 8.0  # and takes part in no more rounds after this many (once it has 3)


def fused(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def stepjit(**options):
    return lambda params: st.AdamW(params, lr=1e-3, **options)


def competitor(name: str, *modules: str, **options):
    """Class `name` from the first of `modules` that has it, imported only when its row is built."""
    def build(params):
        error = None
        for module in modules:
            logging.disable(logging.WARNING)  # their imports warn about GPU kernels they lack here
            try:
                return getattr(importlib.import_module(module), name)(params, lr=1e-3, **options)
            except (ImportError, AttributeError) as e:
                error = e
            finally:
                logging.disable(logging.NOTSET)
        raise error
    return build


TORCHAO = ("torchao.optim", "torchao.prototype.low_bit_optim")  # the latter: older torchao
F32, BF16 = torch.float32, torch.bfloat16
ROWS = {  # row -> (parameter dtype, optimizer of [parameter])
    "torch fused": (F32, fused),
    "stepjit float32 state": (F32, stepjit()),
    "stepjit bfloat16 state": (F32, stepjit(state_dtype="bfloat16")),
    "stepjit int8 state": (F32, stepjit(state_dtype="int8")),
    "bitsandbytes AdamW": (F32, competitor("AdamW", "bitsandbytes.optim")),
    "bitsandbytes AdamW8bit": (F32, competitor("AdamW8bit", "bitsandbytes.optim")),
    "torchao AdamW8bit": (F32, competitor("AdamW8bit", *TORCHAO)),
    "bf16 params: torch fused": (BF16, fused),
    "bf16 params: stepjit SR": (BF16, stepjit(stochastic_rounding=True)),
    "bf16 params: SR, bf16 state": (BF16, stepjit(stochastic_rounding=True,
                                                  state_dtype="bfloat16")),
    "bf16 params: SR, int8 state": (BF16, stepjit(stochastic_rounding=True, state_dtype="int8")),
    "bf16 params: torchao SR": (BF16, competitor("_AdamW", *TORCHAO, bf16_stochastic_round=True)),
}
TARGETS = {  # (row, against) -> the speed ratio aimed at (None: shown only)
    ("stepjit int8 state", "torch fused"): 1.4,
    ("stepjit int8 state", "bitsandbytes AdamW8bit"): 20,
    ("stepjit int8 state", "torchao AdamW8bit"): 20,
    ("bf16 params: SR, int8 state", "bitsandbytes AdamW8bit"): None,  # float32 params there
    ("bf16 params: SR, int8 state", "torchao AdamW8bit"): None,
    ("bf16 params: stepjit SR", "bf16 params: torchao SR"): 1.0,
    ("bf16 params: SR, bf16 state", "bf16 params: torchao SR"): 1.0,  # both: bf16 state
}


def make(kind: str, numel: int):
    """(parameter, optimizer) after one step (state allocated, kernels compiled), or why not."""
    dtype, build = ROWS[kind]
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel, dtype=dtype))
    p.grad = torch.randn(numel, dtype=dtype) * 1e-2
    try:
        opt = build([p])
        opt.step()
    except Exception as e:  # noqa: BLE001 - any reason a row cannot run is printed, not raised
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return p, opt


def nbytes(t: torch.Tensor) -> int:
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # torchao's 8-bit state
        return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def state_bytes(opt, p) -> int:
    return sum(nbytes(v) for k, v in opt.state[p].items() if k != "step" and torch.is_tensor(v))


def version(package: str) -> str:
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5,
                        help=f"steps timed per round and row (fewer past {SLOW_S} s)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")  # torchao's, harmless
    made = {kind: make(kind, args.numel) for kind in ROWS}
    runs = {kind: run for kind, run in made.items() if not isinstance(run, str)}
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    spent, timed = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0)
    for _ in range(args.rounds):
        for kind, (_, opt) in runs.items():
            if spent[kind] > BUDGET_S and len(times[kind]) >= 3:
                continue
            t0 = now = time.perf_counter()
            steps = 0
            while steps < args.steps and (steps == 0 or now - t0 < SLOW_S):
                opt.step()
                steps += 1
                now = time.perf_counter()
            times[kind].append((now - t0) / steps)
            spent[kind] += now - t0
            timed[kind] += steps
    ms = {kind: 1e3 * statistics.median(times[kind]) for kind in runs}

    print(f"AdamW, {args.numel} parameters, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} rounds x {args.steps} steps (slow rows: fewer steps per round); "
          f"torch {torch.__version__}, {version('bitsandbytes')}, {version('torchao')}")
    print(f"{'':28} {'ms/step':>8} {'steps':>6} {'state B/param':>14} {'moved B/param':>14} "
          f"{'vs fused':>9}")
    for kind, run in made.items():
        if isinstance(run, str):
            print(f"{kind:28} skipped: {run}")
            continue
        p, opt = run
        fused_row = "torch fused" if p.dtype == torch.float32 else "bf16 params: torch fused"
        state = state_bytes(opt, p) / args.numel
        moved = 3 * p.element_size() + 2 * state  # param read, written; grad read; state both ways
        vs = f"{ms[fused_row] / ms[kind]:8.2f}x" if fused_row in ms else f"{'-':>9}"
        print(f"{kind:28} {ms[kind]:8.2f} {timed[kind]:6} {state:14.2f} {moved:14.2f} {vs}")

    print("\nspeed ratios aimed at:")
    for (kind, against), target in TARGETS.items():
        label = f"  {kind} vs {against}"
        missing = [k for k in (kind, against) if k not in ms]
        if missing:
            print(f"{label:66} skipped: no {' and no '.join(missing)}")
            continue
        ratio = ms[against] / ms[kind]
        aim = "" if target is None else f"  (target >= {target}x: " \
            f"{'met' if ratio >= target else 'NOT met'})"
        print(f"{label:66} {ratio:7.2f}x{aim}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
