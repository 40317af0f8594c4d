"""What a sweep is, resolved and checked before Ray starts (`plan_sweep`), and what each of its trials runs:
the run_trial spec built from Tune's sampled values (`trial_spec`) and the Tune function trainable
(`sweep_trainable`). Light on purpose: Ray's workers import it for the trainable."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from harness.errors import ConfigError, HarnessError
from harness.sweep.space import load_space
from harness.tracking.store import plain

DEFAULT_VAL_TASKS = 3
DEFAULT_VAL_FRACTION = 0.1
VAL_SPLIT_SEED = 0           # the validation split is the same for every trial, seed and class order
METRICS = {"val_accuracy": "validation accuracy on the classes seen so far, after each task",
           "avg_inc_accuracy": "average incremental validation accuracy up to each task"}
TIME_ATTR = "tasks_seen"     # ASHA's clock: tasks finished (task index + 1), reported by run_trial per task
OUTCOMES = ("completed", "early_stopped", "failed")


def sweep_overrides(args: argparse.Namespace) -> dict:
    """The fixed options a sweep's flags set (under the swept values)."""
    from harness.config.compose import parse_overrides

    out: dict[str, Any] = {"data_path": str(Path(args.data_path).resolve()) if args.data_path else None,
                           "num_workers": args.num_workers, "device": args.device,
                           "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker,
                           "orders": [args.order] if args.order else None,
                           "seeds": [args.seed] if args.seed is not None else None}
    out.update(parse_overrides(args.set))
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
    base = resolve_config(args.method, args.suite, args.options, sweep_overrides(args), args.recipe)
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
    digest = hashlib.sha1(json.dumps(plain(settings), sort_keys=True).encode()).hexdigest()[:8]
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


def trial_sweep(sweep: dict) -> dict:
    """What the trainables need (picklable, no SearchSpace object)."""
    return {k: v for k, v in sweep.items() if k != "space"}


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
