"""The Ray layer under the conditions that once hung or crashed it, through the real CLI in fresh processes.

- Tune saves its experiment state (pickling the trainable, callbacks and stopper) after every step here
  (TUNE_GLOBAL_CHECKPOINT_S=0) while 3 trials run 2 at a time: the run must end normally (it crashed with
  `PicklingError` when the driver's callbacks captured its print function).
- A long task reports a heartbeat (epoch, loss, img/s, ETA) to the driver between its task rows.
- (slow) The ASHA sweep that hung CI, 5 times in a row on 2 CPUs with a busy process beside it, alternating one
  worker per trial (the trial runs in its Tune actor) and 2 DDP workers (a Ray Train job whose placement group
  the driver must free when ASHA stops it). Every run must end, within a bounded time.
Every subprocess has a timeout: a hang fails the test in minutes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "backbone=tiny_cnn", "--set", "augment=none", "--batch-size", "32", "--quiet"]


def _cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run([sys.executable, "run_benchmark.py", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(420)
def test_three_trials_two_at_a_time_while_tune_saves_its_state_after_every_step(tmp_path):
    out = tmp_path / "out"
    run = _cli(["--method", "replay", "--suite", "digits-5x2", "--seeds", "0", "1", "2", "--output-dir", str(out),
                "--max-concurrent-trials", "2", *TINY], env={"TUNE_GLOBAL_CHECKPOINT_S": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "PicklingError" not in run.stderr
    assert "2 trial(s) at once" in run.stdout
    results = [json.loads(p.read_text()) for p in out.glob("trials/*/result.json")]
    assert sorted(r["seed"] for r in results) == [0, 1, 2]
    assert all(r["status"] == "finished" for r in results)
    states = list((out / "ray" / "_tune").glob("*/experiment_state*.json"))
    assert states, "Tune saved no experiment state"


@pytest.mark.timeout(300)
def test_a_long_task_reports_its_progress_to_the_driver(tmp_path):
    run = _cli(["--method", "finetune", "--suite", "digits-5x2", "--output-dir", str(tmp_path / "out"),
                "--epochs", "10", "--set", "progress_interval_s=0.2", "--no-tracking", *TINY])
    assert run.returncode == 0, run.stderr[-3000:]
    beats = [line for line in run.stdout.splitlines() if " epoch " in line]
    assert beats, run.stdout
    line = beats[0]
    assert "order=natural seed=0] task " in line and "/10 " in line and "img/s" in line and "ETA" in line, line


# ---------------------------------------------------------------------------------------------------------
# The ASHA sweep, 5 times in a row, under load
# ---------------------------------------------------------------------------------------------------------
BUSY = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    sum(i * i for i in range(10000))\n"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_asha_sweep_five_times_in_a_row_on_two_cpus_under_load(tmp_path):
    space = tmp_path / "space.yaml"
    # lr 1e-6 / 1e-7 stay at chance on the first task; ASHA (one rung after task 1, reduction 4) stops them
    # after a good trial has passed the rung. One trial at a time: each takes the whole machine, so a stopped
    # trial whose resources were not freed would block the next one.
    space.write_text("lr: {grid: [0.05, 0.03, 1.0e-6, 1.0e-7]}\n")
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    walls = []
    try:
        for i, workers in enumerate([1, 2, 1, 2, 1]):
            out = tmp_path / f"run{i}"
            started = time.monotonic()
            run = _cli(["sweep", "--method", "finetune", "--suite", "digits-5x2", "--space", str(space),
                        "--output-dir", str(out), "--search", "grid", "--reduction-factor", "4", "--val-tasks", "3",
                        "--max-concurrent-trials", "1", "--num-workers", str(workers),
                        "--set", "base_epochs=1", "--set", "epochs=20", "--set", "backbone=tiny_cnn"],
                       timeout=600)
            walls.append(round(time.monotonic() - started))
            assert run.returncode == 0, (i, workers, run.stderr[-3000:])
            rows = (next((out / "sweeps").iterdir()) / "results.csv").read_text().splitlines()
            outcomes = [r.split(",") for r in rows[1:]]
            assert len(outcomes) == 4, rows
            assert sum("early_stopped" in r for r in outcomes) >= 2, rows
    finally:
        busy.kill()
        busy.wait(timeout=30)
    print(f"sweep wall times (s): {walls}")
