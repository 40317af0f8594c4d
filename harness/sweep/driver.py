"""Hyper-parameter sweeps: `run_benchmark.py sweep --method M --suite S --space space.yaml`.

Each sweep trial is one continual run (harness.run.trial.run_trial) on the tuning protocol below, launched exactly
like a benchmark trial (harness.run.ray_trial.trial_trainable: inside its Tune actor with one worker, a Ray Train
job with several) in the same kind of grid (harness.run.grid); Ray Tune samples the space (random / grid /
optuna) and ASHA stops bad configurations after their first tasks.

The sweep's parts: harness.sweep.space (the space file), .plan (the sweep and its trials, checked before Ray
starts), .trial_events (the driver's lines and MLflow per trial), .tracker (MLflow), .outcome (results.csv,
best.yaml); this module is the command.

Tuning protocol (docs/SWEEPS.md): the metric is measured on a validation split held out of the TRAINING data
(`fraction` of every class, fixed seed), only the first k tasks are run (--val-tasks, default 3), and the test
split is never loaded (run_trial does not call load_dataset(..., "test") when spec["validation"] is set).

Where things go (<output_dir>/sweeps/<name>/, <name> deterministic, so `--resume` finds it again):
    tune/                   Ray Tune's experiment state (Tuner.restore reads it)
    trials/<name>_<trial id>/  per-trial checkpoints and result.json (as with run_benchmark.py)
    ray/<trial>/            Ray Train's checkpoints (multi-worker trials)
    results.csv, best.yaml  every trial's outcome; the best configuration (`run_benchmark.py --options best.yaml`)
MLflow: experiment `clbench-sweeps` (kept apart from benchmark leaderboards), a parent run per sweep
(run_kind=sweep), a child run per trial (run_kind=sweep_trial) with the per-task validation metrics.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from harness.errors import ConfigError, HarnessError
from harness.sweep.outcome import sweep_summary, write_outputs
from harness.sweep.plan import (DEFAULT_VAL_FRACTION, DEFAULT_VAL_TASKS, METRICS, TIME_ATTR, VAL_SPLIT_SEED,
                                plan_sweep, sweep_trainable, trial_sweep)
from harness.sweep.space import SEARCHES, SearchSpace
from harness.tracking.store import STATUS_FAILED, STATUS_FINISHED

if TYPE_CHECKING:
    from harness.run.events import LaunchOptions
    from harness.sweep.tracker import SweepTracker

DEFAULT_EXPERIMENT = "clbench-sweeps"


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def add_sweep_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `sweep` subcommand's options (run_benchmark.py sweep ...)."""
    p.add_argument("--method", required=True, help="registered method (see run_benchmark.py --list-methods)")
    p.add_argument("--suite", required=True, help="suite name from benchmarks/suites/ or a suite .yaml path")
    p.add_argument("--space", required=True, metavar="YAML",
                   help="search space: option -> Tune distribution, e.g. `lr: {loguniform: [1.0e-3, 1.0e-1]}` "
                        "(examples: benchmarks/sweeps/<method>.yaml)")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help="samples of the space (grid entries are repeated per sample, as in Tune); "
                        "default: 10, or 1 with --search grid")
    p.add_argument("--search", choices=SEARCHES, default="random",
                   help="random: Tune's variant generator (default); grid: enumerate grid/choice values; "
                        "optuna: TPE (needs `pip install optuna`)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha: stop bad configurations after their first tasks (default); fifo: run all to the end")
    p.add_argument("--metric", choices=sorted(METRICS), default="val_accuracy",
                   help="what ASHA compares per task and the best trial is chosen by (default: val_accuracy)")
    p.add_argument("--grace-period", type=int, default=1, metavar="T",
                   help="ASHA: tasks every trial runs before it can be stopped (default 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0, metavar="R",
                   help="ASHA: keep the top 1/R of the trials at each rung (default 2)")
    g = p.add_argument_group("tuning protocol (see docs/SWEEPS.md)")
    g.add_argument("--val-tasks", type=int, default=DEFAULT_VAL_TASKS, metavar="K",
                   help=f"tune on the first K tasks (default {DEFAULT_VAL_TASKS}, or all when the suite has fewer)")
    g.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help="fraction of each class's TRAINING samples held out as the validation split "
                        f"(default {DEFAULT_VAL_FRACTION}); the test split is never read")
    g.add_argument("--order", help="class order to tune on (default: the suite's first)")
    g.add_argument("--seed", type=int, help="seed of every trial (default: the suite's first); random search "
                                            "samples with --search-seed")
    g.add_argument("--search-seed", type=int, default=0, help="seed of the random / optuna sampler (default 0)")
    o = p.add_argument_group("options and output")
    o.add_argument("--recipe", help="named recipe in benchmarks/recipes/<method>/ (default: the suite's)")
    o.add_argument("--options", nargs="+", default=[], metavar="YAML",
                   help="option files applied before the swept values (as in run_benchmark.py)")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fixed option for every trial, e.g. --set epochs=2")
    o.add_argument("--data-path", help="dataset directory (official layout)")
    o.add_argument("--output-dir", default="results",
                   help="sweeps go to <output-dir>/sweeps/<name>/ (default: ./results)")
    o.add_argument("--name", help="sweep name (default: <method>_<suite>_sweep-<hash of the sweep's settings>)")
    o.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep with the same settings (Tuner.restore); finished trials "
                        "are kept, not rerun")
    o.add_argument("--tracking-uri", help="MLflow store (default: sqlite <output-dir>/mlflow.db)")
    o.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    r = p.add_argument_group("Ray")
    r.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start Ray on this machine)")
    r.add_argument("--num-workers", type=int, help="DDP workers per trial")
    r.add_argument("--device", help="auto | cpu | cuda")
    r.add_argument("--max-concurrent-trials", type=int, metavar="N", help="trials at once (default: what fits)")
    r.add_argument("--cpus-per-worker", type=float, metavar="X", help="CPUs per DDP worker (default: fit the cluster)")
    r.add_argument("--gpus-per-worker", type=float, metavar="X", help="GPUs per DDP worker")
    r.add_argument("--max-failures", type=int, default=2, metavar="N",
                   help="restarts of a failed trial from its last finished task (default 2)")
    r.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress output")
    return p


def build_parser() -> argparse.ArgumentParser:
    from harness.run.preflight import OneLineParser     # argparse errors as one `error:` line

    p = OneLineParser(prog="run_benchmark.py sweep", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_sweep_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """`run_benchmark.py sweep ...` (argv without the word `sweep`)."""
    args = build_parser().parse_args(argv)
    return run_sweep(args)


# ---------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------
def tune_objects(sweep: dict, space: SearchSpace, concurrency: int):
    """(param_space, scheduler, search_alg) for Tune."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    k = sweep["validation"]["tasks"]
    if sweep["scheduler"] == "asha":
        # Rungs at grace * rf^i tasks, up to k - 1 (max_t): stopping a trial after its last task saves nothing,
        # and with stop_last_trials=False a trial that survived every rung is never killed at the end.
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=max(k - 1, sweep["grace_period"]),
                                  grace_period=sweep["grace_period"],
                                  reduction_factor=sweep["reduction_factor"], stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    if sweep["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=sweep["search_seed"])
    else:
        # max_concurrent here: Tune ignores TuneConfig.max_concurrent_trials for an explicit variant generator.
        # Trials are then created as slots free up, so they start in the order the space lists them.
        search_alg = BasicVariantGenerator(random_state=sweep["search_seed"], max_concurrent=concurrency)
    return space.to_tune(sweep["search"]), scheduler, search_alg


def run_sweep(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """The `sweep` subcommand: 0 when a best configuration was found (and written), 1 when no trial completed."""
    sweep = plan_sweep(args, log)
    space: SearchSpace = sweep["space"]
    sweep.update(swept=space.swept, space_yaml=space.as_yaml_dict())
    sweep_dir = Path(sweep["sweep_dir"])
    exp_dir = sweep_dir / "tune"

    from ray import tune

    restorable = exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))
    if args.resume and not restorable:
        raise ConfigError(f"nothing to resume: no sweep state in {exp_dir} (give the same --method, --suite, "
                          "--space and sweep options as the interrupted sweep, or its --name)")
    if not args.resume and restorable:
        raise ConfigError(f"sweep {sweep['name']} already exists in {sweep_dir}: add --resume to continue it "
                          "(finished trials are kept), or delete that folder to start over")
    k = sweep["validation"]["tasks"]
    log(f"sweep {sweep['name']}: {args.method} on {sweep['suite']}, {sweep['num_trials']} trial(s) "
        f"({sweep['search']} search, {sweep['scheduler']}), space "
        f"{', '.join(p.describe() for p in space.params.values())}")
    log(f"protocol: first {k} task(s), validation = {sweep['validation']['fraction']:g} of each class's training "
        f"data (seed {VAL_SPLIT_SEED}), order {sweep['order_name']}, seed {sweep['seed']}; the test split is "
        "never read")
    from harness.sweep.tracker import SweepTracker

    tracker = SweepTracker.for_sweep(sweep, args.tracking_uri, args.experiment, log)     # fails before Ray starts
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "space.yaml").write_text(Path(sweep["space_path"]).read_text())

    from harness.run.events import LaunchOptions
    from harness.run.ray_session import init_ray

    options = LaunchOptions(address=args.address, max_concurrent_trials=args.max_concurrent_trials,
                            max_failures=args.max_failures, verbose=args.verbose)
    started_here = init_ray(options.address, options.verbose)
    try:
        summary = _fit(sweep, space, tracker, options, args.resume, exp_dir, log)
        files = write_outputs(sweep, summary, log)
        tracker.end(summary, files, STATUS_FINISHED if summary["best"] is not None else STATUS_FAILED)
        return 0 if summary["best"] is not None else 1
    except BaseException:
        tracker.abort()       # the parent run ends KILLED, not RUNNING; `--resume` continues it
        raise
    finally:
        if started_here:
            import ray

            ray.shutdown()


def _fit(sweep: dict, space: SearchSpace, tracker: "SweepTracker", options: "LaunchOptions", restore: bool,
         exp_dir: Path, log: Callable[[str], None]) -> dict:
    """Run (or continue) the sweep's grid; its summary. Raises the user's error or KeyboardInterrupt
    (harness.run.grid) instead of summarising a partial sweep."""
    from harness.run.grid import cluster_plan, run_grid
    from harness.sweep.trial_events import SweepDriver

    plan = cluster_plan([sweep["base"]], sweep["num_trials"], options, log, sweep["num_trials"])
    param_space = tune_config = None
    if not restore:       # Tuner.restore brings them back from the saved state
        param_space, scheduler, search_alg = tune_objects(sweep, space, plan.concurrency)
        tune_config = {"metric": sweep["metric"], "mode": "max", "scheduler": scheduler, "search_alg": search_alg,
                       "num_samples": sweep["num_samples"]}
    grid = run_grid(SweepDriver(sweep, tracker, log), sweep_trainable, {"sweep": trial_sweep(sweep)}, plan, options,
                    exp_dir, param_space=param_space, tune_config=tune_config, trial_name=_trial_id,
                    restore=restore, record_failures=False)
    return sweep_summary(sweep, grid)


def _trial_id(trial) -> str:
    return trial.trial_id


if __name__ == "__main__":
    # Run the imported module, not __main__: Tune pickles what it is given by reference to its module.
    from harness.sweep.driver import main as _main

    try:
        sys.exit(_main(sys.argv[1:]))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
