"""PODNet as a method: stage maps, distillation from the second task on, frozen old proxies, gradient clamping, the
classifier-only finetuning, NME class means, checkpoints, real runs."""
import io
import math

import numpy as np
import pytest
import torch

from harness.config.compose import RECIPES_DIR, defaults, load_yaml
from harness.config.phases import balanced_phase
from harness.core.backbones import build_backbone
from harness.core.loop import train_phase
from harness.core.memory import RehearsalMemory
from harness.core.method import PhaseConfig, PhaseKind, TaskInfo
from harness.core.runtime import RuntimeContext
from harness.data import ArrayData, DatasetInfo, TaskDataset, build_transform
from harness.errors import ConfigError
from harness.run.trial import TrialTools
from methods.podnet import PODNet, kmeans_proxies, nca_loss, pod_flat_loss, pod_spatial_loss, stage_maps
from toy_data import toy_data  # noqa: E402


def _task(t: int, per_task: int = 2, tasks: int = 3) -> TaskInfo:
    return TaskInfo(task_id=t, num_tasks=tasks, new_classes=tuple(range(t * per_task, (t + 1) * per_task)),
                    num_old_classes=t * per_task, num_total_classes=tasks * per_task)


def _config(**kw) -> dict:
    """The harness's and PODNet's declared defaults (recipes/podnet/default.yaml) on a tiny backbone."""
    cfg = {**defaults(), **load_yaml(RECIPES_DIR / "podnet" / "default.yaml"), "backbone": "tiny_cnn",
           "backbone_width": 4, "lsc_proxies": 3, "weight_decay": 0.0, "memory_size": 20, "memory_per_class": None,
           "seed": 0}
    cfg.update(kw)
    return cfg


def _podnet(seed: int = 0, **kw) -> PODNet:
    torch.manual_seed(seed)
    method = PODNet(_config(**kw), torch.device("cpu"))
    method.build()
    return method


TOY = DatasetInfo("toy", 4, 8, (0.5,) * 3, (0.25,) * 3)


def _images(labels: np.ndarray, seed: int = 0) -> ArrayData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 200, (len(labels), 8, 8, 3), dtype=np.uint8) + 10 * labels[:, None, None, None]
    return ArrayData(images.astype(np.uint8), labels, [str(c) for c in range(10)])


def _with_memory(method: PODNet, classes: int = 4, per_class: int = 5) -> RehearsalMemory:
    """Lends the method a real memory of random 8x8 images (`classes` classes) through the trial's tools."""
    memory = RehearsalMemory(per_class=per_class, selection="random")
    data = _images(np.repeat(np.arange(classes), per_class))
    memory.update(data.x, data.y, None, num_seen_classes=classes)
    method.tools = TrialTools(method, RuntimeContext(progress=False), build_transform(TOY, train=False), 16, memory,
                              data.class_names)
    return memory


# ---- stage maps -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,stages", [("resnet18", 4), ("tiny_cnn", 2), ("resnet18_reduced", 4)])
def test_stage_maps_of_every_supported_backbone_end_in_its_features(name, stages):
    torch.manual_seed(0)
    net = build_backbone(name, 4 if name != "resnet18" else None).eval()
    x = torch.randn(2, 3, 32, 32)
    maps, features = stage_maps(net, x)
    assert len(maps) == stages and all(m.ndim == 4 for m in maps)
    assert torch.equal(features, net(x))


def test_a_backbone_without_stages_is_refused_before_any_task():
    with pytest.raises(ConfigError, match="podnet reads the stage maps"):
        stage_maps(torch.nn.Linear(3, 3), torch.randn(1, 3))


# ---- losses -----------------------------------------------------------------------------------------------------
def test_distillation_terms_appear_from_the_second_task_scaled_by_the_adaptive_factor():
    method = _podnet()
    method.net = method.model
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1])
    method.before_task(_task(0))
    assert method.teacher is None
    method.model.eval()                            # the same BatchNorm statistics as the eval-mode teacher
    out = method.model(x)
    nca = nca_loss(out["logits"], y, 0.6, method.model.classifier.eta, released_code=True)   # the recipe's
    assert method.training_step((x, y), _task(0), PhaseConfig()).item() == pytest.approx(nca.item(), rel=1e-6)

    method.before_task(_task(1))
    y = torch.tensor([0, 1, 2, 3, 2, 3])
    method.model.eval()
    out = method.model(x)
    nca = nca_loss(out["logits"], y, 0.6, method.model.classifier.eta, released_code=True)
    # the teacher is the model as it was: nothing to distil yet
    assert method.training_step((x, y), _task(1), PhaseConfig()).item() == pytest.approx(nca.item(), abs=1e-6)
    with torch.no_grad():                          # the backbone moves away from the teacher
        for p in method.model.backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out, old = method.model(x), method.teacher(x)
    nca = nca_loss(out["logits"], y, 0.6, method.model.classifier.eta, released_code=True)
    flat, spatial = pod_flat_loss(old["features"], out["features"]), pod_spatial_loss(old["maps"], out["maps"])
    assert flat.item() > 1e-3 and spatial.item() > 1e-3
    loss = method.training_step((x, y), _task(1), PhaseConfig())
    # 4 classes seen, 2 new: factor sqrt(2); lambda_f = 1, lambda_c = 3 (the authors' CIFAR CNN config)
    assert loss.item() == pytest.approx((nca + math.sqrt(2) * (1.0 * flat + 3.0 * spatial)).item(), rel=1e-5)


def test_nca_released_code_false_selects_the_papers_loss():
    method = _podnet(nca_released_code=False)
    method.net = method.model
    method.before_task(_task(0))
    method.model.eval()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    out = method.model(x)
    released = nca_loss(out["logits"], y, 0.6, method.model.classifier.eta, released_code=True)
    paper = nca_loss(out["logits"], y, 0.6, method.model.classifier.eta)
    assert released.item() != pytest.approx(paper.item())
    assert method.training_step((x, y), _task(0), PhaseConfig()).item() == pytest.approx(paper.item(), rel=1e-6)


# ---- imprinting ------------------------------------------------------------------------------------------------
def test_kmeans_proxies_are_the_centres_of_each_class_s_normalised_features_times_the_norm():
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(4) * 5                          # class 0 around axes 0 and 1, class 1 around 2 and 3
    features = torch.cat([directions[i] + 0.01 * torch.randn(20, 4, generator=g) for i in range(4)])
    labels = torch.tensor([0] * 40 + [1] * 40)
    rows = kmeans_proxies(features, labels, (0, 1), num_proxies=2, norm=3.0, seed=0)
    assert rows.shape == (4, 4)                             # class-major: rows 0-1 class 0, rows 2-3 class 1
    for c in (0, 1):
        axes = sorted(rows[2 * c: 2 * c + 2].abs().argmax(dim=1).tolist())
        assert axes == [2 * c, 2 * c + 1]
    assert torch.allclose(rows.norm(dim=1), torch.full((4,), 3.0), atol=0.01)   # unit centres x the norm
    assert torch.equal(rows, kmeans_proxies(features, labels, (0, 1), 2, 3.0, seed=0))   # reproducible
    with pytest.raises(ConfigError, match="fewer than its 50 proxies"):
        kmeans_proxies(features, labels, (0,), num_proxies=50, norm=1.0, seed=0)


@pytest.mark.parametrize("imprint", [True, False])
def test_new_proxies_are_imprinted_before_the_main_phase_of_later_tasks(imprint):
    method = _podnet(lsc_imprint=imprint)
    _with_memory(method, classes=2)
    task_data = _images(np.repeat([2, 3], 12), seed=1)
    method.tools.start_task(task_data)
    method.before_task(_task(0))
    before = method.model.classifier.proxies[0].detach().clone()
    method.before_phase(PhaseConfig(), _task(0))
    assert torch.equal(method.model.classifier.proxies[0], before)     # nothing to imprint from in the first task
    method.before_task(_task(1))
    old, new = (p.detach().clone() for p in method.model.classifier.proxies)
    method.before_phase(PhaseConfig(), _task(1))
    proxies = method.model.classifier.proxies
    assert torch.equal(proxies[0], old)
    if not imprint:
        assert torch.equal(proxies[1], new)                             # PyCIL: the random init
        return
    feats = method.tools.features(task_data)               # the previous task's model, test transform
    expected = kmeans_proxies(feats, torch.as_tensor(task_data.y), (2, 3), 3, float(old.norm(dim=1).mean()), 0)
    assert torch.equal(proxies[1], expected)
    assert proxies[1].requires_grad


# ---- what trains --------------------------------------------------------------------------------------------------
def test_main_phase_freezes_old_proxies_and_trains_the_rest_through_the_real_loop():
    method = _podnet(lsc_imprint=False)          # imprinting: its own test above
    method.before_task(_task(0))
    method.before_task(_task(1))
    classifier = method.model.classifier
    old, new = classifier.proxies[0].detach().clone(), classifier.proxies[1].detach().clone()
    eta = classifier.eta.detach().clone()
    conv = method.model.backbone.body[0].weight.detach().clone()
    train_phase(method, toy_data(32, 4), PhaseConfig(epochs=2, batch_size=8, lr=0.1, sched="constant"), _task(1),
                RuntimeContext(progress=False), seed=0)
    assert torch.equal(classifier.proxies[0], old)                 # the authors' `old_weights: 0`
    assert not torch.equal(classifier.proxies[1], new)
    assert not torch.equal(classifier.eta, eta)                    # the learned scale trains in the main phase
    assert not torch.equal(method.model.backbone.body[0].weight, conv)


def test_gradients_are_clamped_elementwise_before_the_step():
    method = _podnet(grad_clamp=0.5)
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = method.wrap_optimizer(torch.optim.SGD([p], lr=1.0), PhaseConfig(), _task(0))
    p.grad = torch.tensor([3.0, -2.0, 0.25, -0.5])
    optimizer.step()
    assert p.detach().tolist() == [-0.5, 0.5, -0.25, 0.5]
    unclamped = _podnet(grad_clamp=0.0)
    q = torch.nn.Parameter(torch.zeros(2))
    optimizer = unclamped.wrap_optimizer(torch.optim.SGD([q], lr=1.0), PhaseConfig(), _task(0))
    q.grad = torch.tensor([3.0, -2.0])
    optimizer.step()
    assert q.detach().tolist() == [-3.0, 2.0]


def test_finetuning_trains_every_proxy_and_nothing_else_then_restores_freezing_and_class_means():
    method = _podnet()
    _with_memory(method)
    stage = balanced_phase(method.config, PhaseKind.FINETUNE)
    assert (stage.epochs, stage.lr, stage.opt, stage.sched) == (20, 0.05, "sgd", "constant")   # the authors'
    assert method.finetune_phase(_task(0), stage) is None        # nothing to balance after the first task
    method.before_task(_task(0))
    method.before_task(_task(1))
    method.after_task(_task(1))
    assert method.teacher is None and method.class_means.shape[0] == 4
    means = method.class_means.clone()
    classifier, backbone = method.model.classifier, method.model.backbone
    proxies = [p.detach().clone() for p in classifier.proxies]
    eta = classifier.eta.detach().clone()
    weights = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    running = backbone.body[1].running_mean.clone()
    phase = method.finetune_phase(_task(1), stage).with_(epochs=2, batch_size=8)
    train_phase(method, TaskDataset(method.tools.memory_data(), build_transform(TOY, train=False)), phase, _task(1),
                RuntimeContext(progress=False), seed=0)
    assert all(not torch.equal(p, before) for p, before in zip(classifier.proxies, proxies))   # old ones too
    assert torch.equal(classifier.eta, eta)
    for k, v in backbone.named_parameters():
        assert torch.equal(v, weights[k]), k
    assert not torch.equal(backbone.body[1].running_mean, running)  # BatchNorm in training mode, as the authors'
    # back to what before_task left: old proxies frozen, the rest trainable; the means follow the moved statistics
    assert [p.requires_grad for p in classifier.proxies] == [False, True]
    assert classifier.eta.requires_grad and all(p.requires_grad for p in backbone.parameters())
    assert not torch.equal(method.class_means, means)


# ---- inference and checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_round_trip_after_replaying_before_task_predicts_the_same():
    method = _podnet(lsc_imprint=False)
    _with_memory(method)
    for t in range(2):
        method.before_task(_task(t))
        train_phase(method, toy_data(16, 2 * (t + 1)), PhaseConfig(epochs=1, batch_size=8, sched="constant"),
                    _task(t), RuntimeContext(progress=False), seed=0)
    method.after_task(_task(1))                    # class means of the 4 classes in the memory
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    other = _podnet(seed=7)
    _with_memory(other)
    for t in range(2):
        other.before_task(_task(t))
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 3, 8, 8)
    method.model.eval(), other.model.eval()
    mine, theirs = method.predict(x), other.predict(x)
    assert list(mine) == list(theirs) == ["cnn", "nme"]              # the LSC is the main head
    for head in mine:
        assert torch.equal(mine[head], theirs[head]), head


# ---- real runs on scikit-learn digits ------------------------------------------------------------------------
def _digits(**kw) -> dict:
    from harness.config.compose import resolve_config
    overrides = {"epochs": 4, "base_epochs": 4, "batch_size": 32, "lr": 0.05, "incremental_lr": 0.05,
                 "augment": "none", **kw}                                # as the iCaRL and DER digits runs
    return resolve_config("podnet", "digits-5x2", overrides=overrides)


def test_podnet_runs_on_real_digits(tmp_path):
    from harness.config.identity import expand_trials
    from harness.run.local import run_local
    (result,) = run_local(expand_trials(_digits()), tmp_path, log=lambda s: None, progress=False)
    assert result["status"] == "finished", result.get("error")
    metrics = result["metrics"]
    assert list(metrics) == ["cnn", "nme"]
    assert metrics["cnn"]["accuracies"][0] > 80 and metrics["nme"]["accuracies"][0] > 80     # 2 digit classes
    # 10 classes at the end: chance is 10, finetune forgets down to ~20
    assert metrics["cnn"]["last_accuracy"] > 40 and metrics["nme"]["last_accuracy"] > 30
    params = [row["parameters"] for row in result["history"]]
    assert [b - a for a, b in zip(params, params[1:])] == [2 * 10 * 32] * 4   # 2 classes x 10 proxies x 32 dims


def test_podnet_resume_matches_uninterrupted_run(tmp_path):
    from harness.config.identity import expand_trials
    from harness.run.local import run_local
    kw = dict(epochs=2, base_epochs=2, finetuning_epochs=2)
    clean = run_local(expand_trials(_digits(**kw)), tmp_path / "a", log=lambda s: None, progress=False)[0]
    cfg = _digits(fault_at_task=2, **kw)
    first = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert first["status"] == "failed"
    resumed = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert resumed["status"] == "finished", resumed.get("error")
    for head in ("cnn", "nme"):
        assert resumed["metrics"][head]["accuracies"] == pytest.approx(clean["metrics"][head]["accuracies"],
                                                                       abs=1e-6)


def test_podnet_needs_a_memory():
    from harness.config.compose import resolve_config
    with pytest.raises(ConfigError, match="podnet needs a rehearsal memory"):
        resolve_config("podnet", "digits-5x2", overrides={"memory_size": 0})
