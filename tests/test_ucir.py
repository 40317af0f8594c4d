"""UCIR (methods/ucir.py): features before the last ReLU, split cosine classifier with frozen old rows, the loss
terms from the second task on, imprinting, class-balanced finetuning of the class rows only, checkpoints, and
real runs on digits."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.config.compose import resolve_config
from harness.config.phases import balanced_phase, main_phase
from harness.core.backbones import build_backbone
from harness.core.loop import train_phase
from harness.core.memory import RehearsalMemory
from harness.core.method import PhaseKind, TaskInfo
from harness.core.runtime import RuntimeContext
from harness.data import ArrayData, DatasetInfo, TaskDataset, build_transform
from harness.errors import ConfigError
from harness.run.trial import TrialTools
from methods.ucir import (UCIR, BlockWithoutFinalReLU, CosineLinear, SplitCosineLinear, UCIRNet, imprinted_weights,
                          less_forget_loss, margin_ranking_loss)

INFO = DatasetInfo("toy", 6, 8, (0.5,) * 3, (0.25,) * 3)
TEST_TF = build_transform(INFO, train=False)
CTX = RuntimeContext(progress=False)


def _task(t: int) -> TaskInfo:
    return TaskInfo(task_id=t, num_tasks=3, new_classes=(2 * t, 2 * t + 1), num_old_classes=2 * t,
                    num_total_classes=6)


def _data(t: int, per_class: int = 8) -> ArrayData:
    """Task t's two classes: 8x8 images whose brightness depends on the class, plus noise."""
    rng = np.random.default_rng(t)
    y = np.repeat(np.array([2 * t, 2 * t + 1]), per_class)
    x = np.clip(rng.normal(40 * y[:, None, None, None] + 20, 30, (len(y), 8, 8, 3)), 0, 255).astype(np.uint8)
    return ArrayData(x, y, [str(c) for c in range(6)])


def _ucir(**options) -> tuple[UCIR, RehearsalMemory]:
    torch.manual_seed(0)
    config = resolve_config("ucir", "digits-5x2", overrides={"backbone_width": 4, "augment": "none", **options})
    method = UCIR(config, torch.device("cpu"))
    method.build()
    memory = RehearsalMemory(per_class=4, selection="random")
    method.tools = TrialTools(method, CTX, TEST_TF, 16, memory, [str(c) for c in range(6)])
    return method, memory


def _train_task(method: UCIR, memory: RehearsalMemory, t: int, epochs: int = 1) -> None:
    """One task as the trial runs it: main phase on task data + memory, memory update, after_task, finetuning."""
    task, data = _task(t), _data(t)
    method.tools.start_task(data)
    method.before_task(task)
    memory_data = method.tools.memory_data()
    train = data if memory_data is None else ArrayData(np.concatenate([data.x, memory_data.x]),
                                                       np.concatenate([data.y, memory_data.y]), data.class_names)
    phase = main_phase(method.config, t).with_(epochs=epochs, batch_size=8)
    train_phase(method, TaskDataset(train, TEST_TF), phase, task, CTX, seed=0)
    memory.update(data.x, data.y, None, num_seen_classes=task.num_seen_classes)
    method.after_task(task)
    ft = method.finetune_phase(task, balanced_phase(method.config, method.balanced_phase))
    if ft is not None:
        train_phase(method, TaskDataset(method.tools.memory_data(), TEST_TF), ft.with_(epochs=epochs, batch_size=8),
                    task, CTX, seed=0)


def _last_block_output(module: torch.nn.Module, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(out))
    module(x)
    handle.remove()
    return seen[0]


# ---- the network -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet32", "resnet18"])
def test_features_are_the_last_block_before_its_relu(name):
    torch.manual_seed(0)
    plain = build_backbone(name, 4 if name == "resnet32" else None).eval()
    torch.manual_seed(0)
    net = UCIRNet(build_backbone(name, 4 if name == "resnet32" else None)).eval()
    last = net.backbone.stages[-1][-1] if name == "resnet32" else net.backbone.net.layer4[-1]
    assert isinstance(last, BlockWithoutFinalReLU)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before_relu = _last_block_output(net.backbone, last, x)
        original = _last_block_output(plain, plain.stages[-1][-1] if name == "resnet32" else plain.net.layer4[-1], x)
        feats = net.features(x)
    assert torch.equal(F.relu(before_relu), original)               # the same block, only its final ReLU gone
    assert (before_relu < 0).any() and (feats < 0).any()            # so features can be negative
    assert torch.allclose(feats, before_relu.mean(dim=(2, 3)), atol=1e-6)


def test_tiny_cnn_features_can_be_negative():
    torch.manual_seed(0)
    net = UCIRNet(build_backbone("tiny_cnn", 4)).eval()
    with torch.no_grad():
        assert (net.features(torch.randn(4, 3, 8, 8)) < 0).any()


def test_classifier_splits_keeps_old_rows_and_sigma_and_freezes_them_and_the_teacher_is_the_previous_model():
    method, _ = _ucir()
    method.before_task(_task(0))
    assert isinstance(method.model.fc, CosineLinear) and method.teacher is None
    with torch.no_grad():
        method.model.fc.sigma.fill_(3.0)
    old_rows = method.model.fc.weight.detach().clone()
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.before_task(_task(1))
    fc = method.model.fc
    assert isinstance(fc, SplitCosineLinear) and fc.fc1.weight.shape[0] == 2 and fc.fc2.weight.shape[0] == 2
    assert torch.equal(fc.fc1.weight, old_rows) and fc.sigma.item() == 3.0
    assert not fc.fc1.weight.requires_grad and fc.fc2.weight.requires_grad and fc.sigma.requires_grad
    teacher = method.teacher
    assert teacher.fc.weight.shape[0] == 2 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    method.before_task(_task(2))                     # both halves of the split classifier become the old rows
    assert method.model.fc.fc1.weight.shape[0] == 4 and torch.equal(method.model.fc.fc1.weight[:2], old_rows)


# ---- the loss ------------------------------------------------------------------------------------------------
def test_first_task_is_cross_entropy_and_later_tasks_add_less_forget_and_margin_ranking():
    method, _ = _ucir(lf_lambda=5.0, mr_margin=0.5, mr_k=2, mr_weight=1.0)
    method.net = method.model
    x = torch.randn(8, 3, 8, 8)
    method.before_task(_task(0))
    method.model.eval()
    y0 = torch.tensor([0, 1] * 4)
    phase0 = main_phase(method.config, 0)
    assert method.training_step((x, y0), _task(0), phase0).item() == pytest.approx(
        F.cross_entropy(method.model(x)["logits"], y0).item(), rel=1e-6)

    method.before_task(_task(1))
    with torch.no_grad():                            # the student drifts away from the teacher
        for p in method.model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.model.eval()
    y = torch.tensor([0, 1, 2, 3, 2, 3, 0, 2])       # three old-class samples
    out = method.model(x)
    ce = F.cross_entropy(out["logits"], y)
    lf = less_forget_loss(out["features"], method.teacher.features(x), 5.0, 2, 2)
    mr = margin_ranking_loss(out["cosine"], y, 2, 0.5, 2)
    assert lf.item() > 0 and mr.item() > 0
    phase1 = main_phase(method.config, 1)
    assert method.training_step((x, y), _task(1), phase1).item() == pytest.approx((ce + lf + mr).item(), rel=1e-6)
    # the finetuning's backbone is frozen: no less-forget term there (constant), the ranking term stays
    finetune = balanced_phase(method.config, PhaseKind.FINETUNE)
    assert method.training_step((x, y), _task(1), finetune).item() == pytest.approx((ce + mr).item(), rel=1e-6)
    # logits are sigma times the unscaled cosine the ranking loss reads
    assert torch.allclose(out["logits"], method.model.fc.sigma * out["cosine"])


# ---- imprinting ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("imprint", [True, False])
def test_new_rows_are_imprinted_from_the_new_classes_features_before_training(imprint):
    method, memory = _ucir(imprint_weights=imprint)
    _train_task(method, memory, 0)
    data = _data(1)
    method.tools.start_task(data)
    method.before_task(_task(1))
    random_rows = method.model.fc.fc2.weight.detach().clone()
    method.before_phase(main_phase(method.config, 1), _task(1))
    rows = method.model.fc.fc2.weight.detach()
    if not imprint:
        assert torch.equal(rows, random_rows)
        return
    method.model.eval()
    with torch.no_grad():
        feats = method.model.features(torch.stack([TEST_TF(torch.from_numpy(img).permute(2, 0, 1))
                                                   for img in data.x]))
    labels = torch.as_tensor(data.y)
    expected = imprinted_weights([feats[labels == 2], feats[labels == 3]], method.model.fc.fc1.weight)
    assert torch.allclose(rows, expected, atol=1e-5)
    old_norm = method.model.fc.fc1.weight.norm(dim=1).mean()
    assert torch.allclose(rows.norm(dim=1), old_norm.expand(2), rtol=1e-5)


# ---- phases: what each one trains -----------------------------------------------------------------------------
def test_main_phase_keeps_old_rows_and_finetuning_trains_only_the_class_rows():
    method, memory = _ucir()
    _train_task(method, memory, 0)
    assert method.finetune_phase(_task(0), balanced_phase(method.config, method.balanced_phase)) is None

    task, data = _task(1), _data(1)
    method.tools.start_task(data)
    method.before_task(task)
    old_rows = method.model.fc.fc1.weight.detach().clone()
    backbone = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    train = ArrayData(np.concatenate([data.x, memory.get()[0]]), np.concatenate([data.y, memory.get()[1]]),
                      data.class_names)
    train_phase(method, TaskDataset(train, TEST_TF), main_phase(method.config, 1).with_(epochs=2, batch_size=8),
                task, CTX, seed=0)
    assert torch.equal(method.model.fc.fc1.weight, old_rows)
    assert any(not torch.equal(v, backbone[k]) for k, v in method.model.backbone.state_dict().items())
    memory.update(data.x, data.y, None, num_seen_classes=4)
    method.after_task(task)

    phase = method.finetune_phase(task, balanced_phase(method.config, method.balanced_phase))
    assert phase.kind is PhaseKind.FINETUNE and (phase.epochs, phase.lr, phase.milestones) == (20, 0.01, (10,))
    backbone = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    fc1, fc2 = method.model.fc.fc1.weight.detach().clone(), method.model.fc.fc2.weight.detach().clone()
    sigma = method.model.fc.sigma.detach().clone()
    seen = {}

    def spy(module, args) -> None:        # the backbone's mode during the phase's forward passes
        seen["backbone_training"] = method.model.backbone.training
    handle = method.model.register_forward_pre_hook(spy)
    train_phase(method, TaskDataset(method.tools.memory_data(), TEST_TF), phase.with_(epochs=2, batch_size=4),
                task, CTX, seed=0)
    handle.remove()
    assert seen["backbone_training"] is False                   # BatchNorm in eval mode while finetuning
    for k, v in method.model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k                   # weights AND BatchNorm statistics
    assert torch.equal(method.model.fc.sigma, sigma)
    assert not torch.equal(method.model.fc.fc1.weight, fc1) and not torch.equal(method.model.fc.fc2.weight, fc2)
    # after the phase: back to the state before_task left
    assert all(p.requires_grad for p in method.model.backbone.parameters())
    assert not method.model.fc.fc1.weight.requires_grad and method.model.fc.sigma.requires_grad
    method.model.train()
    assert method.model.backbone.training


# ---- heads and checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_after_replaying_before_task_gives_the_same_predictions():
    method, memory = _ucir()
    for t in range(2):
        _train_task(method, memory, t)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other, _ = _ucir()
    for t in range(2):
        other.before_task(_task(t))
    other.load_state_dict(state)
    x = torch.randn(5, 3, 8, 8)
    method.model.eval(), other.model.eval()
    mine, theirs = method.predict(x), other.predict(x)
    assert list(mine) == list(theirs) == ["cnn", "nme"]
    for head in mine:
        assert torch.equal(mine[head], theirs[head]), head
    other.config["main_head"] = "nme"
    assert list(other.predict(x)) == ["nme", "cnn"]


def test_bad_options_and_a_missing_memory_stop_the_run():
    with pytest.raises(ConfigError, match="main_head"):
        _ucir(main_head="linear")
    method, _ = _ucir(mr_k=3)
    method.before_task(_task(0))
    with pytest.raises(ConfigError, match="mr_k = 3"):
        method.before_task(_task(1))                # 2 new classes cannot give 3 hard negatives
    with pytest.raises(ConfigError, match="ucir needs a rehearsal memory"):
        resolve_config("ucir", "digits-5x2", overrides={"memory_size": 0, "finetuning_epochs": 0})


def test_recipes_set_the_authors_and_pycils_protocols():
    ours = resolve_config("ucir", "cifar100")
    assert (ours["backbone"], ours["epochs"], ours["milestones"], ours["batch_size"], ours["weight_decay"]) == (
        "resnet18_cifar", 160, [80, 120], 128, 0.0005)
    finetune = balanced_phase(ours, PhaseKind.FINETUNE)
    assert (finetune.epochs, finetune.lr, finetune.milestones, finetune.opt, finetune.sched) == (
        20, 0.01, (10,), "sgd", "multistep")
    pycil = resolve_config("ucir", "cifar100", recipe="cifar100_pycil")
    assert balanced_phase(pycil, PhaseKind.FINETUNE) is None
    assert (pycil["backbone"], pycil["memory_per_class"], pycil["main_head"], pycil["imprint_weights"]) == (
        "resnet32", 20, "nme", False)


# ---- real runs on scikit-learn digits ------------------------------------------------------------------------
def test_runs_on_real_digits_and_resumes_as_if_uninterrupted(tmp_path):
    from harness.config.identity import expand_trials
    from harness.run.local import run_local

    config = resolve_config("ucir", "digits-5x2")
    clean = run_local(expand_trials(config), tmp_path / "a", log=lambda s: None, progress=False)[0]
    assert clean["status"] == "finished", clean.get("error")
    metrics = clean["metrics"]
    assert list(metrics) == ["cnn", "nme"]
    assert metrics["cnn"]["accuracies"][0] > 90                    # digits 0 / 1
    assert metrics["cnn"]["last_accuracy"] > 10 and metrics["nme"]["last_accuracy"] > 20   # 10 classes: chance 10%

    faulty = resolve_config("ucir", "digits-5x2", overrides={"fault_at_task": 2})
    first = run_local(expand_trials(faulty), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert first["status"] == "failed"
    resumed = run_local(expand_trials(faulty), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert resumed["status"] == "finished" and resumed["resumed_from"] == "task_002.pt"
    for head in ("cnn", "nme"):
        assert resumed["metrics"][head]["accuracies"] == metrics[head]["accuracies"], head
