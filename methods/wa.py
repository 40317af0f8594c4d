"""WA, Weight Aligning (Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning",
CVPR 2020): the parts below and the registered method `wa` (class WA).

Sources: PyCIL's models/wa.py and utils/inc_net.py (`weight_align`), and the official DER code's WA
(Rhyssiyan/DER-ClassIL.pytorch, inclearn/models/align.py).

- Training loss: (1 - lambda) * CE + lambda * KD, lambda = n_old / (n_old + n_new), KD at temperature 2:
  `methods.bic.balanced_kd_loss` (current PyCIL and DER's align.py; an older PyCIL revision used CE + 2 * KD).
  The first task: cross-entropy only. The teacher is the model as the previous task left it (aligned).
- After each incremental task: `align_weights` on the linear classifier's weight rows (bias untouched).
  PyCIL calls it twice (end of `_train` and `after_task`); the second call finds gamma = 1 up to rounding.
- Weight clipping (`wa_clip`, on by default): DER's WA clamps every classifier parameter (weight and bias) to
  >= 0 after every optimiser step of every task (`p.data.clamp_(0.0)`); PyCIL's WA does not clip (`wa_clip:
  false`). Taken as the paper's behaviour on indirect evidence (the paper's text was not readable here): DER's
  re-implementation clips, and an unofficial one (README "TODO: Add weight clipping") lists it as a part of the
  paper it lacks. `clip_positive` is that step.
- Head: the linear classifier (`cnn`), as the paper and DER's code evaluate it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
import torch.nn.functional as F

from harness.core.method import PhaseConfig, TaskInfo
from harness.core.registry import register_method
from methods.bic import balanced_kd_loss
from methods.common import IncrementalNetMethod


def align_weights(fc_weight: torch.Tensor, num_old: int, num_new: int) -> float:
    """Rescales, in place, the new classes' rows [num_old, num_old + num_new) by gamma = mean_j ||w_old_j|| /
    mean_j ||w_new_j|| (the paper's weight aligning) and returns gamma. The old rows are left unchanged."""
    with torch.no_grad():
        old = fc_weight[:num_old]
        new = fc_weight[num_old:num_old + num_new]
        gamma = old.norm(p=2, dim=1).mean() / new.norm(p=2, dim=1).mean()
        new.mul_(gamma)
    return gamma.item()


def clip_positive(module: nn.Module) -> None:
    """Clamps every parameter of `module` (the classifier) to be non-negative, in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.clamp_(min=0.0)


@register_method("wa")
class WA(IncrementalNetMethod):
    """KD + CE weighted by the old classes' share, weight aligning after each incremental task, optional
    clipping of the classifier to non-negative values after every step."""

    requires_memory = True          # the paper's setting: exemplars of the old classes in every task

    def build(self) -> None:
        super().build()
        self.temperature = float(self.config["kd_temperature"])
        self.clip = bool(self.config["wa_clip"])
        self.teacher: nn.Module | None = None
        self.gammas: list[float] = []             # the aligning factors, one per incremental task

    def before_task(self, task: TaskInfo) -> None:
        # The previous model (already aligned), copied before the classifier grows; taken here so that a
        # resumed trial, which loads the weights first, gets it too.
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if task.task_id > 0 else None
        super().before_task(task)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, phase: PhaseConfig,
                       task: TaskInfo) -> torch.optim.Optimizer:
        if self.clip:    # after every step, the classifier as it is then (it grows each task)
            optimizer.register_step_post_hook(lambda *_: clip_positive(self.model.fc))
        return optimizer

    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        if self.teacher is None:
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            old_logits = self.teacher(x)
        return balanced_kd_loss(logits, y, old_logits, self.temperature)

    def after_task(self, task: TaskInfo) -> None:
        self.teacher = None            # not needed until the next before_task: free it
        if task.task_id > 0:
            self.gammas.append(align_weights(self.model.fc.weight, task.num_old_classes, task.num_new_classes))

    def extra_state(self) -> dict:
        return {"gammas": torch.tensor(self.gammas, dtype=torch.float64)}

    def load_extra_state(self, state: dict) -> None:
        if "gammas" in state:
            self.gammas = [float(g) for g in state["gammas"]]
