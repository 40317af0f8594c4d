"""A sweep's grid in the driver (harness.run.grid.GridDriver): one line per task, per heartbeat of a long task and
per trial, each trial's outcome, and its MLflow child run."""
from __future__ import annotations

from typing import Callable

from harness.run.events import progress_text
from harness.run.grid import GridDriver
from harness.run.results import read_result
from harness.sweep.outcome import short, trial_outcome
from harness.sweep.plan import trial_spec
from harness.sweep.tracker import SweepTracker


class SweepDriver(GridDriver):
    """The trials of a sweep are Tune's (named by trial id, configured by Tune's samples): their specs are built
    from the trial, their rows kept to decide each outcome."""

    def __init__(self, sweep: dict, tracker: SweepTracker, log: Callable[[str], None]) -> None:
        super().__init__(sweep["name"], sweep["sweep_dir"], log,
                         float(sweep["base"].get("progress_interval_s") or 30.0))
        self.sweep, self.tracker = sweep, tracker
        self.rows: dict[str, dict[int, dict]] = {}     # per trial, the task rows Tune received
        self.closed: set[str] = set()

    def spec_of(self, trial) -> dict:
        return trial_spec(self.sweep, trial.config, trial.trial_id)

    def label(self, spec: dict) -> str:
        hp = " ".join(f"{k}={short(v)}" for k, v in spec["hyperparameters"].items() if k in self.sweep["swept"])
        return f"[{spec['trial_id']} {hp}]"

    def task_finished(self, spec: dict, row: dict) -> None:
        seen = self.rows.setdefault(spec["name"], {})
        if int(row["task"]) in seen:      # a restarted trial reports its tasks again
            return
        seen[int(row["task"])] = row
        self.log(f"{self.label(spec)} task {int(row['task']) + 1}/{self.sweep['validation']['tasks']} "
                 f"val_acc={row['accuracy']:.2f} val_avg={row['avg_inc_accuracy']:.2f}")
        self.tracker.log_task(spec, row)

    def heartbeat(self, spec: dict, info: dict) -> None:
        self.log(f"{self.label(spec)} {progress_text(info)}")

    def trial_ended(self, spec: dict, error: bool) -> None:
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
        self.tracker.log_outcome(spec, result, outcome)
