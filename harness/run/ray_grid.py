"""The Ray launcher of a benchmark: its trials as one Ray Tune grid (harness.run.grid) of function trainables, one
per trial. A one-worker trial runs inside its Tune actor; a W-worker trial is a Ray Train DDP job
(`TorchTrainer`) its trainable fits. The trial itself is the same `harness.run.trial.run_trial` the local
launcher runs (harness.run.ray_trial).

Where things go under <output_dir> (absolute; on a multi-node cluster it must be shared storage):
    trials/<name>/result.json              the trial's result (skip marker on reruns), as with --launcher local
    trials/<name>/checkpoints/task_XXX.pt  per-task checkpoints written by run_trial (either launcher resumes)
    ray/<name>/task_XXX/                   the checkpoints reported to Ray Train (restart source on failures)
    ray/_tune/<experiment>/                Ray Tune's experiment state
Names carry no timestamps: rerunning the same command finds the same trials, Train runs and checkpoints.

Progress goes through Ray Tune: each task's row reaches Tune (`tune.report`, or Ray Train's report forwarded by
`TuneReportCallback`), and the grid's driver prints one line per task and per trial through
harness.run.events.TrialEvents, which is also where per-trial tracking hooks in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ray import tune

from harness.run.events import (LaunchOptions, TrialEvents, failed_result, finish_result, progress_line,
                                split_finished)
from harness.run.grid import GridDriver, cluster_plan, plan_for_grid, run_grid
from harness.run.ray_resources import ResourcePlan
from harness.run.ray_session import init_ray
from harness.run.ray_trial import first_line_error, trial_trainable
from harness.run.results import read_result, result_path, write_json
from harness.tracking.store import benchmark_name


class BenchmarkDriver(GridDriver):
    """A benchmark's grid in the driver: its trials are named in their config; their rows and ends go to
    TrialEvents (progress lines, tracking)."""

    def __init__(self, key: str, specs: dict[str, dict], output_dir: Path, events: TrialEvents) -> None:
        interval = min(float(s["config"].get("progress_interval_s") or 30.0) for s in specs.values())
        super().__init__(key, output_dir, events.log, interval, specs)
        self.events = events

    def spec_of(self, trial) -> dict | None:
        return self.specs.get(trial.config.get("name"))

    def task_finished(self, spec: dict, row: dict) -> None:
        self.events.task_finished(spec, row)

    def trial_ended(self, spec: dict, error: bool) -> None:
        if error:
            self.log(f"[failed] {spec['name']}: Ray Tune trial error (see --verbose)")
            return
        done = read_result(self.output_dir, spec["name"])
        if done is not None:
            self.events.trial_finished(spec, done)

    def heartbeat(self, spec: dict, info: dict) -> None:
        self.log(progress_line(spec, info))


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
        # The same command (all its trials, finished or not) gets the same Tune folder: a rerun reuses it.
        experiment = benchmark_name(specs[0]["config"], specs)
        results = _run_grid(todo, len(specs), experiment, output_dir, options, events)
    finally:
        if started_here:
            import ray

            ray.shutdown()
    done.update(results)
    return [done[s["name"]] for s in specs]


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
    # threads_per_worker: fixed in the trials' identity before they were named (harness.run.launch.resolve_threads)
    plan = cluster_plan([s["config"] for s in todo], num_trials, options, events.log, len(todo),
                        threads=todo[0]["config"].get("threads_per_worker"))
    specs = {s["name"]: s for s in todo}
    driver = BenchmarkDriver(f"{experiment}:{id(events)}", specs, output_dir, events)
    grid = run_grid(driver, trial_trainable, {"specs": specs}, plan, options, output_dir / "ray" / "_tune" / experiment,
                    param_space={"name": tune.grid_search(list(specs))}, trial_name=_trial_name)
    tune_errors = {**driver.errors, **{r.config.get("name"): r.error for r in grid if r.config and r.error is not None}}
    results, missing = {}, []
    for spec in todo:
        result = read_result(output_dir, spec["name"])
        if result is None and spec["name"] in tune_errors:
            err = tune_errors[spec["name"]] or RuntimeError("Ray Tune could not run the trial (see --verbose)")
            result = finish_result(spec, failed_result(spec, first_line_error(err), str(err)), "ray")
            write_json(result_path(output_dir, spec["name"]), result)
            events.trial_finished(spec, result)
        if result is None:      # e.g. its result.json was damaged and moved aside: the same command resumes it
            missing.append(spec["name"])
        else:
            results[spec["name"]] = result
    if missing:
        raise KeyboardInterrupt(f"{len(missing)} trial(s) did not finish: {', '.join(missing)}")
    return results


def _trial_name(trial) -> str:
    return trial.config["name"]
