"""The per-trial MLflow logger: one trial's child run under its benchmark's (or sweep's) parent run."""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from harness.tracking.store import (MAX_TAG_VALUE, SENTINEL_METRIC, STATUS_FAILED, STATUS_FINISHED, STATUS_RUNNING,
                                    accuracy_matrix_frame, classes_seen, config_digest, dataset_descriptor,
                                    error_line, find_child_run, finite, flatten_params, git_commit, log_metrics,
                                    log_params, make_client, param_value, plain, provenance, row_metrics,
                                    summary_metrics, variant_of)

if TYPE_CHECKING:
    from mlflow import MlflowClient


# ---------------------------------------------------------------------------------------------------------
# Per-trial logger
# ---------------------------------------------------------------------------------------------------------
class TrialLogger:
    """Logs one trial into its child run, from the driver (never from a trial's workers).

    Re-created for the same trial (a resume, a Ray restart), it finds the child run by trial name under the
    parent and continues it; the steps whose metrics are already there are skipped.
    """

    def __init__(self, client: "MlflowClient | str", experiment_id: str, parent_run_id: str, spec: dict,
                 tags: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.extra_tags = dict(tags or {})
        self.name = spec["name"]
        self.run_id: str | None = None
        self.resumed = False
        self.status = STATUS_RUNNING     # of the child run in the store
        self.closed = False              # finish() ran in this process
        self._logged_steps: set[int] = set()
        self.client = make_client(client) if isinstance(client, str) else client
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        existing = find_child_run(self.client, experiment_id, parent_run_id, self.name)
        if existing is not None:
            self.run_id, self.resumed, self.status = existing.info.run_id, True, existing.info.status
            self._logged_steps = {int(m.step) for m in self.client.get_metric_history(self.run_id, SENTINEL_METRIC)}
            self._log_params(known=set(existing.data.params))
        else:
            self._create()

    @property
    def logged_steps(self) -> set[int]:
        return set(self._logged_steps)

    def _create(self) -> None:
        cfg, spec = self.spec["config"], self.spec
        tags = {"mlflow.parentRunId": self.parent_run_id, "run_kind": "trial", "trial": self.name,
                "method": str(cfg.get("method")), "suite": str(cfg.get("suite")), "variant": variant_of(cfg),
                "order": str(spec.get("order_name", spec.get("order"))), "seed": str(spec.get("seed")),
                "config_hash": config_digest(cfg), "mlflow.source.git.commit": git_commit(), **self.extra_tags}
        run = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags)
        self.run_id = run.info.run_id
        self._log_params(known=set())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(plain(cfg), sort_keys=True))
            self.client.log_artifact(self.run_id, str(path))
        self._log_dataset()

    def _log_params(self, known: set[str]) -> None:
        cfg, spec = self.spec["config"], self.spec
        params = flatten_params(cfg)
        params.update({"trial_name": spec["name"], "order": param_value(spec.get("order")),
                       "order_name": str(spec.get("order_name")), "seed": str(spec.get("seed")),
                       "world_size": str(cfg.get("num_workers", 1))})
        params.update(provenance())
        # Params are immutable in MLflow: a resumed run keeps the values it started with, only new keys land.
        new = [(k, v) for k, v in sorted(params.items()) if k not in known]
        log_params(self.client, self.run_id, new)

    def _log_dataset(self) -> None:
        """mlflow.log_input of a one-row descriptor (name = dataset, digest of the descriptor), never the images.
        Best effort: a dataset that cannot be described leaves a tag instead of stopping the trial's logging."""
        import warnings

        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        cfg = self.spec["config"]
        try:
            frame = dataset_descriptor(cfg, self.spec)
            digest = hashlib.sha1(frame.to_json(orient="records").encode()).hexdigest()[:8]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # source-resolution and schema hints about a 1-row descriptor
                dataset = mlflow.data.from_pandas(frame, source=str(cfg.get("data_path") or cfg.get("dataset")),
                                                  name=str(cfg.get("dataset")), digest=digest)
            self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                              [InputTag("mlflow.data.context", "train")])])
        except Exception as exc:  # noqa: BLE001
            self.client.set_tag(self.run_id, "dataset_log_error", error_line(exc, 200))

    def log_task(self, row: dict) -> bool:
        """Metrics of one finished task (step = task index); False when it was logged already."""
        step = int(row["task"])
        if step in self._logged_steps:
            return False
        if self.status != STATUS_RUNNING:     # a failed or interrupted trial is being retried: running again
            self.client.update_run(self.run_id, status=STATUS_RUNNING)
            self.status = STATUS_RUNNING
        log_metrics(self.client, self.run_id, row_metrics(row), step)
        self._logged_steps.add(step)
        return True

    def finish(self, result: dict) -> None:
        """End of the trial: backfill missing steps, summary metrics, artifacts, then FINISHED or FAILED."""
        from harness.tracking import plots

        ok = result.get("status") == "finished"
        for row in result.get("history") or []:
            self.log_task(row)
        summary = result.get("metrics") or {}
        final = summary_metrics(summary)
        for key in ("wall_time_s", "parameters", "num_tasks", "world_size"):
            if finite(result.get(key)):
                final[{"parameters": "final_parameters"}.get(key, key)] = float(result[key])
        last_step = max(self._logged_steps) if self._logged_steps else 0
        log_metrics(self.client, self.run_id, final, last_step)
        if result.get("class_order"):     # the permutation itself, not only the order's name: label i = class [i]
            log_params(self.client, self.run_id, [("class_permutation", param_value(result["class_order"]))])
        tags = {"result_status": str(result.get("status")), "launcher": str(result.get("launcher", ""))}
        if summary:
            tags.update(main_head=next(iter(summary)), heads=json.dumps(list(summary)))
        if result.get("error"):
            tags["error"] = str(result["error"])[:MAX_TAG_VALUE]
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            cfg = result.get("config") or self.spec["config"]
            for i, (head, values) in enumerate(summary.items()):
                matrix = values.get("accuracy_matrix")
                if not matrix:
                    continue
                suffix = "" if i == 0 else f"_{head}"
                accuracy_matrix_frame(matrix).to_csv(tmp_path / f"accuracy_matrix{suffix}.csv")
                fig = plots.accuracy_matrix_figure(matrix, title=f"{self.name} ({head})")
                plots.save_png(fig, tmp_path / f"accuracy_matrix{suffix}.png")
            curves = [plots.Curve(head, classes_seen(cfg, len(v.get("accuracies") or [])), v["accuracies"])
                      for head, v in summary.items() if v.get("accuracies")]
            if curves:
                plots.save_png(plots.accuracy_curve_figure(curves, title=self.name), tmp_path / "accuracy_curve.png")
            (tmp_path / "result.json").write_text(json.dumps(plain(result), indent=2))
            for path in sorted(tmp_path.iterdir()):
                self.client.log_artifact(self.run_id, str(path))
        self.status = STATUS_FINISHED if ok else STATUS_FAILED
        self.client.set_terminated(self.run_id, self.status)
        self.closed = True
