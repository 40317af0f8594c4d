"""A sweep in MLflow: a parent run (run_kind=sweep) and a child run per trial (run_kind=sweep_trial), in their own
experiment so that validation numbers never mix with the test numbers of benchmark leaderboards. A resumed sweep
continues its parent run and its trials' child runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from harness.tracking.store import STATUS_KILLED, flatten_params, plain
from harness.tracking.trackers import Tracker


class SweepTracker(Tracker):
    kind = "sweep"
    kept = "results.csv and best.yaml are written anyway"

    def __init__(self, *args: Any, sweep: dict, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sweep = sweep

    @classmethod
    def for_sweep(cls, sweep: dict, uri: str | None, experiment: str,
                  log: Callable[[str], None] = print) -> "SweepTracker":
        """Check the store (ResourceError before Ray starts), then create or continue the sweep's parent run."""
        tags = {"method": sweep["method"], "suite": sweep["suite"], "eval_split": "validation",
                "search": sweep["search"], "scheduler": sweep["scheduler"], "sweep_dir": sweep["sweep_dir"]}
        params = flatten_params({k: v for k, v in sweep["base"].items() if k not in sweep["swept"]})
        params.update(flatten_params({
            "sweep": {"space": json.dumps(plain(sweep["space_yaml"]), sort_keys=True), "search": sweep["search"],
                      "scheduler": sweep["scheduler"], "metric": sweep["metric"], "num_samples": sweep["num_samples"],
                      "grace_period": sweep["grace_period"], "reduction_factor": sweep["reduction_factor"],
                      "val_tasks": sweep["validation"]["tasks"], "val_fraction": sweep["validation"]["fraction"],
                      "val_seed": sweep["validation"]["seed"], "search_seed": sweep["search_seed"]}}))
        return cls.open(uri, sweep["output_dir"], experiment, sweep["name"], tags, params, log=log, sweep=sweep)

    def trial_tags(self, spec: dict) -> dict[str, str]:
        return {**super().trial_tags(spec), "run_kind": "sweep_trial", "eval_split": "validation",
                "tune_trial_id": spec["trial_id"],
                "hyperparameters": json.dumps(spec["hyperparameters"], sort_keys=True, default=str)}

    def log_outcome(self, spec: dict, result: dict, outcome: str) -> None:
        """A trial's end: its child run closes with `sweep_outcome`; a trial the scheduler stopped ends KILLED
        (not FAILED: stopping it was the scheduler's call)."""
        def finish() -> None:
            logger = self.trial_logger(spec)
            if logger.closed:
                return
            logger.finish(result)
            self.client.set_tag(logger.run_id, "sweep_outcome", outcome)
            if outcome == "early_stopped":
                self.client.set_terminated(logger.run_id, STATUS_KILLED)

        self._guard("trial", finish)

    def end(self, summary: dict, files: list[Path], status: str) -> None:
        """The counts of outcomes, the best trial and the sweep's files on the parent run, then its status."""
        metrics = {f"trials_{k}": float(v) for k, v in summary["counts"].items()}
        tags = {}
        if summary.get("best") is not None:
            metrics[f"best_{self.sweep['metric']}"] = float(summary["best"]["value"])
            tags["best_trial"] = summary["best"]["name"]
        self.paused = False       # one more chance for a store that failed mid-sweep
        self._guard("end of sweep", lambda: self._end_parent(status, metrics, files, tags))
