#!/usr/bin/env python
"""The harness's own overhead: a small real suite through Ray (Tune grid of Ray Train jobs, 1 worker per trial)
versus the same trials in a plain in-process loop (the local launcher), alternated, in one session.

  python benchmarks/perf/harness_overhead.py             # cifar10-mini, tiny_cnn, 4 epochs, 2 orders, 3 repeats
  python benchmarks/perf/harness_overhead.py --quick     # digits-5x2, 1 repeat: about a minute (CI)

Reported per launcher (median over repeats): wall time of the whole suite, start-up time to the first training
step (from the launcher call; for Ray that includes starting Ray, as the CLI does), the time spent outside
run_trial (the launcher's own cost: Ray start, process start-up, reporting, teardown), and the ratio ray / local
(goal <= 1.10), as a ratio of medians and as the median of back-to-back pairs. `--warm` adds Ray with an already running session (a persistent cluster). Trials run one at a
time in both (--max-concurrent-trials 1): the ratio measures overhead, not parallelism. Writes JSON
(default benchmarks/results/harness_overhead.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harness.config import resolve_config  # noqa: E402
from harness.launch import LaunchOptions, TrialEvents, run_local  # noqa: E402
from harness.trials import expand_trials  # noqa: E402


def build_specs(args: argparse.Namespace) -> list[dict]:
    overrides = {"backbone": args.backbone, "epochs": args.epochs, "base_epochs": args.epochs,
                 "milestones": [], "base_milestones": [], "orders": args.orders, "seeds": args.seeds}
    config = resolve_config(args.method, args.suite, overrides={k: v for k, v in overrides.items() if v is not None})
    return expand_trials(config)


def timed_run(kind: str, specs: list[dict], out: Path, warm: bool = False) -> dict:
    events = TrialEvents(lambda s: None)
    started_unix, started = time.time(), time.perf_counter()
    if kind == "local":
        results = run_local(specs, out, log=lambda s: None, progress=False, events=events)
    else:
        from harness.ray_launch import run_ray

        results = run_ray(specs, out, LaunchOptions(max_concurrent_trials=1), events=events)
    wall = time.perf_counter() - started
    bad = [r for r in results if r.get("status") != "finished"]
    if bad:
        raise SystemExit(f"{kind}: trial {bad[0]['name']} failed: {bad[0].get('error')}")
    first = min(r["first_step_unix"] for r in results if r.get("first_step_unix"))
    return {"wall_s": wall, "startup_s": first - started_unix, "trial_s": [r["wall_time_s"] for r in results],
            "metrics": [r["metrics"] for r in results]}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits-5x2, 1 repeat (CI)")
    p.add_argument("--suite", default="cifar10-mini")
    p.add_argument("--method", default="replay")
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--epochs", type=int, default=None, help="default: the suite's budget")
    p.add_argument("--orders", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm", action="store_true", help="also time Ray with an already running session")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "harness_overhead.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.suite, args.repeats, args.epochs = "digits-5x2", 1, args.epochs or 1
        if args.output == p.get_default("output"):
            args.output = str(ROOT / "benchmarks" / "results" / "harness_overhead_quick.json")

    specs = build_specs(args)
    import harness.trial  # noqa: F401 -- imports paid before timing, as the CLI pays them in both cases

    kinds = ["local", "ray"] + (["ray_warm"] if args.warm else [])
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    load_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="clbench-overhead-"))
    try:
        for i in range(args.repeats):
            for kind in kinds:                       # alternated, so load drifts hit both launchers alike
                out = scratch / f"{kind}-{i}"
                if kind == "ray_warm":
                    import ray

                    from harness.ray_launch import init_ray
                    init_ray()
                    run = timed_run("ray", specs, out)
                    ray.shutdown()
                else:
                    run = timed_run(kind, specs, out)
                runs[kind].append(run)
                print(f"repeat {i + 1}/{args.repeats} {kind:8s} wall {run['wall_s']:7.1f} s  "
                      f"first step after {run['startup_s']:5.1f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    local_wall = median([r["wall_s"] for r in runs["local"]])
    summary = {}
    for kind in kinds:
        wall = median([r["wall_s"] for r in runs[kind]])
        # Ratios of runs made back to back (less exposed to load drifts than the ratio of medians), and the
        # launcher's own time: wall minus the time spent inside run_trial.
        pairs = [r["wall_s"] / l["wall_s"] for r, l in zip(runs[kind], runs["local"])]
        outside = [r["wall_s"] - sum(r["trial_s"]) for r in runs[kind]]
        summary[kind] = {"wall_s_median": wall, "startup_s_median": median([r["startup_s"] for r in runs[kind]]),
                         "ratio_to_local": wall / local_wall, "paired_ratio_median": median(pairs),
                         "outside_trials_s_median": median(outside),
                         "wall_s": [r["wall_s"] for r in runs[kind]],
                         "startup_s": [r["startup_s"] for r in runs[kind]],
                         "trial_s": [r["trial_s"] for r in runs[kind]], "paired_ratios": pairs}
    same = all(r["metrics"] == runs["local"][0]["metrics"] for kind in kinds for r in runs[kind])
    try:
        import ray
        import torch

        versions = {"ray": ray.__version__, "torch": torch.__version__}
    except ImportError:
        versions = {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {
        "suite": args.suite, "method": args.method, "backbone": args.backbone, "trials": len(specs),
        "trial_names": [s["name"] for s in specs], "epochs": specs[0]["config"]["epochs"], "repeats": args.repeats,
        "max_concurrent_trials": 1, "ray_workers_per_trial": 1, "summary": summary, "same_metrics": same,
        "goal_ratio": 1.10, "cpus": os.cpu_count(), "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "platform": platform.platform(), "python": platform.python_version(),
        "versions": versions, "git_commit": commit.strip(), "date_unix": time.time(),
    }
    print()
    print(f"{args.suite} ({len(specs)} trial(s), {args.method}, {args.backbone}, {report['epochs']} epoch(s)), "
          f"median of {args.repeats}; load average {load_start[0]:.1f} -> {report['load_average_end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("| launcher | wall (s) | first training step (s) | time outside run_trial (s) | ratio to local "
          "(of medians / paired) |")
    print("|---|---|---|---|---|")
    for kind, s in summary.items():
        print(f"| {kind} | {s['wall_s_median']:.1f} | {s['startup_s_median']:.1f} | "
              f"{s['outside_trials_s_median']:.1f} | {s['ratio_to_local']:.2f} / {s['paired_ratio_median']:.2f} |")
    print(f"identical metrics across launchers: {same}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
