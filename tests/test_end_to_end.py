"""The whole path on real data: CLI -> config -> trials -> loop -> memory -> metrics -> results table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config.compose import resolve_config
from harness.run.local import run_local
from harness.config.identity import expand_trials

ROOT = Path(__file__).resolve().parents[1]


def _digits_config(method: str, **overrides):
    base = {"backbone": "tiny_cnn", "epochs": 3, "base_epochs": 3, "batch_size": 32, "incremental_batch_size": 32,
            "lr": 0.05, "incremental_lr": 0.05, "augment": "none"}
    base.update(overrides)
    return resolve_config(method, "digits-5x2", overrides=base)


@pytest.mark.parametrize("method", ["finetune", "replay", "joint"])
def test_baselines_run_on_real_digits(tmp_path, method):
    cfg = _digits_config(method)
    (result,) = run_local(expand_trials(cfg), tmp_path, log=lambda s: None, progress=False)
    assert result["status"] == "finished", result.get("error")
    assert len(result["history"]) == 5
    cnn = result["metrics"]["cnn"]
    assert len(cnn["accuracies"]) == 5
    assert cnn["accuracies"][0] > 80          # 2 classes of digits: well above the 50% chance
    if method == "joint":
        assert cnn["last_accuracy"] > 60      # 10 classes, chance 10%
    saved = json.loads((tmp_path / "trials" / result["name"] / "result.json").read_text())
    assert saved["metrics"]["cnn"]["last_accuracy"] == cnn["last_accuracy"]
    assert list(saved["startup_s"]) == ["trial_setup_s"] and saved["startup_s"]["trial_setup_s"] >= 0
    assert sorted(p.name for p in (tmp_path / "trials" / result["name"] / "checkpoints").iterdir())[:5] == [
        f"task_{t:03d}.pt" for t in range(5)]


def test_finetune_forgets_and_replay_remembers(tmp_path):
    fin = run_local(expand_trials(_digits_config("finetune")), tmp_path / "f", log=lambda s: None, progress=False)[0]
    rep = run_local(expand_trials(_digits_config("replay")), tmp_path / "r", log=lambda s: None, progress=False)[0]
    assert rep["metrics"]["cnn"]["last_accuracy"] > fin["metrics"]["cnn"]["last_accuracy"] + 10


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    clean = run_local(expand_trials(_digits_config("replay")), tmp_path / "a", log=lambda s: None, progress=False)[0]
    faulty_cfg = _digits_config("replay", fault_at_task=2)
    first = run_local(expand_trials(faulty_cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert first["status"] == "failed" and "injected fault" in first["error"]
    lines = []
    resumed = run_local(expand_trials(faulty_cfg), tmp_path / "b", log=lines.append, progress=False)[0]
    assert any("resumed" in line and "task_002" in line for line in lines)
    assert resumed["status"] == "finished"
    assert resumed["metrics"]["cnn"]["accuracies"] == pytest.approx(clean["metrics"]["cnn"]["accuracies"], abs=1e-6)
    again = []
    run_local(expand_trials(faulty_cfg), tmp_path / "b", log=again.append, progress=False)
    assert again and again[0].startswith("[skip]")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_benchmark.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_logs_to_mlflow_and_prints_the_leaderboard_it_wrote(tmp_path):
    """The whole CLI path on the embedded defaults (sqlite MLflow in the output dir), local launcher."""
    import pandas as pd
    from mlflow import MlflowClient

    out = _cli("--method", "finetune", "--suite", "digits-5x2", "--seeds", "0", "1", "--launcher", "local",
               "--epochs", "1", "--output-dir", str(tmp_path), "--quiet")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| Method | Suite |" in out.stdout and "| finetune | digits-5x2 |" in out.stdout
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert len(board) == 1 and board.loc[0, "finished"] == 2 and board.loc[0, "failed"] == 0
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("trials/*/result.json"))]
    avgs = [r["metrics"]["cnn"]["average_incremental_accuracy"] for r in results]
    assert board.loc[0, "avg_inc_acc_mean"] == pytest.approx(sum(avgs) / 2)     # the table is what the trials got
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clbench")
    (parent,) = client.search_runs([exp.experiment_id], "tags.run_kind = 'benchmark'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(len(client.get_metric_history(c.info.run_id, "accuracy")) == 5
                                      for c in children)
    # `report` reads the same store back into the same numbers
    again = _cli("report", "--output-dir", str(tmp_path / "report"), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-plots")
    assert again.returncode == 0, again.stderr
    assert pd.read_csv(tmp_path / "report" / "leaderboard.csv").loc[0, "avg_inc_acc_mean"] == pytest.approx(
        board.loc[0, "avg_inc_acc_mean"])


def test_unreachable_tracking_server_stops_before_training(tmp_path):
    out = _cli("--method", "finetune", "--suite", "digits-5x2", "--launcher", "local", "--epochs", "1",
               "--output-dir", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9", "--quiet", timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "127.0.0.1:9" in lines[-1]
    assert not (tmp_path / "trials").exists()       # nothing trained, nothing half-written
