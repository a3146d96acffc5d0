"""Benchmark the CUDA backend on a GPU machine.

    python tools/bench_gpu.py                 # all measurements, a table and the targets
    python tools/bench_gpu.py --json out.json # the same numbers as JSON

Measured in one run, with CUDA events around many back-to-back steps (after warm-up):

1. bandwidth: SGD with momentum and weight decay on one float32 tensor of --numel elements
   (default 64M). Bytes moved per step: param, grad and buffer read, param and buffer written
   (5 x 4 bytes per element). Compared with a device-to-device copy of the same size measured
   in the same run (2 x 4 bytes per element: read and write). Target: >= 85 % of the copy.
2. against torch.optim.SGD(fused=True) on CUDA, same configuration and tensor, when torch with
   CUDA is installed. Target: stepjit time <= torch time (>= 1.0x).
3. host time of step() for --tensors tensors of --small elements (default 200 x 1000): the wall
   time of the Python call, the GPU left running asynchronously. Target: <= 30 us.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _events(cp, fn, iters: int) -> float:
    """Seconds per call of `fn`, by CUDA events on the current stream."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / iters


def bench_copy(cp, numel: int, iters: int) -> dict:
    src = cp.random.standard_normal(numel, dtype=cp.float32)
    dst = cp.empty_like(src)
    nbytes = src.nbytes

    def copy():
        dst.data.copy_from_device_async(src.data, nbytes)

    for _ in range(3):
        copy()
    seconds = _events(cp, copy, iters)
    return {"seconds": seconds, "gbps": 2 * nbytes / seconds / 1e9}


def bench_stepjit(cp, numel: int, iters: int) -> dict:
    import stepjit

    w = stepjit.Parameter(cp.random.standard_normal(numel, dtype=cp.float32))
    w.grad = cp.random.standard_normal(numel, dtype=cp.float32)
    opt = stepjit.optim.SGD([w], lr=1e-3, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        opt.step()
    seconds = _events(cp, opt.step, iters)
    return {"seconds": seconds, "gbps": 5 * 4 * numel / seconds / 1e9}


def bench_torch(numel: int, iters: int) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    w = torch.nn.Parameter(torch.randn(numel, device="cuda"))
    w.grad = torch.randn(numel, device="cuda")
    opt = torch.optim.SGD([w], lr=1e-3, momentum=0.9, weight_decay=1e-4, fused=True)
    for _ in range(3):
        opt.step()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        opt.step()
    stop.record()
    stop.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / iters
    return {"seconds": seconds, "gbps": 5 * 4 * numel / seconds / 1e9}


def bench_host(cp, tensors: int, small: int, iters: int) -> dict:
    import stepjit

    params = [stepjit.Parameter(cp.zeros(small, cp.float32)) for _ in range(tensors)]
    for p in params:
        p.grad = cp.ones(small, cp.float32)
    opt = stepjit.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    for _ in range(5):
        opt.step()
    cp.cuda.get_current_stream().synchronize()
    calls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        opt.step()
        calls.append(time.perf_counter() - t0)
    cp.cuda.get_current_stream().synchronize()
    calls.sort()
    return {"median_us": calls[len(calls) // 2] * 1e6, "min_us": calls[0] * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=64 * 2**20)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    try:
        import cupy as cp

        device = cp.cuda.Device()
        name = cp.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    except Exception as exc:
        print(f"no CUDA device: {exc}", file=sys.stderr)
        return 2

    copy = bench_copy(cp, args.numel, args.iters)
    ours = bench_stepjit(cp, args.numel, args.iters)
    torch_fused = bench_torch(args.numel, args.iters)
    host = bench_host(cp, args.tensors, args.small, 20 * args.iters)
    results = {"device": name, "numel": args.numel, "copy": copy, "stepjit": ours,
               "torch_fused": torch_fused, "host": host}

    print(f"device: {name}; SGD(momentum=0.9, weight_decay=1e-4), float32, {args.numel} elements")
    print(f"  device-to-device copy   {copy['gbps']:8.1f} GB/s  {copy['seconds'] * 1e6:9.1f} us")
    print(f"  stepjit step            {ours['gbps']:8.1f} GB/s  {ours['seconds'] * 1e6:9.1f} us")
    if torch_fused:
        print(f"  torch SGD(fused=True)   {torch_fused['gbps']:8.1f} GB/s  "
              f"{torch_fused['seconds'] * 1e6:9.1f} us")
    print(f"  host time of step(), {args.tensors} x {args.small}: "
          f"median {host['median_us']:.1f} us, min {host['min_us']:.1f} us")
    checks = [("bandwidth >= 85% of copy", ours["gbps"] / copy["gbps"], 0.85),
              ("host time <= 30 us", 30.0 / host["median_us"], 1.0)]
    if torch_fused:
        checks.append(("speed >= 1.0x torch fused", torch_fused["seconds"] / ours["seconds"], 1.0))
    print("targets:")
    for label, value, need in checks:
        verdict = "ok" if value >= need else "MISSED"
        print(f"  {label:28s} {value:6.2f} (need >= {need:.2f})  {verdict}")
    results["targets"] = {label: value >= need for label, value, need in checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
