#!/usr/bin/env python
"""Compare CNN class-incremental methods on real CIFAR-10 JPEGs (suite `cifar10-5x2`) under one small CPU budget.

  python benchmarks/compare_cifar10.py                               # finetune, replay, icarl, der
  python benchmarks/compare_cifar10.py --methods finetune replay icarl der dytox
  python benchmarks/compare_cifar10.py --suite digits-5x2             # smoke test in seconds

Every method runs every class order of the suite (seed from the suite) through the harness API (local launcher:
one trial after another in this process; finished trials under --output-dir are skipped, unfinished ones
resume). The budget is the suite's `budget` (the same for every method, over each method's `cpu` recipe: a
transformer such as DyTox keeps its own optimiser and model). The table (mean +- std over orders of the main head, plus iCaRL's second head) goes to stdout and to
--markdown, with the checks this comparison exists for:
  last accuracy:            icarl > finetune and der > finetune
  avg incremental accuracy: finetune < replay <= icarl
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The shared budget is the suite's own (benchmarks/suites/cifar10-5x2.yaml `budget`: 1,000 training images per
# class, 5 epochs per task, batch 32, a reduced ResNet-18 of width 8 for the CNN methods), so that
# `run_benchmark.py --method M --suite cifar10-5x2` reproduces a row of the table. --set adds overrides.
DEFAULT_METHODS = ["finetune", "replay", "icarl", "der"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="registered methods to compare")
    p.add_argument("--suite", default="cifar10-5x2", help="suite (default: cifar10-5x2, real CIFAR-10 JPEGs)")
    p.add_argument("--orders", nargs="+", help="class orders (default: the suite's)")
    p.add_argument("--output-dir", default=str(ROOT / "results" / "compare_cifar10"),
                   help="trials, checkpoints and per-trial results (default: results/compare_cifar10)")
    p.add_argument("--markdown", default=None,
                   help="where to write the table (default: benchmarks/results/cifar10_5x2.md for cifar10-5x2, "
                        "else <output-dir>/comparison.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every method (YAML value), applied after the budget")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core). On a machine shared with other "
                        "jobs use 1: two spinning threads on oversubscribed cores can run several times slower")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def overrides_for(method: str, args: argparse.Namespace) -> dict:
    from harness.config.compose import parse_overrides

    out = parse_overrides(args.set)
    if args.orders:
        out["orders"] = list(args.orders)
    return out


def _mean_std(values: list[float]) -> str:
    """Mean +- sample std; one value has no std: `n/a`, never 0.00."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} +- n/a"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def old_task_accuracy(matrix: list[list[float | None]]) -> float:
    """Mean accuracy on the tasks before the last one, after the last task (finetune: near 0 = forgetting)."""
    last = matrix[-1]
    olds = [v for v in last[:-1] if v is not None]
    return sum(olds) / len(olds) if olds else float("nan")


def summarise(results_by_method: dict[str, list[dict]]) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Rows of the table (one per method and head) and the mean numbers the checks use (main head)."""
    rows, means = [], {}
    for method, results in results_by_method.items():
        done = [r for r in results if r.get("status") == "finished"]
        heads = list(done[0]["metrics"]) if done else []
        for i, head in enumerate(heads):
            avg = [r["metrics"][head]["average_incremental_accuracy"] for r in done]
            last = [r["metrics"][head]["last_accuracy"] for r in done]
            forg = [r["metrics"][head]["forgetting"] for r in done if r["metrics"][head].get("forgetting") is not None]
            per_order = ", ".join(f"{r['order']}: {r['metrics'][head]['last_accuracy']:.1f}" for r in done)
            old_tasks = [old_task_accuracy(r["metrics"][head]["accuracy_matrix"]) for r in done]
            rows.append({
                "method": method if i == 0 else f"{method} ({head} head)", "head": head,
                "avg inc acc": _mean_std(avg), "last acc": _mean_std(last), "forgetting": _mean_std(forg),
                "old tasks acc at end": _mean_std(old_tasks),
                "last acc per order": per_order, "trials": f"{len(done)}/{len(results)}",
                "params (M)": f"{max(r['parameters'] for r in done) / 1e6:.3f}",
                "time (min)": f"{sum(r['wall_time_s'] for r in done) / 60:.1f}" if i == 0 else "",
            })
            if i == 0 and done:
                means[method] = {"avg": statistics.mean(avg), "last": statistics.mean(last)}
    return rows, means


def checks(means: dict[str, dict[str, float]]) -> list[str]:
    out = []

    def check(text: str, ok: bool | None) -> None:
        out.append(f"- {'PASS' if ok else ('FAIL' if ok is False else 'n/a ')} {text}")

    m = means
    has = lambda *names: all(n in m for n in names)  # noqa: E731
    check("last accuracy: icarl > finetune", m["icarl"]["last"] > m["finetune"]["last"] if has("icarl", "finetune") else None)
    check("last accuracy: der > finetune", m["der"]["last"] > m["finetune"]["last"] if has("der", "finetune") else None)
    check("avg incremental accuracy: finetune < replay",
          m["finetune"]["avg"] < m["replay"]["avg"] if has("finetune", "replay") else None)
    check("avg incremental accuracy: replay <= icarl",
          m["replay"]["avg"] <= m["icarl"]["avg"] if has("replay", "icarl") else None)
    return out


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no results)"
    cols = [c for c in rows[0] if c != "head"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.config.compose import resolve_config
    from harness.run.local import run_local
    from harness.config.identity import expand_trials

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    output_dir = Path(args.output_dir).resolve()
    configs = {m: resolve_config(m, args.suite, overrides=overrides_for(m, args)) for m in args.methods}
    results: dict[str, list[dict]] = {}
    for method, config in configs.items():
        specs = expand_trials(config)
        print(f"== {method}: {len(specs)} trial(s) on {config['suite']} (backbone {config['backbone']}"
              f"{'' if not config.get('backbone_width') else ' width ' + str(config['backbone_width'])}, "
              f"epochs {config.get('base_epochs') or config['epochs']}/{config['epochs']}, batch {config['batch_size']})",
              flush=True)
        results[method] = run_local(specs, output_dir, log=lambda s: print(s, flush=True),
                                    progress=not args.quiet and sys.stderr.isatty())
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rows, means = summarise(results)
    table = to_markdown(rows)
    verdict = checks(means)

    first = next(iter(configs.values()))
    budget = (f"the suite's, for every method: {first.get('train_per_class') or 'all'} training images per class, "
              f"{first['base_epochs']}/{first['epochs']} epochs (first/later tasks), batch {first['batch_size']}; "
              f"CNN methods on {first['backbone']} (width {first.get('backbone_width')}); "
              "DyTox on its reduced cpu recipe")
    torch_threads = _torch_threads()
    doc = [
        f"# {first['suite']}: class-incremental comparison",
        "",
        f"Suite `{first['suite']}`: dataset `{first['dataset']}`, {first['initial_increment']} classes first then "
        f"{first['increment']} per task, memory {first.get('memory_size') or first.get('memory_per_class')} "
        f"({'total' if first.get('memory_size') else 'per class'}), orders {', '.join(map(str, first['orders']))}, "
        f"seeds {first['seeds']}. Mean +- std over the orders; accuracies in %.",
        "",
        f"Budget: {budget}; extra overrides: {args.set or 'none'}.",
        "",
        table,
        "",
        "Checks (main head of each method; iCaRL's main head is NME):",
        *verdict,
        "",
        f"Wall time of this invocation: {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min (trials already finished in "
        f"--output-dir are not rerun; `time (min)` sums each method's trial wall times). "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), "
        f"torch threads {torch_threads}, load average before/after {load_before} / "
        f"{os.getloadavg() if hasattr(os, 'getloadavg') else None}.",
        "",
        f"Command: `python benchmarks/compare_cifar10.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    text = "\n".join(doc)
    md = Path(args.markdown) if args.markdown else (
        ROOT / "benchmarks" / "results" / "cifar10_5x2.md" if first["suite"] == "cifar10-5x2"
        else output_dir / "comparison.md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print()
    print(text)
    print(f"written: {md}")
    failed = sum(r.get("status") != "finished" for rs in results.values() for r in rs)
    return 1 if failed else 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    from harness.errors import HarnessError

    try:
        sys.exit(main())
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
