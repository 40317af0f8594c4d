"""Driver-side trackers: a parent run (a benchmark's here, a sweep's in harness.sweep.tracker) and the child runs
of its trials, all logged from the driver."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import yaml

from harness.errors import ResourceError
from harness.tracking import plots, report
from harness.tracking.store import (DEFAULT_EXPERIMENT, STATUS_FAILED, STATUS_FINISHED, STATUS_KILLED,
                                    STATUS_RUNNING, benchmark_name, check_tracking, config_digest, error_line,
                                    escape_filter, flatten_params, git_commit, is_server, log_metrics, log_params,
                                    make_client, plain, provenance, resolve_tracking_uri, variant_of)
from harness.tracking.trial_logger import TrialLogger

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient


# ---------------------------------------------------------------------------------------------------------
# What every parent run does
# ---------------------------------------------------------------------------------------------------------
class Tracker:
    """A parent run and the loggers of its trials' child runs. Implements harness.run.events' TrialLogger
    protocol (`log_task(spec, row)`, `log_trial(spec, result)`), so `TrialEvents(log, tracker=tracker)` wires it in.

    `open` checks the store and finds or creates the parent run; a failure there raises ResourceError before any
    training. Later, a logging failure prints one warning line and pauses logging (a dead server would otherwise
    stall every task on MLflow's HTTP retries): training goes on. Subclasses name the kind of parent run and say
    what is kept when MLflow is not.
    """

    kind = "run"          # the parent's `run_kind` tag, and the tag that holds its name
    kept = ""             # what the warning says still holds the results while logging is paused

    def __init__(self, uri: str, experiment: str, experiment_id: str, parent_run_id: str, client: "MlflowClient",
                 name: str, log: Callable[[str], None] = print) -> None:
        self.uri, self.experiment, self.experiment_id, self.name = uri, experiment, experiment_id, name
        self.parent_run_id, self.client, self.log = parent_run_id, client, log
        self._trials: dict[str, TrialLogger] = {}
        self.paused = False

    @classmethod
    def open(cls, uri: str | None, output_dir: str | Path, experiment: str, name: str, tags: dict[str, str],
             params: dict[str, str], files: dict[str, str] | None = None, log: Callable[[str], None] = print,
             timeout: float = 5.0, **fields: Any) -> "Tracker":
        """Check the store, then find the parent run of this kind and name (a rerun of the same command
        continues it) or create it with `tags` and `files` (file name -> text, logged as artifacts); log the
        `params` (and provenance) it does not have yet. `fields` go to the subclass's constructor."""
        uri = resolve_tracking_uri(uri, Path(output_dir).resolve())
        if is_server(uri):
            # MLflow's HTTP defaults (7 retries with backoff, 120 s timeout) would stall a run for minutes when
            # the server dies mid-run; the user's own settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")   # 2 lines per run otherwise
        experiment_id = check_tracking(uri, experiment, timeout=timeout)
        client = make_client(uri)
        try:
            found = client.search_runs([experiment_id], filter_string=(
                f"tags.run_kind = '{cls.kind}' and tags.{cls.kind} = '{escape_filter(name)}'"),
                order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status=STATUS_RUNNING)
                known = set(found[0].data.params)
            else:
                run_id = client.create_run(experiment_id, run_name=name, tags={
                    "run_kind": cls.kind, cls.kind: name, "mlflow.source.git.commit": git_commit(),
                    **tags}).info.run_id
                known = set()
                _log_files(client, run_id, files or {})
            params = {**params, **provenance()}
            log_params(client, run_id, [(k, v) for k, v in sorted(params.items()) if k not in known])
        except Exception as exc:  # noqa: BLE001
            raise ResourceError(f"cannot create the {cls.kind} run in {uri} ({error_line(exc)}); check the tracking "
                                "store or drop --tracking-uri") from None
        where = f"{uri}/#/experiments/{experiment_id}/runs/{run_id}" if is_server(uri) else f"{uri} run {run_id}"
        log(f"mlflow: {where} (experiment {experiment!r}, {cls.kind} {name})")
        return cls(uri, experiment, experiment_id, run_id, client, name, log, **fields)

    # ---- per trial ---------------------------------------------------------------------------------
    def trial_tags(self, spec: dict) -> dict[str, str]:
        """Extra tags of a trial's child run."""
        return {self.kind: self.name}

    def trial_logger(self, spec: dict) -> TrialLogger:
        """The (cached) logger of a trial's child run."""
        if spec["name"] not in self._trials:
            self._trials[spec["name"]] = TrialLogger(self.client, self.experiment_id, self.parent_run_id, spec,
                                                     tags=self.trial_tags(spec))
        return self._trials[spec["name"]]

    def log_task(self, spec: dict, row: dict) -> None:
        self._guard("task", lambda: self.trial_logger(spec).log_task(row))

    def log_trial(self, spec: dict, result: dict) -> None:
        self._guard("trial", lambda: self.trial_logger(spec).finish(result))

    def _guard(self, what: str, fn: Callable[[], Any]) -> bool:
        """Run one logging call; on failure warn once and pause live logging. The end of the run tries once
        more."""
        if self.paused:
            return False
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 -- tracking must never kill a run that is training
            self.paused = True
            self.log(f"warning: MLflow logging ({what}) failed: {error_line(exc, 200)}; MLflow logging paused, "
                     f"training goes on ({self.kept})")
            return False

    # ---- end of the parent run --------------------------------------------------------------------
    def abort(self) -> None:
        """The run was interrupted (Ctrl-C) or crashed: end the open runs KILLED instead of leaving them
        RUNNING; the same command continues them (the parent run is found again by its name)."""
        def close() -> None:
            for logger in self._trials.values():
                if logger.run_id is not None and not logger.closed:
                    self.client.set_terminated(logger.run_id, STATUS_KILLED)
            self.client.set_terminated(self.parent_run_id, STATUS_KILLED)

        self.paused = False
        self._guard("abort", close)

    def _end_parent(self, status: str, metrics: dict[str, float], files: Iterable[Path] = (),
                    tags: dict[str, str] | None = None) -> None:
        """The parent's last tags, metrics and files, then its status (call it through _guard)."""
        for key, value in (tags or {}).items():
            self.client.set_tag(self.parent_run_id, key, value)
        log_metrics(self.client, self.parent_run_id, metrics, 0)
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.parent_run_id, str(path))
        self.client.set_terminated(self.parent_run_id, status)


def _log_files(client: "MlflowClient", run_id: str, files: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            path = Path(tmp) / name
            path.write_text(text)
            client.log_artifact(run_id, str(path))


# ---------------------------------------------------------------------------------------------------------
# A benchmark's parent run (what harness.run.events.TrialEvents calls)
# ---------------------------------------------------------------------------------------------------------
class BenchmarkTracker(Tracker):
    """The parent run of a benchmark (run_kind=benchmark) and its trials' child runs (run_kind=trial). Results
    are in result.json whatever MLflow does: the end of the benchmark, or a rerun of the same command, backfills
    MLflow from them."""

    kind = "benchmark"
    kept = ("results stay in trials/*/result.json; the end of the benchmark or a rerun of the same command "
            "backfills MLflow")

    @classmethod
    def for_benchmark(cls, uri: str | None, output_dir: str | Path, config: dict, specs: list[dict] | None = None,
                      experiment: str = DEFAULT_EXPERIMENT, tags: dict[str, str] | None = None,
                      log: Callable[[str], None] = print, timeout: float = 5.0) -> "BenchmarkTracker":
        """Check the store (ResourceError before any training), then create or continue the parent run."""
        output_dir = Path(output_dir).resolve()
        params = {**flatten_params(config), "num_trials": str(len(specs or []))}
        run_tags = {"method": str(config.get("method")), "suite": str(config.get("suite")),
                    "variant": variant_of(config), "config_hash": config_digest(config),
                    "output_dir": str(output_dir), **(tags or {})}
        return cls.open(uri, output_dir, experiment, benchmark_name(config, specs), run_tags, params,
                        files={"config.yaml": yaml.safe_dump(plain(config), sort_keys=True)}, log=log,
                        timeout=timeout)

    def _backfill(self, spec: dict, result: dict) -> None:
        """Log a trial from its result unless the store already has it as it ended."""
        logger = self.trial_logger(spec)
        if logger.closed or logger.status == STATUS_FINISHED:
            return
        if logger.resumed and logger.status in (STATUS_FAILED, STATUS_KILLED) and result.get("status") != "finished":
            return
        logger.finish(result)

    # ---- end of the benchmark ---------------------------------------------------------------------
    def end_benchmark(self, results: list[dict], specs: list[dict] | None = None) -> "pd.DataFrame | None":
        """Backfill trials not logged yet (skipped as already finished, or logged elsewhere), log the
        benchmark's accuracy-curve plot (one mean curve per method) and its leaderboard on the parent run,
        close the parent (FAILED if any trial failed). Returns the leaderboard of this benchmark."""
        by_name = {s["name"]: s for s in specs or []}
        self.paused = False             # one more chance for a store that failed mid-benchmark
        for result in results:
            spec = by_name.get(result.get("name")) or _spec_from_result(result)
            if spec is not None:
                self._guard("backfill", lambda spec=spec, result=result: self._backfill(spec, result))
        if self.paused:
            return None
        failed = sum(1 for r in results if r.get("status") != "finished")
        table = None

        def close() -> None:
            nonlocal table
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp)
                curves = plots.mean_accuracy_curves(results)
                if curves:
                    fig = plots.accuracy_curve_figure(curves, title=benchmark_title(results))
                    plots.save_png(fig, tmp_path / "accuracy_curve.png")
                table = report.leaderboard(self.uri, self.experiment,
                                           filter=f"tags.`mlflow.parentRunId` = '{escape_filter(self.parent_run_id)}'")
                report.write_leaderboard(table, tmp_path)
                self._end_parent(STATUS_FAILED if failed else STATUS_FINISHED,
                                 {"trials_finished": float(len(results) - failed), "trials_failed": float(failed)},
                                 sorted(tmp_path.iterdir()))

        self._guard("end of benchmark", close)
        return table


def benchmark_title(results: list[dict]) -> str:
    suites = sorted({str(r.get("suite")) for r in results})
    return f"accuracy per step: {', '.join(suites)}"


def _spec_from_result(result: dict) -> dict | None:
    """Enough of a spec to log a trial known only from its result.json (skipped trials)."""
    if not result.get("name") or not isinstance(result.get("config"), dict):
        return None
    return {"name": result["name"], "order": result.get("order"), "order_name": result.get("order"),
            "seed": result.get("seed"), "config": result["config"]}
