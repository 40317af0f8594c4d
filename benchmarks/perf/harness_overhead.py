#!/usr/bin/env python
"""The harness's own overhead: a small real suite through Ray (Tune grid of Ray Train jobs, 1 worker per trial)
versus the same trials in a plain in-process loop (the local launcher), alternated, in one session.

  python benchmarks/perf/harness_overhead.py             # cifar10-mini, tiny_cnn, 4 epochs, 2 orders, 3 repeats
  python benchmarks/perf/harness_overhead.py --quick     # digits-5x2 (1 trial), local vs ray, 1 repeat: ~1 min (CI)

Launchers timed (alternated, so load drifts hit them alike):
  local       the plain loop: trials one after another in this process (torch's default threads)
  ray         Ray as `run_benchmark.py` runs it: the default resource plan decides how many trials run at once
              and their threads (on 2 CPUs: the 2 trials side by side, 1 thread each)
  ray_serial  Ray with one trial at a time, which the plan gives all the CPUs (the plain loop's threads): isolates
              Ray's own cost, and its metrics must equal the local ones bit for bit
  ray_warm    (--warm) `ray`, with Ray already started (a persistent cluster)
  cli         `run_benchmark.py` in a fresh process (embedded Ray), as a user runs it: start-up counts from the
              command's start (imports, pre-flight, Ray's start)
Reported per launcher (median over repeats): wall time of the whole suite, start-up time to the first training
step (from the launcher call; for Ray that includes starting Ray, as the CLI does), the time spent outside
run_trial (serial launchers only: Ray start, process start-up, reporting, teardown), the gap between one
trial's end and the next one's start (serial launchers: the per-trial cost once running), the ratio to local (goal
<= 1.10) as a ratio of medians and as the median of back-to-back pairs, and whether the metrics equal the local
ones. Writes JSON (default benchmarks/results/harness_overhead.json).
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

from harness.config.compose import resolve_config  # noqa: E402
from harness.run.events import LaunchOptions, TrialEvents
from harness.run.local import run_local  # noqa: E402
from harness.config.identity import expand_trials  # noqa: E402


def build_specs(args: argparse.Namespace) -> list[dict]:
    overrides = {"backbone": args.backbone, "orders": args.orders, "seeds": args.seeds}
    if args.epochs is not None:     # else the suite's budget, schedule included
        overrides.update(epochs=args.epochs, base_epochs=args.epochs, milestones=[], base_milestones=[])
    config = resolve_config(args.method, args.suite, overrides={k: v for k, v in overrides.items() if v is not None})
    return expand_trials(config)


def timed_run(kind: str, specs: list[dict], out: Path) -> dict:
    """Run the suite with one launcher; `kind` is local, ray (the default plan) or ray_serial."""
    events = TrialEvents(lambda s: None)
    started_unix, started = time.time(), time.perf_counter()
    if kind == "local":
        results = run_local(specs, out, log=lambda s: None, progress=False, events=events)
    else:
        from harness.run.ray_grid import run_ray

        # ray_serial: one trial at a time, which the default plan gives all the CPUs (the plain loop's threads)
        results = run_ray(specs, out, LaunchOptions(max_concurrent_trials=1 if kind == "ray_serial" else None),
                          events=events)
    wall = time.perf_counter() - started
    bad = [r for r in results if r.get("status") != "finished"]
    if bad:
        raise SystemExit(f"{kind}: trial {bad[0]['name']} failed: {bad[0].get('error')}")
    return _measures(results, wall, started_unix)


def _measures(results: list[dict], wall: float, started_unix: float) -> dict:
    first = min(r["first_step_unix"] for r in results if r.get("first_step_unix"))
    plan = results[0].get("resources") or {}
    # Trials one after another: what the launcher spends between one trial's end and the next one's start
    # (Ray: Tune's scheduling, resetting the reused actor, reporting; local: writing result.json).
    spans = sorted((r["started_unix"], r["finished_unix"]) for r in results if r.get("started_unix"))
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return {"wall_s": wall, "startup_s": first - started_unix, "trial_s": [r["wall_time_s"] for r in results],
            "gaps_between_trials_s": gaps,
            "metrics": [r["metrics"] for r in results], "concurrency": plan.get("concurrency", 1),
            "trial_startup_s": [r.get("startup_s") or {} for r in results],
            "threads": plan.get("threads_per_worker", _local_threads())}


def cli_run(args: argparse.Namespace, specs: list[dict], out: Path) -> dict:
    """`run_benchmark.py` in a fresh process, as a user runs it (embedded Ray): start-up is measured from the
    command's start, Python's imports and Ray's start included."""
    cfg = specs[0]["config"]
    cmd = [sys.executable, str(ROOT / "run_benchmark.py"), "--method", args.method, "--suite", args.suite,
           "--output-dir", str(out), "--no-tracking", "--quiet", "--set", f"backbone={args.backbone}",
           "--orders", *[s["order_name"] for s in specs[::len(cfg["seeds"])]],
           "--seeds", *[str(s) for s in cfg["seeds"]]]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    started_unix, started = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"cli: exit {proc.returncode}: {proc.stderr[-2000:]}")
    results = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/result.json"))]
    return _measures(results, wall, started_unix)


def _local_threads() -> int:
    import torch

    return torch.get_num_threads()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _stage_medians(runs: list[dict]) -> dict[str, float]:
    stages = [s for run in runs for s in run["trial_startup_s"]]
    keys = list(dict.fromkeys(k for s in stages for k in s))
    return {k: median([s[k] for s in stages if k in s]) for k in keys}


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
    p.add_argument("--launchers", nargs="+", default=["local", "ray", "ray_serial", "cli"],
                   choices=["local", "ray", "ray_serial", "cli"], help="which launchers to time (local is always timed)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "harness_overhead.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.suite, args.repeats, args.epochs = "digits-5x2", 1, args.epochs or 1
        if args.launchers == p.get_default("launchers"):
            args.launchers = ["local", "ray", "cli"]   # one trial: the default plan is already one at a time
        if args.output == p.get_default("output"):
            args.output = str(ROOT / "benchmarks" / "results" / "harness_overhead_quick.json")

    specs = build_specs(args)
    import harness.run.trial  # noqa: F401 -- imports paid before timing, as the CLI pays them in both cases

    kinds = ["local"] + [k for k in args.launchers if k != "local"] + (["ray_warm"] if args.warm else [])
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    load_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="clbench-overhead-"))
    try:
        for i in range(args.repeats):
            for kind in kinds:                       # alternated, so load drifts hit both launchers alike
                out = scratch / f"{kind}-{i}"
                if kind == "ray_warm":
                    import ray

                    from harness.run.ray_session import init_ray
                    init_ray()
                    run = timed_run("ray", specs, out)
                    ray.shutdown()
                elif kind == "cli":
                    run = cli_run(args, specs, out)
                else:
                    run = timed_run(kind, specs, out)
                runs[kind].append(run)
                print(f"repeat {i + 1}/{args.repeats} {kind:10s} wall {run['wall_s']:7.1f} s  "
                      f"first step after {run['startup_s']:5.1f} s  ({run['concurrency']} trial(s) at once, "
                      f"{run['threads']} thread(s) each)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    local_wall = median([r["wall_s"] for r in runs["local"]])
    summary = {}
    for kind in kinds:
        wall = median([r["wall_s"] for r in runs[kind]])
        # Ratios of runs made back to back: less exposed to load drifts than the ratio of medians.
        pairs = [r["wall_s"] / l["wall_s"] for r, l in zip(runs[kind], runs["local"])]
        # The launcher's own time (wall minus the time inside run_trial) only adds up when trials run one at a time.
        serial = all(r["concurrency"] == 1 for r in runs[kind])
        outside = [r["wall_s"] - sum(r["trial_s"]) for r in runs[kind]]
        summary[kind] = {"wall_s_median": wall, "startup_s_median": median([r["startup_s"] for r in runs[kind]]),
                         "ratio_to_local": wall / local_wall, "paired_ratio_median": median(pairs),
                         "outside_trials_s_median": median(outside) if serial else None,
                         # Between two trials of a serial run: the launcher's per-trial cost once it is running.
                         "gap_between_trials_s_median": median([g for r in runs[kind]
                                                                for g in r["gaps_between_trials_s"]]) if serial else None,
                         "concurrency": runs[kind][0]["concurrency"], "threads": runs[kind][0]["threads"],
                         # Per trial, from the launcher starting it to its first training step, by stage.
                         "trial_startup_s_median": _stage_medians(runs[kind]),
                         # Bitwise equal to the plain loop? Expected when the threads match (docs/CLUSTER.md).
                         "same_metrics_as_local": all(r["metrics"] == runs["local"][0]["metrics"] for r in runs[kind]),
                         "wall_s": [r["wall_s"] for r in runs[kind]],
                         "startup_s": [r["startup_s"] for r in runs[kind]],
                         "trial_s": [r["trial_s"] for r in runs[kind]], "paired_ratios": pairs}
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
        "ray_workers_per_trial": 1, "summary": summary,
        "goal_ratio": 1.10, "cpus": os.cpu_count(), "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "platform": platform.platform(), "python": platform.python_version(),
        "versions": versions, "git_commit": commit.strip(), "date_unix": time.time(),
    }
    print()
    print(f"{args.suite} ({len(specs)} trial(s), {args.method}, {args.backbone}, {report['epochs']} epoch(s)), "
          f"median of {args.repeats}; load average {load_start[0]:.1f} -> {report['load_average_end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("| launcher | trials at once x threads | wall (s) | first training step (s) | time outside run_trial (s) "
          "| between trials (s) | ratio to local (of medians / paired) | metrics = local |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, s in summary.items():
        outside = "-" if s["outside_trials_s_median"] is None else f"{s['outside_trials_s_median']:.1f}"
        gap = s["gap_between_trials_s_median"]
        gap = "-" if gap is None or gap != gap else f"{gap:.2f}"
        print(f"| {kind} | {s['concurrency']} x {s['threads']} | {s['wall_s_median']:.1f} | "
              f"{s['startup_s_median']:.1f} | {outside} | {gap} | {s['ratio_to_local']:.2f} / "
              f"{s['paired_ratio_median']:.2f} | {s['same_metrics_as_local']} |")
    print()
    print("per trial, launcher start of the trial -> first training step (median s): " + "; ".join(
        f"{kind}: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in s["trial_startup_s_median"].items())
        for kind, s in summary.items()))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
