"""The run-time estimate behind the driver's long-run warning: the work it counts (by hand on a small case), its
order of magnitude on the CPU suites against their measured times, and the one warning line."""
from __future__ import annotations

import math

import pytest

import harness.run.estimate as estimate
from harness.config.compose import resolve_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def test_work_counted_by_hand(monkeypatch) -> None:
    """replay on digits-5x2 with a forward pass of exactly 1 GFLOP and a training step of 3: 5 tasks of 2 classes
    x 144 images, 2 epochs, memory 100 (random: no herding features), 36 test images per class. Training: task 1
    2 x 288 images, tasks 2-5 2 x (288 + 100) -> 3e9 x 3,680 = 1.104e13; evaluation 36 x (2 + 4 + 6 + 8 + 10) x
    1e9 = 1.08e12: 1.212e13 FLOPs at 1 thread x 4e10 FLOP/s = 303 s. Herding adds 5 x 288 forward passes."""
    monkeypatch.setattr(estimate, "_flops", lambda config, tasks: ((1e9, 3e9), (1e9, 3e9), False))
    config = resolve_config("replay", "digits-5x2")
    assert estimate.estimate_hours(config, "cpu") == pytest.approx(303 / 3600)
    assert estimate.estimate_hours({**config, "memory_selection": "herding"}, "cpu") == pytest.approx(339 / 3600)
    # a teacher adds a forward pass per training image from the second task on
    monkeypatch.setattr(estimate, "_flops", lambda config, tasks: ((1e9, 3e9), (1e9, 3e9), True))
    assert estimate.estimate_hours(config, "cpu") == pytest.approx((1.212e13 + 4 * 2 * 388 * 1e9) / 4e10 / 3600)
    # a cost that grows with the tasks (DER) is interpolated between the first and the last task
    monkeypatch.setattr(estimate, "_flops", lambda config, tasks: ((1e9, 3e9), (5e9, 7e9), False))
    grown = sum((2 * (288 + (100 if t else 0)) * (3e9 + 1e9 * t) + 36 * 2 * (t + 1) * (1e9 + 1e9 * t))
                for t in range(5))
    assert estimate.estimate_hours(config, "cpu") == pytest.approx(grown / 4e10 / 3600)


def test_bic_held_out_split_and_bias_correction_counted_by_hand(monkeypatch) -> None:
    """BiC on digits-5x2 (memory 100, validation ratio 0.1, 30 bias-correction epochs), forward 1 GFLOP, step 3,
    a teacher from the second task on. The split held out of tasks 2-5 is int(0.1 x 100 / old classes) images of
    each seen class: 5 x 4, 2 x 6, 1 x 8, 1 x 10 = 20, 12, 8, 10. Main phases: 2 x 288 x 3e9 + 2 x (288 + 100 -
    held) x 4e9 summed = 1.3744e13; bias correction 30 x 50 x 1e9 = 1.5e12 (only the bias layer trains: a step is
    a forward pass); evaluation 1.08e12; herding 5 x 288 x 1e9 = 1.44e12. In all 1.7764e13 FLOPs = 444.1 s."""
    monkeypatch.setattr(estimate, "_flops", lambda config, tasks: ((1e9, 3e9), (1e9, 3e9), True))
    config = resolve_config("bic", "digits-5x2")
    assert estimate.estimate_hours(config, "cpu") == pytest.approx(1.7764e13 / 4e10 / 3600)
    # the second stage off: nothing held out, no bias correction
    no_stage2 = (2 * 288 * 3e9 + 4 * 2 * 388 * 4e9 + 1.08e12 + 1.44e12) / 4e10 / 3600
    assert estimate.estimate_hours({**config, "bias_correction_epochs": 0}, "cpu") == pytest.approx(no_stage2)


def test_training_steps_are_counted_with_their_frozen_parts() -> None:
    """A real count on the meta device: a step of a plain CNN is about 3 forward passes; DER's at the last of 5
    tasks far less (4 of its 5 extractors are frozen: no weight gradients, no backward below them)."""
    from harness.core.method import TaskInfo

    tasks = [TaskInfo(t, 5, (2 * t, 2 * t + 1), 2 * t, 10) for t in range(5)]
    (fwd, step), _, teacher = estimate._flops(resolve_config("replay", "cifar10-5x2"), tasks)
    assert 2.5 < step / fwd < 3.5 and not teacher
    first, (fwd5, step5), _ = estimate._flops(resolve_config("der", "cifar10-5x2"), tasks)
    assert fwd5 == pytest.approx(5 * first[0], rel=0.01) and step5 < 2 * fwd5
    assert estimate._flops(resolve_config("icarl", "cifar10-5x2"), tasks)[2]           # iCaRL has a teacher
    # PODNet's forward returns its learned scale (a view of a parameter): counted, not refused
    (fwd_pod, step_pod), _, _ = estimate._flops(resolve_config("podnet", "cifar10-5x2"), tasks)
    assert fwd_pod == pytest.approx(fwd, rel=0.2) and 2.5 < step_pod / fwd_pod < 3.5


@pytest.mark.parametrize("method,measured_min", [("finetune", 2.4), ("replay", 2.6), ("icarl", 3.3), ("der", 5.9),
                                                 ("dytox", 4.1)])
def test_cpu_suite_estimates_are_within_a_factor_two_of_the_measured_times(method, measured_min) -> None:
    # measured: the cifar10-5x2 comparison on one thread (README, benchmarks/results/cifar10_5x2.md), 2 trials
    minutes = 60 * estimate.estimate_hours(resolve_config(method, "cifar10-5x2"), "cpu")
    assert measured_min / 2 < minutes < measured_min * 2
    assert estimate.long_run_warning(resolve_config(method, "cifar10-5x2"), "cpu") is None


def test_full_recipes_on_a_cpu_get_one_warning_line() -> None:
    config = resolve_config("dytox", "cifar100")
    assert estimate.estimate_hours(config, "cpu") > 1000          # 3 orders x 10 tasks x 500 epochs of a ViT
    line = estimate.long_run_warning(config, "cpu")
    assert line.startswith("warning: ") and "\n" not in line and "hours" in line
    # the official-pickle CIFAR-10 suite carries the CPU budget now: minutes, not days
    for method in ("icarl", "dytox"):
        assert estimate.estimate_hours(resolve_config(method, "cifar10-official-5x2"), "cpu") < 1
    assert math.isnan(estimate.estimate_hours({**config, "dataset": "imagefolder"}, "cpu"))   # size unknown
