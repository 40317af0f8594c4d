"""The Ray launcher on CPU (gloo), real Ray, real digits data, a tiny model.

One embedded Ray session (2 CPUs) is shared by the module. What is shown:
1. 2 DDP workers select the same rehearsal memory and reach the same metrics as 1 worker with the same
   global batch;
2. a trial whose worker dies after task 2 is restarted by Ray Train from its checkpoint and ends with the
   same metrics as an uninterrupted one;
3. a rerun skips finished trials (in-process here; the Ctrl-C version through the CLI is marked slow);
4. a request the cluster cannot hold fails at once with one clear line.

Model: BatchNorm normalises each rank's half batch with that half's statistics, so a BN network trained by 2
workers is NOT the one 1 worker trains (SyncBatchNorm would fix that but torch only implements it for GPUs).
The equivalence test therefore uses a norm-free tiny CNN, registered in every Ray worker process by a Ray
`worker_process_setup_hook`, and `augment: none` (random crops/flips would differ per rank).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray")

from harness.config import resolve_config  # noqa: E402
from harness.errors import ResourceError  # noqa: E402
from harness.launch import LaunchOptions, TrialEvents  # noqa: E402
from harness.ray_launch import plan_resources, run_ray  # noqa: E402
from harness.trials import expand_trials  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NORM_FREE = "test_norm_free_cnn"


class NormFreeTinyCNN(nn.Module):
    """TinyCNN without BatchNorm: its training step does not depend on how a batch is split across ranks."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def register_norm_free_backbone() -> None:
    """Ray worker_process_setup_hook: make the test backbone available in every Ray worker process."""
    from harness import backbones

    backbones.BACKBONES.setdefault(NORM_FREE, lambda width: NormFreeTinyCNN(width or 16))


@pytest.fixture(scope="module")
def ray_session():
    if ray.is_initialized():
        ray.shutdown()
    # Workers import this module (for the setup hook) and the harness whatever their cwd.
    paths = [str(ROOT), str(ROOT / "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": f"{Path(__file__).stem}.register_norm_free_backbone"})
    yield
    ray.shutdown()
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path


def digits_specs(**overrides) -> list[dict]:
    options = {"backbone": NORM_FREE, "epochs": 2, "base_epochs": 2, "batch_size": 32, "lr": 0.05,
               "incremental_lr": 0.05, "augment": "none", "memory_selection": "random", "num_workers": 1}
    options.update(overrides)
    return expand_trials(resolve_config("replay", "digits-5x2", overrides=options))


def launch(specs: list[dict], out: Path, lines: list[str] | None = None, **options) -> list[dict]:
    log = lines.append if lines is not None else (lambda s: None)
    return run_ray(specs, out, LaunchOptions(**{"max_failures": 1, **options}), events=TrialEvents(log))


def last_checkpoint(out: Path, name: str) -> dict:
    path = sorted((out / "trials" / name / "checkpoints").glob("task_*.pt"))[-1]
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_worker")
    lines: list[str] = []
    started = time.perf_counter()
    # 0.95 CPU -> 1 torch thread, like each of the 2 workers below: the intra-op thread count changes CPU
    # float rounding, which training amplifies (2 threads vs 1 moves the weights by 1e-3 after one task).
    (result,) = launch(digits_specs(cpus_per_worker=0.95), out, lines)
    return out, result, lines, time.perf_counter() - started


# ---- resource planning (no Ray needed) -------------------------------------------------------------------
def test_plan_fits_two_workers_on_two_cpus_with_fractions():
    plan = plan_resources({"CPU": 2.0}, num_workers=2, num_trials=1)
    assert plan.cpus_per_worker == pytest.approx(0.95)
    assert plan.trial_cpus <= 2.0 and plan.concurrency == 1 and plan.threads_per_worker == 1
    single = plan_resources({"CPU": 2.0}, num_workers=1, num_trials=1)
    assert single.trial_cpus <= 2.0 and single.threads_per_worker == 2     # one trial gets the machine
    shared = plan_resources({"CPU": 2.0}, num_workers=1, num_trials=4)
    assert shared.concurrency == 2 and shared.concurrency * shared.trial_cpus <= 2.0 and shared.threads_per_worker == 1
    crowded = plan_resources({"CPU": 2.0}, num_workers=4, num_trials=2)   # more workers than CPUs: fractions
    assert crowded.concurrency == 1 and crowded.cpus_per_worker == pytest.approx(0.45)
    assert plan_resources({"CPU": 2.0}, 1, 4, max_concurrent=1).concurrency == 1
    gpu = plan_resources({"CPU": 16.0, "GPU": 2.0}, num_workers=2, num_trials=3)
    assert gpu.use_gpu and gpu.gpus_per_worker == 1 and gpu.concurrency == 1 and gpu.threads_per_worker == 8


def test_plan_rejects_what_cannot_fit_with_one_clear_line():
    with pytest.raises(ResourceError) as err:
        plan_resources({"CPU": 2.0}, num_workers=64, num_trials=1)
    message = str(err.value)
    assert "\n" not in message and "64 worker(s)" in message and "2 CPU" in message and "--num-workers" in message
    with pytest.raises(ResourceError, match=r"--cpus-per-worker 0\.95"):
        plan_resources({"CPU": 2.0}, num_workers=2, num_trials=1, cpus_per_worker=1)   # 2.01 CPU > 2
    with pytest.raises(ResourceError, match="GPU"):
        plan_resources({"CPU": 8.0, "GPU": 1.0}, num_workers=2, num_trials=1, gpus_per_worker=1)
    with pytest.raises(ResourceError, match="cuda"):
        plan_resources({"CPU": 8.0}, num_workers=1, num_trials=1, device="cuda")


# ---- with Ray ----------------------------------------------------------------------------------------------
def test_resource_check_fails_fast_before_launching(ray_session, tmp_path):
    specs = digits_specs(num_workers=64, batch_size=64)
    started = time.perf_counter()
    with pytest.raises(ResourceError, match=r"64 worker\(s\).*2 CPU.*--num-workers"):
        launch(specs, tmp_path)
    assert time.perf_counter() - started < 30     # seconds, not Ray's endless wait (even on a loaded box)
    assert not (tmp_path / "trials").exists()      # nothing was launched


def test_one_worker_trial_reports_each_task_and_checkpoints(one_worker):
    out, result, lines, _ = one_worker
    assert result["status"] == "finished", result.get("error")
    assert result["launcher"] == "ray" and result["world_size"] == 1 and result["resources"]["num_workers"] == 1
    task_lines = [line for line in lines if " task " in line]
    assert [line.split(" task ")[1].split()[0] for line in task_lines] == ["1", "2", "3", "4", "5"]
    assert all("order=natural seed=0" in line and "acc=" in line for line in task_lines)
    assert any("finished avg_inc_acc=" in line for line in lines)
    assert result["metrics"]["cnn"]["accuracies"][0] > 80           # it learned something real
    # start-up to the first training step, by stage, in order (benchmarks/perf/harness_overhead.py reads it)
    startup = result["startup_s"]
    assert list(startup) == ["ray_train_start_s", "worker_imports_s", "trial_setup_s"]
    assert all(v >= 0 for v in startup.values()) and startup["ray_train_start_s"] > 0.1, startup   # new processes
    # Ray Train kept the last two task checkpoints under the absolute storage path, names without timestamps
    ray_run = out / "ray" / result["name"]
    assert sorted(p.name for p in ray_run.glob("task_*")) == ["task_003", "task_004"]
    assert (ray_run / "task_004" / "task_004.pt").is_file()
    state = torch.load(ray_run / "task_004" / "task_004.pt", map_location="cpu", weights_only=True)
    assert state["task"] == 4


def test_two_ddp_workers_match_one_worker(one_worker, tmp_path):
    out1, one, _, _ = one_worker
    (two,) = launch(digits_specs(num_workers=2, cpus_per_worker=0.95), tmp_path)
    assert two["status"] == "finished", two.get("error")
    assert two["world_size"] == 2 and two["distributed"] and two["backend"] == "gloo"
    assert two["resources"]["cpus_per_worker"] < 1            # fractional CPUs: 2 workers + trainable on 2 CPUs
    assert two["resources"]["threads_per_worker"] == one["resources"]["threads_per_worker"] == 1
    # the memory does not depend on the number of workers (random selection here: with herding, float-level
    # weight differences can change late picks; tests/test_distributed.py shows that herding on features
    # gathered from 2 ranks picks exactly what 1 process picks given the same weights)
    mem1 = last_checkpoint(out1, one["name"])["memory"]
    mem2 = last_checkpoint(tmp_path, two["name"])["memory"]
    assert mem1["classes"] == mem2["classes"] and mem1["indices"] == mem2["indices"]
    # and the accuracy curve is the same up to float rounding (all-reduce sums in another order)
    acc1, acc2 = one["metrics"]["cnn"]["accuracies"], two["metrics"]["cnn"]["accuracies"]
    assert acc2 == pytest.approx(acc1, abs=1e-6)
    flat = [[v for row in r["metrics"]["cnn"]["accuracy_matrix"] for v in row if v is not None] for r in (one, two)]
    assert flat[1] == pytest.approx(flat[0], abs=1e-6)
    # because the weights themselves are the same after 5 tasks of DDP training
    w1 = _tensors(last_checkpoint(out1, one["name"])["method"])
    w2 = _tensors(last_checkpoint(tmp_path, two["name"])["method"])
    assert w1.keys() == w2.keys() and len(w1) > 4
    for key in w1:
        assert torch.allclose(w1[key].float(), w2[key].float(), rtol=1e-4, atol=1e-5), key


def _tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a (nested) state dict into {dotted key: tensor}."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        out = {}
        for key, value in state.items():
            out.update(_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def test_worker_killed_at_task_2_resumes_to_the_same_metrics(one_worker, tmp_path):
    _, clean, _, _ = one_worker
    lines: list[str] = []
    (faulty,) = launch(digits_specs(fault_at_task=2, cpus_per_worker=0.95), tmp_path, lines)
    assert faulty["status"] == "finished", faulty.get("error")
    ckpts = tmp_path / "trials" / faulty["name"] / "checkpoints"
    assert (ckpts / "fault_injected_2").is_file()                       # the fault did fire
    assert faulty["restored_from"] in ("task_001.pt", "task_002.pt")     # restarted from a Ray checkpoint
    assert "ray_train_start_s" not in faulty["startup_s"]                # would include the failed attempt
    assert faulty["metrics"]["cnn"]["accuracies"] == pytest.approx(clean["metrics"]["cnn"]["accuracies"], abs=1e-9)
    assert faulty["metrics"] == clean["metrics"]                         # bitwise, on CPU with 1 worker
    # each task is printed once, though task 3 ran twice at most
    assert sum(" task 3 " in line for line in lines) == 1


def test_rerun_skips_finished_trials_and_runs_the_rest(one_worker):
    out, first, _, _ = one_worker
    path = out / "trials" / first["name"] / "result.json"
    stamp = path.stat().st_mtime_ns
    lines: list[str] = []
    specs = digits_specs(seeds=[0, 1], cpus_per_worker=0.95)
    results = launch(specs, out, lines)
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert lines[0] == f"[skip] {first['name']} already finished"
    assert path.stat().st_mtime_ns == stamp and results[0] == json.loads(path.read_text())
    assert not any("seed=0] task" in line for line in lines)            # seed 0 was not trained again
    assert sum("seed=1] task" in line for line in lines) == 5
    assert launch(specs, out, lines) == results                         # all done: Ray is not even needed


@pytest.mark.slow
def test_ctrl_c_after_one_trial_then_rerun_does_not_retrain_it(tmp_path):
    """The real thing, through the CLI: Ctrl-C (SIGINT) once the first trial has finished, run again."""
    cmd = [sys.executable, "run_benchmark.py", "--method", "replay", "--suite", "digits-5x2", "--seeds", "0", "1",
           "--output-dir", str(tmp_path), "--set", "backbone=tiny_cnn", "--set", "augment=none", "--epochs", "3",
           "--batch-size", "32", "--max-concurrent-trials", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if " finished " in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "rerun the same command" in err
    finished = [json.loads(p.read_text()) for p in tmp_path.glob("trials/*/result.json")]
    assert [r["seed"] for r in finished if r["status"] == "finished"] == [0]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "[skip] replay_digits-5x2_natural_seed0_" in again.stdout
    assert "seed=0] task" not in again.stdout and again.stdout.count("seed=1] task") >= 1
