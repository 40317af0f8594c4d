"""Leaderboard: trial runs read back from any MLflow tracking URI, mean +- std per method x suite x variant.

    python run_benchmark.py report --tracking-uri sqlite:////abs/results/mlflow.db --output-dir results
    python -m harness.tracking.report --tracking-uri http://127.0.0.1:5000 --experiment clbench

Rules (also in docs/TRACKING.md):
- One row per (method, suite, variant, config hash): runs of different options never average together.
- Only FINISHED trials are averaged. Failed (FAILED/KILLED) and unfinished (RUNNING) trials are counted in
  their own columns and listed under the Markdown table.
- The same trial logged more than once (e.g. under two parents) counts once: its finished run, else its latest.
- std is the SAMPLE standard deviation (ddof=1) over orders x seeds; undefined for a single trial (empty in the
  CSV, `n/a` in the Markdown).
- `published_*` come from benchmarks/published.yaml, from an entry measured under the run's protocol (memory_mode,
  memory_shards, memory_size) only; `diff_* = ours - published`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from harness.errors import ConfigError, HarnessError
from harness.tracking.store import (DEFAULT_EXPERIMENT, STATUS_FAILED, STATUS_FINISHED, STATUS_KILLED, classes_seen,
                                    is_server, make_client, probe_server, resolve_tracking_uri, sqlite_path)
from harness.tracking.tables import MISSING, markdown_table, mean_std, mean_std_text, missing, signed

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "benchmarks" / "published.yaml"
GROUP_KEYS = ["method", "suite", "variant", "config_hash"]
FAILED_STATUSES = {STATUS_FAILED, STATUS_KILLED}
# (column stem in the leaderboard, metric name in a trial run without the `final_` / `final_<head>_` prefix)
HEAD_METRICS = [("avg_inc_acc", "avg_inc_accuracy"), ("last_acc", "last_accuracy"), ("forgetting", "forgetting")]
TOP5_METRICS = [("top5_avg_inc_acc", "avg_top5_accuracy"), ("top5_last_acc", "last_top5_accuracy")]


# ---------------------------------------------------------------------------------------------------------
# Published numbers
# ---------------------------------------------------------------------------------------------------------
def load_published(path: str | Path = PUBLISHED) -> list[dict]:
    """benchmarks/published.yaml as a list of entries (checked: every entry has method, suites, variant, source)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"published numbers file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("published") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path} must hold `published: [ {{method, suites, variant, source, ...}}, ... ]`")
    for i, e in enumerate(entries):
        missing = [k for k in ("method", "suites", "variant", "source", "avg_inc_acc", "last_acc") if k not in e]
        if missing:
            raise ConfigError(f"{path} entry {i} ({e.get('method')}) lacks {', '.join(missing)}")
    return entries


PROTOCOL_KEYS = ("memory_mode", "memory_shards", "memory_size")


def run_protocol(values: dict) -> dict:
    """The protocol of a run (its memory placement) from its options or MLflow params: memory_mode (absent: the
    harness default, global), memory_shards (distributed only) and memory_size (the total budget)."""
    out: dict[str, Any] = {"memory_mode": str(values.get("memory_mode") or "global")}
    for key in ("memory_shards", "memory_size"):
        number = _int(values.get(key))
        if number is not None and (key != "memory_shards" or out["memory_mode"] == "distributed"):
            out[key] = number
    return out


def same_protocol(entry: dict, protocol: dict | None) -> bool:
    """True when a published entry was measured under the run's protocol. An entry without `protocol` is a global
    memory of any size; an entry's shard count or size, when it gives one, must equal the run's."""
    want = entry.get("protocol") or {}
    run = protocol or {"memory_mode": "global"}
    if want.get("memory_mode", "global") != run.get("memory_mode", "global"):
        return False
    return all(run.get(key) is None or int(run[key]) == int(want[key]) for key in PROTOCOL_KEYS[1:] if key in want)


def find_published(entries: Sequence[dict], method: str, suite: str, variant: str | None,
                   protocol: dict | None = None) -> dict | None:
    """The entry for a run group measured under the same protocol (see benchmarks/published.yaml): the one its
    variant (or a part of a combined variant, the last options file first) names, else the primary one; None when
    no entry of the run's protocol is there to compare with."""
    candidates = [e for e in entries if e["method"] == method and suite in (e.get("suites") or [])]
    names = lambda e: {e["variant"], *(e.get("aliases") or [])}  # noqa: E731
    parts = [] if variant is None else [variant, *reversed(variant.split("+"))]
    for part in parts:
        named = [e for e in candidates if part in names(e)]
        if named:           # the run says which published variant it is: that one, under its own protocol
            return next((e for e in named if same_protocol(e, protocol)), None)
    return next((e for e in candidates if e.get("primary") and same_protocol(e, protocol)), None)


# ---------------------------------------------------------------------------------------------------------
# Runs -> one row per trial
# ---------------------------------------------------------------------------------------------------------
def _experiment_ids(client, experiment: str | None) -> list[str]:
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ConfigError(f"no MLflow experiment {experiment!r} in {client.tracking_uri}; available: "
                              f"{', '.join(names) or '(none)'}")
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def trial_runs(tracking_uri: str, experiment: str | None = None,
               filter: str | None = None) -> pd.DataFrame:  # noqa: A002
    """One row per trial run (run_kind = trial) with its tags and end-of-trial metrics, deduplicated by trial."""
    client = make_client(tracking_uri)
    ids = _experiment_ids(client, experiment)
    if not ids:
        return pd.DataFrame()
    filter_string = "tags.run_kind = 'trial'" + (f" and {filter}" if filter else "")
    try:
        runs = _search(client, ids, filter_string)
    except Exception as exc:  # noqa: BLE001 -- MLflow's filter parser: say which filter is wrong
        if "filter" in str(exc).lower() or "invalid" in str(exc).lower():
            raise ConfigError(f"bad --filter {filter!r} (MLflow search syntax, e.g. \"tags.suite = 'cifar100'\"): "
                              f"{' '.join(str(exc).split())[:200]}") from None
        raise
    rows = [_run_row(run) for run in runs]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # A trial logged more than once counts once: its finished run first, then the most recent.
    df["_finished"] = df["status"] == STATUS_FINISHED
    df = df.sort_values(["_finished", "start_time"], ascending=[False, False])
    df = df.drop_duplicates("trial", keep="first").drop(columns="_finished")
    return df.sort_values(["suite", "method", "variant", "order", "seed"], kind="stable").reset_index(drop=True)


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _run_row(run) -> dict:
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    row: dict[str, Any] = {
        "trial": tags.get("trial") or run.info.run_name, "run_id": run.info.run_id,
        "method": tags.get("method"), "suite": tags.get("suite"), "variant": tags.get("variant", "default"),
        "config_hash": tags.get("config_hash", ""), "order": tags.get("order"), "seed": tags.get("seed"),
        "status": run.info.status, "start_time": run.info.start_time or 0, "error": tags.get("error"),
        "parameters": _num(metrics.get("final_parameters", metrics.get("parameters"))),
        "wall_time_s": _num(metrics.get("wall_time_s")),
        "world_size": _num(metrics.get("world_size", params.get("world_size", 1))),
        "initial_increment": params.get("initial_increment"), "increment": params.get("increment"),
        **run_protocol(params),
    }
    for column, name in HEAD_METRICS + TOP5_METRICS:
        row[column] = _num(metrics.get(f"final_{name}"))
    try:
        heads = json.loads(tags.get("heads", "[]"))
    except json.JSONDecodeError:
        heads = []
    for head in heads[1:]:      # secondary heads (the first is the main head)
        for column, name in HEAD_METRICS[:2]:
            row[f"{head}_{column}"] = _num(metrics.get(f"final_{head}_{name}"))
    return row


# ---------------------------------------------------------------------------------------------------------
# Trials -> leaderboard
# ---------------------------------------------------------------------------------------------------------
def _metric_columns(df: pd.DataFrame) -> list[str]:
    """Metric columns present in the trial table: main head, top-5 when logged, then secondary heads."""
    base = [c for c, _ in HEAD_METRICS]
    top5 = [c for c, _ in TOP5_METRICS if c in df and df[c].notna().any()]
    heads = [c for c in df.columns if c.endswith(("_avg_inc_acc", "_last_acc")) and c not in base + top5
             and not c.startswith("top5_")]
    return base + top5 + heads


def summary_by_group(trials: pd.DataFrame, published: Sequence[dict] | None = None) -> pd.DataFrame:
    """Mean +- std (ddof=1) over the FINISHED trials of each (method, suite, variant, config) group."""
    if trials.empty:
        return pd.DataFrame()
    metric_cols = _metric_columns(trials)
    out = []
    for key, group in trials.groupby(GROUP_KEYS, sort=False, dropna=False):
        ok = group[group["status"] == STATUS_FINISHED]
        failed = group[group["status"].isin(FAILED_STATUSES)]
        unfinished = group[~group["status"].isin(FAILED_STATUSES | {STATUS_FINISHED})]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        row.update(trials=len(group), finished=len(ok), failed=len(failed), unfinished=len(unfinished))
        for col in metric_cols:
            row[f"{col}_mean"], row[f"{col}_std"] = mean_std(ok[col]) if col in ok else (math.nan, math.nan)
        params = ok["parameters"].dropna()
        row["parameters"] = int(round(params.mean())) if not params.empty else None
        wall = ok["wall_time_s"].fillna(0.0)
        row["wall_time_h"] = float(wall.sum() / 3600)
        row["compute_h"] = float((wall * ok["world_size"].fillna(1.0)).sum() / 3600)   # worker-hours
        first = ok.iloc[0] if len(ok) else group.iloc[0]
        protocol = run_protocol({k: first[k] for k in PROTOCOL_KEYS if k in group and pd.notna(first[k])})
        row["memory_mode"] = protocol["memory_mode"]
        entry = find_published(published or [], str(row["method"]), str(row["suite"]), row["variant"], protocol)
        row["published_variant"] = entry["variant"] if entry else None
        row["published_avg_inc_acc"] = _num(entry.get("avg_inc_acc")) if entry else math.nan
        row["published_last_acc"] = _num(entry.get("last_acc")) if entry else math.nan
        row["diff_avg_inc_acc"] = row["avg_inc_acc_mean"] - row["published_avg_inc_acc"]
        row["diff_last_acc"] = row["last_acc_mean"] - row["published_last_acc"]
        row["published_source"] = entry["source"] if entry else None
        row["not_finished_trials"] = "; ".join(
            f"order {r.order} seed {r.seed}: {r.status}" + (f" ({r.error})" if isinstance(r.error, str) else "")
            for r in pd.concat([failed, unfinished]).itertuples())
        out.append(row)
    return pd.DataFrame(out)


def leaderboard(tracking_uri: str, experiment: str | None = None, filter: str | None = None,  # noqa: A002
                published: str | Path | Sequence[dict] | None = None) -> pd.DataFrame:
    """Read the trial runs of `tracking_uri` (all experiments unless `experiment`; `filter` is an MLflow search
    filter ANDed with run_kind = trial) and return one row per method x suite x variant x config."""
    if published is None or isinstance(published, (str, Path)):
        published = load_published(published or PUBLISHED)
    return summary_by_group(trial_runs(tracking_uri, experiment, filter), published)


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    return MISSING if missing(value) else f"{value:.2f}"


def to_markdown(table: pd.DataFrame) -> str:
    """The leaderboard as a Markdown table, then the list of failed / unfinished trials."""
    if table.empty:
        return "(no trial runs)"
    heads = sorted({c[: -len("_avg_inc_acc_mean")] for c in table.columns
                    if c.endswith("_avg_inc_acc_mean") and c != "avg_inc_acc_mean" and not c.startswith("top5")})
    ambiguous = table.groupby(["method", "suite", "variant"]).size().max() > 1
    cols = ["Method", "Suite", "Variant"] + (["Config"] if ambiguous else []) + [
        "Finished", "Failed", "Unfinished", "Avg inc acc", "Last acc"]
    cols += [f"{h} avg inc acc" for h in heads] + [f"{h} last acc" for h in heads]
    cols += ["Params (M)", "Compute (worker-h)", "Published avg / last", "Δ avg / Δ last"]
    records = table.to_dict("records")
    lines = [markdown_table(cols, [_leaderboard_cells(r, heads, ambiguous) for r in records])]
    notes = [f"- {r['method']} {r['suite']} {r['variant']}: {r['not_finished_trials']}"
             for r in records if r.get("not_finished_trials")]
    if notes:
        lines += ["", "Failed or unfinished trials (not averaged in):"] + notes
    lines += ["", "Mean ± sample std (ddof=1) over finished orders x seeds; published numbers and their sources "
                  "in benchmarks/published.yaml (leaderboard.csv: published_source)."]
    return "\n".join(lines)


def _leaderboard_cells(r: dict, heads: list[str], ambiguous: bool) -> list:
    n = r["finished"]

    def cell(column: str) -> str:
        return mean_std_text(r.get(f"{column}_mean", math.nan), r.get(f"{column}_std", math.nan), n)

    cells = [r["method"], r["suite"], r["variant"]] + ([r["config_hash"]] if ambiguous else [])
    cells += [r["finished"], r["failed"], r["unfinished"], cell("avg_inc_acc"), cell("last_acc")]
    cells += [cell(f"{h}_avg_inc_acc") for h in heads] + [cell(f"{h}_last_acc") for h in heads]
    params = r.get("parameters")
    cells.append(MISSING if missing(params) else f"{params / 1e6:.2f}")
    cells.append(f"{r['compute_h']:.2f}")
    if r.get("published_variant"):
        cells.append(f"{_number(r['published_avg_inc_acc'])} / {_number(r['published_last_acc'])} "
                     f"({r['published_variant']})")
    else:
        cells.append(MISSING)
    cells.append(f"{signed(r['diff_avg_inc_acc'])} / {signed(r['diff_last_acc'])}")
    return cells


def write_leaderboard(table: pd.DataFrame, output_dir: str | Path) -> tuple[Path, Path]:
    """leaderboard.csv (numbers, machine-readable) and leaderboard.md (the paper table) in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = output_dir / "leaderboard.csv", output_dir / "leaderboard.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(table) + "\n")
    return csv_path, md_path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "suite"


def write_curve_plots(tracking_uri: str, trials: pd.DataFrame, output_dir: str | Path) -> list[Path]:
    """Per suite, accuracy_curves_<suite>.png: one curve per method x variant x config (mean of the finished
    trials' per-step accuracy, sample-std band)."""
    import numpy as np

    from harness.tracking import plots

    if trials.empty:
        return []
    client = make_client(tracking_uri)
    written = []
    for suite, suite_trials in trials[trials["status"] == STATUS_FINISHED].groupby("suite", sort=True):
        curves = []
        ambiguous = suite_trials.groupby(["method", "variant"])["config_hash"].nunique().max() > 1
        for key, group in suite_trials.groupby(["method", "variant", "config_hash"], sort=True):
            series = []
            for run_id in group["run_id"]:
                history = sorted(client.get_metric_history(run_id, "accuracy"), key=lambda m: m.step)
                series.append([m.value for m in history])
            steps = min(len(s) for s in series)
            if steps == 0:
                continue
            values = np.array([s[:steps] for s in series], dtype=float)
            first = group.iloc[0]
            config = {"initial_increment": _int(first["initial_increment"]), "increment": _int(first["increment"])}
            label = f"{key[0]} ({key[1]}{', ' + key[2] if ambiguous else ''}) n={len(series)}"
            curves.append(plots.Curve(label, classes_seen(config, steps), list(values.mean(axis=0)),
                                      list(values.std(axis=0, ddof=1)) if len(series) > 1 else None))
        if curves:
            path = Path(output_dir) / f"accuracy_curves_{_slug(str(suite))}.png"
            plots.save_png(plots.accuracy_curve_figure(curves, title=f"{suite}: accuracy per step"), path)
            written.append(path)
    return written


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI to read (sqlite:////abs/mlflow.db or "
                                               "http://host:port); default: <output-dir>/mlflow.db")
    parser.add_argument("--output-dir", default="results",
                        help="where leaderboard.csv/.md and the curve plots go (default: ./results)")
    parser.add_argument("--experiment", help=f"MLflow experiment to read (default: all; the harness logs to "
                                             f"{DEFAULT_EXPERIMENT!r})")
    parser.add_argument("--filter", help="extra MLflow search filter, e.g. \"tags.suite = 'cifar100'\"")
    parser.add_argument("--published", default=str(PUBLISHED), help="published numbers (YAML)")
    parser.add_argument("--no-plots", action="store_true", help="skip the accuracy-curve PNGs")
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Write the leaderboard of a tracking store; 0 on success, 1 when it holds no matching trial runs."""
    output_dir = Path(args.output_dir).resolve()
    uri = resolve_tracking_uri(args.tracking_uri, output_dir)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():   # reading must never create an empty store
        raise ConfigError(f"no MLflow store at {db}; pass --tracking-uri (sqlite:////abs/path/mlflow.db or "
                          "http://host:port) or the --output-dir of a benchmark")
    if is_server(uri):
        probe_server(uri)
    trials = trial_runs(uri, args.experiment, args.filter)
    if trials.empty:
        print(f"no trial runs in {uri}" + (f" experiment {args.experiment!r}" if args.experiment else "")
              + (f" matching {args.filter!r}" if args.filter else ""), file=sys.stderr)
        return 1
    table = summary_by_group(trials, load_published(args.published))
    csv_path, md_path = write_leaderboard(table, output_dir)
    written = [] if args.no_plots else write_curve_plots(uri, trials, output_dir)
    print(to_markdown(table))
    print()
    print(f"wrote {csv_path}, {md_path}" + "".join(f", {p}" for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_report_arguments(argparse.ArgumentParser(
        prog="report", description="Leaderboard (mean ± std over orders x seeds) from an MLflow tracking store."))
    args = parser.parse_args(argv)
    try:
        return run_report(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
