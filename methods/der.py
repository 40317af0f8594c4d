"""DER: Dynamically Expandable Representation (Yan, Xie & He, CVPR 2021). Not Dark Experience Replay.

Each task adds a feature extractor initialised from the previous one; the old extractors are frozen (no
gradients, BatchNorm in eval mode even while the model trains). A linear classifier reads the concatenation of
all extractors' features; when it grows, the old classes' weights are copied into its top-left block
(`reuse_old_classifier`; DER's official configs start it afresh instead). An auxiliary classifier over the NEW
extractor's features only, with |new| + 1 outputs (every old class -> 0, new classes -> 1..k), adds
`aux_weight * CE_aux` to the loss from the second task on.

After each incremental task:
- weight aligning (`weight_align`, PyCIL's DER): the new classes' weight rows are scaled by
  gamma = mean norm(old rows) / mean norm(new rows);
- optional classifier re-training ("decouple", the official DER code): `decouple_epochs` epochs on the balanced
  memory, only the classifier trains (every extractor frozen, BatchNorm in eval mode), on logits divided by
  `decouple_temperature`; the classifier is re-initialised first (`decouple_reset_classifier`, as the official
  code). The official code re-trains on the task's data + old exemplars with a class-balanced sampler, BEFORE
  the memory update; here it is the harness's balanced-memory phase (`balanced_phase`, PhaseKind.DECOUPLE: its
  options `decouple_*`, harness.config.phases), on the updated memory, after every task but the first.

NOT implemented: the channel-level masks and pruning of the paper (DER w/o P in its tables is what this is).
`parameter_count()` counts the inference model (extractors + classifier; the auxiliary head is training-only).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from harness.core.backbones import build_backbone
from harness.errors import ConfigError
from harness.core.method import Method, PhaseConfig, PhaseKind, TaskInfo
from harness.core.registry import register_method

# DER's own options when a config lacks them: the values of benchmarks/recipes/der/default.yaml (one place).
DEFAULTS = {"aux_weight": 1.0, "reuse_old_classifier": True, "weight_align": True, "decouple_temperature": 5.0,
            "decouple_reset_classifier": True}


def aux_targets(targets: torch.Tensor, num_old_classes: int) -> torch.Tensor:
    """Auxiliary labels: every old class -> 0, new class num_old + j -> 1 + j."""
    return torch.where(targets < num_old_classes, torch.zeros_like(targets), targets - num_old_classes + 1)


class DERNet(nn.Module):
    """A list of feature extractors, a classifier over their concatenated features, an auxiliary head.

    `num_frozen` leading extractors are frozen: `train()` keeps them in eval mode (their BatchNorm statistics
    must not move when the harness loop calls model.train()).
    """

    def __init__(self, make_extractor: Callable[[], nn.Module]) -> None:
        super().__init__()
        self._make_extractor = make_extractor
        self.extractors = nn.ModuleList()
        self.fc: nn.Linear | None = None
        self.aux_fc: nn.Linear | None = None
        self.num_frozen = 0

    @property
    def out_dim(self) -> int:
        """Features of ONE extractor."""
        return self.extractors[0].out_dim

    @property
    def feature_dim(self) -> int:
        return self.out_dim * len(self.extractors)

    @property
    def num_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def add_task(self, num_new: int, reuse_old_classifier: bool = True) -> None:
        """New extractor (a copy of the last one), the old ones frozen, the classifier grown, a new aux head."""
        new = self._make_extractor()
        if len(self.extractors):
            new.load_state_dict(self.extractors[-1].state_dict())
            new = new.to(self._device())
        self.extractors.append(new)
        self.freeze_extractors(len(self.extractors) - 1)

        old_fc, old_classes = self.fc, self.num_classes
        fc = nn.Linear(self.feature_dim, old_classes + num_new).to(self._device())
        if old_fc is not None and reuse_old_classifier:
            with torch.no_grad():   # old classes keep their weights on the old features (top-left block)
                fc.weight[:old_classes, : old_fc.in_features] = old_fc.weight
                fc.bias[:old_classes] = old_fc.bias
        self.fc = fc
        # The aux head exists from the second extractor on (task 0 has no old classes to separate from).
        self.aux_fc = nn.Linear(self.out_dim, num_new + 1).to(self._device()) if len(self.extractors) > 1 else None

    def freeze_extractors(self, count: int) -> None:
        """Freeze the first `count` extractors (no grad, eval-mode BN); the rest train."""
        self.num_frozen = count
        for i, extractor in enumerate(self.extractors):
            for p in extractor.parameters():
                p.requires_grad_(i >= count)
        self.train(self.training)

    def train(self, mode: bool = True) -> "DERNet":
        super().train(mode)
        for extractor in self.extractors[: self.num_frozen]:
            extractor.train(False)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([extractor(x) for extractor in self.extractors], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        out = {"logits": self.fc(feats)}
        if self.aux_fc is not None:
            out["aux_logits"] = self.aux_fc(feats[:, -self.out_dim:])
        return out

    @torch.no_grad()
    def weight_align(self, num_new: int) -> float:
        """Scale the `num_new` last classes' weight rows so their mean norm equals the old rows'. Returns gamma."""
        w = self.fc.weight
        if num_new <= 0 or num_new >= w.shape[0]:
            return 1.0
        old_norm = w[:-num_new].norm(p=2, dim=1).mean()
        new_norm = w[-num_new:].norm(p=2, dim=1).mean()
        gamma = float(old_norm / new_norm) if new_norm > 0 else 1.0
        w[-num_new:] *= gamma
        return gamma

    def inference_parameter_count(self) -> int:
        return sum(p.numel() for p in self.extractors.parameters()) + sum(p.numel() for p in self.fc.parameters())


@register_method("der")
class DER(Method):
    """DER without pruning: one frozen extractor per past task, + aux loss, + weight aligning / decouple."""

    balanced_phase = PhaseKind.DECOUPLE

    def option(self, key: str):
        value = self.config.get(key)
        return DEFAULTS[key] if value is None else value

    def build(self) -> None:
        c = self.config
        if float(self.option("aux_weight")) < 0:
            raise ConfigError(f"aux_weight must be >= 0, got {c.get('aux_weight')!r}")
        if float(self.option("decouple_temperature")) <= 0:
            raise ConfigError(f"decouple_temperature must be > 0, got {c.get('decouple_temperature')!r}")
        name, width, shortcut = c["backbone"], c.get("backbone_width"), c.get("resnet_shortcut")
        build_backbone(name, width, shortcut)                  # a bad option fails here, before any task
        self.model = DERNet(lambda: build_backbone(name, width, shortcut).to(self.device))
        self.aux_weight = float(self.option("aux_weight"))
        self.gammas: list[float] = []

    # ---- growth --------------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        self.model.add_task(task.num_new_classes, bool(self.option("reuse_old_classifier")))

    def after_task(self, task: TaskInfo) -> None:
        if task.task_id > 0 and self.option("weight_align"):
            self.gammas.append(self.model.weight_align(task.num_new_classes))

    # ---- decouple (classifier re-training) stage -----------------------------------------------
    def before_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is not PhaseKind.DECOUPLE:
            return
        self.model.freeze_extractors(len(self.model.extractors))   # every extractor, BN included
        if self.model.aux_fc is not None:
            self.model.aux_fc.requires_grad_(False)
        if self.option("decouple_reset_classifier"):
            self.model.fc.reset_parameters()

    def after_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is not PhaseKind.DECOUPLE:
            return
        # Back to the state before_task left (a resumed trial replays only before_task).
        self.model.freeze_extractors(len(self.model.extractors) - 1)
        if self.model.aux_fc is not None:
            self.model.aux_fc.requires_grad_(True)

    def parameters_to_optimize(self, phase: PhaseConfig):
        if phase.kind is PhaseKind.DECOUPLE:
            return list(self.model.fc.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if phase.kind is PhaseKind.DECOUPLE:
            return F.cross_entropy(out["logits"] / float(self.option("decouple_temperature")), y)
        loss = F.cross_entropy(out["logits"], y)
        if "aux_logits" in out and self.aux_weight > 0:
            loss = loss + self.aux_weight * F.cross_entropy(out["aux_logits"], aux_targets(y, task.num_old_classes))
        return loss

    # ---- inference -----------------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cnn": self.model.fc(self.model.features(x))}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Concatenated features of every extractor (what the official code herds on).
        return self.model.features(x)

    def parameter_count(self) -> int:
        return self.model.inference_parameter_count()

    # ---- checkpointing -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"gammas": torch.tensor(self.gammas, dtype=torch.float64)}

    def load_extra_state(self, state: dict) -> None:
        if "gammas" in state:
            self.gammas = [float(g) for g in state["gammas"]]
