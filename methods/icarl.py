"""iCaRL (Rebuffi et al., CVPR 2017): herding exemplars, distillation from the previous model, NME classifier.

- Exemplars: the harness memory selects them by herding on L2-normalised features (`memory_selection: herding`).
- Loss (`icarl_loss`):
    `bce` -- the paper's: sigmoid BCE over all seen classes, old-class targets = sigmoid(teacher logits);
    `kd`  -- PyCIL's: cross-entropy + softmax KD (temperature `kd_temperature`) on the old classes.
  The default is `kd`: the harness's shared optimisation recipes (SGD, lr 0.1) are PyCIL's, and the BCE loss,
  averaged over batch x classes, needs the paper's lr 2.0 schedule (recipe `cifar100_original`).
- Teacher: a frozen copy of the model taken at the start of every task after the first.
- Heads: `nme` (the paper's nearest-mean-of-exemplars classifier, reported first: it is the paper's number) and
  `cnn` (the trained linear head). Class means: for each exemplar, the L2-normalised features of the image and
  of its horizontal flip are averaged; the class mean of those is L2-normalised again (as the original code;
  `nme_flip: false` leaves the flip out, as PyCIL).
  Prediction: the class whose mean is nearest (Euclidean) to the L2-normalised test feature.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.core.method import PhaseConfig, TaskInfo
from harness.core.registry import register_method
from methods.common import ClassMeansState, IncrementalNetMethod
from methods.losses import icarl_bce_loss, icarl_kd_loss

LOSSES = ("bce", "kd")


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised per-class means of `features` (rows already normalised by the caller when wanted).

    Returns (means (num_classes, D), valid (num_classes,) bool): a class without samples has a zero mean and
    valid False, so the NME head can never predict it.
    """
    features = features.float()
    labels = labels.long().to(features.device)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes].to(features.dtype)
    valid = counts > 0
    means = sums / counts.clamp(min=1)[:, None]
    return F.normalize(means, p=2, dim=1), valid


def nme_scores(features: torch.Tensor, means: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Minus the Euclidean distance between L2-normalised features and each class mean (-inf: no mean)."""
    f = F.normalize(features.float(), p=2, dim=1)
    scores = -torch.cdist(f, means.to(f.device, f.dtype))
    return scores.masked_fill(~valid.to(f.device)[None, :], float("-inf"))


@register_method("icarl")
class ICaRL(ClassMeansState, IncrementalNetMethod):
    """iCaRL on a growing IncrementalNet; `predict` returns {"nme": -distances, "cnn": logits}."""

    requires_memory = True          # the NME classifier's class means are the exemplars'

    def build(self) -> None:
        loss = self.config.get("icarl_loss", "kd")
        if loss not in LOSSES:
            raise ConfigError(f"icarl_loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not float(self.config.get("kd_temperature", 2.0)) > 0:
            raise ConfigError(f"kd_temperature must be > 0, got {self.config.get('kd_temperature')!r}")
        super().build()
        self.loss_name = loss
        self.temperature = float(self.config.get("kd_temperature", 2.0))
        self.teacher: torch.nn.Module | None = None
        self.class_means: torch.Tensor | None = None      # (seen classes, D), L2-normalised rows
        self.class_valid: torch.Tensor | None = None      # (seen classes,) bool
        self._unit_features = False                         # features() returns normalised rows when set

    # ---- growth --------------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        # The teacher is the model as it ended the previous task. Taken here (not in after_task) so that a
        # resumed trial, which loads the weights before the next before_task, gets the right teacher.
        self.teacher = None
        if task.task_id > 0 and self.model.num_classes > 0:
            teacher = copy.deepcopy(self.model)
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.teacher = teacher
        super().before_task(task)

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        old_logits = None
        if self.teacher is not None and task.num_old_classes > 0:
            with torch.no_grad():
                old_logits = self.teacher(x)[:, : task.num_old_classes]
        if self.loss_name == "bce":
            return icarl_bce_loss(logits, y, old_logits)
        return icarl_kd_loss(logits, y, old_logits, self.temperature)

    def after_task(self, task: TaskInfo) -> None:
        # The trial updates the memory BEFORE after_task, so it already holds this task's exemplars.
        self.teacher = None            # not needed until the next before_task: free it
        data = self.tools.memory_data()
        if data is None:
            raise RuntimeError("icarl: the rehearsal memory is empty after the update; the NME head needs "
                               "exemplars (memory_size too small for the number of classes?)")
        # Each exemplar's feature L2-normalised; with `nme_flip` (the original iCaRL) the image and its mirror are
        # normalised separately and averaged; PyCIL uses the image alone (nme_flip: false).
        self._unit_features = True
        try:
            feats = self.tools.features(data, flip=bool(self.config.get("nme_flip", True)))
        finally:
            self._unit_features = False
        labels = torch.as_tensor(data.y, dtype=torch.long)
        self.class_means, self.class_valid = class_means(feats, labels, task.num_seen_classes)

    # ---- inference -----------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.features(x)
        return F.normalize(f.float(), p=2, dim=1) if self._unit_features else f

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.class_means is None:
            raise RuntimeError("icarl: NME class means are computed in after_task; predict was called before")
        f = self.model.features(x)
        logits = self.model.fc(f)
        nme = nme_scores(f, self.class_means, self.class_valid)
        # Classes seen by the head but without a mean yet cannot happen in a trial (means are recomputed
        # after every task); pad defensively so both heads score the same classes.
        if nme.shape[1] < logits.shape[1]:
            pad = torch.full((nme.shape[0], logits.shape[1] - nme.shape[1]), float("-inf"), device=nme.device)
            nme = torch.cat([nme, pad], dim=1)
        return {"nme": nme, "cnn": logits}
