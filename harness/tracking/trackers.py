"""Driver-side trackers: the parent run of a benchmark and its trials' loggers."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from harness.tracking import plots, report
from harness.errors import ResourceError
from harness.tracking.store import (error_line, DEFAULT_EXPERIMENT, STATUS_FAILED, STATUS_FINISHED, STATUS_KILLED, STATUS_RUNNING,
                                   benchmark_name, check_tracking, config_digest, escape_filter, flatten_params,
                                   git_commit, is_server, log_metrics, log_params, make_client, plain, provenance,
                                   resolve_tracking_uri, variant_of)
from harness.tracking.trial_logger import TrialLogger

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient


# ---------------------------------------------------------------------------------------------------------
# Driver-side benchmark tracker (what harness.launch.TrialEvents calls)
# ---------------------------------------------------------------------------------------------------------
class BenchmarkTracker:
    """The parent run of a benchmark and its trials' loggers. Implements harness.run.launch's TrialLogger protocol
    (`log_task(spec, row)`, `log_trial(spec, result)`), so `TrialEvents(log, tracker=tracker)` wires it in.

    A logging failure mid-benchmark prints one warning line and training goes on (results are in result.json;
    rerunning the same command backfills MLflow from them). Failures before training raise ResourceError.
    """

    def __init__(self, uri: str, experiment: str, experiment_id: str, parent_run_id: str, output_dir: Path,
                 client: "MlflowClient", log: Callable[[str], None] = print, name: str = "") -> None:
        self.uri, self.experiment, self.experiment_id, self.name = uri, experiment, experiment_id, name
        self.parent_run_id, self.output_dir, self.client, self.log = parent_run_id, output_dir, client, log
        self._trials: dict[str, TrialLogger] = {}
        self.paused = False

    @classmethod
    def for_benchmark(cls, uri: str | None, output_dir: str | Path, config: dict, specs: list[dict] | None = None,
                      experiment: str = DEFAULT_EXPERIMENT, tags: dict[str, str] | None = None,
                      log: Callable[[str], None] = print, timeout: float = 5.0) -> "BenchmarkTracker":
        """Check the store (ResourceError before any training), then create or continue the parent run."""
        output_dir = Path(output_dir).resolve()
        uri = resolve_tracking_uri(uri, output_dir)
        if is_server(uri):
            # MLflow's HTTP defaults (7 retries with backoff, 120 s timeout) would stall a benchmark for minutes
            # when the server dies mid-run; the user's own settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")   # 2 lines per run otherwise
        experiment_id = check_tracking(uri, experiment, timeout=timeout)
        client = make_client(uri)
        name = benchmark_name(config, specs)
        try:
            found = client.search_runs([experiment_id], filter_string=(
                f"tags.run_kind = 'benchmark' and tags.benchmark = '{escape_filter(name)}'"),
                order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                parent = found[0].info.run_id
                client.update_run(parent, status=STATUS_RUNNING)
                known = set(found[0].data.params)
            else:
                parent = client.create_run(experiment_id, run_name=name, tags={
                    "run_kind": "benchmark", "benchmark": name, "method": str(config.get("method")),
                    "suite": str(config.get("suite")), "variant": variant_of(config),
                    "config_hash": config_digest(config), "output_dir": str(output_dir),
                    "mlflow.source.git.commit": git_commit(), **(tags or {})}).info.run_id
                known = set()
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "config.yaml"
                    path.write_text(yaml.safe_dump(plain(config), sort_keys=True))
                    client.log_artifact(parent, str(path))
            params = flatten_params(config)
            params.update({"num_trials": str(len(specs or []))})
            params.update(provenance())
            log_params(client, parent, [(k, v) for k, v in sorted(params.items()) if k not in known])
        except Exception as exc:  # noqa: BLE001
            raise ResourceError(f"cannot create the benchmark run in {uri} ({error_line(exc)}); check the tracking "
                                "store or drop --tracking-uri") from None
        where = f"{uri}/#/experiments/{experiment_id}/runs/{parent}" if is_server(uri) else f"{uri} run {parent}"
        log(f"mlflow: {where} (experiment {experiment!r}, benchmark {name})")
        return cls(uri, experiment, experiment_id, parent, output_dir, client, log, name)

    # ---- per trial ---------------------------------------------------------------------------------
    def trial_logger(self, spec: dict, rank: int = 0) -> TrialLogger:
        """The (cached) logger of a trial; a no-op logger for rank != 0."""
        if rank != 0:
            return TrialLogger(self.client, self.experiment_id, self.parent_run_id, spec, rank)
        if spec["name"] not in self._trials:
            self._trials[spec["name"]] = TrialLogger(self.client, self.experiment_id, self.parent_run_id, spec,
                                                     tags={"benchmark": self.name} if self.name else None)
        return self._trials[spec["name"]]

    def log_task(self, spec: dict, row: dict) -> None:
        self._guard("task", lambda: self.trial_logger(spec).log_task(row))

    def log_trial(self, spec: dict, result: dict) -> None:
        self._guard("trial", lambda: self.trial_logger(spec).finish(result))

    def _guard(self, what: str, fn: Callable[[], Any]) -> bool:
        """Run one logging call; on failure warn once and pause live logging (a dead server would otherwise
        stall every task on MLflow's HTTP retries). end_benchmark tries once more, backfilling from results."""
        if self.paused:
            return False
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 -- tracking must never kill a benchmark that is training
            self.paused = True
            self.log(f"warning: MLflow logging ({what}) failed: {error_line(exc, 200)}; MLflow logging paused, "
                     "training goes on (results stay in trials/*/result.json; the end of the benchmark or a rerun "
                     "of the same command backfills MLflow)")
            return False

    def _backfill(self, spec: dict, result: dict) -> None:
        """Log a trial from its result unless the store already has it as it ended."""
        logger = self.trial_logger(spec)
        if logger.closed or logger.status == STATUS_FINISHED:
            return
        if logger.resumed and logger.status in (STATUS_FAILED, STATUS_KILLED) and result.get("status") != "finished":
            return
        logger.finish(result)

    def abort(self) -> None:
        """The benchmark was interrupted (Ctrl-C) or crashed: end the open runs KILLED instead of leaving them
        RUNNING; the same command resumes them (the parent run is found again by its name)."""
        def close() -> None:
            for logger in self._trials.values():
                if logger.run_id is not None and not logger.closed:
                    self.client.set_terminated(logger.run_id, STATUS_KILLED)
            self.client.set_terminated(self.parent_run_id, STATUS_KILLED)

        self.paused = False
        self._guard("abort", close)

    # ---- end of the benchmark ---------------------------------------------------------------------
    def end_benchmark(self, results: list[dict], specs: list[dict] | None = None,
                      status: str | None = None) -> "pd.DataFrame | None":
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
                for path in sorted(tmp_path.iterdir()):
                    self.client.log_artifact(self.parent_run_id, str(path))
            log_metrics(self.client, self.parent_run_id,
                        {"trials_finished": float(len(results) - failed), "trials_failed": float(failed)}, 0)
            self.client.set_terminated(self.parent_run_id, status or (STATUS_FAILED if failed else STATUS_FINISHED))

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
