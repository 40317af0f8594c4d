"""DER (Dynamically Expandable Representation): freezing, BN, growth, weight aligning, aux targets, decouple."""
import io

import pytest
import torch

from harness.config.phases import balanced_phase
from harness.core.backbones import build_backbone
from harness.core.loop import train_phase
from harness.core.method import PhaseConfig, PhaseKind, TaskInfo
from harness.core.runtime import RuntimeContext
from methods.der import DER, DERNet, aux_targets
from toy_data import toy_data  # noqa: E402


def _task(t: int, per_task: int = 2, tasks: int = 3) -> TaskInfo:
    return TaskInfo(task_id=t, num_tasks=tasks, new_classes=tuple(range(t * per_task, (t + 1) * per_task)),
                    num_old_classes=t * per_task, num_total_classes=tasks * per_task)


def _config(**kw) -> dict:
    cfg = {"backbone": "tiny_cnn", "backbone_width": 4, "batch_size": 8, "momentum": 0.9, "weight_decay": 0.0,
           "memory_size": 20, "aux_weight": 1.0, "weight_align": True, "decouple_epochs": 0, "decouple_lr": 0.1,
           "decouple_milestones": [], "decouple_temperature": 5.0, "reuse_old_classifier": True}
    cfg.update(kw)
    return cfg


def _der(**kw) -> DER:
    torch.manual_seed(0)
    method = DER(_config(**kw), torch.device("cpu"))
    method.build()
    return method


def _bn_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in module.named_buffers() if "running" in name or "num_batches" in name]


def test_aux_targets_map_old_classes_to_zero_and_new_to_one_onwards():
    y = torch.tensor([0, 3, 4, 5, 6, 1])
    assert aux_targets(y, 4).tolist() == [0, 0, 1, 2, 3, 0]
    assert aux_targets(y, 0).tolist() == [1, 4, 5, 6, 7, 2]


def test_new_extractor_copies_the_last_one_and_old_extractors_get_no_gradient():
    method = _der()
    method.before_task(_task(0))
    first = method.model.extractors[0]
    with torch.no_grad():       # make task-0 weights differ from a fresh init
        for p in first.parameters():
            p.add_(0.5)
    method.before_task(_task(1))
    net = method.model
    assert len(net.extractors) == 2 and net.num_frozen == 1
    for a, b in zip(net.extractors[0].state_dict().values(), net.extractors[1].state_dict().values()):
        assert torch.equal(a, b)                      # initialised from the previous extractor
    assert all(not p.requires_grad for p in net.extractors[0].parameters())
    assert all(p.requires_grad for p in net.extractors[1].parameters())
    net.train()
    method.net = net
    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 3, 2, 3, 0, 2])
    method.training_step((x, y), _task(1), PhaseConfig()).backward()
    assert all(p.grad is None for p in net.extractors[0].parameters())
    assert all(p.grad is not None for p in net.extractors[1].parameters())
    assert net.aux_fc.weight.grad is not None and net.aux_fc.out_features == 3


def test_old_extractor_batchnorm_stats_do_not_move_in_training_mode():
    method = _der()
    method.before_task(_task(0))
    method.before_task(_task(1))
    method.before_task(_task(2))
    net = method.model
    old = [_bn_stats(e) for e in net.extractors[:2]]
    new = _bn_stats(net.extractors[2])
    net.train()                                       # what the loop does every phase
    assert net.training and not net.extractors[0].training and not net.extractors[1].training
    assert net.extractors[2].training
    for _ in range(3):
        net(torch.randn(8, 3, 8, 8) * 3 + 1)
    for before, extractor in zip(old, net.extractors[:2]):
        assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(extractor)))
    assert not all(torch.equal(a, b) for a, b in zip(new, _bn_stats(net.extractors[2])))


def test_parameter_growth_is_one_backbone_plus_classifier_growth():
    method = _der()
    backbone = build_backbone("tiny_cnn", 4)
    size = sum(p.numel() for p in backbone.parameters())
    d = backbone.out_dim
    counts = []
    for t in range(3):
        method.before_task(_task(t))
        counts.append(method.parameter_count())
    assert counts[0] == size + (d * 2 + 2)
    for t in (1, 2):
        old_fc = (t * d) * (2 * t) + 2 * t                       # t extractors, 2t classes
        new_fc = ((t + 1) * d) * (2 * (t + 1)) + 2 * (t + 1)
        assert counts[t] - counts[t - 1] == size + new_fc - old_fc
    # the aux head is training-only and not counted
    total = sum(p.numel() for p in method.model.parameters())
    assert total - counts[2] == sum(p.numel() for p in method.model.aux_fc.parameters())


def test_grown_classifier_keeps_old_weights_in_the_top_left_block():
    method = _der()
    method.before_task(_task(0))
    w, b = method.model.fc.weight.detach().clone(), method.model.fc.bias.detach().clone()
    method.before_task(_task(1))
    fc = method.model.fc
    assert fc.weight.shape == (4, 2 * method.model.out_dim)
    assert torch.equal(fc.weight[:2, : w.shape[1]], w) and torch.equal(fc.bias[:2], b)
    fresh = _der(reuse_old_classifier=False)
    fresh.before_task(_task(0))
    w0 = fresh.model.fc.weight.detach().clone()
    fresh.before_task(_task(1))
    assert not torch.equal(fresh.model.fc.weight[:2, : w0.shape[1]], w0)


def test_weight_aligning_equalises_mean_norms():
    net = DERNet(lambda: build_backbone("tiny_cnn", 4))
    net.add_task(2)
    net.add_task(3)
    with torch.no_grad():
        net.fc.weight[2:] *= 7.0                      # new classes' rows much larger, as after training
    norms = net.fc.weight.detach().norm(dim=1)
    expected = float(norms[:2].mean() / norms[2:].mean())
    old_rows = net.fc.weight[:2].detach().clone()
    gamma = net.weight_align(3)
    norms = net.fc.weight.detach().norm(dim=1)
    assert gamma == pytest.approx(expected, rel=1e-6)
    assert norms[:2].mean().item() == pytest.approx(norms[2:].mean().item(), rel=1e-5)
    assert torch.equal(net.fc.weight[:2], old_rows)


def test_after_task_aligns_only_incremental_tasks():
    method = _der()
    method.before_task(_task(0))
    w = method.model.fc.weight.detach().clone()
    method.after_task(_task(0))
    assert torch.equal(method.model.fc.weight, w) and method.gammas == []
    method.before_task(_task(1))
    method.after_task(_task(1))
    assert len(method.gammas) == 1
    off = _der(weight_align=False)
    off.before_task(_task(0))
    off.before_task(_task(1))
    w = off.model.fc.weight.detach().clone()
    off.after_task(_task(1))
    assert torch.equal(off.model.fc.weight, w)


def test_main_phase_trains_only_the_new_extractor_through_the_real_loop():
    method = _der()
    method.before_task(_task(0))
    method.before_task(_task(1))
    old = {k: v.clone() for k, v in method.model.extractors[0].state_dict().items()}
    new = {k: v.clone() for k, v in method.model.extractors[1].state_dict().items()}
    phase = PhaseConfig(epochs=2, batch_size=8, lr=0.1, sched="constant")
    train_phase(method, toy_data(32, 4), phase, _task(1), RuntimeContext(progress=False), seed=0)
    for k, v in method.model.extractors[0].state_dict().items():
        assert torch.equal(v, old[k]), k                 # weights AND BatchNorm statistics
    assert any(not torch.equal(v, new[k]) for k, v in method.model.extractors[1].state_dict().items())


def test_decouple_phase_trains_only_the_classifier_on_tempered_logits():
    method = _der(decouple_epochs=3, decouple_milestones=[2], decouple_temperature=5.0, decouple_gamma=0.1)
    stage = balanced_phase(method.config, method.balanced_phase)
    assert method.finetune_phase(_task(0), stage) is None      # nothing to re-balance after the first task
    method.before_task(_task(0))
    method.before_task(_task(1))
    phase = method.finetune_phase(_task(1), stage)
    assert phase.kind is PhaseKind.DECOUPLE and phase.epochs == 3 and phase.milestones == (2,)
    extractors = {k: v.clone() for k, v in method.model.extractors.state_dict().items()}
    aux = method.model.aux_fc.weight.detach().clone()
    fc = method.model.fc.weight.detach().clone()
    seen = {}

    def spy(module, args):    # record training flags during the phase's forward passes
        seen["extractors_training"] = [e.training for e in method.model.extractors]
    handle = method.model.register_forward_pre_hook(spy)
    train_phase(method, toy_data(32, 4), phase, _task(1), RuntimeContext(progress=False), seed=0)
    handle.remove()
    assert seen["extractors_training"] == [False, False]    # every extractor's BN frozen, the newest included
    for k, v in method.model.extractors.state_dict().items():
        assert torch.equal(v, extractors[k]), k
    assert torch.equal(method.model.aux_fc.weight, aux)
    assert not torch.equal(method.model.fc.weight, fc)
    # after the phase: back to the state before_task set (newest extractor trainable)
    assert method.model.num_frozen == 1 and all(p.requires_grad for p in method.model.extractors[1].parameters())
    # the loss is CE on logits / T
    method.net = method.model
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    method.model.eval()
    loss = method.training_step((x, y), _task(1), phase)
    expected = torch.nn.functional.cross_entropy(method.model(x)["logits"] / 5.0, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_der_state_survives_a_regrown_model():
    method = _der()
    for t in range(3):
        method.before_task(_task(t))
        method.after_task(_task(t))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = DER(_config(), torch.device("cpu"))
    other.build()
    for t in range(3):
        other.before_task(_task(t))
    other.load_state_dict(state)
    x = torch.randn(4, 3, 8, 8)
    method.model.eval(), other.model.eval()
    assert torch.equal(method.predict(x)["cnn"], other.predict(x)["cnn"])
    assert other.gammas == pytest.approx(method.gammas)


# ---- real runs on scikit-learn digits ------------------------------------------------------------------------
def _digits(**kw):
    from harness.config.compose import resolve_config
    overrides = {"backbone": "tiny_cnn", "epochs": 4, "base_epochs": 4, "batch_size": 32, "lr": 0.05,
                 "incremental_lr": 0.05, "augment": "none"}
    overrides.update(kw)
    return resolve_config("der", "digits-5x2", overrides=overrides)


@pytest.mark.parametrize("variant,floor", [("plain", 40), ("decouple", 40), ("weight_align", 25)])
def test_der_runs_on_real_digits(tmp_path, variant, floor):
    from harness.run.local import run_local
    from harness.config.identity import expand_trials
    cfg = _digits(decouple_epochs=4 if variant == "decouple" else 0, decouple_milestones=[], decouple_batch_size=16,
                  weight_align=variant == "weight_align")
    (result,) = run_local(expand_trials(cfg), tmp_path, log=lambda s: None, progress=False)
    assert result["status"] == "finished", result.get("error")
    cnn = result["metrics"]["cnn"]
    assert cnn["accuracies"][0] > 80
    # 10 classes; finetune forgets down to ~16-20. WA gets a lower floor: after 4 epochs the new rows are the
    # SMALLER ones (gamma > 1), so WA favours the new classes (see docs/METHODS.md)
    assert cnn["last_accuracy"] > floor
    params = [row["parameters"] for row in result["history"]]
    growth = [b - a for a, b in zip(params, params[1:])]
    assert all(g > 0 for g in growth) and len(set(growth)) == len(growth)   # a backbone + a wider classifier


def test_der_resume_matches_uninterrupted_run(tmp_path):
    from harness.run.local import run_local
    from harness.config.identity import expand_trials
    kw = dict(epochs=2, base_epochs=2, decouple_epochs=1, decouple_milestones=[])
    clean = run_local(expand_trials(_digits(**kw)), tmp_path / "a", log=lambda s: None, progress=False)[0]
    cfg = _digits(fault_at_task=2, **kw)
    first = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert first["status"] == "failed"
    resumed = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert resumed["status"] == "finished", resumed.get("error")
    assert resumed["metrics"]["cnn"]["accuracies"] == pytest.approx(clean["metrics"]["cnn"]["accuracies"], abs=1e-6)
    assert [r["parameters"] for r in resumed["history"]] == [r["parameters"] for r in clean["history"]]


def test_code_defaults_equal_the_recipe_defaults_and_pycil_milestones():
    """One value per option: what DER falls back to when a key is absent is what recipes/der/default.yaml says,
    and that file is PyCIL's DER (milestones [80, 120, 150], not iCaRL's [80, 120])."""
    from harness.config.compose import RECIPES_DIR, load_yaml
    from methods.der import DEFAULTS

    recipe = load_yaml(RECIPES_DIR / "der" / "default.yaml")
    assert {k: recipe[k] for k in DEFAULTS} == DEFAULTS
    assert recipe["milestones"] == [80, 120, 150] and recipe["base_milestones"] == [60, 120, 170]
    assert load_yaml(RECIPES_DIR / "der" / "cifar100_pycil.yaml")["milestones"] == [80, 120, 150]
    config = _config()
    del config["decouple_temperature"]                         # absent: the recipe default, 5.0, everywhere
    method = DER(config, torch.device("cpu"))
    method.build()
    method.net = method.model
    method.before_task(_task(0))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    method.model.eval()
    phase = PhaseConfig(kind=PhaseKind.DECOUPLE)
    expected = torch.nn.functional.cross_entropy(method.model(x)["logits"] / 5.0, y)
    assert method.training_step((x, y), _task(0), phase).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(Exception, match="decouple_temperature must be > 0"):
        DER(_config(decouple_temperature=0.0), torch.device("cpu")).build()


def test_decouple_needs_a_memory_only_while_it_is_on():
    from harness.config.compose import resolve_config
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"der's decouple phase trains on the rehearsal memory: .*decouple_epochs: 0"):
        _digits(memory_size=0)                                  # digits-5x2's cpu recipe: decouple_epochs 15
    assert resolve_config("der", "digits-5x2", overrides={"memory_size": 0, "decouple_epochs": 0})["memory_size"] == 0


# ---- pruning (der_pruning): channel gates, sparsity loss, binary masks after the task -----------------------
def test_mask_scale_anneals_from_one_over_smax_to_smax_over_an_epoch():
    from methods.der import mask_scale
    scales = [mask_scale(b, 5, 400.0) for b in range(5)]
    assert scales[0] == pytest.approx(1 / 400) and scales[-1] == pytest.approx(400.0)
    assert scales[2] == pytest.approx((1 / 400 + 400) / 2)
    assert all(a < b for a, b in zip(scales, scales[1:]))
    assert mask_scale(0, 1, 400.0) == 400.0                      # one batch per epoch: the gate is already sharp


def test_sparsity_loss_by_hand_on_a_tiny_extractor():
    from methods.der import ChannelMasks
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                               torch.nn.Conv2d(2, 4, 1), torch.nn.BatchNorm2d(4))
    masks = ChannelMasks(body, s_max=4.0)
    with torch.no_grad():
        masks.embeddings[0].copy_(torch.tensor([0.0, 1.0]))
        masks.embeddings[1].copy_(torch.tensor([0.0, -1.0, 2.0, 0.5]))
    masks.eval()                                                 # eval: the gates at s_max = 4
    m1 = torch.sigmoid(4 * torch.tensor([0.0, 1.0]))
    m2 = torch.sigmoid(4 * torch.tensor([0.0, -1.0, 2.0, 0.5]))
    # layer 1: 3x3 kernel, input = the image's 3 channels; layer 2: 1x1 kernel, input = layer 1's gated channels
    expected = (9 * 3 * m1.sum() + 1 * m1.sum() * m2.sum()) / (9 * 3 * 2 + 1 * 2 * 4)
    assert masks.sparsity_loss().item() == pytest.approx(expected.item(), rel=1e-6)
    out = body(torch.randn(2, 3, 5, 5))                          # the gate multiplies the BatchNorm's output
    body.eval()
    masks.prune(threshold=0.5)
    assert masks.keep(1).tolist() == [0.0, 0.0, 1.0, 1.0]       # sigmoid(0) = 0.5 is not above the threshold
    assert out.shape == (2, 4, 3, 3)


def _pruned_der(**kw) -> DER:
    return _der(der_pruning=True, der_prune_smax=400.0, der_sparsity_lambda=1.0, der_prune_threshold=0.5, **kw)


def test_gates_train_only_on_the_new_extractor():
    method = _pruned_der()
    method.before_task(_task(0))
    method.after_phase(PhaseConfig(), _task(0))                  # end of task 0's main phase: extractor 0 pruned
    method.before_task(_task(1))
    net = method.model
    net.train()
    method.net = net
    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 3, 2, 3, 0, 2])
    method.training_step((x, y), _task(1), PhaseConfig()).backward()
    assert net.masks[1].embeddings[0].grad is not None and bool(net.masks[0].pruned)
    assert all(e.grad is None and not e.requires_grad for e in net.masks[0].embeddings)
    assert all(p.grad is None for p in net.extractors[0].parameters())
    params = {id(p) for p in method.parameters_to_optimize(PhaseConfig())}
    assert all(id(e) in params for e in net.masks[1].embeddings)
    assert not any(id(e) in params for e in net.masks[0].embeddings)


def test_pruned_channels_output_zero_and_the_parameter_count_drops():
    method = _pruned_der()
    method.before_task(_task(0))
    full = method.parameter_count()
    net = method.model
    with torch.no_grad():                                        # close 1 of 4 channels, then 3 of 8
        net.masks[0].embeddings[0].copy_(torch.tensor([1.0, -1.0, 1.0, 1.0]))
        net.masks[0].embeddings[1].copy_(torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0]))
    method.after_phase(PhaseConfig(), _task(0))
    seen = {}
    bn2 = net.extractors[0].body[5]
    bn2.register_forward_hook(lambda m, a, out: seen.update(bn2=out))
    net.eval()
    feats = net.features(torch.randn(4, 3, 8, 8) * 2 + 1)
    assert torch.all(seen["bn2"][:, [0, 2]] == 0) and torch.all(feats[:, [0, 2]] == 0)
    assert seen["bn2"][:, 1].abs().sum() > 0
    # conv1 channel: 3*3*3 kernel + bias + BN weight and bias; conv2 channel: 4*3*3 kernel + bias + BN pair
    assert full - method.parameter_count() == 1 * (27 + 1 + 2) + 3 * (36 + 1 + 2)
    method.before_task(_task(1))                                 # and it stays so
    assert method.model.masks[0].keep(1).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    net = method.model                                           # the new extractor is not pruned yet: full
    extractors = sum(p.numel() for p in net.extractors.parameters())
    assert method.parameter_count() == extractors - 147 + sum(p.numel() for p in net.fc.parameters())


def test_pruning_off_registers_no_gates():
    method = _der()
    method.before_task(_task(0))
    assert len(method.model.masks) == 0
    assert all(not m._forward_hooks for m in method.model.extractors[0].modules())


def test_pruned_der_state_survives_a_regrown_model():
    method = _pruned_der()
    for t in range(3):
        method.before_task(_task(t))
        with torch.no_grad():
            method.model.masks[t].embeddings[1][: t + 1] = -1.0
        method.after_phase(PhaseConfig(), _task(t))
        method.after_task(_task(t))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    other = _pruned_der()
    for t in range(3):
        other.before_task(_task(t))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert all(bool(m.pruned) for m in other.model.masks)
    assert other.parameter_count() == method.parameter_count()
    x = torch.randn(4, 3, 8, 8)
    method.model.eval(), other.model.eval()
    assert torch.equal(method.predict(x)["cnn"], other.predict(x)["cnn"])


def test_pruned_der_runs_on_real_digits(tmp_path):
    from harness.run.local import run_local
    from harness.config.identity import expand_trials
    cfg = _digits(der_pruning=True, der_prune_smax=5.0, der_sparsity_lambda=3.0, epochs=2, base_epochs=2,
                  decouple_epochs=2)
    (result,) = run_local(expand_trials(cfg), tmp_path, log=lambda s: None, progress=False)
    assert result["status"] == "finished", result.get("error")
    cnn = result["metrics"]["cnn"]
    assert cnn["accuracies"][0] > 80 and cnn["last_accuracy"] > 25          # chance: 10
    unpruned = DER(cfg | {"der_pruning": False}, torch.device("cpu"))        # the same model grown, no gates
    unpruned.build()
    for t in range(5):
        unpruned.before_task(TaskInfo(task_id=t, num_tasks=5, new_classes=(2 * t, 2 * t + 1),
                                      num_old_classes=2 * t, num_total_classes=10))
    assert result["history"][-1]["parameters"] < unpruned.parameter_count()   # channels were pruned
