"""Data-parallel AdamW over gloo on this machine: stepjit's sharded and unsharded optimizers
beside torch DDP + fused AdamW and torch's ZeroRedundancyOptimizer.

    python tools/bench_dist.py                          # worlds 2 and 4: about 1 min on 2 cores
    python tools/bench_dist.py --world 2,4 --steps 30 --params 5 --json out.json
    python tools/bench_dist.py --world 2 --steps 2 --warmup 1 --params 0.05   # a smoke run

For each world size N, N processes (one rank each) rendezvous through a file and talk gloo over
loopback (GLOO_SOCKET_IFNAME=lo). Each rank runs on one thread (OMP_NUM_THREADS=1,
torch.set_num_threads(1), STEPJIT_NUM_THREADS=1): N > cores oversubscribes the CPUs, and the
times then measure the machine's time-sharing as much as the optimizers.

Every rank builds the five variants, each its own copy of one MLP (d-2d-d-2d-d, GELU, float32,
the same initial weights; --params sets its size in millions of parameters), all with AdamW
lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01:
    stepjit sharded       stepjit.torch.AdamW(process_group=, shard_state=True)  (ZeRO-2 style)
    stepjit unsharded     stepjit.torch.AdamW(process_group=)
    DDP + fused           DistributedDataParallel + torch.optim.AdamW(fused=True)
    DDP + ZeRO            DistributedDataParallel + ZeroRedundancyOptimizer(optimizer_class=
                          torch.optim.AdamW, fused=True)                        (ZeRO-1)
    stepjit sharded int8  as stepjit sharded, with state_dtype="int8"
Step i feeds every variant the same global batch (synthetic, --batch rows, MSE to random
targets); rank r takes its 1/N of the rows. After --warmup untimed rounds, --steps rounds each
run one step of every variant, the order rotated every round (interleaved: a noisy machine slows
all alike). A step is zero_grad -> forward -> backward -> step(), timed on every rank after a
barrier; its time is the slowest rank's. ms/step is the median over the timed rounds.

State: bytes of optimizer state a rank holds (AdamW's two moments; step counts aside): stepjit's
`state_bytes()`, torch's the tensors in its `state`, ZeRO's in its local optimizer's; the largest
over ranks, and the range when ranks differ. RSS: each process's peak resident memory
(getrusage), all five variants together: not per variant.

Collectives: all_reduce, reduce_scatter, all_gather and broadcast alone, on one float32 buffer
of the model's size, interleaved the same way; the median of the slowest rank.

Parity: at the end every variant's parameters are checksummed (sum, sum of squares, a weighted
sum, in float64) on every rank, and the checksums all-reduced (max and min): the ranks must hold
identical parameters, else the exit status is 1. max|dp| is rank 0's largest difference from
DDP + fused's parameters after the same steps (rounding, and int8 state, make them drift).
A rank that fails or outlives --timeout fails its world (the others are killed); what any rank
wrote on stderr is shown, repeated lines once. Each rank drops its optimizers and models before
destroy_process_group, so that gloo's threads are joined before the interpreter exits.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ["stepjit sharded", "stepjit unsharded", "DDP + fused", "DDP + ZeRO",
            "stepjit sharded int8"]
BASELINE = "DDP + fused"
STEPJIT = {"stepjit sharded": {"shard_state": True},
           "stepjit unsharded": {"shard_state": False},
           "stepjit sharded int8": {"shard_state": True, "state_dtype": "int8"}}
HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def width_for(millions: float) -> int:
    """d of the d-2d-d-2d-d MLP (8 d^2 weights) nearest `millions` of parameters, a multiple of
    8 (of 64 from 256 on)."""
    d = (millions * 1e6 / 8) ** 0.5
    step = 64 if d >= 256 else 8
    return max(8, int(round(d / step)) * step)


# -- one rank ----------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    import resource
    import statistics

    import torch
    import torch._dynamo  # noqa: F401  before the group (see tests/test_torch_interop.py)
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import stepjit.torch as st

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["RENDEZVOUS"],
                            rank=rank, world_size=world)
    group = dist.group.WORLD
    d = args.width
    dims = [d, 2 * d, d, 2 * d, d]

    def model() -> nn.Module:
        torch.manual_seed(0)
        layers: list = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        return nn.Sequential(*layers[:-1])

    def torch_state_bytes(opt) -> int:
        return sum(v.numel() * v.element_size() for s in opt.state.values()
                   for k, v in s.items() if k != "step" and isinstance(v, torch.Tensor))

    runs: dict = {}  # name -> (module to call, parameters' module, optimizer, state bytes)
    ddp = None
    for name in VARIANTS:
        m = model()
        if name in STEPJIT:
            opt = st.AdamW(m.parameters(), **HYPER, process_group=group, **STEPJIT[name])
            runs[name] = (m, m, opt, opt.state_bytes)
        else:
            ddp = DDP(m)
            if name == "DDP + fused":
                opt = torch.optim.AdamW(ddp.parameters(), **HYPER, fused=True)
                runs[name] = (ddp, m, opt, lambda opt=opt: torch_state_bytes(opt))
            else:
                opt = ZeroRedundancyOptimizer(ddp.parameters(),
                                              optimizer_class=torch.optim.AdamW, **HYPER,
                                              fused=True)
                runs[name] = (ddp, m, opt, lambda opt=opt: torch_state_bytes(opt.optim))
    n_params = sum(p.numel() for p in runs[BASELINE][1].parameters())

    rows = args.batch
    part = slice(rank * rows // world, (rank + 1) * rows // world)

    def batch(i: int):
        g = torch.Generator().manual_seed(1000 + i)
        x, y = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
        return x[part].contiguous(), y[part].contiguous()

    def one_step(name: str, x, y) -> float:
        call, _, opt, _ = runs[name]
        dist.barrier(group)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(call(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for i in range(args.warmup):  # untimed: stepjit compiles (or loads) its kernels here
        x, y = batch(i)
        for name in VARIANTS:
            one_step(name, x, y)
    times = torch.zeros(args.steps, len(VARIANTS), dtype=torch.float64)
    started = time.perf_counter()
    for i in range(args.steps):
        x, y = batch(args.warmup + i)
        k = i % len(VARIANTS)
        for name in VARIANTS[k:] + VARIANTS[:k]:
            times[i, VARIANTS.index(name)] = one_step(name, x, y)
    timed_s = time.perf_counter() - started
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)  # a step: its slowest rank

    # the collectives alone, on one buffer of every parameter (float32), interleaved as above
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # 2.13
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    flat = torch.randn(-(-n_params // world) * world)
    piece = torch.empty(flat.numel() // world)
    collectives = {"all_reduce": lambda: dist.all_reduce(flat, group=group),
                   "reduce_scatter": lambda: scatter(piece, flat, group=group),
                   "all_gather": lambda: gather(flat, piece, group=group),
                   "broadcast": lambda: dist.broadcast(flat, 0, group=group)}
    names = list(collectives)
    reps = max(3, min(args.steps, 15))
    coll = torch.zeros(reps, len(names), dtype=torch.float64)
    for i in range(reps + 1):  # the first round untimed
        k = i % len(names)
        for name in names[k:] + names[:k]:
            dist.barrier(group)
            t0 = time.perf_counter()
            collectives[name]()
            if i:
                coll[i - 1, names.index(name)] = time.perf_counter() - t0
    dist.all_reduce(coll, op=dist.ReduceOp.MAX, group=group)

    # state bytes of every rank, peak RSS of every rank
    mine = torch.tensor([runs[n][3]() for n in VARIANTS]
                        + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024],
                        dtype=torch.int64)
    every = torch.zeros(world * mine.numel(), dtype=torch.int64)
    gather(every, mine, group=group)
    every = every.view(world, -1)

    # parity: identical parameters on every rank, per variant
    def checksum(m) -> torch.Tensor:
        out = torch.zeros(3, dtype=torch.float64)
        for p in m.parameters():
            v = p.detach().flatten().double()
            w = torch.linspace(1.0, 2.0, v.numel(), dtype=torch.float64)
            out += torch.stack([v.sum(), (v * v).sum(), (v * w).sum()])
        return out

    sums = torch.stack([checksum(runs[n][1]) for n in VARIANTS])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    base = list(runs[BASELINE][1].parameters())
    drift = [max(float((p.detach() - q.detach()).abs().max())
                 for p, q in zip(runs[n][1].parameters(), base)) for n in VARIANTS]

    if rank == 0:
        result = {"world": world, "width": d, "dims": dims, "params": n_params,
                  "rows_per_rank": part.stop - part.start, "timed_s": timed_s,
                  "variants": {}, "rss_bytes": every[:, -1].tolist(),
                  "collective_ms": {n: 1e3 * statistics.median(coll[:, j].tolist())
                                    for j, n in enumerate(names)}}
        for j, n in enumerate(VARIANTS):
            result["variants"][n] = {
                "ms_median": 1e3 * statistics.median(times[:, j].tolist()),
                "ms_steps": [1e3 * t for t in times[:, j].tolist()],
                "state_bytes": every[:, j].tolist(),
                "checksum": sums[j].tolist(),
                "ranks_identical": bool(torch.equal(high[j], low[j])),
                "max_checksum_spread": float((high[j] - low[j]).abs().max()),
                "max_abs_diff_vs_ddp": drift[j]}
        print("RESULT " + json.dumps(result), flush=True)

    # exit cleanly: nothing may hold the group when it is destroyed, so that gloo's threads are
    # joined here and not while the interpreter exits
    runs.clear()
    del opt, m, ddp, base
    gc.collect()
    dist.destroy_process_group()
    return 0


# -- the launcher ------------------------------------------------------------------------------
def cpu_marks() -> tuple[float, float, float]:
    """(wall clock, CPU time of this process and its waited-for children, busy CPU time of the
    whole machine from /proc/stat)."""
    import resource

    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    except (OSError, ValueError):
        busy = float("nan")
    mine = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    return time.perf_counter(), mine, busy


def others_share(marks: tuple) -> float:
    """The share of the CPUs that processes other than this run kept busy since `marks`."""
    (w0, o0, b0), (w1, o1, b1) = marks, cpu_marks()
    return max(0.0, (b1 - b0 - (o1 - o0)) / ((w1 - w0) * os.cpu_count()))


def run_world(world: int, args: argparse.Namespace) -> tuple[dict | None, str]:
    """The worker as `world` ranks: rank 0's result (None on failure) and what went wrong."""
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        env = {**os.environ, "WORLD_SIZE": str(world), "RENDEZVOUS": str(Path(tmp) / "rdzv"),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "STEPJIT_NUM_THREADS": "1"}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--width", str(args.width),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch)]
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(world)]
        deadline = time.monotonic() + args.timeout
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
                outputs.append(p.communicate())
        problems = []
        for r, (p, (_, err)) in enumerate(zip(procs, outputs)):
            if p.returncode != 0:
                problems.append(f"rank {r} exited with {p.returncode}:\n{err[-3000:]}")
            elif err.strip():
                problems.append(f"rank {r} stderr:\n{_distinct(err)}")
        result = None
        for line in outputs[0][0].splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        return result, "\n".join(problems)


def _distinct(text: str) -> str:
    """The distinct lines of `text` in order, repeats counted."""
    counts: dict = {}
    for line in text.splitlines():
        if line.strip():
            counts[line] = counts.get(line, 0) + 1
    return "\n".join(f"  {line}" + (f"  (x{n})" if n > 1 else "") for line, n in counts.items())


def table(res: dict) -> str:
    v = res["variants"]
    base_ms = v[BASELINE]["ms_median"]
    base_state = max(v[BASELINE]["state_bytes"])
    lines = [f"{'variant':<22} {'ms/step':>8} {'vs DDP':>6} {'state MB/rank':>13} "
             f"{'vs DDP':>6} {'ranks min..max MB':>17} {'ranks equal':>11} {'checksum':>14} "
             f"{'max|dp|':>8}", "-" * 114]
    for n in VARIANTS:
        r = v[n]
        lo, hi = min(r["state_bytes"]) / 1e6, max(r["state_bytes"]) / 1e6
        spread = f"{lo:.2f}..{hi:.2f}" if lo != hi else "same"
        lines.append(
            f"{n:<22} {r['ms_median']:>8.1f} {r['ms_median'] / base_ms:>6.2f} {hi:>13.2f} "
            f"{max(r['state_bytes']) / base_state:>6.3f} {spread:>17} "
            f"{'yes' if r['ranks_identical'] else 'NO':>11} {r['checksum'][0]:>14.6f} "
            f"{r['max_abs_diff_vs_ddp']:>8.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="2,4", help="world sizes, comma-separated (default 2,4)")
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    ap.add_argument("--params", type=float, default=5.0,
                    help="model size, millions of parameters (default 5)")
    ap.add_argument("--batch", type=int, default=64, help="global batch rows (default 64)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    args.width = width_for(args.params)
    worlds = [int(w) for w in args.world.split(",") if w.strip()]
    if any(w < 1 for w in worlds) or args.steps < 1 or args.warmup < 1 or args.batch < max(worlds):
        ap.error("world sizes >= 1, steps >= 1, warmup >= 1 and batch >= the largest world")

    import torch

    import stepjit

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    d = args.width
    print(f"stepjit {stepjit.__version__}, torch {torch.__version__}, python "
          f"{sys.version.split()[0]}; {cores} CPU cores")
    print(f"model: MLP {d}-{2 * d}-{d}-{2 * d}-{d} (GELU, float32); global batch {args.batch}, "
          f"split over the ranks; AdamW lr={HYPER['lr']} betas={HYPER['betas']} "
          f"eps={HYPER['eps']} weight_decay={HYPER['weight_decay']}")
    print(f"worlds {worlds}; {args.warmup} untimed + {args.steps} timed rounds, each one step of "
          f"every variant (order rotated)")
    print(f"each rank: one process, 1 thread (OMP_NUM_THREADS=1, torch.set_num_threads(1), "
          f"STEPJIT_NUM_THREADS=1),\n  gloo on loopback (GLOO_SOCKET_IFNAME=lo); more ranks than "
          f"the {cores} cores oversubscribe them")
    print("ms/step: median over the timed rounds of the slowest rank's zero_grad + forward + "
          "backward + step;\nstate MB/rank: optimizer state (MB = 1e6 bytes) of the rank holding "
          f"most; vs DDP: this / {BASELINE}'s;\nranks equal: every rank's parameters identical "
          "(float64 checksums all-reduced, max == min); checksum: their sum;\nmax|dp|: largest "
          f"difference from {BASELINE}'s parameters (rank 0)", flush=True)
    results, ok = [], True
    for world in worlds:
        marks = cpu_marks()
        res, problems = run_world(world, args)
        wall, others = time.perf_counter() - marks[0], others_share(marks)
        print()
        if res is None:
            print(f"world {world}: FAILED after {wall:.0f} s\n{problems}")
            ok = False
            continue
        results.append(res)
        print(f"world {world}: {res['params']:,} parameters, {res['rows_per_rank']} rows per "
              f"rank; {wall:.0f} s wall ({res['timed_s']:.0f} s timed); other processes kept "
              f"{others:.0%} of the CPUs busy meanwhile")
        res["others_cpu_share"] = others
        print(table(res))
        print(f"gloo collectives alone on one float32 buffer of every parameter "
              f"({4 * res['params'] / 1e6:.1f} MB),\n  median ms of the slowest rank: " + ", ".join(
                  f"{n} {ms:.1f}" for n, ms in res["collective_ms"].items()))
        rss = ", ".join(f"{b / 2**20:.0f}" for b in res["rss_bytes"])
        print(f"peak RSS per rank, all five variants in one process (MiB): {rss}")
        bad = [n for n, r in res["variants"].items() if not r["ranks_identical"]]
        if bad:
            ok = False
            print("parity: FAILED, ranks differ for " + ", ".join(
                f"{n} (checksum spread {res['variants'][n]['max_checksum_spread']:.3g})"
                for n in bad))
        else:
            print(f"parity: ok, all {world} ranks hold identical parameters for every variant")
        if problems:
            print(f"note, output on stderr:\n{problems}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
