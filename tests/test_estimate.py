"""The run-time estimate behind the driver's long-run warning: the work it counts (by hand on a small case), its
order of magnitude on the CPU suites against their measured times, and the one warning line."""
from __future__ import annotations

import math

import pytest
import torch

import harness.estimate as estimate
from harness.config import resolve_config


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_work_counted_by_hand(monkeypatch) -> None:
    """replay on digits-5x2 with a forward pass of exactly 1 GFLOP: 5 tasks of 2 classes x 144 images, 2 epochs,
    memory 100 (random: no herding features), 36 test images per class. Training 3 GFLOP per image: task 1:
    2 x 288 images, tasks 2-5: 2 x (288 + 100) -> 1.104e13; evaluation 36 x (2 + 4 + 6 + 8 + 10) x 1e9 = 1.08e12:
    1.212e13 FLOPs at 2 threads x 2e10 FLOP/s = 303 s. Herding adds 5 x 288 forward passes: 1.44e12, 36 s."""
    monkeypatch.setattr(estimate, "_forward_flops", lambda config, tasks: (1e9, 1e9, False))
    config = resolve_config("replay", "digits-5x2")
    assert estimate.estimate_hours(config, "cpu") == pytest.approx(303 / 3600)
    assert estimate.estimate_hours({**config, "memory_selection": "herding"}, "cpu") == pytest.approx(339 / 3600)
    # a teacher adds a forward pass per training image from the second task on
    monkeypatch.setattr(estimate, "_forward_flops", lambda config, tasks: (1e9, 1e9, True))
    with_teacher = (1.212e13 + 4 * 2 * 388 * 1e9) / 4e10 / 3600
    assert estimate.estimate_hours(config, "cpu") == pytest.approx(with_teacher)


@pytest.mark.parametrize("method,measured_min", [("finetune", 3.9), ("replay", 4.3), ("icarl", 5.6), ("der", 9.0),
                                                 ("dytox", 5.0)])
def test_cpu_suite_estimates_are_within_a_factor_two_of_the_measured_times(method, measured_min) -> None:
    # measured: the cifar10-5x2 comparison on 2 cores (README), 2 trials per method
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
