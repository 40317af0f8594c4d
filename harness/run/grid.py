"""One Ray Tune grid of trials, run from the driver: what a benchmark (harness.run.ray_grid) and a sweep
(harness.sweep.driver) share. Each brings its trainable, its param space and (a sweep) its scheduler and search
algorithm; `run_grid` brings the rest.

Tune saves its experiment state (pickled) with the callback and the stopper it was given, any number of times
during a run, and `Tuner.restore` unpickles them in a later process. So they carry only a key: the live driver
state (progress lines, tracking, the first user error) is a `GridDriver` of this process, found by that key. An
unpickled copy without its driver is inert.

What the end of a grid means (`run_grid` raises it): a user error in any trial (bad option, missing data) stops
the grid and is raised as that error, one line; Ctrl-C, or trials Tune left unfinished, is a KeyboardInterrupt
(the same command resumes them); the trials Tune gave up on are in `driver.errors`, for the caller to record.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from ray import tune

from harness.run.events import LaunchOptions
from harness.run.ray_cleanup import PeriodicReaper, remove_orphaned_placement_groups
from harness.run.ray_resources import ResourcePlan, cluster_resources, fmt, plan_resources
from harness.run.ray_session import ray_env
from harness.run.ray_trial import error_class, progress_path, trainable_resources

PROGRESS_POLL_S = 5.0     # how often the driver looks at running trials' heartbeat files
REAP_POLL_S = 2.0         # how often the driver frees placement groups of stopped multi-worker trials
_DRIVERS: dict[str, "GridDriver"] = {}


# ---------------------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------------------
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


def cluster_plan(configs: list[dict], num_trials: int, options: LaunchOptions, log: Callable[[str], None],
                 trials_now: int, threads: int | None = None) -> ResourcePlan:
    """plan_for_grid on the connected cluster, with `threads` per worker when the trials fixed them; printed
    as one line."""
    total, largest = cluster_resources()
    plan = plan_for_grid(configs, num_trials, options, (total, largest))
    if threads:
        plan = replace(plan, threads_per_worker=int(threads))
    log(f"ray: {trials_now} trial(s) on {fmt(total.get('CPU', 0))} CPU / {fmt(total.get('GPU', 0))} GPU: "
        f"{plan.describe()}")
    return plan


# ---------------------------------------------------------------------------------------------------------
# Driver-side state
# ---------------------------------------------------------------------------------------------------------
class GridDriver:
    """Driver-side state of one grid: the first user error, Ctrl-C, the trials Tune gave up on, running trials'
    heartbeats, orphaned placement groups. Subclasses say which spec a Tune trial runs and what its task rows,
    its end and its heartbeats print and log."""

    def __init__(self, key: str, output_dir: str | Path, log: Callable[[str], None],
                 progress_interval_s: float = 30.0, specs: dict[str, dict] | None = None) -> None:
        self.key, self.output_dir, self.log = key, Path(output_dir), log
        self.specs: dict[str, dict] = dict(specs or {})     # by trial name
        self.user_error: tuple[str, str] | None = None      # (HarnessError class name, message)
        self.interrupted = False                            # Ctrl-C: Tune stops the trials and returns
        self.errors: dict[str, BaseException | None] = {}   # trials Tune gave up on, by name
        self.running: set[str] = set()
        self.multi_worker = False                           # run_grid sets it from the plan
        self.poll_s = min(PROGRESS_POLL_S, progress_interval_s)
        self.reaper = PeriodicReaper(REAP_POLL_S)
        self._progress_seen: dict[str, Any] = {}
        self._next_poll = 0.0

    # ---- what a subclass says ----------------------------------------------------------------------
    def spec_of(self, trial) -> dict | None:
        """The spec a Tune trial runs; None when it is not one of this grid's."""
        raise NotImplementedError

    def task_finished(self, spec: dict, row: dict) -> None:
        """A task's row reached Tune (a restarted trial may report a task again)."""

    def trial_ended(self, spec: dict, error: bool) -> None:
        """Tune is done with a trial: it ended (finished, or stopped by a scheduler), or failed for good."""

    def heartbeat(self, spec: dict, info: dict) -> None:
        """A running trial's latest progress.json, inside a long task."""

    # ---- Tune's events (GridCallback) --------------------------------------------------------------
    def on_start(self, trial) -> None:
        if (spec := self._spec(trial)) is not None:
            self.running.add(spec["name"])

    def on_result(self, trial, result: dict) -> None:
        if "harness_error" in result:
            if self.user_error is None:
                self.user_error = (result["harness_error_type"], result["harness_error"])
        elif result.get("_row_keys") and (spec := self._spec(trial)) is not None:
            self.task_finished(spec, {k: result.get(k) for k in result["_row_keys"]})

    def on_complete(self, trial) -> None:
        if (spec := self._spec(trial)) is not None:
            self.running.discard(spec["name"])
            self.trial_ended(spec, error=False)

    def on_error(self, trial) -> None:
        if (spec := self._spec(trial)) is not None:
            self.running.discard(spec["name"])
            self.errors[spec["name"]] = _trial_error(trial)
            self.trial_ended(spec, error=True)

    def poll(self) -> None:
        """Between Tune's steps: heartbeats of long tasks, and freeing orphaned placement groups."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.poll_s
            for name in sorted(self.running):
                self._show_progress(name)
        if self.multi_worker:
            self.reaper.poll()

    def _spec(self, trial) -> dict | None:
        spec = self.spec_of(trial)
        if spec is not None:
            self.specs.setdefault(spec["name"], spec)
        return spec

    def _show_progress(self, name: str) -> None:
        try:
            info = json.loads(progress_path(self.output_dir, name).read_text())
        except (OSError, ValueError):
            return
        if not isinstance(info, dict) or info.get("time") == self._progress_seen.get(name):
            return
        self._progress_seen[name] = info.get("time")
        self.heartbeat(self.specs[name], info)


def _trial_error(trial) -> BaseException | None:
    """The exception Tune recorded for a trial it gave up on (None if it cannot be read back)."""
    try:
        return trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 -- Tune's error files are best effort
        return None


# ---------------------------------------------------------------------------------------------------------
# What Tune holds: a callback and a stopper that carry only the driver's key
# ---------------------------------------------------------------------------------------------------------
class GridCallback(tune.Callback):
    """Forwards Tune's events to the GridDriver registered under `key`."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __reduce__(self):
        return GridCallback, (self.key,)

    def setup(self, **info) -> None:
        """Tune has installed its Ctrl-C handler by now (it stops the run and returns normally): wrap it so
        the driver knows the grid was interrupted, not finished."""
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(sig, frame, key=self.key):
            if (driver := _DRIVERS.get(key)) is not None:
                driver.interrupted = True
            if callable(tune_handler):
                tune_handler(sig, frame)

        signal.signal(signal.SIGINT, on_sigint)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if (driver := _DRIVERS.get(self.key)) is not None:
            driver.on_start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if (driver := _DRIVERS.get(self.key)) is not None:
            driver.on_result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if (driver := _DRIVERS.get(self.key)) is not None:
            driver.on_complete(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if (driver := _DRIVERS.get(self.key)) is not None:
            driver.on_error(trial)

    def on_step_end(self, iteration, trials, **info) -> None:
        if (driver := _DRIVERS.get(self.key)) is not None:
            driver.poll()


class StopOnUserError(tune.Stopper):
    """A user error in a trial (bad option, missing data) stops the whole grid, as with the local launcher."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __reduce__(self):
        return StopOnUserError, (self.key,)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return "harness_error" in result

    def stop_all(self) -> bool:
        driver = _DRIVERS.get(self.key)
        return driver is not None and driver.user_error is not None


# ---------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------
def run_grid(driver: GridDriver, trainable: Callable, params: dict[str, Any], plan: ResourcePlan,
             options: LaunchOptions, experiment_dir: Path, *, param_space: dict | None = None,
             tune_config: dict | None = None, trial_name: Callable | None = None, restore: bool = False,
             record_failures: bool = True) -> tune.ResultGrid:
    """Fit the grid of `trainable(config, setup=..., **params)` (harness.run.ray_trial.trial_trainable or one
    that calls it), Tune's state in `experiment_dir`; `restore` continues the grid saved there instead.
    `tune_config`: more TuneConfig arguments (metric, mode, scheduler, search_alg, num_samples).
    `record_failures`: whether a failed multi-worker trial writes a failed result.json (a sweep records its
    trials' outcomes itself). Returns Tune's ResultGrid; raises as the module doc says."""
    embedded = not (options.address or os.environ.get("RAY_ADDRESS"))
    setup = {"output_dir": str(driver.output_dir), "plan": asdict(plan), "max_failures": int(options.max_failures),
             "verbose": bool(options.verbose), "env": ray_env(embedded), "record_failures": record_failures}
    runnable = tune.with_resources(tune.with_parameters(trainable, setup=setup, **params), trainable_resources(plan))
    if restore:
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=runnable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            runnable, param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=plan.concurrency, trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
                # One worker: the trial runs in the actor and its thread ends at a task report (or the one a
                # scheduler stopped it on), so one process serves trial after trial. Several: the thread is
                # inside TorchTrainer.fit(), which Tune cannot reset.
                reuse_actors=plan.num_workers == 1, **(tune_config or {})),
            run_config=tune.RunConfig(
                name=experiment_dir.name, storage_path=str(experiment_dir.parent),
                verbose=2 if options.verbose else 0, callbacks=[GridCallback(driver.key)],
                stop=StopOnUserError(driver.key),
                # Tune restarts a trial whose trainable failed (one worker: the trial itself; several: the
                # process waiting on Ray Train, e.g. on a node that was lost); it resumes from its last task
                # checkpoint. Ray Train restarts lost workers of a multi-worker trial itself (FailureConfig in
                # the trainable).
                failure_config=tune.FailureConfig(max_failures=int(options.max_failures))))
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")   # a user-error report has no metric
    driver.multi_worker = plan.num_workers > 1
    _DRIVERS[driver.key] = driver
    sigint = signal.getsignal(signal.SIGINT)
    try:
        grid = tuner.fit()
    finally:
        _DRIVERS.pop(driver.key, None)
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)      # Tune leaves its own handler behind
        if driver.multi_worker:     # the placement groups of Ray Train jobs Tune stopped (harness.run.ray_cleanup)
            remove_orphaned_placement_groups()
    _raise_outcome(driver, grid)
    return grid


def _raise_outcome(driver: GridDriver, grid: tune.ResultGrid) -> None:
    if driver.user_error is not None:
        kind, message = driver.user_error
        raise error_class(kind)(message)
    # Tune catches Ctrl-C itself and returns; the trials it left neither terminated (finished, or stopped by a
    # scheduler) nor errored did not finish
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if driver.interrupted or unfinished:
        raise KeyboardInterrupt(f"{unfinished} trial(s) did not finish")
