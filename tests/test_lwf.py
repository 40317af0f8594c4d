"""LwF (methods/lwf.py): the loss by hand, no distillation on the first task, the previous model as teacher, and a
short real run on digits."""
import math

import pytest
import torch

from harness.config.compose import resolve_config
from harness.core.method import PhaseConfig, TaskInfo
from methods.lwf import LwF, lwf_loss


def _task(t: int) -> TaskInfo:
    return TaskInfo(task_id=t, num_tasks=5, new_classes=(2 * t, 2 * t + 1), num_old_classes=2 * t,
                    num_total_classes=10)


def test_loss_by_hand_on_a_tiny_example():
    # 2 old classes, 2 new ones; the label is new class 2; T = 2, lambda = 3.
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    old_logits = torch.tensor([[1.0, 3.0]])
    # CE over the new classes only: -log softmax([1, -1])[0] = log(1 + e^-2)
    ce = math.log(1 + math.exp(-2))
    # KD: teacher softmax([1, 3] / 2) against the student's log softmax([2, 0] / 2), summed over the old classes
    q = [1 / (1 + math.e), math.e / (1 + math.e)]
    log_p = [-math.log(1 + math.exp(-1)), -math.log(1 + math.e)]
    kd = -(q[0] * log_p[0] + q[1] * log_p[1])
    assert ce == pytest.approx(0.126928, abs=1e-6) and kd == pytest.approx(1.044320, abs=1e-6)
    got = lwf_loss(logits, torch.tensor([2]), old_logits, temperature=2.0, weight=3.0)
    assert got.item() == pytest.approx(ce + 3 * kd, rel=1e-6)          # 3.259889
    assert lwf_loss(logits, torch.tensor([2]), old_logits, 2.0, 0.0).item() == pytest.approx(ce, rel=1e-6)


def _lwf() -> LwF:
    torch.manual_seed(0)
    config = resolve_config("lwf", "digits-5x2")
    method = LwF(config, torch.device("cpu"))
    method.build()
    method.net = method.model
    return method


def test_first_task_is_plain_cross_entropy_and_the_next_distils_from_the_previous_model():
    method = _lwf()
    assert (method.temperature, method.weight) == (2.0, 3.0)                  # PyCIL's T and lambda
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    method.before_task(_task(0))
    assert method.teacher is None
    method.model.eval()
    loss = method.training_step((x, y), _task(0), PhaseConfig())
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(method.model(x), y).item(), rel=1e-6)

    method.after_task(_task(0))
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.before_task(_task(1))
    teacher = method.teacher
    assert teacher is not None and teacher.fc.out_features == 2 and method.model.fc.out_features == 4
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())   # the model as task 0 left it
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    method.model.eval()
    y = torch.tensor([2, 3, 2, 3, 3, 2])
    logits = method.model(x)
    expected = lwf_loss(logits, y, teacher(x), 2.0, 3.0)
    assert method.training_step((x, y), _task(1), PhaseConfig()).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > torch.nn.functional.cross_entropy(logits[:, 2:], y - 2).item()   # the KD term is on


def test_runs_on_real_digits_without_a_memory(tmp_path):
    from harness.config.identity import expand_trials
    from harness.config.memory import memory_budget
    from harness.run.local import run_local

    config = resolve_config("lwf", "digits-5x2")
    assert config["memory_size"] == 100 and memory_budget(config, LwF) is None     # the suite's budget is unused
    (result,) = run_local(expand_trials(config), tmp_path, log=lambda s: None, progress=False)
    assert result["status"] == "finished", result.get("error")
    accuracies = result["metrics"]["cnn"]["accuracies"]
    assert len(accuracies) == 5 and accuracies[0] > 90          # digits 0 / 1
    assert accuracies[-1] > 10                                  # 10 classes at the end: chance is 10%
