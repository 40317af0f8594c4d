"""Pieces shared by the CNN methods: a backbone with a classifier that grows with each task."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from harness.core.backbones import build_backbone
from harness.core.method import Method, PhaseConfig, TaskInfo


class IncrementalNet(nn.Module):
    """Backbone + one linear classifier over all seen classes; old rows are kept when it grows."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc: nn.Linear | None = None

    @property
    def num_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def add_classes(self, n: int) -> None:
        old = self.fc
        fc = nn.Linear(self.backbone.out_dim, self.num_classes + n)
        if old is not None:
            with torch.no_grad():
                fc.weight[: old.out_features] = old.weight
                fc.bias[: old.out_features] = old.bias
        self.fc = fc.to(next(self.backbone.parameters()).device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


class IncrementalNetMethod(Method):
    """Cross-entropy over all seen classes on a growing IncrementalNet (finetune / replay / joint)."""

    def build(self) -> None:
        backbone = build_backbone(self.config["backbone"], self.config.get("backbone_width"),
                                  self.config.get("resnet_shortcut"))
        self.model = IncrementalNet(backbone).to(self.device)

    def before_task(self, task: TaskInfo) -> None:
        self.model.add_classes(task.num_new_classes)

    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class ClassMeansState:
    """Mixin (before the Method base) for methods with an NME head: `class_means` (seen classes, D) of the
    exemplars' L2-normalised features and `class_valid` (which classes have exemplars), kept in checkpoints."""

    class_means: torch.Tensor | None = None
    class_valid: torch.Tensor | None = None

    def extra_state(self) -> dict:
        if self.class_means is None:
            return {}
        return {"class_means": self.class_means.detach().cpu().clone(),
                "class_valid": self.class_valid.detach().cpu().clone()}

    def load_extra_state(self, state: dict) -> None:
        if "class_means" in state:
            self.class_means = state["class_means"].to(self.device)
            self.class_valid = state["class_valid"].to(self.device, torch.bool)
