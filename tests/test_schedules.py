"""Learning-rate schedules epoch by epoch: every recipe's epoch -> lr map equals a hand-written table of what its
reference code does, and the two schedule kinds equal the reference libraries stepped as the originals stepped
them (PyTorch's MultiStepLR after every epoch: PyCIL, iCaRL, DER; timm's cosine with `step(epoch)` after epoch
`epoch`: DyTox's main.py)."""
from __future__ import annotations

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from harness.config.compose import resolve_config
from harness.config.phases import balanced_phase, main_phase
from harness.core.loop import lr_at_epoch
from harness.core.method import PhaseConfig, PhaseKind, TaskInfo


def lrs(phase: PhaseConfig) -> list[float]:
    return [lr_at_epoch(phase, e) for e in range(phase.epochs)]


def runs(*pairs: tuple[int, float]) -> list[float]:
    """[(3, 0.1), (2, 0.01)] -> [0.1, 0.1, 0.1, 0.01, 0.01]"""
    return [lr for count, lr in pairs for _ in range(count)]


def phases(method: str, suite: str, recipe: str | None = None) -> tuple[PhaseConfig, PhaseConfig, dict]:
    config = resolve_config(method, suite, recipe=recipe)
    return main_phase(config, 0), main_phase(config, 1), config


# ---- the two schedule kinds against the reference libraries --------------------------------------------------

@pytest.mark.parametrize("milestones", [(60, 120, 170), (4,), (49, 63), ()])
def test_multistep_equals_torch_multisteplr_stepped_after_every_epoch(milestones) -> None:
    phase = PhaseConfig(epochs=200, lr=0.1, sched="multistep", milestones=milestones, gamma=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=phase.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma=phase.gamma)
    expected = []
    for _ in range(phase.epochs):             # PyCIL's loop: train the epoch, then scheduler.step()
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs(phase) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("epochs,warmup", [(500, 5), (5, 0), (20, 3)])
def test_cosine_equals_timm_stepped_as_dytox_main_py(epochs, warmup) -> None:
    phase = PhaseConfig(epochs=epochs, lr=1.25e-4, sched="cosine", warmup_epochs=warmup, warmup_lr=1e-6,
                        min_lr=1e-5)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=phase.lr)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=phase.min_lr, warmup_t=warmup,
                              warmup_lr_init=phase.warmup_lr, cycle_limit=1, t_in_epochs=True)
    expected = []
    for epoch in range(epochs):               # main.py: train_one_epoch(...); lr_scheduler.step(epoch)
        expected.append(opt.param_groups[0]["lr"])
        sched.step(epoch)
    assert lrs(phase) == pytest.approx(expected, rel=1e-12)


# ---- each recipe, by hand -------------------------------------------------------------------------------------

def test_dytox_cifar100_and_imagenet_cosine_by_hand() -> None:
    # lr 5e-4 x 128 / 512 = 1.25e-4; warm-up 5 epochs from 1e-6; min 1e-5; 500 epochs; epochs 0 AND 1 at 1e-6.
    head = [1e-6, 1e-6, 2.58e-5, 5.06e-5, 7.54e-5, 1.002e-4, 1.2497162722e-4, 1.2495914468e-4]
    for suite in ("cifar100", "imagenet100"):
        first, later, config = phases("dytox", suite)
        for phase in (first, later):
            got = lrs(phase)
            assert (phase.epochs, phase.opt) == (500, "adamw")
            assert got[:8] == pytest.approx(head, rel=1e-9)
            assert got[251] == pytest.approx(6.75e-5, rel=1e-12)          # half-way down: f(250)
            assert got[499] == pytest.approx(1.000453996e-5, rel=1e-9)    # f(498): the min is never reached
        finetune = balanced_phase(config, PhaseKind.FINETUNE)
        assert (finetune.kind, finetune.opt) == (PhaseKind.FINETUNE, "adamw")
        assert lrs(finetune) == pytest.approx([5e-5 * 128 / 512] * 20)   # constant, fresh AdamW


def test_icarl_pycil_and_original_recipes_by_hand() -> None:
    first, later, _ = phases("icarl", "cifar100")
    assert lrs(first) == pytest.approx(runs((60, 0.1), (60, 0.01), (50, 1e-3), (30, 1e-4)))
    assert lrs(later) == pytest.approx(runs((80, 0.1), (40, 0.01), (50, 1e-3)))
    first, later, _ = phases("icarl", "cifar100", recipe="cifar100_original")
    for phase in (first, later):     # lr 2.0 divided by 5 after 49 and 63 epochs
        assert lrs(phase) == pytest.approx(runs((49, 2.0), (14, 0.4), (7, 0.08)))


def test_der_pycil_recipes_by_hand() -> None:
    for recipe in ("default", "cifar100_pycil"):
        first, later, _ = phases("der", "cifar100", recipe=recipe)
        assert lrs(first) == pytest.approx(runs((60, 0.1), (60, 0.01), (50, 1e-3), (30, 1e-4)))
        assert lrs(later) == pytest.approx(runs((80, 0.1), (40, 0.01), (30, 1e-3), (20, 1e-4)))


@pytest.mark.parametrize("method", ["finetune", "replay", "joint", "icarl", "der"])
def test_cpu_suites_by_hand(method: str) -> None:
    for phase in phases(method, "cifar10-5x2")[:2]:            # 5 epochs, step at epoch 4 (the 5th)
        assert lrs(phase) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01])
    for phase in phases(method, "cifar10-mini")[:2]:
        assert lrs(phase) == pytest.approx([0.1] * 12)
    for phase in phases(method, "digits-5x2")[:2]:
        assert lrs(phase) == pytest.approx([0.1] * 2)


def test_der_cpu_decouple_stage_by_hand() -> None:
    from methods.der import DER

    config = resolve_config("der", "cifar10-5x2")
    stage = balanced_phase(config, DER.balanced_phase)
    assert (stage.kind, stage.opt, stage.batch_size) == (PhaseKind.DECOUPLE, "sgd", 32)
    assert lrs(stage) == pytest.approx(runs((10, 0.1), (5, 0.01)))
    der = DER(config, torch.device("cpu"))
    assert der.finetune_phase(TaskInfo(0, 5, (0, 1), 0, 10), stage) is None      # nothing to balance yet
    assert der.finetune_phase(TaskInfo(1, 5, (2, 3), 2, 10), stage) is stage


def test_every_balanced_phase_scales_its_lr_with_the_batch_like_the_main_phase() -> None:
    # DyTox's recipes set lr_reference_batch; DER's do not, but its decouple stage is scaled alike when one does.
    config = resolve_config("der", "cifar10-5x2", overrides={"lr_reference_batch": 64})
    assert main_phase(config, 1).lr == pytest.approx(0.1 * 32 / 64)                  # the suite's batch 32
    assert balanced_phase(config, PhaseKind.DECOUPLE).lr == pytest.approx(0.1 * 32 / 64)   # decouple_batch_size
    assert balanced_phase(resolve_config("der", "cifar10-5x2"), PhaseKind.DECOUPLE).lr == 0.1


def test_dytox_cpu_recipe_by_hand() -> None:
    # lr 1e-3 (no batch scaling), cosine over 5 epochs, no warm-up, min 1e-5: f(0), f(0), f(1), f(2), f(3)
    for phase in phases("dytox", "cifar10-5x2")[:2]:
        assert lrs(phase) == pytest.approx([1e-3, 1e-3, 9.05463412e-4, 6.57963412e-4, 3.52036588e-4], rel=1e-8)
