"""Benchmark the CUDA backend on a GPU machine (torch with CUDA, CuPy and NVRTC installed).

    PYTHONPATH=src python tools/bench_gpu.py                  # every measurement, table, targets
    PYTHONPATH=src python tools/bench_gpu.py --only sgd,host  # some of them
    PYTHONPATH=src python tools/bench_gpu.py --json out.json  # the same numbers as JSON

Parameters are torch CUDA tensors stepped by `stepjit.torch` (the drop-in torch.optim face),
except in `cupy`. Device times come from CUDA events around --iters back-to-back calls after
warm-up; the competitors of one measurement run --rounds times, interleaved, and the median
time per call of each is kept. Bytes moved count each array read or written once.

1. sgd: SGD(momentum=0.9, weight_decay=1e-4) on one float32 tensor of --numel elements (64M):
   param, grad and buffer read, param and buffer written (5 x 4 bytes per element). Against a
   device-to-device copy of the same size in the same run (2 x 4 bytes per element) and against
   torch.optim.SGD(fused=True) on the same configuration. Targets: >= 90 % of the copy's
   bandwidth; >= 1.0x torch fused (goal 1.1x).
2. adam: Adam(lr=1e-3) on --numel float32 elements (7 x 4 bytes per element) against
   torch.optim.Adam(fused=True). Target: >= 1.0x torch fused.
3. clip: the SGD of 1 with clip_norm=1.0 (two launches: partial norms, then the update) against
   clip_norm=0. Target: time ratio <= 1.25.
4. misaligned: the SGD of 1 on 16 tensors of --numel / 16 + 1 elements that are views at odd
   element offsets into one flat parameter buffer and one flat gradient buffer (as DDP's
   gradient_as_bucket_view or FSDP's flat parameters), against 16 separate tensors of the same
   sizes. Target: misaligned speed >= 0.9x aligned.
5. host: the wall time of one step() call of the SGD of 1 over --tensors tensors of --small
   elements (200 x 1000), the GPU left running asynchronously; the median of many calls.
   Target: <= 30 us.
6. cupy: the SGD of 1 through the CuPy engine (`stepjit.optim.SGD` on a CuPy array) against a
   CuPy device-to-device copy, and its host time as in 5 (figures only, no target).

`tools/gpu_check.py` runs these same functions as part of its one prepared GPU run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
DEVICE = "cuda"
"""Where the torch tensors live (tests/test_gpu_check.py runs the code on "cpu")."""

TARGETS: dict[str, tuple[str, float, str]] = {
    # key: (comparison, need, how it is printed)
    "sgd_copy_fraction": (">=", 0.90, ">= 90 % of copy"),
    "sgd_vs_torch": (">=", 1.0, ">= 1.0x (goal 1.1x)"),
    "adam_vs_torch": (">=", 1.0, ">= 1.0x"),
    "clip_ratio": ("<=", 1.25, "<= 1.25x unclipped"),
    "misaligned_vs_aligned": (">=", 0.9, ">= 0.9x aligned"),
    "host_us": ("<=", 30.0, "<= 30 us"),
}
"""The targets of the measurements (see the module docstring)."""

SGD_CONFIG = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
SGD_BYTES = 5 * 4  # per element: param, grad, buffer read; param, buffer written
ADAM_BYTES = 7 * 4  # per element: param, grad, exp_avg, exp_avg_sq read; three written
COPY_BYTES = 2 * 4  # per element: read and written


# -- rows: what gpu_check.py and this script print -------------------------------------------------
def row(check: str, figure: str, target: str = "", passed: bool | None = None, **data) -> dict:
    """One line of a result table: PASS / FAIL when there is a target, INFO otherwise."""
    result = "INFO" if passed is None else ("PASS" if passed else "FAIL")
    return {"check": check, "figure": figure, "target": target, "result": result, **data}


def target_row(check: str, key: str, value: float, figure: str, **data) -> dict:
    """A row for a measurement with a target in `TARGETS`."""
    op, need, text = TARGETS[key]
    passed = value >= need if op == ">=" else value <= need
    return row(check, figure, text, passed, value=value, need=need, **data)


def format_table(rows: list[dict], width: int = 90) -> str:
    """The rows as a fixed-width table: check, result/figure, target, pass/fail (texts cut to
    `width` characters: the JSON has them whole)."""

    def cut(text) -> str:
        text = str(text)
        return text if len(text) <= width else text[: width - 3] + "..."

    header = ("check", "result / figure", "target", "")
    lines = [header] + [(cut(r["check"]), cut(r["figure"]), cut(r["target"]), r["result"])
                        for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(3)]
    return "\n".join(
        f"{a:{widths[0]}}  {b:{widths[1]}}  {c:{widths[2]}}  {d}".rstrip() for a, b, c, d in lines)


# -- timing ----------------------------------------------------------------------------------------
def per_call(fn: Callable[[], object], iters: int, events: str = "torch") -> float:
    """Seconds per call of `fn`, from CUDA events recorded on the current stream of `events`
    ("torch" or "cupy") around `iters` back-to-back calls."""
    if events == "torch":
        import torch

        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters
    import cupy as cp

    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / iters


def interleaved(competitors: dict[str, Callable[[], object]], iters: int, rounds: int,
                events: str = "torch", warmup: int = 3) -> dict[str, float]:
    """The median seconds per call of each competitor over `rounds` interleaved rounds."""
    for fn in competitors.values():
        for _ in range(warmup):
            fn()
    _synchronize(events)
    times: dict[str, list[float]] = {name: [] for name in competitors}
    for _ in range(rounds):
        for name, fn in competitors.items():
            times[name].append(per_call(fn, iters, events))
    return {name: statistics.median(values) for name, values in times.items()}


def host_times(fn: Callable[[], object], calls: int, events: str = "torch",
               warmup: int = 10) -> dict:
    """Median and minimum wall time (us) of one Python call of `fn`, the device left running."""
    for _ in range(warmup):
        fn()
    _synchronize(events)
    seconds = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    _synchronize(events)
    return {"median_us": statistics.median(seconds) * 1e6, "min_us": min(seconds) * 1e6,
            "calls": calls}


def _synchronize(events: str) -> None:
    if events == "torch":
        import torch

        torch.cuda.synchronize()
    else:
        import cupy as cp

        cp.cuda.Device().synchronize()


def _gbps(nbytes_per_element: int, numel: int, seconds: float) -> float:
    return nbytes_per_element * numel / seconds / 1e9


# -- the measurements ------------------------------------------------------------------------------
def _sgd_pair(torch, numel: int, **extra):
    """A stepjit.torch SGD and a torch fused SGD, each over its own copy of one random float32
    tensor of `numel` elements with a static gradient."""
    import stepjit.torch

    init = torch.randn(numel, device=DEVICE)
    grad = torch.randn(numel, device=DEVICE)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    del init
    mine = stepjit.torch.SGD([ours], **SGD_CONFIG, **extra)
    fused = torch.optim.SGD([theirs], **SGD_CONFIG, fused=True)
    return mine, fused, grad


def bench_sgd(numel: int = 64 * 2**20, iters: int = 50, rounds: int = 7) -> list[dict]:
    """Measurement 1: SGD against a device-to-device copy and torch fused SGD."""
    import torch

    mine, fused, grad = _sgd_pair(torch, numel)
    copy_dst = torch.empty_like(grad)
    t = interleaved({"copy": lambda: copy_dst.copy_(grad), "stepjit": mine.step,
                     "torch_fused": fused.step}, iters, rounds)
    copy_gbps = _gbps(COPY_BYTES, numel, t["copy"])
    ours_gbps = _gbps(SGD_BYTES, numel, t["stepjit"])
    fused_gbps = _gbps(SGD_BYTES, numel, t["torch_fused"])
    data = {"numel": numel, "seconds": t, "gbps": {"copy": copy_gbps, "stepjit": ours_gbps,
                                                   "torch_fused": fused_gbps}}
    fraction, speedup = ours_gbps / copy_gbps, t["torch_fused"] / t["stepjit"]
    size = f"{numel / 2**20:.0f}M"
    return [
        target_row(f"bench: SGD {size} fp32 vs copy", "sgd_copy_fraction", fraction,
                   f"{fraction * 100:.1f} % ({ours_gbps:.0f} / {copy_gbps:.0f} GB/s)", **data),
        target_row(f"bench: SGD {size} fp32 vs torch fused", "sgd_vs_torch", speedup,
                   f"{speedup:.2f}x ({t['stepjit'] * 1e6:.0f} / "
                   f"{t['torch_fused'] * 1e6:.0f} us)"),
    ]


def bench_adam(numel: int = 64 * 2**20, iters: int = 50, rounds: int = 7) -> list[dict]:
    """Measurement 2: Adam against torch fused Adam."""
    import torch

    import stepjit.torch

    init = torch.randn(numel, device=DEVICE)
    grad = torch.randn(numel, device=DEVICE)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours.grad, theirs.grad = grad, grad.clone()
    del init
    mine = stepjit.torch.Adam([ours], lr=1e-3)
    fused = torch.optim.Adam([theirs], lr=1e-3, fused=True)
    t = interleaved({"stepjit": mine.step, "torch_fused": fused.step}, iters, rounds)
    speedup = t["torch_fused"] / t["stepjit"]
    gbps = {k: _gbps(ADAM_BYTES, numel, v) for k, v in t.items()}
    return [target_row(f"bench: Adam {numel / 2**20:.0f}M fp32 vs torch fused", "adam_vs_torch",
                       speedup, f"{speedup:.2f}x ({t['stepjit'] * 1e6:.0f} / "
                       f"{t['torch_fused'] * 1e6:.0f} us; {gbps['stepjit']:.0f} GB/s)",
                       numel=numel, seconds=t, gbps=gbps)]


def bench_clip(numel: int = 64 * 2**20, iters: int = 50, rounds: int = 7) -> list[dict]:
    """Measurement 3: SGD with clip_norm against the same SGD without."""
    import torch

    import stepjit.torch

    opts = {}
    for name, clip in (("unclipped", 0.0), ("clipped", 1.0)):
        p = torch.nn.Parameter(torch.randn(numel, device=DEVICE))
        p.grad = torch.randn(numel, device=DEVICE)
        opts[name] = stepjit.torch.SGD([p], **SGD_CONFIG, clip_norm=clip)
    t = interleaved({name: opt.step for name, opt in opts.items()}, iters, rounds)
    ratio = t["clipped"] / t["unclipped"]
    return [target_row(f"bench: clip_norm on / off ({numel / 2**20:.0f}M SGD)", "clip_ratio",
                       ratio, f"{ratio:.2f}x ({t['clipped'] * 1e6:.0f} / "
                       f"{t['unclipped'] * 1e6:.0f} us)", numel=numel, seconds=t)]


def odd_views(torch, sizes: list[int], dtype, offset: int = 1, device: str | None = None):
    """Views of `sizes` elements into one new flat buffer on `device` (default `DEVICE`), each at
    an odd element offset (the first at `offset`, odd), and the buffer."""
    assert offset % 2 == 1
    starts, at = [], offset
    for n in sizes:
        starts.append(at)
        at += n + (1 if n % 2 == 1 else 2)  # n + gap is even: the next start stays odd
    flat = torch.zeros(at + 1, dtype=dtype, device=device or DEVICE)
    return [flat[s : s + n] for s, n in zip(starts, sizes)], flat


def bench_misaligned(numel: int = 64 * 2**20, pieces: int = 16, iters: int = 50,
                     rounds: int = 7) -> list[dict]:
    """Measurement 4: SGD over views at odd element offsets against separate tensors."""
    import torch

    import stepjit.torch

    n = numel // pieces + 1
    sizes = [n] * pieces
    aligned = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for _ in sizes]
    for p in aligned:
        p.grad = torch.randn(n, device=DEVICE)
    views, _ = odd_views(torch, sizes, torch.float32, offset=1)
    grads, _ = odd_views(torch, sizes, torch.float32, offset=3)
    misaligned = [torch.nn.Parameter(v) for v in views]
    for p, v, g, a in zip(misaligned, views, grads, aligned):
        assert p.data_ptr() == v.data_ptr() and p.data_ptr() % 16 != 0
        p.data.copy_(a.data)
        g.copy_(a.grad)
        p.grad = g
    opts = {"aligned": stepjit.torch.SGD(aligned, **SGD_CONFIG),
            "misaligned": stepjit.torch.SGD(misaligned, **SGD_CONFIG)}
    t = interleaved({name: opt.step for name, opt in opts.items()}, iters, rounds)
    ratio = t["aligned"] / t["misaligned"]
    return [target_row(f"bench: misaligned / aligned ({pieces} x {n} SGD)",
                       "misaligned_vs_aligned", ratio,
                       f"{ratio:.2f}x ({t['misaligned'] * 1e6:.0f} / {t['aligned'] * 1e6:.0f} us)",
                       numel=n * pieces, pieces=pieces, seconds=t)]


def bench_host(tensors: int = 200, small: int = 1000, calls: int = 2000) -> list[dict]:
    """Measurement 5: host time of step() over many small torch CUDA tensors."""
    import torch

    import stepjit.torch

    params = [torch.nn.Parameter(torch.zeros(small, device=DEVICE)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.ones(small, device=DEVICE)
    opt = stepjit.torch.SGD(params, **SGD_CONFIG)
    host = host_times(opt.step, calls)
    return [target_row(f"bench: host time of step(), {tensors} x {small} torch", "host_us",
                       host["median_us"], f"{host['median_us']:.1f} us (min "
                       f"{host['min_us']:.1f})", **host)]


def bench_cupy(numel: int = 64 * 2**20, iters: int = 50, rounds: int = 7, tensors: int = 200,
               small: int = 1000, calls: int = 2000) -> list[dict]:
    """Measurement 6: the CuPy engine (figures only)."""
    import cupy as cp

    import stepjit

    w = stepjit.Parameter(cp.random.standard_normal(numel, dtype=cp.float32))
    w.grad = cp.random.standard_normal(numel, dtype=cp.float32)
    opt = stepjit.optim.SGD([w], **SGD_CONFIG)
    dst = cp.empty_like(w.grad)
    src, nbytes = w.grad, w.grad.nbytes

    def copy():
        dst.data.copy_from_device_async(src.data, nbytes)

    t = interleaved({"copy": copy, "stepjit": opt.step}, iters, rounds, events="cupy")
    fraction = (SGD_BYTES / t["stepjit"]) / (COPY_BYTES / t["copy"])
    params = [stepjit.Parameter(cp.zeros(small, cp.float32)) for _ in range(tensors)]
    for p in params:
        p.grad = cp.ones(small, cp.float32)
    host = host_times(stepjit.optim.SGD(params, **SGD_CONFIG).step, calls, events="cupy")
    return [
        row(f"bench: CuPy engine SGD {numel / 2**20:.0f}M vs copy",
            f"{fraction * 100:.1f} % ({_gbps(SGD_BYTES, numel, t['stepjit']):.0f} GB/s)",
            numel=numel, seconds=t, value=fraction),
        row(f"bench: CuPy engine host time, {tensors} x {small}",
            f"{host['median_us']:.1f} us (min {host['min_us']:.1f})", **host),
    ]


BENCHES: dict[str, Callable[..., list[dict]]] = {
    "sgd": bench_sgd, "adam": bench_adam, "clip": bench_clip, "misaligned": bench_misaligned,
    "host": bench_host, "cupy": bench_cupy,
}
"""Every measurement by name, in the order they run."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated measurements (default: all of {', '.join(BENCHES)})")
    parser.add_argument("--numel", type=int, default=64 * 2**20)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown measurement {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        name = torch.cuda.get_device_name()
    except Exception as exc:
        print(f"no CUDA device: {exc}", file=sys.stderr)
        return 2
    sizes = {"numel": args.numel, "iters": args.iters, "rounds": args.rounds,
             "tensors": args.tensors, "small": args.small}
    rows = []
    for n in names:
        fn = BENCHES[n]
        accepted = inspect.signature(fn).parameters
        try:
            rows += fn(**{k: v for k, v in sizes.items() if k in accepted})
        except Exception as exc:  # the other measurements still run
            rows.append(row(f"bench: {n}", f"error: {type(exc).__name__}: {exc}"[:200], "",
                            False))
        torch.cuda.empty_cache()
    print(f"device: {name}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)
    return 0 if all(r["result"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
