#!/usr/bin/env python
"""End-to-end wall time of a real suite per method, with the speed options off ("plain") and on ("fast").

  python benchmarks/perf/end_to_end.py                                   # cifar10-5x2 (real CIFAR-10 JPEGs)
  python benchmarks/perf/end_to_end.py --methods icarl der --epochs 1 --rounds 2
  python benchmarks/perf/end_to_end.py --quick                           # digits-5x2, 1 epoch (CI, seconds)

Each (method, variant) runs the suite's FIRST class order (all with --all-orders) through the harness API with
the local launcher (the same path as `run_benchmark.py --launcher local`), in a scratch output dir, so nothing
is skipped or resumed. Variants:
  plain  batched_augment: false, channels_last: false, compile: false   (the harness before issue 8)
  fast   batched_augment: true,  channels_last: auto,  compile: false   (auto = on for the CNN backbones)
  (--compile adds `compiled`: fast + compile: true)
The variants of a method run back to back, in alternating order from one method to the next and from one round
to the next, so a drift in machine load hits them alike. Budget (default `compare`): the one
benchmarks/compare_cifar10.py gives every method (few epochs, a reduced ResNet-18 for the CNN methods), so a
full run takes tens of minutes on 2 CPU cores; `--budget recipe` uses each method's own `cpu` recipe instead
(hours on CPU). --epochs overrides the epochs of every task. Threads: 1 by default (`--threads 0`: torch's
default), see docs/PERFORMANCE.md. Writes JSON (default benchmarks/results/perf_end_to_end.json).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perfutil  # noqa: E402

VARIANTS = {
    "plain": {"batched_augment": False, "channels_last": False, "compile": False},
    "fast": {"batched_augment": True, "channels_last": "auto", "compile": False},
    "compiled": {"batched_augment": True, "channels_last": "auto", "compile": True},
}


def budget_overrides(method: str, budget: str, suite: dict) -> dict:
    """`compare`: the suite's own budget (as benchmarks/compare_cifar10.py); `recipe`: every key of the suite's
    budget put back to the method's `cpu` recipe value (else the harness default)."""
    if budget != "recipe":
        return {}
    from harness.config.compose import defaults, method_recipe

    recipe, _ = method_recipe(method, "cpu", explicit=False)
    base = {**defaults(), **recipe}
    return {key: base.get(key) for key in suite.get("budget") or {}}


def run_variant(method: str, suite: str, overrides: dict, scratch: Path) -> dict:
    from harness.config.compose import resolve_config
    from harness.run.local import run_local
    from harness.config.identity import expand_trials

    config = resolve_config(method, suite, overrides=overrides)
    specs = expand_trials(config)
    started = time.perf_counter()
    results = run_local(specs, scratch, log=lambda s: None, progress=False)
    wall = time.perf_counter() - started
    bad = [r for r in results if r.get("status") != "finished"]
    if bad:
        raise SystemExit(f"{method}: trial {bad[0]['name']} failed: {bad[0].get('error')}\n{bad[0].get('traceback')}")
    head = next(iter(results[0]["metrics"]))
    train_ips = [row["images_per_s"] for r in results for row in r["history"]]
    return {"wall_s": wall, "trial_wall_s": [r["wall_time_s"] for r in results],
            "train_images_per_s_median": perfutil.median(train_ips),
            "last_accuracy": [r["metrics"][head]["last_accuracy"] for r in results],
            "avg_inc_accuracy": [r["metrics"][head]["average_incremental_accuracy"] for r in results],
            "head": head, "backbone": config["backbone"], "epochs": [config.get("base_epochs"), config["epochs"]],
            "trials": [s["name"] for s in specs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits-5x2, 1 epoch, finetune/icarl/der (CI)")
    p.add_argument("--suite", default="cifar10-5x2")
    p.add_argument("--methods", nargs="+", default=["finetune", "replay", "icarl", "der"])
    p.add_argument("--epochs", type=int, default=None, help="epochs of every task (default: the budget's)")
    p.add_argument("--budget", choices=["compare", "recipe"], default="compare")
    p.add_argument("--all-orders", action="store_true", help="every class order of the suite (default: first)")
    p.add_argument("--variants", nargs="+", default=["plain", "fast"], choices=list(VARIANTS))
    p.add_argument("--compile", action="store_true", help="add the `compiled` variant")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.suite, args.epochs, args.budget = "digits-5x2", 1, "compare"   # the suite's own tiny_cnn budget
        if args.methods == p.get_default("methods"):
            args.methods = ["finetune", "icarl", "der"]
    if args.compile and "compiled" not in args.variants:
        args.variants.append("compiled")
    args.output = args.output or perfutil.default_output("end_to_end", args.quick)

    import torch

    from harness.config.compose import load_suite
    from harness.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite)
    for split in ("train", "test"):        # decode (and cache) the data before any clock starts
        load_dataset(suite["dataset"], None, split)
    import harness.run.trial  # noqa: F401 -- imports paid before timing

    runs: dict[tuple[str, str], list[dict]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="clbench-e2e-"))
    try:
        for rnd in range(args.rounds):
            for i, method in enumerate(args.methods):
                order = args.variants if (i + rnd) % 2 == 0 else list(reversed(args.variants))
                for variant in order:
                    overrides = {**budget_overrides(method, args.budget, suite), **VARIANTS[variant]}
                    if args.epochs is not None:
                        overrides.update(epochs=args.epochs, base_epochs=args.epochs, milestones=[],
                                         base_milestones=[])
                    if not args.all_orders:
                        overrides["orders"] = [suite.get("orders", ["natural"])[0]]
                    run = run_variant(method, args.suite, overrides, scratch / f"{method}-{variant}-{rnd}")
                    runs.setdefault((method, variant), []).append(run)
                    print(f"round {rnd + 1}/{args.rounds} {method:9s} {variant:8s} wall {run['wall_s']:7.1f} s  "
                          f"train {run['train_images_per_s_median']:7.1f} img/s  last acc "
                          f"{run['last_accuracy'][0]:.1f}", flush=True)
                    shutil.rmtree(scratch / f"{method}-{variant}-{rnd}", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base_variant = args.variants[0]
    rows, results = [], []
    for (method, variant), rs in runs.items():
        wall = perfutil.median([r["wall_s"] for r in rs])
        ips = perfutil.median([r["train_images_per_s_median"] for r in rs])
        base = perfutil.median([r["wall_s"] for r in runs[(method, base_variant)]])
        entry = {"method": method, "variant": variant, "options": VARIANTS[variant], "wall_s_median": wall,
                 "speedup_vs_" + base_variant: base / wall, "train_images_per_s": ips, "runs": rs}
        results.append(entry)
        last = perfutil.median([a for r in rs for a in r["last_accuracy"]])
        rows.append([method, variant, wall, f"{base / wall:.2f}x", ips, last, rs[0]["backbone"]])
    machine = perfutil.machine_info()
    report = {"benchmark": "end_to_end", "quick": args.quick, "suite": args.suite, "budget": args.budget,
              "epochs": args.epochs, "rounds": args.rounds, "threads": args.threads or "torch default",
              "all_orders": args.all_orders, "results": results, "machine": machine}
    print()
    print(f"{args.suite}, median of {args.rounds} round(s), {args.threads or 'default'} thread(s); "
          f"{machine['cpu_model']}, {machine['cpus']} CPUs, load {machine['load_average'][0]:.1f}")
    print(perfutil.markdown_table(["method", "variant", "wall (s)", f"speed-up vs {base_variant}",
                                   "train img/s", "last acc (%)", "backbone"], rows))
    perfutil.write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
