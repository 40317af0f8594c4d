"""The Ray launcher: every trial is a Ray Train DDP job (`TorchTrainer`), the trials of a benchmark run as a
Ray Tune grid of function trainables (the Train V2 pattern: each Tune trial builds a TorchTrainer and calls
`fit()`). The trial itself is the same `harness.trial.run_trial` the local launcher runs.

Where things go under <output_dir> (absolute; on a multi-node cluster it must be shared storage):
    trials/<name>/result.json              the trial's result (skip marker on reruns), as with --launcher local
    trials/<name>/checkpoints/task_XXX.pt  per-task checkpoints written by run_trial (either launcher resumes)
    ray/<name>/task_XXX/                   the checkpoints reported to Ray Train (restart source on failures)
    ray/_tune/<experiment>/                Ray Tune's experiment state
Names carry no timestamps: rerunning the same command finds the same trials, Train runs and checkpoints.

Progress goes through Ray Tune: the Train workers report each task's row (`ray.train.report`), Ray's
`TuneReportCallback` forwards it to Tune, and a Tune callback in the driver prints one line per task and per
trial (harness.launch.TrialEvents, which is also where per-trial tracking hooks in).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from harness.run.events import (LaunchOptions, TrialEvents, failed_result, finish_result, progress_line,
                                split_finished)
from harness.run.ray_cleanup import PeriodicReaper, remove_orphaned_placement_groups
from harness.run.ray_resources import ResourcePlan, cluster_resources, fmt as _fmt, plan_resources
from harness.run.ray_session import init_ray, ray_env
from harness.run.ray_trial import progress_path
from harness.run.results import read_result, result_path, write_json

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
# Tune saves its experiment state (pickled) with the callbacks and stopper it was given, any number of times
# during a run. They carry only a key; the live driver state (progress printing, tracking, the user error
# seen) stays in this process, in _DRIVERS. An unpickled copy without its driver is inert.
_DRIVERS: dict[str, "GridDriver"] = {}
PROGRESS_POLL_S = 5.0     # how often the driver looks at running trials' heartbeat files
REAP_POLL_S = 2.0         # how often the driver frees placement groups of stopped multi-worker trials


class GridDriver:
    """Driver-side state of one grid of trials: progress lines, tracking, the first user error."""

    def __init__(self, key: str, specs: dict[str, dict], output_dir: Path, events: TrialEvents,
                 multi_worker: bool) -> None:
        self.key, self.specs, self.output_dir, self.events = key, specs, output_dir, events
        self.multi_worker = multi_worker
        self.user_error: tuple[str, str] | None = None
        self.errors: dict[str, BaseException | None] = {}     # trials Tune gave up on, by name
        self.running: set[str] = set()
        self._progress_seen: dict[str, float] = {}
        self._next_poll = 0.0
        interval = min(float(s["config"].get("progress_interval_s") or 30.0) for s in specs.values())
        self.poll_s = min(PROGRESS_POLL_S, interval)
        self.reaper = PeriodicReaper(REAP_POLL_S)

    def on_result(self, name: str, result: dict) -> None:
        spec = self.specs.get(name)
        if spec is None:
            return
        if "harness_error" in result:
            if self.user_error is None:
                self.user_error = (result["harness_error_type"], result["harness_error"])
        elif result.get("_row_keys"):
            self.events.task_finished(spec, {k: result.get(k) for k in result["_row_keys"]})

    def on_start(self, name: str) -> None:
        self.running.add(name)

    def on_complete(self, name: str) -> None:
        self.running.discard(name)
        spec = self.specs.get(name)
        done = read_result(self.output_dir, name) if spec else None
        if done is not None:
            self.events.trial_finished(spec, done)

    def on_error(self, name: str, error: BaseException | None) -> None:
        self.running.discard(name)
        self.errors[name] = error
        self.events.log(f"[failed] {name}: Ray Tune trial error (see --verbose)")

    def poll(self) -> None:
        """Between Tune's steps: heartbeat lines of long tasks, and freeing orphaned placement groups."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.poll_s
            for name in sorted(self.running):
                self._show_progress(name)
        if self.multi_worker:
            self.reaper.poll()

    def _show_progress(self, name: str) -> None:
        path = progress_path(self.output_dir, name)
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(info, dict) or info.get("time") == self._progress_seen.get(name):
            return
        self._progress_seen[name] = info.get("time")
        self.events.log(progress_line(self.specs[name], info))


def _tune_classes() -> dict[str, type]:
    """Tune's base classes are imported lazily (the local launcher never imports Ray)."""
    from ray import tune

    class GridCallback(tune.Callback):
        """Forwards Tune's events to the driver's GridDriver (found by key)."""

        def __init__(self, key: str) -> None:
            self.key = key

        def __reduce__(self):
            return (_make_callback, (self.key,))

        def _driver(self) -> GridDriver | None:
            return _DRIVERS.get(self.key)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            if (d := self._driver()) is not None:
                d.on_start(trial.config.get("name"))

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if (d := self._driver()) is not None:
                d.on_result(trial.config.get("name"), result)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            if (d := self._driver()) is not None:
                d.on_complete(trial.config.get("name"))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            if (d := self._driver()) is not None:
                d.on_error(trial.config.get("name"), _trial_error(trial))

        def on_step_end(self, iteration, trials, **info) -> None:
            if (d := self._driver()) is not None:
                d.poll()

    class StopOnUserError(tune.Stopper):
        """A user error (bad option, missing data) stops the whole grid, as with the local launcher."""

        def __init__(self, key: str) -> None:
            self.key = key

        def __reduce__(self):
            return (_make_stopper, (self.key,))

        def __call__(self, trial_id: str, result: dict) -> bool:
            return "harness_error" in result

        def stop_all(self) -> bool:
            d = _DRIVERS.get(self.key)
            return d is not None and d.user_error is not None

    return {"callback": GridCallback, "stopper": StopOnUserError}


_TUNE_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if not _TUNE_CLASSES:
        _TUNE_CLASSES.update(_tune_classes())
    return _TUNE_CLASSES


def _make_callback(key: str):
    return _classes()["callback"](key)


def _make_stopper(key: str):
    return _classes()["stopper"](key)


def experiment_name(specs: list[dict]) -> str:
    """Deterministic Tune experiment name (all the command's trials, finished or not): a rerun of the same
    command reuses the same folder."""
    cfg = specs[0]["config"]
    digest = hashlib.sha1("\n".join(sorted(s["name"] for s in specs)).encode()).hexdigest()[:8]
    return f"{cfg['method']}_{cfg['suite']}_{digest}"


def run_ray(specs: list[dict], output_dir: str | Path, options: LaunchOptions | None = None,
            log: Callable[[str], None] = print, events: TrialEvents | None = None) -> list[dict]:
    """Run the trials as a Ray Tune grid; returns one result per spec, in order.

    Finished trials are skipped, unfinished ones resume from their last task checkpoint. Raises ResourceError
    before launching anything when one trial cannot fit the cluster, the user's HarnessError when a trial hits
    one, KeyboardInterrupt when the run was interrupted.
    """
    options = options or LaunchOptions()
    events = events or TrialEvents(log)
    output_dir = Path(output_dir).resolve()
    done, todo = split_finished(specs, output_dir, events)
    if not todo:
        return [done[s["name"]] for s in specs]

    started_here = init_ray(options.address, options.verbose)
    try:
        results = _run_grid(todo, len(specs), experiment_name(specs), output_dir, options, events)
    finally:
        if started_here:
            import ray

            ray.shutdown()
    done.update(results)
    return [done[s["name"]] for s in specs]


def plan_for_grid(configs: list[dict], num_trials: int, options: LaunchOptions,
                  resources: tuple[dict, dict] | None = None) -> ResourcePlan:
    """The resource plan of a grid on `resources` (total, largest node; default: the connected cluster's).
    `num_trials` counts all the command's trials (finished ones too), so a rerun gets the same plan, hence the
    same threads per worker."""
    cfg = configs[0]
    total, largest = resources or cluster_resources()
    return plan_resources(total, max(int(c["num_workers"]) for c in configs), num_trials,
                          cpus_per_worker=cfg.get("cpus_per_worker"), gpus_per_worker=cfg.get("gpus_per_worker"),
                          max_concurrent=options.max_concurrent_trials, device=str(cfg.get("device", "auto")),
                          largest_node=largest)


def preview_plan(config: dict, options: LaunchOptions, num_trials: int) -> ResourcePlan:
    """The plan run_ray will use, known before trials are named: an embedded Ray gets this machine's CPUs and
    visible GPUs; a cluster is joined to read its resources (the connection is kept for the run)."""
    if options.address or os.environ.get("RAY_ADDRESS"):
        init_ray(options.address, options.verbose)
        return plan_for_grid([config], num_trials, options)
    import torch

    machine = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return plan_for_grid([config], num_trials, options, (machine, machine))


def _run_grid(todo: list[dict], num_trials: int, experiment: str, output_dir: Path, options: LaunchOptions,
              events: TrialEvents) -> dict[str, dict]:
    from ray import tune

    from harness.run.ray_trial import first_line_error, trainable_resources, trial_trainable

    total, largest = cluster_resources()
    plan = plan_for_grid([s["config"] for s in todo], num_trials, options, (total, largest))
    threads = todo[0]["config"].get("threads_per_worker")
    if threads:      # fixed in the trials' identity before they were named (harness.launch.resolve_threads)
        plan = replace(plan, threads_per_worker=int(threads))
    embedded = not (options.address or os.environ.get("RAY_ADDRESS"))
    events.log(f"ray: {len(todo)} trial(s) on {_fmt(total.get('CPU', 0))} CPU / {_fmt(total.get('GPU', 0))} GPU: "
               f"{plan.describe()}")
    specs = {s["name"]: s for s in todo}
    setup = {"output_dir": str(output_dir), "plan": asdict(plan), "max_failures": int(options.max_failures),
             "verbose": bool(options.verbose), "env": ray_env(embedded)}
    trainable = tune.with_resources(tune.with_parameters(trial_trainable, specs=specs, setup=setup),
                                    trainable_resources(plan))
    key = f"{experiment}:{id(events)}"
    driver = _DRIVERS[key] = GridDriver(key, specs, output_dir, events, multi_worker=plan.num_workers > 1)
    one_worker = plan.num_workers == 1
    tuner = tune.Tuner(
        trainable,
        param_space={"name": tune.grid_search(list(specs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrency,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                    # one process serves trial after trial (its thread ends at a task report)
                                    reuse_actors=one_worker),
        run_config=tune.RunConfig(
            name=experiment, storage_path=str(output_dir / "ray" / "_tune"),
            verbose=2 if options.verbose else 0, callbacks=[_make_callback(key)], stop=_make_stopper(key),
            # Tune restarts a trial whose trainable failed (one worker: the trial itself; several: the process
            # waiting on Ray Train, e.g. on a node that was lost); it resumes from its last task checkpoint. Ray
            # Train restarts lost workers of a multi-worker trial itself (FailureConfig in the trainable).
            failure_config=tune.FailureConfig(max_failures=int(options.max_failures))))
    try:
        grid = tuner.fit()
    finally:
        _DRIVERS.pop(key, None)
        if not one_worker:
            remove_orphaned_placement_groups()

    if driver.user_error is not None:
        kind, message = driver.user_error
        from harness.run.ray_trial import error_class

        raise error_class(kind)(message)
    tune_errors = {**driver.errors, **{r.config.get("name"): r.error for r in grid if r.config and r.error is not None}}
    results, interrupted = {}, []
    for spec in todo:
        result = read_result(output_dir, spec["name"])
        if result is None and spec["name"] in tune_errors:
            err = tune_errors[spec["name"]] or RuntimeError("Ray Tune could not run the trial (see --verbose)")
            result = finish_result(spec, failed_result(spec, first_line_error(err), str(err)), "ray")
            write_json(result_path(output_dir, spec["name"]), result)
            events.trial_finished(spec, result)
        if result is None:
            interrupted.append(spec["name"])
        else:
            results[spec["name"]] = result
    if interrupted:
        raise KeyboardInterrupt(f"{len(interrupted)} trial(s) did not finish: {', '.join(interrupted)}")
    return results


def _trial_error(trial) -> BaseException | None:
    """The exception Tune recorded for a trial it gave up on (None if it cannot be read back)."""
    try:
        return trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 -- Tune's error files are best effort
        return None


def _trial_name(trial) -> str:
    return trial.config["name"]
