#!/usr/bin/env python
"""The README's CIFAR-10 comparison: `run_benchmark.py table` on the suite `cifar10-5x2` (real CIFAR-10 JPEGs)
with every registered method, plus the ordering checks this comparison exists for.

  python benchmarks/compare_cifar10.py                                # every method, one Ray grid
  python benchmarks/compare_cifar10.py --methods finetune replay icarl der
  python benchmarks/compare_cifar10.py --suite digits-5x2             # smoke test in seconds
  python benchmarks/compare_cifar10.py -- --launcher local            # anything after -- goes to the table command

It is exactly `run_benchmark.py table --suite S --methods ... --reference finetune --output-dir
results/compare_cifar10` (finished trials are skipped, unfinished ones resume), then writes the table, the
checks and the wall time to benchmarks/results/<suite>.md:
  last accuracy:            icarl > finetune and der > finetune
  avg incremental accuracy: finetune < replay <= icarl
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import run_benchmark  # noqa: E402
from harness.config.catalog import list_methods  # noqa: E402
from harness.core.runtime import cpu_model  # noqa: E402

# The table's order: the bounds, then the rehearsal and distillation baselines, then the expanding/transformer ones.
ORDER = ["finetune", "replay", "lwf", "icarl", "ucir", "bic", "wa", "podnet", "der", "dytox", "joint"]
CHECKS = [("last", "icarl", ">", "finetune"), ("last", "der", ">", "finetune"),
          ("avg", "finetune", "<", "replay"), ("avg", "replay", "<=", "icarl")]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", help="methods (default: every registered one except joint)")
    p.add_argument("--suite", default="cifar10-5x2")
    p.add_argument("--reference", default="finetune", help="the paired differences' reference (default: finetune)")
    p.add_argument("--output-dir", default=str(ROOT / "results" / "compare_cifar10"))
    p.add_argument("--markdown", help="default: benchmarks/results/<suite>.md")
    return p.parse_args(own), extra


def repo_relative(args: list[str]) -> str:
    """Command-line arguments as a reader would type them: an absolute path under the repository becomes relative,
    so a results page carries no machine's paths."""
    def shown(arg: str) -> str:
        path = Path(arg)
        return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg
    return " ".join(shown(a) for a in args)


def mean_of(cell: str) -> float | None:
    """The mean of a `mean ± std` cell of the table."""
    try:
        return float(cell.split("±")[0])
    except ValueError:
        return None


def checks(rows: dict[str, dict]) -> list[str]:
    ops = {">": float.__gt__, "<": float.__lt__, "<=": float.__le__}
    lines = []
    for metric, a, op, b in CHECKS:
        col = "Avg inc acc" if metric == "avg" else "Last acc"
        va, vb = (mean_of(rows[m][col]) if m in rows else None for m in (a, b))
        ok = None if va is None or vb is None else ops[op](va, vb)
        label = "avg incremental accuracy" if metric == "avg" else "last accuracy"
        lines.append(f"- {'PASS' if ok else 'FAIL' if ok is False else 'n/a '} {label}: {a} {op} {b}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parse_args(argv)
    methods = args.methods or [m for m in ORDER if m in list_methods() and m != "joint"]
    command = ["table", "--suite", args.suite, "--methods", *methods, "--reference", args.reference,
               "--output-dir", args.output_dir, *extra]
    started, load_before = time.perf_counter(), os.getloadavg()
    status = run_benchmark.cli(command)
    wall = time.perf_counter() - started
    if status == 2:
        return status
    table_path = Path(args.output_dir) / f"table_{args.suite}.md"
    rows = {r["Method"]: r for r in csv.DictReader(table_path.with_suffix(".csv").open())}
    text = "\n".join([
        f"# {args.suite}: class-incremental comparison", "",
        f"`python run_benchmark.py {repo_relative(command)}` (what `python benchmarks/compare_cifar10.py "
        f"{repo_relative(argv)}` runs). The suite's budget for every method (benchmarks/suites/{args.suite}.yaml); "
        "mean ± std over the class orders; accuracies in %.", "",
        table_path.read_text().rstrip(), "",
        "Checks (main head of each method):", *checks(rows), "",
        f"Wall time of this invocation: {wall / 60:.1f} min (finished trials are not rerun). Machine: "
        f"{cpu_model()} ({platform.machine()}, torch CPU kernels {torch.backends.cpu.get_cpu_capability()}), "
        f"{os.cpu_count()} CPU(s), load average before/after {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}. "
        "Each trial's result.json records its machine: float rounding, and so every trial's path, differs between "
        "CPUs.", ""])
    default_md = ROOT / "benchmarks" / "results" / f"{args.suite.replace('-', '_')}.md"
    md = Path(args.markdown) if args.markdown else default_md
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(f"written: {md}")
    return status


if __name__ == "__main__":
    sys.exit(main())
