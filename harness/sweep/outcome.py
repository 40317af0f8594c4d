"""How a sweep ended: each trial's outcome (`trial_outcome`), the table of every trial and the best completed one
(`sweep_summary`), and the files they go to (`write_outputs`: results.csv, best.yaml)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from harness.run.results import read_result
from harness.sweep.plan import METRICS, OUTCOMES, TIME_ATTR
from harness.sweep.space import best_config_yaml
from harness.tracking.store import plain

if TYPE_CHECKING:
    from ray.tune import ResultGrid


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


def short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_summary(sweep: dict, grid: "ResultGrid") -> dict:
    """Every trial's outcome and last metrics; the best completed trial (all k tuning tasks) by the metric.
    Early-stopped trials are not candidates: their last value is measured on fewer classes."""
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
    log(f"best: {' '.join(f'{key}={short(v)}' for key, v in values.items())} ({metric}={best['value']:.2f}) -> {path}")
    return files
