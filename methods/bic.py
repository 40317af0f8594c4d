"""BiC (Wu et al., "Large Scale Incremental Learning", CVPR 2019): its parts, then the registered method `bic`
(class BiC). Sources: the paper and PyCIL's models/bic.py, utils/inc_net.py (`BiasLayer_BIC`,
`IncrementalNetWithBias`), utils/data_manager.py (`get_dataset_with_split`), exps/bic.json.

Two stages per incremental task:
1. Train everything but the bias layers on (new data + memory) minus a held-out validation set
   (`split_for_bias_correction`), with `balanced_kd_loss`: lambda * KD + (1 - lambda) * CE, lambda = n_old /
   (n_old + n_new) (the paper's n / (n + m)), KD at temperature 2 on the old classes.
2. Train only the newest `BiasLayer` (alpha, beta) on the validation set with cross-entropy on the corrected
   logits (the paper's bias-correction loss). PyCIL applies `cross_entropy(softmax(logits))` there: a softmax
   too many.

PyCIL keeps one bias layer per task, each on its own class range, all applied in order; earlier ones stay at
their trained values and get lr 0 afterwards.

The method: `hold_out` (the harness's hook, before the main phase) splits each incremental task's data + memory
with `split_for_bias_correction`; the main phase (stage 1) trains on the rest; the trial then runs the
BIAS_CORRECTION phase (stage 2, options `bias_correction_*`) on the held-out part. Stage 2 freezes everything but
the newest bias layer, BatchNorm statistics included (the paper freezes the model; PyCIL's stage 2 runs the
network in training mode, so its BatchNorm statistics move on the validation set). The first task has no old
classes: no hold-out, no bias layer, plain cross-entropy. PyCIL's extra softmax in stage 2 is not replicated
(the paper's loss is used). Head: `cnn` (the corrected logits).
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from harness.core.backbones import build_backbone
from harness.core.method import PhaseConfig, PhaseKind, TaskInfo
from harness.core.registry import register_method
from harness.data.base import ArrayData
from harness.errors import ConfigError
from methods.common import IncrementalNet, IncrementalNetMethod
from methods.losses import kd_loss


class BiasLayer(nn.Module):
    """q_k = alpha * o_k + beta for the classes [start, stop) (the last task's new classes), q_k = o_k for the
    others (the paper's bias correction layer). alpha = 1, beta = 0 at init: the identity."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        before, new, after = logits[:, :self.start], logits[:, self.start:self.stop], logits[:, self.stop:]
        return torch.cat([before, self.alpha * new + self.beta, after], dim=1)


def distillation_weight(num_old: int, num_new: int) -> float:
    """lambda = n_old / (n_old + n_new): the paper's n / (n + m) (PyCIL: known / total classes)."""
    return num_old / (num_old + num_new)


def balanced_kd_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 2.0) -> torch.Tensor:
    """lambda * KD + (1 - lambda) * CE, lambda from the teacher's and the student's class counts.

    KD: `methods.losses.kd_loss` (soft cross-entropy on the old classes, no T^2), as PyCIL's BiC and WA.
    """
    num_old = teacher_logits.shape[1]
    lam = distillation_weight(num_old, logits.shape[1] - num_old)
    return lam * kd_loss(logits, teacher_logits, temperature) + (1 - lam) * F.cross_entropy(logits, targets)


def bias_val_per_class(memory_size: int, num_old: int, ratio: float = 0.1) -> int:
    """Validation samples per class: `ratio` of an old class's exemplars, int(ratio * memory_size / num_old)
    (PyCIL, split_ratio 0.1: the paper's 9:1 train:val split of the exemplars). New classes give as many."""
    return int(ratio * memory_size / num_old)


def split_for_bias_correction(memory_indices_by_class: Mapping[int, Sequence[int]],
                              new_indices_by_class: Mapping[int, Sequence[int]], val_per_class: int,
                              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: `val_per_class` samples of every class held out, old (memory) and new alike, so the
    validation set is class-balanced (the paper; PyCIL's get_dataset_with_split).

    Pass indices of the TRAINING split only: the validation set must never come from the test split. Classes
    are visited in increasing order and drawn without replacement from numpy's Generator(`seed`) (PyCIL draws
    from the global numpy state instead). Every class must keep at least one training sample.
    """
    overlap = set(memory_indices_by_class) & set(new_indices_by_class)
    if overlap:
        raise ConfigError(f"classes {sorted(overlap)} are both in the memory and new: one source per class")
    by_class = {**memory_indices_by_class, **new_indices_by_class}
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in sorted(by_class):
        indices = np.asarray(by_class[cls], dtype=np.int64)
        if not 0 < val_per_class < len(indices):
            raise ConfigError(f"class {cls} has {len(indices)} samples: cannot hold out {val_per_class} for bias "
                              "correction and keep one to train on; lower the validation ratio")
        held = np.zeros(len(indices), dtype=bool)
        held[rng.choice(len(indices), val_per_class, replace=False)] = True
        val.append(indices[held])
        train.append(indices[~held])
    return np.concatenate(train), np.concatenate(val)


# ---- the method ------------------------------------------------------------------------------------------------
class BiasCorrectedNet(IncrementalNet):
    """An IncrementalNet whose logits go through one BiasLayer per incremental task, in order (PyCIL's
    IncrementalNetWithBias). Bias layers train only in their own task's bias-correction stage (`set_stage`)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.bias_layers = nn.ModuleList()
        self.correcting = False                  # stage 2: everything but the newest bias layer frozen

    def add_bias_layer(self, start: int, stop: int) -> None:
        self.bias_layers.append(BiasLayer(start, stop).to(next(self.backbone.parameters()).device))
        self.bias_layers.requires_grad_(False)

    def set_stage(self, correcting: bool) -> None:
        """Stage 2 (True): only the newest bias layer trains, the backbone's BatchNorm stays in eval mode.
        Stage 1 (False): the backbone and the classifier train, every bias layer is frozen."""
        self.correcting = correcting
        self.backbone.requires_grad_(not correcting)
        self.fc.requires_grad_(not correcting)
        self.bias_layers.requires_grad_(False)
        if correcting:
            self.bias_layers[-1].requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "BiasCorrectedNet":
        super().train(mode)
        if self.correcting:
            self.backbone.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        for layer in self.bias_layers:
            logits = layer(logits)
        return logits


@register_method("bic")
class BiC(IncrementalNetMethod):
    """BiC: stage 1 balanced KD + CE on the data minus a class-balanced validation split, stage 2 bias
    correction of the newest classes' logits on that split."""

    requires_memory = True                          # the validation split holds old classes' exemplars out
    held_out_phase = PhaseKind.BIAS_CORRECTION      # options bias_correction_*

    def build(self) -> None:
        c = self.config
        self.val_ratio = float(c["bic_val_ratio"])
        if not 0 < self.val_ratio < 1:
            raise ConfigError(f"bic_val_ratio must be in (0, 1), got {c['bic_val_ratio']!r}")
        backbone = build_backbone(c["backbone"], c.get("backbone_width"), c.get("resnet_shortcut"))
        self.model = BiasCorrectedNet(backbone).to(self.device)
        self.temperature = float(c["kd_temperature"])
        self.teacher: BiasCorrectedNet | None = None

    # ---- growth --------------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        # The previous model with its bias layers (PyCIL's old network), frozen; taken here so that a resumed
        # trial, which loads the weights before the next before_task, distils from the right one.
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if task.task_id > 0 else None
        self.model.add_classes(task.num_new_classes)
        if task.task_id > 0:
            self.model.add_bias_layer(task.num_old_classes, task.num_seen_classes)

    def after_task(self, task: TaskInfo) -> None:
        self.teacher = None            # stage 2 does not distil; not needed until the next before_task

    def hold_out(self, data: ArrayData, task: TaskInfo) -> tuple[ArrayData, ArrayData | None]:
        """`bias_val_per_class` samples of every class out of the task's data (new classes) and the memory (old
        ones), drawn with the trial's seed and the task id; none in the first task."""
        if task.task_id == 0:
            return data, None
        budget = self.config.get("memory_per_class")
        total = int(budget) * task.num_old_classes if budget else int(self.config["memory_size"])
        per_class = bias_val_per_class(total, task.num_old_classes, self.val_ratio)
        by_class = {int(c): np.flatnonzero(data.y == c) for c in np.unique(data.y)}
        old = {c: idx for c, idx in by_class.items() if c < task.num_old_classes}
        new = {c: idx for c, idx in by_class.items() if c >= task.num_old_classes}
        seed = int(self.config.get("seed", 0)) * 1000 + task.task_id       # as the trial's per-task seed
        train, val = split_for_bias_correction(old, new, per_class, seed)
        return data.subset(np.sort(train)), data.subset(np.sort(val))

    # ---- stage 2 -------------------------------------------------------------------------------
    def before_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.BIAS_CORRECTION:
            self.model.set_stage(correcting=True)

    def after_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.BIAS_CORRECTION:
            self.model.set_stage(correcting=False)      # back to the state before_task left

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        if phase.kind is PhaseKind.BIAS_CORRECTION or self.teacher is None:
            return F.cross_entropy(logits, y)           # stage 2: the paper's loss on the corrected logits
        with torch.no_grad():
            old_logits = self.teacher(x)
        return balanced_kd_loss(logits, y, old_logits, self.temperature)
