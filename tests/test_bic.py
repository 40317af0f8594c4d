"""BiC as a method: bias layers, the balanced KD loss from the second task on, the held-out validation split (never
trained on in stage 1, reproducible), stage 2 training only the newest bias layer, checkpoints, real runs."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.config.compose import RECIPES_DIR, defaults, load_yaml
from harness.core.loop import train_phase
from harness.core.method import PhaseConfig, PhaseKind, TaskInfo
from harness.core.runtime import RuntimeContext
from harness.data import ArrayData
from harness.errors import ConfigError
from methods.bic import BiC, balanced_kd_loss
from toy_data import toy_data  # noqa: E402


def _task(t: int, per_task: int = 2, tasks: int = 3) -> TaskInfo:
    return TaskInfo(task_id=t, num_tasks=tasks, new_classes=tuple(range(t * per_task, (t + 1) * per_task)),
                    num_old_classes=t * per_task, num_total_classes=tasks * per_task)


def _config(**kw) -> dict:
    """The harness's and BiC's declared defaults (recipes/bic/default.yaml) on a tiny backbone."""
    cfg = {**defaults(), **load_yaml(RECIPES_DIR / "bic" / "default.yaml"), "backbone": "tiny_cnn",
           "backbone_width": 4, "memory_size": 40, "memory_per_class": None, "seed": 0}
    cfg.update(kw)
    return cfg


def _bic(torch_seed: int = 0, **kw) -> BiC:
    torch.manual_seed(torch_seed)
    method = BiC(_config(**kw), torch.device("cpu"))
    method.build()
    return method


# ---- model and losses ---------------------------------------------------------------------------------------------
def test_one_frozen_identity_bias_layer_per_incremental_task_on_its_new_classes():
    method = _bic()
    method.before_task(_task(0))
    assert len(method.model.bias_layers) == 0 and method.teacher is None
    method.before_task(_task(1))
    method.before_task(_task(2))
    layers = method.model.bias_layers
    assert [(b.start, b.stop) for b in layers] == [(2, 4), (4, 6)]
    assert all(not p.requires_grad for p in layers.parameters())        # trained in stage 2 only
    method.model.eval()
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(method.model(x), method.model.fc(method.model.backbone(x)))   # identity at init


def test_loss_is_cross_entropy_first_then_balanced_kd_from_the_previous_model():
    method = _bic()
    method.net = method.model
    x = torch.randn(6, 3, 8, 8)
    method.before_task(_task(0))
    method.model.eval()
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    ce = F.cross_entropy(method.model(x), y)
    assert method.training_step((x, y), _task(0), PhaseConfig()).item() == pytest.approx(ce.item(), rel=1e-6)
    method.before_task(_task(1))
    method.model.eval()
    y = torch.tensor([0, 1, 2, 3, 2, 3])
    logits, old = method.model(x), method.teacher(x)
    assert old.shape[1] == 2                                   # the teacher scores the old classes
    expected = balanced_kd_loss(logits, y, old, 2.0)           # lambda = 2 old / 4 seen, T = 2
    loss = method.training_step((x, y), _task(1), PhaseConfig())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item())
    # stage 2: plain cross-entropy on the corrected logits (PyCIL's extra softmax left out)
    stage2 = PhaseConfig(kind=PhaseKind.BIAS_CORRECTION)
    assert method.training_step((x, y), _task(1), stage2).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6)


# ---- what each stage trains ---------------------------------------------------------------------------------------
def test_stage_1_trains_everything_but_the_bias_layers_through_the_real_loop():
    method = _bic()
    for t in range(2):
        method.before_task(_task(t))
    bias = {k: v.clone() for k, v in method.model.bias_layers.state_dict().items()}
    conv = method.model.backbone.body[0].weight.detach().clone()
    train_phase(method, toy_data(32, 4), PhaseConfig(epochs=2, batch_size=8, lr=0.1, sched="constant"), _task(1),
                RuntimeContext(progress=False), seed=0)
    for k, v in method.model.bias_layers.state_dict().items():
        assert torch.equal(v, bias[k]), k
    assert not torch.equal(method.model.backbone.body[0].weight, conv)


def test_stage_2_trains_only_the_newest_bias_layer_bit_for_bit():
    method = _bic()
    for t in range(3):
        method.before_task(_task(t))
    with torch.no_grad():                          # the previous task's correction, as its stage 2 left it
        method.model.bias_layers[0].alpha.fill_(1.5)
        method.model.bias_layers[0].beta.fill_(-0.2)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    phase = PhaseConfig(kind=PhaseKind.BIAS_CORRECTION, epochs=3, batch_size=8, lr=0.1, sched="constant")
    train_phase(method, toy_data(24, 6), phase, _task(2), RuntimeContext(progress=False), seed=0)
    changed = {k for k, v in method.model.state_dict().items() if not torch.equal(v, before[k])}
    # weights, the BatchNorm statistics and the older bias layer unchanged
    assert changed == {"bias_layers.1.alpha", "bias_layers.1.beta"}
    # back to stage 1 afterwards: base trainable, every bias layer frozen, BatchNorm follows the mode again
    assert all(p.requires_grad for p in method.model.backbone.parameters())
    assert all(not p.requires_grad for p in method.model.bias_layers.parameters())
    method.model.train()
    assert method.model.backbone.training


# ---- the held-out validation split ------------------------------------------------------------------------------
def _task_and_memory() -> ArrayData:
    """Task 1's data (classes 2, 3: 30 each) followed by the memory (classes 0, 1: 20 each); x[i] = i."""
    y = np.concatenate([np.repeat([2, 3], 30), np.repeat([0, 1], 20)])
    return ArrayData(np.arange(len(y)), y, [str(c) for c in range(4)])


def test_hold_out_is_class_balanced_disjoint_and_reproducible_from_seed_and_task():
    data = _task_and_memory()
    method = _bic()
    first, none = method.hold_out(data, _task(0))
    assert first is data and none is None                              # no old classes, nothing to correct
    train, val = method.hold_out(data, _task(1))
    per_class = int(0.1 * 40 / 2)                                      # PyCIL: ratio * memory_size / old classes
    assert np.bincount(val.y).tolist() == [per_class] * 4              # old (memory) and new classes alike
    assert sorted(np.concatenate([train.x, val.x]).tolist()) == list(range(len(data)))   # a split of the data
    assert list(train.x) == sorted(train.x)                            # the data's own order, held-out items out
    again = _bic().hold_out(data, _task(1))
    assert np.array_equal(again[1].x, val.x)                           # a resumed trial holds out the same
    assert not np.array_equal(_bic(seed=1).hold_out(data, _task(1))[1].x, val.x)
    fixed = _bic(memory_size=None, memory_per_class=20).hold_out(data, _task(1))[1]
    assert np.bincount(fixed.y).tolist() == [2] * 4                    # int(0.1 * 20 per class)


def test_held_out_samples_are_kept_out_of_stage_1_and_are_what_stage_2_trains_on(monkeypatch):
    """A real digits trial: the images stage 1 trains on never include a held-out one; stage 2 sees held-out ones."""
    from harness.config.compose import resolve_config
    from harness.config.identity import expand_trials
    from harness.data import TaskDataset, build_transform, dataset_info
    from harness.run.trial import run_trial

    splits, seen = {}, {}
    hold_out, training_step = BiC.hold_out, BiC.training_step

    def recording_hold_out(self, data, task):
        splits[task.task_id] = hold_out(self, data, task)
        return splits[task.task_id]

    def recording_step(self, batch, task, phase):
        seen.setdefault((task.task_id, phase.kind), set()).update(row.tobytes() for row in batch[0].numpy())
        return training_step(self, batch, task, phase)

    monkeypatch.setattr(BiC, "hold_out", recording_hold_out)
    monkeypatch.setattr(BiC, "training_step", recording_step)
    config = resolve_config("bic", "digits-5x2", overrides={"augment": "none", "epochs": 1, "base_epochs": 1,
                                                            "bias_correction_epochs": 2})
    (spec,) = expand_trials(config)
    run_trial(spec, RuntimeContext(progress=False))
    tf = build_transform(dataset_info("digits"), train=True, options=config)

    def images(data: ArrayData) -> set[bytes]:
        dataset = TaskDataset(data, tf)
        return {dataset[i][0].numpy().tobytes() for i in range(len(dataset))}

    assert splits[0][1] is None and (0, PhaseKind.BIAS_CORRECTION) not in seen
    for t in range(1, 5):
        train, val = (images(part) for part in splits[t])
        only_held = val - train                          # (a digit image can occur twice in the data)
        assert only_held and not only_held & seen[(t, PhaseKind.TRAIN)]
        assert seen[(t, PhaseKind.TRAIN)] <= train
        assert seen[(t, PhaseKind.BIAS_CORRECTION)] <= val and seen[(t, PhaseKind.BIAS_CORRECTION)]


# ---- checkpoints --------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_after_replaying_before_task_predicts_the_same():
    method = _bic()
    for t in range(3):
        method.before_task(_task(t))
    with torch.no_grad():
        for layer in method.model.bias_layers:
            layer.alpha.fill_(0.7)
            layer.beta.fill_(0.3)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    other = _bic(torch_seed=5)
    for t in range(3):
        other.before_task(_task(t))
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(4, 3, 8, 8)
    method.model.eval(), other.model.eval()
    assert torch.equal(method.predict(x)["cnn"], other.predict(x)["cnn"])


# ---- real runs on scikit-learn digits ------------------------------------------------------------------------
def _digits(**kw) -> dict:
    from harness.config.compose import resolve_config
    overrides = {"epochs": 4, "base_epochs": 4, "batch_size": 32, "lr": 0.05, "incremental_lr": 0.05,
                 "augment": "none", **kw}                                # as the iCaRL and DER digits runs
    return resolve_config("bic", "digits-5x2", overrides=overrides)


def test_bic_runs_on_real_digits_and_its_bias_correction_pays(tmp_path):
    from harness.config.identity import expand_trials
    from harness.run.local import run_local
    (result,) = run_local(expand_trials(_digits()), tmp_path / "bic", log=lambda s: None, progress=False)
    assert result["status"] == "finished", result.get("error")
    cnn = result["metrics"]["cnn"]
    assert cnn["accuracies"][0] > 80                   # 2 digit classes
    assert cnn["last_accuracy"] > 50                   # 10 classes: chance 10, finetune forgets down to ~20
    params = [row["parameters"] for row in result["history"]]
    # each task: 2 classifier rows (32 weights + a bias each) and, from the second task on, a bias layer (2)
    assert [b - a for a, b in zip(params, params[1:])] == [2 * 33 + 2] * 4
    # stage 1 alone (no hold-out, no stage 2) leaves the new classes' bias in place: 28.6 vs 74.4 measured
    (plain,) = run_local(expand_trials(_digits(bias_correction_epochs=0)), tmp_path / "plain", log=lambda s: None,
                         progress=False)
    assert plain["metrics"]["cnn"]["last_accuracy"] < cnn["last_accuracy"] - 20


def test_bic_resume_matches_uninterrupted_run(tmp_path):
    from harness.config.identity import expand_trials
    from harness.run.local import run_local
    kw = dict(epochs=1, base_epochs=1, bias_correction_epochs=3)
    clean = run_local(expand_trials(_digits(**kw)), tmp_path / "a", log=lambda s: None, progress=False)[0]
    cfg = _digits(fault_at_task=2, **kw)
    first = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert first["status"] == "failed"
    resumed = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert resumed["status"] == "finished", resumed.get("error")
    assert resumed["metrics"]["cnn"]["accuracies"] == pytest.approx(clean["metrics"]["cnn"]["accuracies"], abs=1e-6)


def test_bic_needs_a_memory_and_a_ratio_in_range():
    from harness.config.compose import resolve_config
    with pytest.raises(ConfigError, match="bic needs a rehearsal memory"):
        resolve_config("bic", "digits-5x2", overrides={"memory_size": 0})
    with pytest.raises(ConfigError, match="bic_val_ratio"):
        _bic(bic_val_ratio=1.5)
