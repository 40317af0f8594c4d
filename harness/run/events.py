"""What happens around a trial in the driver, shared by every launcher (harness.run.local, harness.run.ray_grid)
and the sweep's driver: the progress lines, `TrialEvents` (the ONE place where per-trial side effects happen in the
driver: the progress line per task and per trial, the MLflow tracker), the trial folders, skipping finished
trials and the result of a failed or finished trial. Imports nothing heavy: the Ray driver and the Tune
trainable import it in processes that never run a trial."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from harness.run.results import read_result

LAUNCHERS = ("ray", "local")


def trial_label(spec: dict) -> str:
    """`[method suite order=... seed=...]`: how progress lines name a benchmark's trial."""
    cfg = spec["config"]
    return f"[{cfg['method']} {cfg['suite']} order={spec['order_name']} seed={spec['seed']}]"


def task_line(spec: dict, row: dict) -> str:
    """One progress line per finished task: method, order, seed, task, accuracy."""
    head = f" ({row['head']} head)" if row.get("head") else ""      # iCaRL's main head is NME, others CNN
    return (f"{trial_label(spec)} task {row['task'] + 1} acc={row['accuracy']:.2f} avg={row['avg_inc_accuracy']:.2f}"
            f"{head} loss={row['loss']:.3f}")


def trial_line(spec: dict, result: dict) -> str:
    """One line per finished (or failed) trial."""
    if result.get("status") != "finished":
        return f"{trial_label(spec)} FAILED: {result.get('error', 'unknown error')}"
    main_head, main = next(iter((result.get("metrics") or {}).items()), (None, {}))
    avg, last = main.get("average_incremental_accuracy"), main.get("last_accuracy")
    nums = (f" avg_inc_acc={avg:.2f} last_acc={last:.2f} ({main_head} head)" if avg is not None and last is not None
            else "")
    return f"{trial_label(spec)} finished{nums} ({result.get('wall_time_s', 0.0):.1f} s)"


def progress_text(info: dict) -> str:
    """A heartbeat inside a long task (harness.core.runtime.RuntimeContext.beat), without the trial's label:
    `task 3 main epoch 12/500 step 40/97 loss=1.234 310 img/s, phase ETA 41m`."""
    eta = info.get("eta_s")
    eta_text = "?" if eta is None else (f"{eta / 60:.0f}m" if eta >= 90 else f"{eta:.0f}s")
    return (f"task {int(info.get('task', 0)) + 1} {info.get('phase', '')} "
            f"epoch {info.get('epoch')}/{info.get('epochs')} step {info.get('step')}/{info.get('steps')} "
            f"loss={float(info.get('loss', float('nan'))):.3f} "
            f"{float(info.get('images_per_s', 0.0)):.0f} img/s, phase ETA {eta_text}")


def progress_line(spec: dict, info: dict) -> str:
    return f"{trial_label(spec)} {progress_text(info)}"


class TrialLogger(Protocol):
    """What a per-trial tracker implements (harness.tracking.trackers.Tracker)."""

    def log_task(self, spec: dict, row: dict) -> None: ...

    def log_trial(self, spec: dict, result: dict) -> None: ...


class TrialEvents:
    """Driver-side per-trial side effects, called by both launchers as tasks and trials finish.

    This is the single place to hook a per-trial logger (MLflow): pass `tracker=` or subclass. Everything here
    runs in the driver process (never in a Ray worker), once per task row and once per trial.
    """

    def __init__(self, log: Callable[[str], None] = print, tracker: TrialLogger | None = None) -> None:
        self.log = log
        self.tracker = tracker
        self._seen: set[tuple[str, int]] = set()

    def task_finished(self, spec: dict, row: dict) -> None:
        key = (spec["name"], int(row["task"]))
        if key in self._seen:     # a restarted Ray trial may report a task again; print and log it once
            return
        self._seen.add(key)
        self.log(task_line(spec, row))
        if self.tracker is not None:
            self.tracker.log_task(spec, row)          # <- per-task tracking hook

    def trial_finished(self, spec: dict, result: dict) -> None:
        self.log(trial_line(spec, result))
        if self.tracker is not None:
            self.tracker.log_trial(spec, result)      # <- end-of-trial tracking hook

    def trial_skipped(self, spec: dict, result: dict) -> None:
        self.log(f"[skip] {spec['name']} already finished")


def trial_dir(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "trials" / name


def checkpoint_dir(output_dir: str | Path, name: str) -> Path:
    """Per-task checkpoints of a trial; the same place for every launcher, so either can resume the other."""
    return trial_dir(output_dir, name) / "checkpoints"


def split_finished(specs: list[dict], output_dir: Path, events: TrialEvents) -> tuple[dict[str, dict], list[dict]]:
    """(results of trials already finished, by name; specs still to run). Failed trials are run again."""
    done, todo = {}, []
    for spec in specs:
        result = read_result(output_dir, spec["name"])
        if result is not None and result.get("status") == "finished":
            events.trial_skipped(spec, result)
            done[spec["name"]] = result
        else:
            todo.append(spec)
    return done, todo


def failed_result(spec: dict, error: str, tb: str | None = None) -> dict:
    cfg = spec["config"]
    return {"name": spec["name"], "method": cfg["method"], "suite": cfg["suite"], "order": spec["order_name"],
            "seed": spec["seed"], "status": "failed", "error": error, "traceback": tb}


def finish_result(spec: dict, result: dict, launcher: str, clock=None, startup: dict | None = None) -> dict:
    """What every launcher adds to run_trial's result before writing result.json.

    Start-up measurements (benchmarks/perf/harness_overhead.py): `first_step_unix`, and `startup_s`, the seconds
    from the launcher's start of this trial to its first training step, by stage: the stages a launcher passes
    in `startup` (Ray: `ray_train_start_s` from fit() to the worker running our function, `worker_imports_s`),
    then `trial_setup_s` from run_trial's call (data, model) to the first training forward.
    """
    result["config"] = spec["config"]
    result["launcher"] = launcher
    result["finished_unix"] = time.time()
    if clock is not None and clock.started_unix is not None:
        result["started_unix"] = clock.started_unix        # run_trial's call: gaps between trials are launcher cost
    if clock is not None and clock.first_step_unix is not None:
        result["first_step_unix"] = clock.first_step_unix
        if clock.started_unix is not None:
            result["startup_s"] = {**(startup or {}), "trial_setup_s": clock.first_step_unix - clock.started_unix}
    return result


@dataclass
class LaunchOptions:
    """How to run the trials; only `launcher` matters to the local launcher."""

    launcher: str = "ray"
    address: str | None = None               # Ray cluster to join (else RAY_ADDRESS, else an embedded Ray)
    max_concurrent_trials: int | None = None  # None: as many as the cluster holds
    max_failures: int = 2                    # Ray Train restarts of a failed trial, from its last checkpoint
    verbose: bool = False                    # show Ray's own logs and progress output


