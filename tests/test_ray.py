"""The Ray launcher on CPU (gloo), real Ray, real digits data, a tiny model.

One embedded Ray session (2 CPUs) is shared by the module. What is shown:
1. 2 DDP workers (a Ray Train job) compute the same first step as 1 worker (a trial inside its Tune actor)
   with the same global batch, select the same rehearsal memory, and reach the same accuracy within a stated
   tolerance after training (trained weights themselves are not machine-independent: see below);
2. a one-worker trial whose process dies after task 2 is restarted by Tune from its last task checkpoint and
   ends with the same metrics as an uninterrupted one;
3. a rerun skips finished trials (in-process here; the Ctrl-C version through the CLI is marked slow);
4. a request the cluster cannot hold fails at once with one clear line;
5. a placement group whose creator died (a stopped Ray Train job) is removed by the driver.

Model: BatchNorm normalises each rank's half batch with that half's statistics, so a BN network trained by 2
workers is NOT the one 1 worker trains (SyncBatchNorm would fix that but torch only implements it for GPUs).
The equivalence test therefore uses a norm-free tiny CNN, registered in every Ray worker process by a Ray
`worker_process_setup_hook`, and `augment: none` (random crops/flips would differ per rank). After the first
step the two agree to float rounding (an all-reduce sums the half-batch gradients in another order); after
many steps that rounding is amplified differently on different CPUs (BLAS kernels, reduction order): 1e-3 in
weights was measured on one machine, which is why only the first step is compared tightly.
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

from harness.config.compose import resolve_config  # noqa: E402
from harness.errors import ResourceError  # noqa: E402
from harness.run.events import LaunchOptions
from harness.run.events import TrialEvents  # noqa: E402
from harness.run.ray_grid import run_ray  # noqa: E402
from harness.run.ray_resources import plan_resources  # noqa: E402
from harness.config.identity import expand_trials  # noqa: E402

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
    from harness.core import backbones

    backbones.BACKBONES.setdefault(NORM_FREE, lambda width, *_: NormFreeTinyCNN(width or 16))


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


# "2 DDP workers reach 1 worker's accuracy" after 5 tasks of training: the two differ by float rounding only,
# which training amplifies differently on different CPUs. Equal on the machine this was written on; on the CI
# machine a 4-epoch trial (tests/test_ray_multinode.py) differed by 3.5 points at one step (10 of ~290 test
# digits). Stated tolerance: 6 points per step, 3 on the average. A rank that skipped the gradient all-reduce
# is caught tightly by test_first_step_of_two_ddp_workers_equals_one_worker, not by this one.
STEP_TOLERANCE, AVERAGE_TOLERANCE = 6.0, 3.0


def assert_same_accuracy_within_tolerance(result: dict, reference: dict) -> None:
    got, want = result["metrics"]["cnn"], reference["metrics"]["cnn"]
    assert got["accuracies"] == pytest.approx(want["accuracies"], abs=STEP_TOLERANCE)
    assert got["average_incremental_accuracy"] == pytest.approx(want["average_incremental_accuracy"],
                                                                abs=AVERAGE_TOLERANCE)


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
    assert result["resources"]["trainable_cpus"] == 0 and result["threads"] == 1   # the trial runs in its actor
    task_lines = [line for line in lines if " task " in line and " acc=" in line]
    assert [line.split(" task ")[1].split()[0] for line in task_lines] == ["1", "2", "3", "4", "5"]
    assert all("order=natural seed=0" in line for line in task_lines)
    assert any("finished avg_inc_acc=" in line for line in lines)
    assert result["metrics"]["cnn"]["accuracies"][0] > 80           # it learned something real
    # start-up to the first training step, by stage (benchmarks/perf/harness_overhead.py reads it)
    startup = result["startup_s"]
    assert list(startup) == ["trial_setup_s"] and startup["trial_setup_s"] >= 0
    assert result["started_unix"] <= result["first_step_unix"] <= result["finished_unix"]
    # every task's checkpoint, names without timestamps, loadable with weights_only
    ckpts = sorted(p.name for p in (out / "trials" / result["name"] / "checkpoints").glob("task_*.pt"))
    assert ckpts == [f"task_{t:03d}.pt" for t in range(5)]
    assert last_checkpoint(out, result["name"])["task"] == 4


def test_first_step_of_two_ddp_workers_equals_one_worker(ray_session, tmp_path):
    """One SGD step on a global batch of 256 (the task has ~290 images: the short last batch is dropped):
    1 worker vs a Ray Train job of 2 gloo workers with 128 images each. Same weights to float rounding."""
    step = {"epochs": 1, "base_epochs": 1, "batch_size": 256, "cpus_per_worker": 0.95}
    one = launch(digits_specs(**step), tmp_path / "one")[0]
    two = launch(digits_specs(num_workers=2, **step), tmp_path / "two")[0]
    untrained = launch(digits_specs(**{**step, "epochs": 0, "base_epochs": 0}), tmp_path / "init")[0]
    assert one["status"] == two["status"] == untrained["status"] == "finished", (one.get("error"), two.get("error"))
    assert two["world_size"] == 2 and two["distributed"] and two["backend"] == "gloo"
    assert one["history"][0]["images_per_s"] > 0
    first = [torch.load(tmp_path / d / "trials" / r["name"] / "checkpoints" / "task_000.pt", map_location="cpu",
                        weights_only=True)["method"] for d, r in (("one", one), ("two", two), ("init", untrained))]
    w1, w2, initial = (_tensors(state) for state in first)
    assert w1.keys() == w2.keys() and len(w1) > 4
    moved = 0
    for key in w1:
        assert torch.allclose(w1[key].float(), w2[key].float(), rtol=1e-5, atol=1e-7), key
        if key in initial and not torch.equal(initial[key], w1[key]):
            moved += 1
    assert moved > 0       # the step did change the weights (the comparison is not of two untouched inits)


def test_two_ddp_workers_match_one_worker_within_tolerance(one_worker, tmp_path):
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
    assert_same_accuracy_within_tolerance(two, one)


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
    assert faulty["resumed_from"] == "task_002.pt"                      # Tune restarted it from its checkpoint
    assert faulty["metrics"]["cnn"]["accuracies"] == pytest.approx(clean["metrics"]["cnn"]["accuracies"], abs=1e-9)
    assert faulty["metrics"] == clean["metrics"]                         # bitwise, on CPU with 1 worker
    # each task is printed once, though task 3 ran twice at most
    assert sum(" task 3 " in line for line in lines) == 1


def test_a_crashing_trial_is_recorded_failed_not_interrupted(ray_session, tmp_path):
    lines: list[str] = []
    (result,) = launch(digits_specs(fault_at_task=1, cpus_per_worker=0.95), tmp_path, lines, max_failures=0)
    assert result["status"] == "failed" and "InjectedFault" in result["error"], result
    assert "\n" not in result["error"]
    assert json.loads((tmp_path / "trials" / result["name"] / "result.json").read_text())["status"] == "failed"
    assert any("FAILED: InjectedFault" in line for line in lines)


# 2 workers: about a minute here, most of it Ray Train starting its controller and worker group, so the slow suite
# (which CI runs) checks that path; the default suite checks the trial actor's.
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_user_error_inside_a_trial_is_one_line_in_the_driver(ray_session, tmp_path, workers):
    """What pre-flight cannot see (here an unknown backbone, raised when the worker builds the model) reaches the
    driver as the user's own error, one line, from the trial's actor (1 worker) or a Ray Train worker (2)."""
    from harness.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        launch(digits_specs(num_workers=workers, backbone="no_such_backbone", cpus_per_worker=0.95), tmp_path)
    assert "no_such_backbone" in str(err.value) and "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_placement_group_of_a_dead_creator_is_removed_by_the_driver(ray_session):
    """What a Ray Train job that Tune stops leaves behind: a placement group created by an actor that is now
    dead. Ray keeps it (its lifetime is the job's); the driver's reaper frees it, and leaves live ones alone."""
    from ray.util import placement_group, remove_placement_group

    from harness.run.ray_cleanup import orphaned_placement_groups, remove_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self) -> str:
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.hex()

    mine = placement_group([{"CPU": 0.25}])          # the driver's own: must survive
    ray.get(mine.ready(), timeout=60)
    creator = Creator.remote()
    orphan = ray.get(creator.make.remote(), timeout=60)
    assert orphan not in orphaned_placement_groups()  # its creator is alive
    ray.kill(creator)
    deadline = time.monotonic() + 30
    while orphan not in orphaned_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert orphaned_placement_groups() == [orphan]
    assert remove_orphaned_placement_groups() == 1
    table = ray.util.placement_group_table()
    assert table[orphan]["state"] == "REMOVED" and table[mine.id.hex()]["state"] == "CREATED"
    remove_placement_group(mine)


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
