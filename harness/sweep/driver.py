"""Hyper-parameter sweeps: `run_benchmark.py sweep --method M --suite S --space space.yaml`.

Each sweep trial is one continual run (harness.trial.run_trial) on the tuning protocol below, launched exactly
like a benchmark trial (harness.ray_trial.trial_trainable: inside its Tune actor with one worker, a Ray Train
job with several); Ray Tune samples the space (random / grid / optuna) and ASHA stops bad configurations after their
first tasks.

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
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from harness.errors import ConfigError, HarnessError
from harness.run.ray_cleanup import PeriodicReaper
from harness.sweep.space import SEARCHES, SearchSpace, best_config_yaml, load_space, plain

DEFAULT_EXPERIMENT = "clbench-sweeps"
DEFAULT_VAL_TASKS = 3
DEFAULT_VAL_FRACTION = 0.1
VAL_SPLIT_SEED = 0           # the validation split is the same for every trial, seed and class order
METRICS = {"val_accuracy": "validation accuracy on the classes seen so far, after each task",
           "avg_inc_accuracy": "average incremental validation accuracy up to each task"}
TIME_ATTR = "tasks_seen"     # ASHA's clock: tasks finished (task index + 1), reported by run_trial per task
OUTCOMES = ("completed", "early_stopped", "failed")


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
    r.add_argument("--max-failures", type=int, default=2, metavar="N", help="restarts of a failed trial from its last finished task (default 2)")
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
# Sweep definition (everything checked here, before Ray starts)
# ---------------------------------------------------------------------------------------------------------
def _overrides(args: argparse.Namespace) -> dict:
    from harness.config.compose import parse_value

    out: dict[str, Any] = {"data_path": str(Path(args.data_path).resolve()) if args.data_path else None,
                           "num_workers": args.num_workers, "device": args.device,
                           "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker,
                           "orders": [args.order] if args.order else None,
                           "seeds": [args.seed] if args.seed is not None else None}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def _check_args(args: argparse.Namespace) -> None:
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.val_tasks < 1:
        raise ConfigError(f"--val-tasks must be >= 1, got {args.val_tasks}")
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1 (e.g. 0.1), got {args.val_fraction}")
    if args.grace_period < 1:
        raise ConfigError(f"--grace-period must be >= 1 task, got {args.grace_period}")
    if not args.reduction_factor > 1:
        raise ConfigError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.max_concurrent_trials is not None and args.max_concurrent_trials < 1:
        raise ConfigError(f"--max-concurrent-trials must be >= 1, got {args.max_concurrent_trials}")
    if args.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("optuna is not installed: pip install optuna (or use --search random / grid)") from None


def num_tasks_of(config: dict) -> int:
    from harness.data import dataset_info
    from harness.core.scenarios import make_increments

    info = dataset_info(config["dataset"], config.get("data_path"))
    return len(make_increments(info.num_classes, config["initial_increment"], config["increment"]))


def plan_sweep(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Resolve and check everything (config, space, protocol, name) without starting Ray.
    Returns the plain, picklable `sweep` dict the trials are built from."""
    from harness.config.compose import config_hash, resolve_config, validate
    from harness.config.identity import RUNTIME_KEYS, order_name

    _check_args(args)
    base = resolve_config(args.method, args.suite, args.options, _overrides(args), args.recipe)
    space = load_space(args.space, args.method, args.suite, args.recipe, base=base, search=args.search)
    validate({**base, **space.fixed()})
    from harness.run.preflight import preflight    # the driver's pre-flight: before Ray starts or any file is written
    preflight({**base, **space.fixed()}, output_dir=Path(args.output_dir).resolve(), launcher="ray",
              address=args.address, tracking_uri=args.tracking_uri, experiment=args.experiment,
              splits=("train",))
    from harness.run.cluster import preflight_cluster    # on a cluster: join it, check shared folders on every node

    preflight_cluster(args.address, Path(args.output_dir).resolve(), base.get("data_path"), args.tracking_uri,
                      bool(base.get("download")), getattr(args, "verbose", False))
    total_tasks = num_tasks_of(base)
    k = min(args.val_tasks, total_tasks)
    if k < args.val_tasks and args.val_tasks != DEFAULT_VAL_TASKS:
        log(f"note: {base['suite']} has {total_tasks} task(s): tuning on all of them (--val-tasks {args.val_tasks})")
    scheduler = args.scheduler
    if scheduler == "asha" and args.grace_period >= k:
        if args.grace_period != 1 and k > 1:
            raise ConfigError(f"--grace-period {args.grace_period} leaves no task to save out of the {k} tuning "
                              f"task(s): ASHA stops trials between tasks; use --grace-period 1..{k - 1}, more "
                              "--val-tasks, or --scheduler fifo")
        if args.grace_period != 1:
            raise ConfigError("one tuning task leaves ASHA nothing to stop; use --scheduler fifo or --val-tasks 2+")
        log(f"note: {k} tuning task(s) leave ASHA nothing to stop; running every trial to the end (fifo)")
        scheduler = "fifo"
    num_samples = args.num_samples or (1 if args.search == "grid" else 10)
    order, seed = base["orders"][0], int(base["seeds"][0])
    validation = {"tasks": k, "fraction": float(args.val_fraction), "seed": VAL_SPLIT_SEED}
    settings = {"method": args.method, "suite": base["suite"], "base": config_hash(base, exclude=RUNTIME_KEYS),
                "space": space.as_yaml_dict(), "search": args.search, "scheduler": scheduler,
                "num_samples": num_samples, "metric": args.metric, "grace": args.grace_period,
                "rf": args.reduction_factor, "validation": validation, "order": order, "seed": seed,
                "search_seed": args.search_seed}
    digest = hashlib.sha1(json.dumps(plain(settings), sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = args.name or f"{args.method}_{base['suite']}_sweep-{digest}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--name {name!r}: use letters, digits, '-', '_' and '.' only")
    output_dir = Path(args.output_dir).resolve()
    return {"name": name, "method": args.method, "suite": base["suite"], "base": base, "space": space,
            "space_path": str(Path(args.space).resolve()), "order": order, "order_name": order_name(order),
            "seed": seed, "validation": validation, "num_samples": num_samples, "search": args.search,
            "search_seed": args.search_seed, "scheduler": scheduler, "metric": args.metric,
            "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
            "output_dir": str(output_dir), "sweep_dir": str(output_dir / "sweeps" / name),
            "num_trials": space.grid_size(args.search) * num_samples}


def trial_spec(sweep: dict, hyperparameters: dict, trial_id: str) -> dict:
    """A run_trial spec for one Tune trial: the base config with the sampled values, on the tuning protocol.
    The name carries Tune's trial id, which Tuner.restore keeps, so a resumed trial finds its checkpoints."""
    config = {**sweep["base"], **plain(hyperparameters), "seed": sweep["seed"]}
    return {"name": f"{sweep['name']}_{trial_id}", "order": sweep["order"], "order_name": sweep["order_name"],
            "seed": sweep["seed"], "config": config, "validation": dict(sweep["validation"]),
            "hyperparameters": plain(hyperparameters), "sweep": sweep["name"], "trial_id": trial_id}


def _trial_sweep(sweep: dict) -> dict:
    """What the trainables need (picklable, no SearchSpace object)."""
    return {k: v for k, v in sweep.items() if k != "space"}


# ---------------------------------------------------------------------------------------------------------
# Inside Ray: the Tune function trainable of one sweep trial
# ---------------------------------------------------------------------------------------------------------
def sweep_trainable(config: dict, sweep: dict, setup: dict) -> None:
    """Build the trial's spec from the sampled config, then run it as the Ray launcher runs a benchmark trial
    (its per-task reports reach Tune, where ASHA reads them)."""
    from ray import tune

    from harness.config.compose import validate
    from harness.run.ray_trial import trial_trainable

    spec = trial_spec(sweep, config, tune.get_context().get_trial_id())
    try:
        validate(spec["config"])     # e.g. a sampled batch size the workers cannot split
    except HarnessError as exc:
        tune.report({"harness_error": str(exc), "harness_error_type": type(exc).__name__})
        return
    from harness.run.results import read_result

    done = read_result(setup["output_dir"], spec["name"])
    if done is not None and done.get("status") == "finished":
        # Finished before an interruption that Tune's saved state did not see yet (`--resume`): hand Tune the
        # recorded per-task rows instead of training again.
        for row in done.get("history") or []:
            tune.report(dict(row))
        return
    trial_trainable({"name": spec["name"]}, {spec["name"]: spec}, setup)


# ---------------------------------------------------------------------------------------------------------
# Driver: progress lines, MLflow, user errors (Tune pickles callbacks into its experiment state: they carry
# only a key and find the driver's state in _DRIVERS, so a restored sweep gets this process's state)
# ---------------------------------------------------------------------------------------------------------
_DRIVERS: dict[str, "SweepDriver"] = {}
_CLASSES: dict[str, type] = {}


class SweepDriver:
    """Driver-side state of a running sweep: one progress line per task and per trial, MLflow logging."""

    def __init__(self, sweep: dict, tracker: "SweepTracker | None", log: Callable[[str], None]) -> None:
        self.sweep, self.tracker, self.log = sweep, tracker, log
        self.rows: dict[str, dict[int, dict]] = {}
        self.stopped: set[str] = set()
        self.closed: set[str] = set()
        self.user_error: tuple[str, str] | None = None
        self.interrupted = False          # Ctrl-C during the run (Tune stops and returns; see SweepCallback.setup)
        self.reaper = PeriodicReaper()    # placement groups of multi-worker trials ASHA stopped

    def spec(self, trial) -> dict:
        return trial_spec(self.sweep, trial.config, trial.trial_id)

    def label(self, spec: dict) -> str:
        hp = " ".join(f"{k}={_short(v)}" for k, v in spec["hyperparameters"].items()
                      if k in self.sweep["swept"])
        return f"[{spec['trial_id']} {hp}]"

    def on_result(self, trial, result: dict) -> None:
        if "harness_error" in result:
            self.user_error = (result["harness_error_type"], result["harness_error"])
            return
        if not result.get("_row_keys"):
            return
        spec = self.spec(trial)
        row = {k: result.get(k) for k in result["_row_keys"]}
        seen = self.rows.setdefault(spec["name"], {})
        if int(row["task"]) not in seen:
            seen[int(row["task"])] = row
            k = self.sweep["validation"]["tasks"]
            self.log(f"{self.label(spec)} task {int(row['task']) + 1}/{k} val_acc={row['accuracy']:.2f} "
                     f"val_avg={row['avg_inc_accuracy']:.2f}")
            if self.tracker is not None:
                self.tracker.log_task(spec, row)
        if result.get("done") and int(row.get(TIME_ATTR, 0)) < self.sweep["validation"]["tasks"]:
            self.stopped.add(spec["name"])      # Tune marks a scheduler STOP with done=True

    def on_complete(self, trial, error: bool = False) -> None:
        from harness.run.results import read_result

        spec = self.spec(trial)
        if spec["name"] in self.closed or self.user_error is not None:
            return
        self.closed.add(spec["name"])
        result = read_result(self.sweep["sweep_dir"], spec["name"])
        rows = [r for _, r in sorted(self.rows.get(spec["name"], {}).items())]
        k = self.sweep["validation"]["tasks"]
        outcome = trial_outcome(result, len(rows), k, error)
        if result is None:   # stopped (or killed after its last report): what Tune received is all there is
            result = {"name": spec["name"], "status": "finished" if outcome == "completed" else outcome,
                      "history": rows, "num_tasks": len(rows), "config": spec["config"], "launcher": "ray",
                      **({"error": "Ray Tune trial error"} if outcome == "failed" else {})}
        done = len(result.get("history") or rows)
        value = (result.get("history") or rows or [{}])[-1].get(self.sweep["metric"])
        shown = f" {self.sweep['metric']}={value:.2f}" if isinstance(value, (int, float)) else ""
        what = {"completed": f"completed {k} task(s)", "failed": f"FAILED: {result.get('error', 'see --verbose')}",
                "early_stopped": f"stopped early by ASHA after {done}/{k} task(s)"}[outcome]
        self.log(f"{self.label(spec)} {what}{shown}")
        if self.tracker is not None:
            self.tracker.log_trial(spec, result, outcome)

    def on_error(self, trial) -> None:
        self.on_complete(trial, error=True)


def trial_outcome(result: dict | None, tasks_reported: int, k: int, error: bool = False) -> str:
    """completed (all k tuning tasks), early_stopped (by the scheduler) or failed. A trial's result.json is the
    authority; without one, the tasks Tune received decide (a STOP can land after a short last task)."""
    if result is not None:
        if result.get("status") == "finished":
            return "completed"
        return "failed"
    if tasks_reported >= k:
        return "completed"
    return "failed" if error else "early_stopped"


def _make_callback(key: str):
    """Unpickling target of the sweep's Tune callback (see __reduce__)."""
    return _callback_classes()["callback"](key)


def _make_stopper(key: str):
    return _callback_classes()["stopper"](key)


def _callback_classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    from ray import tune

    class SweepCallback(tune.Callback):
        def __init__(self, key: str) -> None:
            self.key = key

        def __reduce__(self):
            return _make_callback, (self.key,)

        def setup(self, **info) -> None:
            """Tune has installed its Ctrl-C handler by now (it stops the run and returns normally): wrap it so
            the driver knows the sweep was interrupted, not finished."""
            import signal
            import threading

            if threading.current_thread() is not threading.main_thread():
                return
            tune_handler = signal.getsignal(signal.SIGINT)

            def on_sigint(sig, frame, key=self.key):
                driver = _DRIVERS.get(key)
                if driver is not None:
                    driver.interrupted = True
                if callable(tune_handler):
                    tune_handler(sig, frame)

            signal.signal(signal.SIGINT, on_sigint)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            driver = _DRIVERS.get(self.key)
            if driver is not None:
                driver.on_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            driver = _DRIVERS.get(self.key)
            if driver is not None:
                driver.on_complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            driver = _DRIVERS.get(self.key)
            if driver is not None:
                driver.on_error(trial)

        def on_step_end(self, iteration, trials, **info) -> None:
            driver = _DRIVERS.get(self.key)
            if driver is not None:
                driver.reaper.poll()     # placement groups of multi-worker trials ASHA stopped

    class StopOnUserError(tune.Stopper):
        """A user error in a trial (bad option, missing data) stops the whole sweep with that error."""

        def __init__(self, key: str) -> None:
            self.key = key

        def __reduce__(self):
            return _make_stopper, (self.key,)

        def __call__(self, trial_id: str, result: dict) -> bool:
            return "harness_error" in result

        def stop_all(self) -> bool:
            driver = _DRIVERS.get(self.key)
            return driver is not None and driver.user_error is not None

    _CLASSES.update(callback=SweepCallback, stopper=StopOnUserError)
    return _CLASSES


def _fmt_cpus(total: dict) -> str:
    return f"{total.get('CPU', 0):g} CPU / {total.get('GPU', 0):g} GPU"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# MLflow: the sweep's parent run and one child run per trial
# ---------------------------------------------------------------------------------------------------------
class SweepTracker:
    """Parent run (run_kind=sweep) and child runs (run_kind=sweep_trial) in their own experiment, so that
    validation numbers never mix with the test numbers of benchmark leaderboards. Built on harness.tracking.store's
    TrialLogger: a resumed sweep continues its parent and its trials' child runs."""

    def __init__(self, sweep: dict, uri: str | None, experiment: str, log: Callable[[str], None]) -> None:
        from harness.tracking.store import (check_tracking, flatten_params, is_server, log_params, make_client,
                                            provenance, resolve_tracking_uri)

        self.sweep, self.log = sweep, log
        self.uri = resolve_tracking_uri(uri, sweep["output_dir"])
        self.experiment = experiment
        if is_server(self.uri):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.experiment_id = check_tracking(self.uri, experiment)
        self.client = make_client(self.uri)
        self.loggers: dict[str, Any] = {}
        self.paused = False
        name = sweep["name"]
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.run_kind = 'sweep' and tags.sweep = '{name}'"), order_by=["attributes.start_time DESC"],
            max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            known = set(found[0].data.params)
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags={
                "run_kind": "sweep", "sweep": name, "method": sweep["method"], "suite": sweep["suite"],
                "eval_split": "validation", "search": sweep["search"], "scheduler": sweep["scheduler"],
                "sweep_dir": sweep["sweep_dir"]}).info.run_id
            known = set()
        params = flatten_params({k: v for k, v in sweep["base"].items() if k not in sweep["swept"]})
        params.update(flatten_params({
            "sweep": {"space": json.dumps(plain(sweep["space_yaml"]), sort_keys=True), "search": sweep["search"],
                      "scheduler": sweep["scheduler"], "metric": sweep["metric"], "num_samples": sweep["num_samples"],
                      "grace_period": sweep["grace_period"], "reduction_factor": sweep["reduction_factor"],
                      "val_tasks": sweep["validation"]["tasks"], "val_fraction": sweep["validation"]["fraction"],
                      "val_seed": sweep["validation"]["seed"], "search_seed": sweep["search_seed"]}}))
        params.update(provenance())
        log_params(self.client, self.run_id, [(k, v) for k, v in sorted(params.items()) if k not in known])
        log(f"mlflow: {self.uri} experiment {experiment!r}, sweep run {self.run_id}")

    def _logger(self, spec: dict):
        from harness.tracking.trial_logger import TrialLogger

        if spec["name"] not in self.loggers:
            tags = {"run_kind": "sweep_trial", "sweep": self.sweep["name"], "eval_split": "validation",
                    "tune_trial_id": spec["trial_id"],
                    "hyperparameters": json.dumps(spec["hyperparameters"], sort_keys=True, default=str)}
            self.loggers[spec["name"]] = TrialLogger(self.client, self.experiment_id, self.run_id, spec, tags=tags)
        return self.loggers[spec["name"]]

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        if self.paused:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 -- tracking must never kill a sweep that is training
            self.paused = True
            self.log(f"warning: MLflow logging ({what}) failed: {type(exc).__name__}: {str(exc)[:200]}; logging "
                     "paused, the sweep goes on (results.csv and best.yaml are written anyway)")

    def log_task(self, spec: dict, row: dict) -> None:
        self._guard("task", lambda: self._logger(spec).log_task(row))

    def log_trial(self, spec: dict, result: dict, outcome: str) -> None:
        def finish() -> None:
            logger = self._logger(spec)
            if logger.closed:
                return
            logger.finish(result)
            self.client.set_tag(logger.run_id, "sweep_outcome", outcome)
            if outcome == "early_stopped":    # not a failure: the scheduler stopped it
                self.client.set_terminated(logger.run_id, "KILLED")

        self._guard("trial", finish)

    def child_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.run_id}'"), max_results=10_000)

    def end(self, summary: dict, files: list[Path], status: str) -> None:
        from harness.tracking.store import log_metrics

        def close() -> None:
            metrics = {f"trials_{k}": float(v) for k, v in summary["counts"].items()}
            if summary.get("best") is not None:
                metrics[f"best_{self.sweep['metric']}"] = float(summary["best"]["value"])
                self.client.set_tag(self.run_id, "best_trial", summary["best"]["name"])
            log_metrics(self.client, self.run_id, metrics, 0)
            for path in files:
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, status)

        self.paused = False
        self._guard("end of sweep", close)


# ---------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------
def _tune_objects(sweep: dict, space: SearchSpace, concurrency: int):
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
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")   # a user-error report has no metric

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
        f"({sweep['search']} search, {sweep['scheduler']}), space {', '.join(p.describe() for p in space.params.values())}")
    log(f"protocol: first {k} task(s), validation = {sweep['validation']['fraction']:g} of each class's training "
        f"data (seed {VAL_SPLIT_SEED}), order {sweep['order_name']}, seed {sweep['seed']}; the test split is never read")
    tracker = SweepTracker(sweep, args.tracking_uri, args.experiment, log)     # fails before Ray starts
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "space.yaml").write_text(Path(sweep["space_path"]).read_text())

    from harness.run.events import LaunchOptions
    from harness.run.ray_session import init_ray

    options = LaunchOptions(address=args.address, max_concurrent_trials=args.max_concurrent_trials,
                            max_failures=args.max_failures, verbose=args.verbose)
    started_here = init_ray(options.address, options.verbose)
    driver = SweepDriver(sweep, tracker, log)
    _DRIVERS[sweep["name"]] = driver
    status = "FAILED"
    try:
        grid = _fit(sweep, space, options, restore=args.resume, exp_dir=exp_dir, log=log)
        # Tune catches Ctrl-C itself and returns: trials it left unfinished mean the sweep was interrupted
        # (ASHA's stops are TERMINATED), so report it as such instead of summarising a partial sweep.
        unfinished = [t for t in getattr(grid, "_experiment_analysis").trials
                      if t.status not in ("TERMINATED", "ERROR")]
        if driver.interrupted or unfinished:
            raise KeyboardInterrupt(f"sweep interrupted; {len(unfinished)} trial(s) did not finish")
        if driver.user_error is not None:
            from harness.run.ray_trial import error_class as _error_class

            kind, message = driver.user_error
            raise _error_class(kind)(message)
        summary = summarise(sweep, grid, driver)
        files = write_outputs(sweep, summary, log)
        status = "FINISHED" if summary["best"] is not None else "FAILED"
        tracker.end(summary, files, status)
        return 0 if summary["best"] is not None else 1
    except KeyboardInterrupt:
        status = "KILLED"
        tracker.end({"counts": {}, "best": None}, [], status)
        raise
    finally:
        _DRIVERS.pop(sweep["name"], None)
        if started_here:
            import ray

            ray.shutdown()


def _fit(sweep: dict, space: SearchSpace, options, restore: bool, exp_dir: Path,
         log: Callable[[str], None] = print):
    from ray import tune

    from harness.run.ray_grid import plan_for_grid
    from harness.run.ray_session import ray_env
    from harness.run.ray_resources import cluster_resources
    from harness.run.ray_trial import trainable_resources

    base = sweep["base"]
    total, largest = cluster_resources()
    plan = plan_for_grid([base], sweep["num_trials"], options, (total, largest))
    embedded = not (options.address or os.environ.get("RAY_ADDRESS"))
    log(f"ray: {_fmt_cpus(total)}: {plan.describe()}")
    setup = {"output_dir": sweep["sweep_dir"], "plan": asdict(plan), "max_failures": int(options.max_failures),
             "verbose": bool(options.verbose), "env": ray_env(embedded), "record_failures": False}
    trainable = tune.with_resources(tune.with_parameters(sweep_trainable, sweep=_trial_sweep(sweep), setup=setup),
                                    trainable_resources(plan))
    if restore:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space, scheduler, search_alg = _tune_objects(sweep, space, plan.concurrency)
        classes = _callback_classes()
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=sweep["metric"], mode="max", scheduler=scheduler,
                                        search_alg=search_alg, num_samples=sweep["num_samples"],
                                        max_concurrent_trials=plan.concurrency,
                                        # One worker: the trial runs in the actor and its thread ends at the
                                        # task report ASHA stopped it on, so the actor is reused. Several: the
                                        # thread is inside TorchTrainer.fit(), which Tune cannot reset.
                                        reuse_actors=plan.num_workers == 1,
                                        trial_name_creator=lambda t: t.trial_id,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent),
                                      verbose=2 if options.verbose else 0,
                                      callbacks=[classes["callback"](sweep["name"])],
                                      stop=classes["stopper"](sweep["name"]),
                                      failure_config=tune.FailureConfig(max_failures=int(options.max_failures))))
    try:
        return tuner.fit()
    finally:
        if plan.num_workers > 1:     # the placement groups of Ray Train jobs Tune stopped (harness.run.ray_cleanup)
            from harness.run.ray_cleanup import remove_orphaned_placement_groups

            remove_orphaned_placement_groups()


def summarise(sweep: dict, grid, driver: SweepDriver | None = None) -> dict:
    """Every trial's outcome and last metrics; the best completed trial (all k tuning tasks) by the metric.
    Early-stopped trials are not candidates: their last value is measured on fewer classes."""
    from harness.run.results import read_result

    k, metric = sweep["validation"]["tasks"], sweep["metric"]
    trials = []
    for r in grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or (Path(r.path).name if r.path else "?")   # dirs are named by trial id
        name = f"{sweep['name']}_{trial_id}"
        done = read_result(sweep["sweep_dir"], name)
        if done is not None and done.get("status") == "finished" and done.get("history"):
            # finished all k tasks: a STOP can land after the last task when tasks are short; the trial's own
            # result is then the authority, not the last row Tune happened to process
            m = {**m, **done["history"][-1]}
        seen = int(m.get(TIME_ATTR) or 0)
        outcome = trial_outcome(done, seen, k, r.error is not None)
        values = {key: float(m[key]) if isinstance(m.get(key), (int, float)) else None for key in METRICS}
        trials.append({"trial": trial_id, "name": name, "outcome": outcome, "tasks_seen": seen, **values,
                       **{key: plain(r.config.get(key)) for key in sweep["swept"]}})
    completed = [t for t in trials if t["outcome"] == "completed" and t[metric] is not None]
    best = None
    if completed:
        # ties (e.g. fine-tuning's last accuracy, which only the last task's classes make) go to the other metric
        other = next(key for key in METRICS if key != metric)
        top = max(completed, key=lambda t: (t[metric], t[other] if t[other] is not None else -math.inf))
        config = next(r.config for r in grid if f"{sweep['name']}_{(r.metrics or {}).get('trial_id')}" == top["name"])
        best = {"name": top["name"], "trial": top["trial"], "value": top[metric], "config": plain(dict(config))}
    counts = {o: sum(1 for t in trials if t["outcome"] == o) for o in OUTCOMES}
    return {"trials": trials, "best": best, "counts": counts}


def write_outputs(sweep: dict, summary: dict, log: Callable[[str], None] = print) -> list[Path]:
    """results.csv (every trial) and best.yaml (the space's keys only, with a comment header)."""
    import pandas as pd

    sweep_dir = Path(sweep["sweep_dir"])
    metric, k = sweep["metric"], sweep["validation"]["tasks"]
    table = pd.DataFrame(summary["trials"])
    if not table.empty:
        table = table.sort_values(by=[metric, "tasks_seen"], ascending=False, na_position="last")
    table.to_csv(sweep_dir / "results.csv", index=False)
    files = [sweep_dir / "results.csv", sweep_dir / "space.yaml"]
    c = summary["counts"]
    log(f"sweep {sweep['name']}: {c['completed']} completed, {c['early_stopped']} stopped early, {c['failed']} failed")
    best = summary["best"]
    if best is None:
        log("no trial completed the tuning tasks: no best configuration (see results.csv)")
        return files
    values = {key: best["config"][key] for key in sweep["space_yaml"]}
    header = [f"best configuration of sweep {sweep['name']}",
              f"method: {sweep['method']}  suite: {sweep['suite']}  trial: {best['trial']}",
              f"{metric} = {best['value']:.2f} on the validation split ({sweep['validation']['fraction']:g} of the "
              f"training data) after the first {k} task(s); the test split was never read",
              f"search {sweep['search']}, scheduler {sweep['scheduler']}, {len(summary['trials'])} trial(s)",
              f"use: python run_benchmark.py --method {sweep['method']} --suite {sweep['suite']} --options best.yaml"]
    path = sweep_dir / "best.yaml"
    path.write_text(best_config_yaml(values, header))
    files.append(path)
    log(f"best: {' '.join(f'{key}={_short(v)}' for key, v in values.items())} ({metric}={best['value']:.2f}) -> {path}")
    return files


if __name__ == "__main__":
    # Run the imported module, not __main__: Tune pickles the trainable and callbacks by reference to it.
    from harness.sweep.driver import main as _main

    try:
        sys.exit(_main(sys.argv[1:]))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
