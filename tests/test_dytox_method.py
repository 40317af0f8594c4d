"""DyTox method: losses, MixUp, ASAM, freezing per phase through training_step and the real loop, presets,
original option files, parameter counts through the recipe, a real 2-task run on digits (dytox.md 1.2-2.6).

The network's own maths (GPSA / class attention fused == explicit, batched tokens == the per-token loop,
within 1e-5, outputs and gradients) is tested in tests/test_dytox_model.py; here the same equality is checked
once more through the method's predict()."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.config.compose import resolve_config
from harness.data import ArrayData, TaskDataset
from harness.errors import ConfigError
from harness.core.loop import train_phase
from harness.core.method import PhaseConfig, PhaseKind, TaskInfo
from harness.config.catalog import get_method
from harness.core.runtime import RuntimeContext
from methods.dytox.losses import (auto_kd_weight, bce_loss, divergence_targets, dytox_loss, hard_targets,
                                  kd_loss)
from methods.dytox.method import BatchMixup, DyToxMethod
from methods.dytox.model import count_parameters
from methods.dytox.sam import SAM

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ROOT / "benchmarks" / "dytox_options" / "options"
TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2, "local_up_to_layer": 1, "patch_size": 4, "image_size": 8,
        "drop_path": 0.0, "head_div": 0.1, "head_div_mode": ["tr"], "freeze_task": ["old_task_tokens", "old_heads"],
        "freeze_ft": ["sab"], "finetuning": "balanced", "finetuning_epochs": 1, "finetuning_lr": 1e-3,
        "batch_size": 8, "weight_decay": 0.0, "momentum": 0.9, "gamma": 0.1, "opt": "adamw"}
MAIN = PhaseConfig(kind=PhaseKind.TRAIN, epochs=1, batch_size=8, lr=1e-3, opt="adamw", sched="constant")
FINETUNE = PhaseConfig(kind=PhaseKind.FINETUNE, epochs=1, batch_size=8, lr=1e-3, opt="adamw", sched="constant")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread. On a busy 2-core machine two spinning threads ran these 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _task(t: int, per_task: int = 2, tasks: int = 3) -> TaskInfo:
    return TaskInfo(task_id=t, num_tasks=tasks, new_classes=tuple(range(t * per_task, (t + 1) * per_task)),
                    num_old_classes=t * per_task, num_total_classes=tasks * per_task)


def _method(**kw) -> DyToxMethod:
    torch.manual_seed(0)
    method = DyToxMethod({**TINY, **kw}, torch.device("cpu"))
    method.build()
    return method


def _batch(n: int = 6, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % classes


def _grow(method: DyToxMethod, tasks: int) -> TaskInfo:
    for t in range(tasks):
        task = _task(t)
        method.before_task(task)
    return task


def _grads(method: DyToxMethod, phase: PhaseConfig, task: TaskInfo, batch=None) -> dict[str, bool]:
    """Run the method's training_step + backward; {parameter name: received a gradient}."""
    method.before_phase(phase, task)
    method.net = method.model
    method.model.train()
    method.model.zero_grad(set_to_none=True)
    loss = method.training_step(batch or _batch(classes=task.num_seen_classes), task, phase)
    assert torch.isfinite(loss)
    loss.backward()
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in method.model.named_parameters()}


# ---- registration, presets, option files ------------------------------------------------------------------
def test_registered_with_presets_as_recipes() -> None:
    assert get_method("dytox") is DyToxMethod
    base = resolve_config("dytox", "cifar100")
    plus = resolve_config("dytox", "cifar100", recipe="plus")
    plusplus = resolve_config("dytox", "cifar100", options=[str(ROOT / "benchmarks/recipes/dytox/plusplus.yaml")])
    assert (base["mixup"], base["sam_rho"]) == (0.0, 0.0)
    assert (plus["mixup"], plus["smoothing"], plus["sam_rho"]) == (0.8, 0.1, 0.0)
    assert (plusplus["mixup"], plusplus["sam_rho"], plusplus["sam_adaptive"], plusplus["sam_skip_first"]) == \
        (0.8, 3.0, True, True)
    # the suite's recipe (cifar100) stays under the preset: the paper's optimisation
    assert (plusplus["epochs"], plusplus["repeated_aug"], plusplus["augment"]) == (500, 3, "randaugment")


def test_cifar100_recipe_values() -> None:
    from harness.config.phases import balanced_phase, main_phase

    c = resolve_config("dytox", "cifar100")
    main = main_phase(c, 0)
    assert (main.opt, main.epochs, main.batch_size, main.sched, main.warmup_epochs) == ("adamw", 500, 128, "cosine", 5)
    assert main.lr == pytest.approx(5e-4 * 128 / 512) and main.min_lr == 1e-5 and main.warmup_lr == 1e-6
    assert main.weight_decay == 1e-6 and main.repeated_aug == 3 and main_phase(c, 3).epochs == 500
    ft = balanced_phase(c, DyToxMethod.balanced_phase)
    assert (ft.epochs, ft.sched, ft.kind) == (20, "constant", PhaseKind.FINETUNE)
    assert ft.lr == pytest.approx(5e-5 * 128 / 512)
    # the global batch defines the learning rate: 256 on any number of workers -> 2.5e-4 (the paper's 2 GPUs)
    assert main_phase(resolve_config("dytox", "cifar100", overrides={"batch_size": 256,
                                                                    "incremental_batch_size": 256}),
                      1).lr == pytest.approx(2.5e-4)
    # `finetuning: none` turns the phase off, and then no memory is needed
    off = resolve_config("dytox", "cifar100", overrides={"finetuning": "none", "memory_size": 0})
    assert balanced_phase(off, DyToxMethod.balanced_phase) is None
    with pytest.raises(ConfigError, match="dytox's finetune phase trains on the rehearsal memory"):
        resolve_config("dytox", "cifar100", overrides={"memory_size": 0})


def _original(*names: str) -> list[str]:
    return [str(OPTIONS / n) for n in names]


@pytest.mark.parametrize("model", ["cifar_dytox", "cifar_dytox_plus", "cifar_dytox_plusplus"])
@pytest.mark.parametrize("data", ["cifar100_2-2", "cifar100_5-5", "cifar100_10-10", "cifar100_joint"])
def test_original_cifar_option_files_load_unchanged(model: str, data: str) -> None:
    c = resolve_config("dytox", "cifar100", _original(f"data/{data}.yaml", "data/cifar100_order2.yaml",
                                                      f"model/{model}.yaml"))
    inc = {"cifar100_2-2": 2, "cifar100_5-5": 5, "cifar100_10-10": 10, "cifar100_joint": 100}[data]
    assert (c["dataset"], c["initial_increment"], c["increment"]) == ("cifar100", inc, inc)
    assert c["orders"][0][:3] == [58, 30, 93] and len(c["orders"]) == 1
    assert (c["embed_dim"], c["depth"], c["num_heads"], c["patch_size"], c["image_size"]) == (384, 6, 12, 4, 32)
    assert (c["amp"], c["memory_selection"], c["head_div"], c["head_div_mode"]) == ("none", "herding", 0.1, ["tr"])
    assert (c["freeze_task"], c["freeze_ft"], c["finetuning"], c["finetuning_epochs"]) == \
        (["old_task_tokens", "old_heads"], ["sab"], "balanced", 20)
    assert c["mixup"] == (0.8 if "plus" in model else 0.0)
    assert c["sam_rho"] == (3.0 if model.endswith("plusplus") else 0.0)


@pytest.mark.parametrize("model", ["imagenet_dytox", "imagenet_dytox_plus"])
@pytest.mark.parametrize("data,order,dataset", [("imagenet100_10-10", "imagenet100_order1", "imagenet100"),
                                                ("imagenet100_joint", "imagenet100_order1", "imagenet100"),
                                                ("imagenet1000_100-100", "imagenet1000_order1", "imagenet1000"),
                                                ("imagenet1000_joint", "imagenet1000_order1", "imagenet1000")])
def test_original_imagenet_option_files_load_unchanged(model, data, order, dataset) -> None:
    c = resolve_config("dytox", "imagenet100", _original(f"data/{data}.yaml", f"data/{order}.yaml",
                                                         f"model/{model}.yaml"))
    assert c["dataset"] == dataset and len(c["orders"][0]) == (100 if dataset == "imagenet100" else 1000)
    assert (c["patch_size"], c["image_size"], c["amp"]) == (16, 224, "auto")


def test_original_values_we_do_not_implement_are_one_line_errors(tmp_path) -> None:
    for text, words in [("model: vit\n", "ConViT"), ("data_set: MNIST\n", "data_set"),
                        ("rehearsal: furthest_all\n", "rehearsal"), ("aa: rand-m5\n", "aa"),
                        ("reprob: 0.25\n", "random erasing"), ("ind_clf: 1-n\n", "ind_clf"),
                        ("freeze_ft: [sab, encoder]\n", None)]:
        path = tmp_path / "opt.yaml"
        path.write_text(text)
        if words is None:      # a bad freeze group is caught when the method is built
            c = resolve_config("dytox", "digits-5x2", [str(path)])
            with pytest.raises(ConfigError, match="freeze group"):
                DyToxMethod(c, torch.device("meta")).build()
            continue
        with pytest.raises(ConfigError, match=words) as err:
            resolve_config("dytox", "digits-5x2", [str(path)])
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    path.write_text("no_amp: false\naa: null\nrepeated_aug: true\nglobal_memory: true\neval_every: 5\n")
    c = resolve_config("dytox", "digits-5x2", [str(path)])
    assert (c["amp"], c["augment"], c["repeated_aug"]) == ("auto", "standard", 3)


def test_parameter_counts_through_the_cifar100_recipe() -> None:
    """The paper's #P (10.73 / 10.74 M at the end of 10 / 20 steps), from the method's build of the cifar100
    recipe, on the meta device (shapes only); the training-only divergence head is not counted. 50 steps
    (10.77 M) is checked on the network in tests/test_dytox_model.py (growing 50 teachers here takes seconds)."""
    for steps, per_task, exact in ((10, 10, 10_733_584), (20, 5, 10_745_104)):
        c = resolve_config("dytox", "cifar100", overrides={"initial_increment": per_task, "increment": per_task})
        method = DyToxMethod(c, torch.device("meta"))
        method.build()
        for t in range(steps):
            method.before_task(TaskInfo(t, steps, tuple(range(t * per_task, (t + 1) * per_task)), t * per_task, 100))
        assert method.parameter_count() == exact
        assert math.floor(exact / 1e4) / 100 == {10: 10.73, 20: 10.74}[steps]
        assert count_parameters(method.model, include_div_head=True) == exact + 768 + 385 * (per_task + 1)


# ---- growth ---------------------------------------------------------------------------------------------
def test_each_task_adds_one_token_one_head_and_a_frozen_teacher() -> None:
    method = _method()
    for t in range(3):
        params_before = {id(p) for p in method.model.parameters()}
        method.before_task(_task(t))
        assert len(method.model.task_tokens) == t + 1 and len(method.model.heads) == t + 1
        assert method.model.heads[-1].head.out_features == 2
        new = [p for p in method.model.parameters() if id(p) not in params_before]
        expected = 1 + 4 + (4 if t > 0 else 0)      # token; head (LN w, b; Linear w, b); a fresh div head
        assert len(new) == expected
        if t == 0:
            assert method.teacher is None and method.model.div_head is None
        else:
            assert method.teacher.num_tasks == t and method.teacher.num_classes == 2 * t
            assert not any(p.requires_grad for p in method.teacher.parameters())
            method.model.train()
            assert not any(m.training for m in method.teacher.modules())
            assert method.model.div_head.head.out_features == 3
    method.after_task(_task(2))
    assert method.teacher is None                        # KD is main-phase only: freed before finetuning


# ---- freezing through training_step and the loss ------------------------------------------------------------
def _sab(name: str) -> bool:
    return name.startswith(("patch_embed", "pos_embed", "sabs"))


def _old(name: str, n_old: int) -> bool:
    return any(name == f"task_tokens.{i}" or name.startswith(f"heads.{i}.") for i in range(n_old))


def test_first_task_trains_everything() -> None:
    method = _method()
    task = _grow(method, 1)
    grads = _grads(method, MAIN, task, _batch(classes=2))
    assert all(grads.values()), [n for n, g in grads.items() if not g]


def test_main_phase_freezes_old_tokens_and_heads_and_trains_the_div_head() -> None:
    method = _method()
    task = _grow(method, 3)
    grads = _grads(method, MAIN, task)
    for name, got in grads.items():
        assert got == (not _old(name, 2)), name
    assert grads["div_head.head.weight"] and "divergence" in method.last_losses and "kd" in method.last_losses
    assert all(p.grad is None for p in method.teacher.parameters())


def test_finetuning_freezes_encoder_and_div_head_and_unfreezes_old_parts() -> None:
    method = _method()
    task = _grow(method, 3)
    method.after_task(task)
    grads = _grads(method, FINETUNE, task)
    for name, got in grads.items():
        assert got == (not (_sab(name) or name.startswith("div_head"))), name
    assert grads["task_tokens.0"] and grads["heads.0.head.weight"]          # old parts train again
    assert "divergence" not in method.last_losses and "kd" not in method.last_losses
    assert all(not m.training for m in method.model.sabs.modules())         # frozen encoder in eval (drop path)
    method.after_phase(FINETUNE, task)                                       # back to the main-phase freezing
    assert not method.model.task_tokens[0].requires_grad and method.model.sabs[0].attn.qk.weight.requires_grad


def _tiny_dataset(n: int, classes: list[int], seed: int = 0) -> TaskDataset:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8)
    y = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.int64)
    mean, std = [0.5] * 3, [0.25] * 3
    from torchvision.transforms import v2
    tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return TaskDataset(ArrayData(x, y, [str(i) for i in range(10)]), tf)


def test_frozen_parameters_do_not_move_through_the_real_loop() -> None:
    method = _method(weight_decay=0.05)                  # decay would move any parameter the optimiser held
    ctx = RuntimeContext(progress=False)
    task0 = _task(0)
    method.before_task(task0)
    train_phase(method, _tiny_dataset(16, [0, 1]), MAIN.with_(weight_decay=0.05), task0, ctx, seed=0)
    task1 = _task(1)
    method.before_task(task1)
    snap = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    train_phase(method, _tiny_dataset(16, [0, 1, 2, 3]), MAIN.with_(weight_decay=0.05), task1, ctx, seed=0)
    for name, p in method.model.named_parameters():
        assert torch.equal(p, snap[name]) == _old(name, 1), name
    method.after_task(task1)
    snap = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    train_phase(method, _tiny_dataset(8, [0, 1, 2, 3]), FINETUNE.with_(weight_decay=0.05), task1, ctx, seed=0)
    for name, p in method.model.named_parameters():
        assert torch.equal(p, snap[name]) == (_sab(name) or name.startswith("div_head")), name


# ---- inference ------------------------------------------------------------------------------------------
def test_divergence_head_absent_at_evaluation() -> None:
    method = _method()
    _grow(method, 2)
    method.model.eval()
    x, _ = _batch()
    out = method.predict(x)
    assert list(out) == ["cnn"] and out["cnn"].shape == (6, 4)
    assert method.model(x)["div_logits"] is None
    assert method.features(x).shape == (6, 2 * 16)
    assert method.parameter_count() == count_parameters(method.model) < sum(p.numel() for p in method.model.parameters())


def test_fused_and_batched_paths_predict_like_the_explicit_loop() -> None:
    fast = _method(fused_attention=True, batched_tokens=True, fused_gpsa=True)
    slow = _method(fused_attention=False, batched_tokens=False, fused_gpsa=False)
    _grow(fast, 3), _grow(slow, 3)
    with torch.no_grad():
        for p in fast.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    slow.model.load_state_dict(fast.model.state_dict())
    fast.model.eval(), slow.model.eval()
    x, _ = _batch()
    assert torch.allclose(fast.predict(x)["cnn"], slow.predict(x)["cnn"], atol=1e-5)
    assert torch.allclose(fast.features(x), slow.features(x), atol=1e-5)


# ---- losses ---------------------------------------------------------------------------------------------
def test_bce_is_the_mean_over_batch_and_classes() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    y = torch.tensor([0, 1])
    t = hard_targets(y, 3)
    manual = -(t * torch.log(torch.sigmoid(logits)) + (1 - t) * torch.log(1 - torch.sigmoid(logits))).sum() / 6
    assert bce_loss(logits, t).item() == pytest.approx(manual.item(), rel=1e-6)
    assert bce_loss(logits.half(), t).dtype == torch.float32              # computed in float32 under AMP


def test_kd_mean_reduction_is_the_originals_elementwise_mean() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for tau in (1.0, 2.0):
        p_t = F.softmax(t / tau, 1)
        kl_rows = (p_t * (F.log_softmax(t / tau, 1) - F.log_softmax(s / tau, 1))).sum(1)
        assert kd_loss(s, t, tau, "mean").item() == pytest.approx(kl_rows.sum().item() / 12 * tau ** 2, rel=1e-5)
        assert kd_loss(s, t, tau, "batchmean").item() == pytest.approx(kl_rows.mean().item() * tau ** 2, rel=1e-5)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="cut the student"):
        kd_loss(torch.randn(4, 5), t)


def test_dytox_loss_weights_kd_by_old_over_seen_and_adds_the_divergence_term() -> None:
    g = torch.Generator().manual_seed(0)
    logits, teacher, div = torch.randn(5, 10, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, 5, generator=g)
    y = torch.tensor([0, 5, 6, 9, 7])
    t = hard_targets(y, 10)
    out = dytox_loss(logits, t, num_old=6, teacher_logits=teacher, div_logits=div, head_div=0.1)
    lam = auto_kd_weight(6, 10)
    assert lam == 0.6
    div_t = hard_targets(torch.tensor([0, 0, 1, 4, 2]), 5)                   # old -> 0, new 6..9 -> 1..4
    expected = (1 - lam) * bce_loss(logits, t) + lam * kd_loss(logits[:, :6], teacher) + 0.1 * bce_loss(div, div_t)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(divergence_targets(t, 6), div_t)
    assert torch.equal(divergence_targets(y, 6), torch.tensor([0, 0, 1, 4, 2]))
    no_kd = dytox_loss(logits, t, num_old=6, teacher_logits=teacher, auto_kd=False, kd_weight=2.0)
    assert no_kd["loss"].item() == pytest.approx((bce_loss(logits, t) + 2 * kd_loss(logits[:, :6], teacher)).item(),
                                                 rel=1e-6)
    first = dytox_loss(logits, t, num_old=0)                                  # task 1: classification only
    assert set(first) == {"loss", "classification"}


def test_soft_divergence_targets_sum_the_old_mass() -> None:
    soft = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.0, 0.0, 0.3]])
    assert torch.allclose(divergence_targets(soft, 2), torch.tensor([[0.3, 0.3, 0.4], [0.7, 0.0, 0.3]]))


# ---- MixUp (DyTox+) ---------------------------------------------------------------------------------------
def test_mixup_targets_over_seen_classes_with_smoothing_and_reuse_for_sam() -> None:
    np.random.seed(0)
    mix = BatchMixup({"mixup": 0.8, "cutmix": 0.0, "smoothing": 0.1})
    x, y = _batch(n=7, classes=4)                                           # odd batch: timm needs even
    original = x.clone()
    mixed, soft = mix(x, y, num_classes=4)
    assert torch.equal(x, original)                                          # the loader's batch is untouched
    assert soft.shape == (7, 4) and torch.allclose(soft.sum(1), torch.ones(7))
    assert soft.min().item() >= 0.1 / 4 - 1e-6                               # smoothing: off value 0.1 / C
    # one lambda per batch, partner = the flipped batch (the first 6; the 7th keeps its smoothed one-hot)
    lam = ((mixed[0] - x[5]) / (x[0] - x[5])).median().item()
    assert torch.allclose(mixed[:6], lam * x[:6] + (1 - lam) * x[:6].flip(0), atol=1e-5)
    assert torch.equal(mixed[6], x[6]) and soft[6, y[6]].item() == pytest.approx(1 - 0.1 + 0.1 / 4)
    again, soft_again = mix(x, y, num_classes=4)                             # SAM's second pass: same mix
    assert again is mixed and soft_again is soft
    other, _ = mix(x.clone(), y, num_classes=4)
    assert not torch.equal(other, mixed)                                      # a new batch gets a new lambda


def test_dytox_plus_training_step_uses_soft_targets_in_both_phases() -> None:
    np.random.seed(0)
    method = _method(mixup=0.8, smoothing=0.1)
    task = _grow(method, 2)
    grads = _grads(method, MAIN, task, _batch(n=8, classes=4))
    assert grads["div_head.head.weight"] and method.mixup._last is not None
    assert method.mixup._last[2].shape == (8, 4)
    method.after_task(task)
    _grads(method, FINETUNE, task, _batch(n=8, classes=4))
    assert method.mixup._last[2].shape == (8, 4)                            # also mixed during finetuning


# ---- ASAM (DyTox++) -------------------------------------------------------------------------------------
def test_asam_step_matches_the_formula() -> None:
    w0 = torch.tensor([1.0, -2.0, 0.5])
    a = torch.tensor([3.0, 1.0, -2.0])

    def loss_at(w: torch.Tensor) -> torch.Tensor:
        return (a * w).pow(2).sum() + w.sum() ** 3

    for adaptive in (False, True):
        w = torch.nn.Parameter(w0.clone())
        sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5, adaptive=adaptive)
        assert sam.requires_closure and sam.param_groups is sam.base_optimizer.param_groups

        def closure() -> torch.Tensor:
            loss = loss_at(w)
            loss.backward()
            return loss

        sam.zero_grad()
        returned = sam.step(closure)
        # by hand
        v = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_at(v), v)
        scale = w0.abs() if adaptive else torch.ones(3)
        eps = 0.5 * scale ** 2 * g / (scale * g).norm()
        u = (w0 + eps).requires_grad_(True)
        (g2,) = torch.autograd.grad(loss_at(u), u)
        assert torch.allclose(w.detach(), w0 - 0.1 * g2, atol=1e-6)
        assert returned.item() == pytest.approx(loss_at(w0).item())


def test_asam_only_in_the_main_phase_after_the_first_task() -> None:
    method = _method(sam_rho=3.0, sam_adaptive=True, sam_skip_first=True, sam_mode=["tr"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert method.wrap_optimizer(opt, MAIN, _task(0)) is opt
    wrapped = method.wrap_optimizer(opt, MAIN, _task(1))
    assert isinstance(wrapped, SAM) and wrapped.adaptive and wrapped.rho == 3.0
    assert method.wrap_optimizer(opt, FINETUNE, _task(1)) is opt
    assert _method().wrap_optimizer(opt, MAIN, _task(1)) is opt              # DyTox / DyTox+: no SAM
    with pytest.raises(ConfigError, match="fp16"):
        _method(sam_rho=3.0, amp="fp16")


def test_dytox_plusplus_trains_through_the_loop_closure() -> None:
    np.random.seed(0)
    method = _method(sam_rho=3.0, sam_adaptive=True, sam_skip_first=True, mixup=0.8)
    ctx = RuntimeContext(progress=False)
    for t in range(2):
        task = _task(t)
        method.before_task(task)
        before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
        stats = train_phase(method, _tiny_dataset(16, list(range(2 * t + 2))), MAIN.with_(epochs=2), task, ctx, 0)
        assert math.isfinite(stats["loss"]) and stats["steps"] == 4
        moved = [n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])]
        assert "pos_embed" in moved and ("task_tokens.0" in moved) == (t == 0)


# ---- a real run ---------------------------------------------------------------------------------------------
def _digits(**kw) -> dict:
    overrides = {"initial_increment": 5, "increment": 5, "epochs": 15, "base_epochs": 15, "patch_size": 2,
                 "embed_dim": 32, "depth": 2, "local_up_to_layer": 1, "num_heads": 4, "batch_size": 32,
                 "incremental_batch_size": 32, "finetuning_batch_size": 32, "finetuning_epochs": 10, "lr": 0.002,
                 "incremental_lr": 0.002, "finetuning_lr": 0.0005, "augment": "none"}
    overrides.update(kw)
    return resolve_config("dytox", "digits-5x2", overrides=overrides)


def test_two_task_run_on_real_digits_learns_both_tasks(tmp_path) -> None:
    from harness.run.local import run_local
    from harness.config.identity import expand_trials

    (result,) = run_local(expand_trials(_digits()), tmp_path, log=lambda s: None, progress=False)
    assert result["status"] == "finished", result.get("error")
    m = result["metrics"]["cnn"]
    assert result["num_tasks"] == 2 and list(result["metrics"]) == ["cnn"]
    assert m["accuracies"][0] > 70                      # 5 classes, chance 20%
    old, new = m["accuracy_matrix"][-1]
    assert old > 45 and new > 45                        # 10 classes after finetuning, chance 10%
    assert m["last_accuracy"] > 50
    assert result["parameters"] == result["history"][-1]["parameters"]


def test_resume_after_the_first_task_matches_an_uninterrupted_run(tmp_path) -> None:
    """The teacher of task 2 is rebuilt from the loaded weights: resumed == uninterrupted."""
    from harness.run.local import run_local
    from harness.config.identity import expand_trials

    fast = {"epochs": 2, "base_epochs": 2, "finetuning_epochs": 2, "mixup": 0.8}
    clean = run_local(expand_trials(_digits(**fast)), tmp_path / "a", log=lambda s: None, progress=False)[0]
    cfg = _digits(fault_at_task=0, **fast)
    first = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert first["status"] == "failed"
    resumed = run_local(expand_trials(cfg), tmp_path / "b", log=lambda s: None, progress=False)[0]
    assert resumed["status"] == "finished", resumed.get("error")
    assert resumed["metrics"]["cnn"]["accuracies"] == pytest.approx(clean["metrics"]["cnn"]["accuracies"], abs=1e-6)


# ---- the throughput script --------------------------------------------------------------------------------
def test_throughput_script_quick_mode(tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dytox_throughput", ROOT / "benchmarks/perf/dytox_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "tp.json"
    assert module.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [(r["batch"], r["tasks"]) for r in rows] == [(8, 1), (8, 3)]
    assert all(r["images_per_s_median"] > 0 for r in rows)
    assert rows[0]["teacher"] is False and rows[1]["teacher"] is True and rows[1]["div_head"] is True


def test_aa_maps_only_the_exact_timm_string_the_harness_reproduces():
    from harness.errors import ConfigError
    from methods.dytox.method import DyToxMethod

    aa = DyToxMethod.option_value_maps["aa"]
    assert aa("rand-m9-mstd0.5-inc1") == "randaugment" and aa("none") == "standard"
    with pytest.raises(ConfigError, match="rand-m9-mstd0.5-inc1"):
        aa("rand-m9-mstd0.5")          # a different timm policy (no "increasing" ops): not silently swapped
