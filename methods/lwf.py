"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016), class-incremental, as PyCIL runs it (models/lwf.py).

No exemplars: each task trains on its own data only. From the second task on, the loss is
    CE(the new classes' logits, label - num_old) + lwf_lambda * KD(the old classes' logits, the previous model's)
with KD the soft cross-entropy at temperature T = kd_temperature (methods.losses.kd_loss, PyCIL's _KD_loss).
The cross-entropy covers the new classes only, as PyCIL and the paper's new-task head; the first task is plain
cross-entropy. The previous model is a frozen copy taken in `before_task`, so a resumed trial gets it too.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from harness.core.method import PhaseConfig, TaskInfo
from harness.core.registry import register_method
from methods.common import IncrementalNetMethod
from methods.losses import kd_loss


def lwf_loss(logits: torch.Tensor, targets: torch.Tensor, old_logits: torch.Tensor | None, temperature: float,
             weight: float) -> torch.Tensor:
    """Cross-entropy over all classes without a previous model; else over the new classes + weight * KD on the
    old ones (`old_logits`: the previous model's, one column per old class)."""
    if old_logits is None:
        return F.cross_entropy(logits, targets)
    num_old = old_logits.shape[1]
    new_classes_ce = F.cross_entropy(logits[:, num_old:], targets - num_old)
    return new_classes_ce + weight * kd_loss(logits, old_logits, temperature)


@register_method("lwf")
class LwF(IncrementalNetMethod):
    """Learning without Forgetting: distillation from the previous model, no exemplars."""

    uses_memory = False

    def build(self) -> None:
        super().build()
        self.temperature = float(self.config["kd_temperature"])
        self.weight = float(self.config["lwf_lambda"])
        self.teacher: torch.nn.Module | None = None

    def before_task(self, task: TaskInfo) -> None:
        # The previous model, copied before the classifier grows (so it scores the old classes only).
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if task.task_id > 0 else None
        super().before_task(task)

    def after_task(self, task: TaskInfo) -> None:
        self.teacher = None            # not needed until the next before_task: free it

    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        old_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                old_logits = self.teacher(x)
        return lwf_loss(self.net(x), y, old_logits, self.temperature, self.weight)
