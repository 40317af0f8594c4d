"""Per-trial JSON results on disk and the mean +- std table printed at the end of a benchmark."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import pandas as pd

from harness.tracking.store import plain
from harness.tracking.tables import markdown_table, mean_std, mean_std_text

RESULT_KEYS = ("name", "status")                            # strings every result.json has
FINISHED_KEYS = {"metrics": dict, "history": list}          # and a finished trial's numbers


def result_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "trials" / name / "result.json"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=plain))
    os.replace(tmp, path)   # never a half-written result


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def move_aside(path: Path) -> Path | None:
    """Rename a damaged file to `<name>.corrupt` (or `.corrupt-2`, ...: never over an earlier one) instead of
    deleting the user's data; None when another process moved it first."""
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


def _result_problem(data: object) -> str | None:
    """What is wrong with a parsed result.json, or None when it has what the launchers and tables read."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    missing = [k for k in RESULT_KEYS if not isinstance(data.get(k), str)]
    if data.get("status") == "finished":
        missing += [k for k, kind in FINISHED_KEYS.items() if not isinstance(data.get(k), kind)]
    return f"no valid {', '.join(missing)}" if missing else None


def read_result(output_dir: str | Path, name: str, warn: Callable[[str], None] = warn_stderr) -> dict | None:
    """A trial's result, or None when it has none yet. A damaged result.json (not JSON, not an object, keys
    missing) is moved aside to result.json.corrupt with one warning line and counts as not finished: the trial
    then resumes from its checkpoints; other trials are not affected."""
    path = result_path(output_dir, name)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        problem = _result_problem(data)
    except (OSError, ValueError) as exc:    # ValueError: invalid JSON or bytes that are not UTF-8
        data, problem = None, f"{type(exc).__name__}: {exc}"
    if problem is None:
        return data
    try:
        aside = move_aside(path)
    except OSError as exc:
        warn(f"{path} is unusable ({problem}) and cannot be moved aside ({exc.strerror or exc}); the trial runs "
             "again and replaces it")
        return None
    if aside is not None:
        warn(f"{path} is unusable ({problem}); moved it to {aside.name}, the trial resumes from its checkpoints")
    return None


def trial_rows(results: list[dict]) -> pd.DataFrame:
    """One row per trial with its headline numbers, per head (main head first)."""
    rows = []
    for r in results:
        row = {"method": r.get("method"), "suite": r.get("suite"), "order": r.get("order"),
               "seed": r.get("seed"), "status": r.get("status"), "parameters": r.get("parameters"),
               "wall_time_s": r.get("wall_time_s")}
        for i, (head, m) in enumerate((r.get("metrics") or {}).items()):
            prefix = "" if i == 0 else f"{head}_"
            row[f"{prefix}avg_inc_acc"] = m.get("average_incremental_accuracy")
            row[f"{prefix}last_acc"] = m.get("last_accuracy")
            row[f"{prefix}forgetting"] = m.get("forgetting")
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(results: list[dict]) -> pd.DataFrame:
    """Mean +- std over orders x seeds per (method, suite). Failed trials are counted, never averaged in."""
    df = trial_rows(results)
    if df.empty:
        return df
    metric_cols = [c for c in df.columns if c.endswith(("avg_inc_acc", "last_acc", "forgetting"))]
    out = []
    for (method, suite), group in df.groupby(["method", "suite"], sort=False):
        ok = group[group["status"] == "finished"]
        row = {"method": method, "suite": suite, "trials": len(ok), "failed": int((group["status"] != "finished").sum())}
        for col in metric_cols:
            values = ok[col].dropna()
            row[col] = mean_std_text(*mean_std(values), len(values), plus="+-", empty="-")
        row["parameters (M)"] = f"{ok['parameters'].max() / 1e6:.2f}" if ok["parameters"].notna().any() else "-"
        row["time (min)"] = f"{ok['wall_time_s'].sum() / 60:.1f}" if ok["wall_time_s"].notna().any() else "-"
        out.append(row)
    return pd.DataFrame(out)


def summary_markdown(table: pd.DataFrame) -> str:
    """summary_table as Markdown (what run_benchmark.py prints without MLflow, and summary.md)."""
    if table.empty:
        return "(no results)"
    return markdown_table(list(table.columns), table.itertuples(index=False))
