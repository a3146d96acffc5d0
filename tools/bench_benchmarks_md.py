"""Write BENCHMARKS.md from the JSON that `stepjit bench --json` writes.

    stepjit bench --json bench.json
    python tools/bench_benchmarks_md.py bench.json -o BENCHMARKS.md

The page holds the figures of that one run (host and versions included) as Markdown tables, and
the command that produced them; regenerate it rather than editing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stepjit.cli.bench import Row, rows_from_json

PHASES = ("trace", "lower", "parse", "optimize", "codegen", "load")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _steps(row: Row, competitor: str) -> str:
    if competitor not in row.step_ms:
        return "-"
    value = row.break_even_steps.get(competitor)
    return "never" if value is None else f"{value:.0f}"


def _table(head: list[str], rows: list[list[str]], right_from: int = 2) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(head))]
    return ["| " + " | ".join(r) + " |" for r in [head, align, *rows]]


def render(data: dict, source: str = "bench.json") -> str:
    """The Markdown page for one `stepjit bench --json` document."""
    rows = rows_from_json(data)
    host = data.get("host", {})
    names = ("python", "numpy", "llvmlite", "torch")
    versions = ", ".join(f"{name} {host[name]}" for name in names if host.get(name))
    lines = [
        "# Benchmarks",
        "",
        "Produced by `stepjit bench` (the README's main job) and rendered by",
        f"`python tools/bench_benchmarks_md.py {source} -o BENCHMARKS.md`:",
        "regenerate this page, do not edit it.",
        "",
        f"- stepjit {data.get('stepjit', '?')}; {versions}",
        f"- CPU: {host.get('cpu', '?')} ({host.get('triple', '?')}), "
        f"{host.get('threads', '?')} threads for stepjit",
        f"- every step time is the median of {data.get('reps') or '?'} interleaved repetitions "
        "(stepjit, numpy, torch, probe, stepjit, ...) in one process; times in milliseconds",
        "",
        "Configurations (float32; `torch.optim.SGD` has no per-tensor clipping, so `clip` has no "
        "torch column):",
        "",
    ]
    configs = data.get("configs", {})
    lines += _table(["name", "hyperparameters"],
                    [[f"`{k}`", ", ".join(f"{a}={b}" for a, b in v.items())]
                     for k, v in configs.items()], right_from=2)
    lines += [
        "",
        "## Step time",
        "",
        "The probe is a compiled kernel that moves the same bytes with no arithmetic: `% probe` is "
        "how close a step comes to the memory bandwidth this machine gives a kernel; speedup: "
        "how many times faster stepjit's step is.",
        "",
    ]
    lines += _table(
        ["config", "size", "tensors", "elements", "stepjit", "numpy", "torch fused", "probe",
         "GB/s", "% probe", "speedup vs numpy", "vs torch"],
        [[r.config, r.size, str(r.tensors), f"{r.elements:,}", _ms(r.step_ms["stepjit"]),
          _ms(r.step_ms.get("numpy")), _ms(r.step_ms.get("torch_fused")),
          _ms(r.step_ms.get("probe")), f"{r.gbps['stepjit']:.1f}",
          f"{100 * r.step_ms['probe'] / r.step_ms['stepjit']:.0f}%",
          (f"{r.step_ms['numpy'] / r.step_ms['stepjit']:.1f}" if "numpy" in r.step_ms else "-"),
          (f"{r.step_ms['torch_fused'] / r.step_ms['stepjit']:.2f}"
           if "torch_fused" in r.step_ms else "-")]
         for r in rows],
    )
    lines += [
        "",
        "## Compile cost and break-even",
        "",
        "A cold compile split into its phases (trace: build the rule; lower: LLVM IR text; parse; "
        "optimize: O3 for this CPU; codegen: machine code; load: into the JIT), the load of the "
        "same kernel from the disk cache by a fresh engine, the first `step()` cold / from disk / "
        "from memory, and the number of steps after which the cold first step has paid for "
        "itself against each competitor (never: stepjit is not faster per step).",
        "",
    ]
    lines += _table(
        ["config", "size", *PHASES, "compile", "disk load", "1st cold", "1st disk", "1st memory",
         "even@numpy", "even@torch"],
        [[r.config, r.size, *(_ms(r.compile_ms.get(p, 0.0)) for p in PHASES),
          _ms(sum(r.compile_ms.values())), _ms(r.disk_load_ms), _ms(r.first_step_ms["cold"]),
          _ms(r.first_step_ms["disk"]), _ms(r.first_step_ms["memory"]), _steps(r, "numpy"),
          _steps(r, "torch_fused")]
         for r in rows],
    )
    lines += [
        "",
        "## Reproduce",
        "",
        "    stepjit bench --json bench.json            # about half a minute on 2 cores",
        "    python tools/bench_benchmarks_md.py bench.json -o BENCHMARKS.md",
        "",
        "`stepjit bench --help` lists the sizes, configurations and every JSON field; "
        "`--quick` runs small sizes in a few seconds.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Read the JSON file, write the Markdown page; return the exit status."""
    parser = argparse.ArgumentParser(description="Write BENCHMARKS.md from stepjit bench --json.")
    parser.add_argument("json", help="the file written by stepjit bench --json")
    parser.add_argument("-o", "--output", default=None, help="the page to write (default: stdout)")
    parser.add_argument(
        "--section", nargs=2, action="append", default=[], metavar=("TITLE", "FILE"),
        help="append FILE (another tool's output, verbatim) under the heading TITLE; repeatable",
    )
    args = parser.parse_args(argv)
    try:
        data = json.loads(Path(args.json).read_text())
        text = render(data, Path(args.json).name)
        for title, path in args.section:
            body = Path(path).read_text().rstrip("\n")
            text += f"\n## {title}\n\n```\n{body}\n```\n"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"cannot read {args.json}: {exc}")
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
