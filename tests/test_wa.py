"""WA (methods/wa.py): cross-entropy then the balanced KD loss from the previous model, weight aligning after each
incremental task, clipping of the classifier after every step, checkpoints, and real runs on digits."""
import io

import pytest
import torch
import torch.nn.functional as F

from harness.config.compose import resolve_config
from harness.core.loop import train_phase
from harness.core.method import PhaseConfig, TaskInfo
from harness.core.runtime import RuntimeContext
from methods.bic import balanced_kd_loss
from methods.wa import WA
from toy_data import toy_data  # noqa: E402


def _task(t: int) -> TaskInfo:
    return TaskInfo(task_id=t, num_tasks=3, new_classes=(2 * t, 2 * t + 1), num_old_classes=2 * t,
                    num_total_classes=6)


def _wa(**options) -> WA:
    torch.manual_seed(0)
    method = WA(resolve_config("wa", "digits-5x2", overrides={"backbone_width": 4, **options}), torch.device("cpu"))
    method.build()
    method.net = method.model
    return method


def test_first_task_is_cross_entropy_and_later_tasks_balance_kd_from_the_previous_model():
    method = _wa()
    assert method.temperature == 2.0 and method.clip is True
    x = torch.randn(6, 3, 8, 8)
    method.before_task(_task(0))
    assert method.teacher is None
    method.model.eval()
    y0 = torch.tensor([0, 1, 0, 1, 1, 0])
    assert method.training_step((x, y0), _task(0), PhaseConfig()).item() == pytest.approx(
        F.cross_entropy(method.model(x), y0).item(), rel=1e-6)

    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.before_task(_task(1))
    teacher = method.teacher
    assert teacher.fc.out_features == 2 and method.model.fc.out_features == 4
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    method.model.eval()
    y = torch.tensor([2, 3, 0, 3, 2, 1])
    logits = method.model(x)
    expected = balanced_kd_loss(logits, y, teacher(x), 2.0)     # lambda = 2 old / 4 seen classes
    assert method.training_step((x, y), _task(1), PhaseConfig()).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)   # the KD term is on


def test_after_task_aligns_the_new_rows_to_the_old_mean_norm_from_the_second_task_on():
    method = _wa()
    method.before_task(_task(0))
    first = method.model.fc.weight.detach().clone()
    method.after_task(_task(0))
    assert torch.equal(method.model.fc.weight, first) and method.gammas == []
    method.before_task(_task(1))
    with torch.no_grad():
        method.model.fc.weight[2:] *= 5.0          # new rows larger than the old ones, as after training
    fc = method.model.fc
    old_rows, new_rows, bias = fc.weight[:2].detach().clone(), fc.weight[2:].detach().clone(), fc.bias.detach().clone()
    method.after_task(_task(1))
    assert method.teacher is None
    norms = fc.weight.detach().norm(dim=1)
    assert norms[2:].mean().item() == pytest.approx(norms[:2].mean().item(), rel=1e-5)
    assert torch.equal(fc.weight[:2], old_rows) and torch.equal(fc.bias, bias)
    (gamma,) = method.gammas
    assert gamma < 1 and torch.allclose(fc.weight[2:], new_rows * gamma)


@pytest.mark.parametrize("clip", [True, False])
def test_classifier_is_clipped_after_every_step_of_the_real_loop(clip):
    method = _wa(wa_clip=clip)
    method.before_task(_task(0))
    minima = []

    def spy(module, args) -> None:          # the classifier each training forward pass reads
        minima.append(min(p.min().item() for p in module.parameters()))
    handle = method.model.fc.register_forward_pre_hook(spy)
    train_phase(method, toy_data(32, 2), PhaseConfig(epochs=2, batch_size=8, lr=0.1, sched="constant"),
                _task(0), RuntimeContext(progress=False), seed=0)
    handle.remove()
    assert len(minima) == 8 and minima[0] < 0                      # the initial classifier has negative entries
    fc_min = min(p.min().item() for p in method.model.fc.parameters())
    if clip:
        assert all(m >= 0 for m in minima[1:]) and fc_min >= 0    # from the first step on
        assert any((p == 0).any() for p in method.model.fc.parameters())
    else:
        assert fc_min < 0
    assert min(p.min().item() for p in method.model.backbone.parameters()) < 0   # only the classifier is clipped


def test_checkpoint_after_replaying_before_task_gives_the_same_predictions_and_gammas():
    method = _wa()
    for t in range(2):
        method.before_task(_task(t))
        train_phase(method, toy_data(16, 2 * (t + 1)), PhaseConfig(epochs=1, batch_size=8, sched="constant"),
                    _task(t), RuntimeContext(progress=False), seed=0)
        method.after_task(_task(t))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = _wa()
    for t in range(2):
        other.before_task(_task(t))
    other.load_state_dict(state)
    x = torch.randn(4, 3, 8, 8)
    method.model.eval(), other.model.eval()
    assert torch.equal(method.predict(x)["cnn"], other.predict(x)["cnn"])
    assert other.gammas == method.gammas and len(other.gammas) == 1


def test_recipes_clip_as_the_paper_and_not_as_pycil():
    ours = resolve_config("wa", "cifar100")
    assert (ours["backbone"], ours["wa_clip"], ours["base_epochs"], ours["epochs"], ours["milestones"]) == (
        "resnet18_cifar", True, 200, 170, [60, 100, 140])
    assert (ours["weight_decay"], ours["incremental_weight_decay"], ours["kd_temperature"]) == (0.0005, 0.0002, 2.0)
    pycil = resolve_config("wa", "cifar100", recipe="cifar100_pycil")
    assert (pycil["backbone"], pycil["resnet_shortcut"], pycil["wa_clip"]) == ("resnet32", "zero_pad", False)


def test_runs_on_real_digits_and_resumes_as_if_uninterrupted(tmp_path):
    from harness.config.identity import expand_trials
    from harness.run.local import run_local

    clean = run_local(expand_trials(resolve_config("wa", "digits-5x2")), tmp_path / "a", log=lambda s: None,
                      progress=False)[0]
    assert clean["status"] == "finished", clean.get("error")
    accuracies = clean["metrics"]["cnn"]["accuracies"]
    assert len(accuracies) == 5 and accuracies[0] > 90             # digits 0 / 1
    assert accuracies[-1] > 10                                      # 10 classes: chance is 10%

    faulty = resolve_config("wa", "digits-5x2", overrides={"fault_at_task": 2})
    first = run_local(expand_trials(faulty), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert first["status"] == "failed"
    resumed = run_local(expand_trials(faulty), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert resumed["status"] == "finished" and resumed["resumed_from"] == "task_002.pt"
    assert resumed["metrics"]["cnn"]["accuracies"] == accuracies
