"""UCIR / LUCIR (Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019).

Sources: the authors' code (hshustc/CVPR19_Incremental_Learning, cifar100-class-incremental/*.py,
utils_incremental/incremental_train_and_eval_MR_LF.py) and PyCIL's models/ucir.py + convs/modified_linear.py,
which follow it. The parts below are then assembled into the registered method `ucir` (class UCIR).

- Cosine normalisation: `CosineLinear`, then `SplitCosineLinear` from the second task on (old rows `fc1`, new
  rows `fc2`, one shared learnable scale sigma, initialised to 1). The old rows get no update in the main phase
  (both codes: lr 0 and weight decay 0 for `fc1`).
- Features: the backbone's output BEFORE its last ReLU (both codes' `last=True` block; `without_final_relu`),
  so they can be negative; the classifier, the less-forget loss, herding and the class means all read them.
- Less-forget constraint: `less_forget_loss` on those features.
- Inter-class separation: `margin_ranking_loss` on the UNSCALED cosine scores (both codes hook fc1/fc2 outputs,
  before sigma), weight lw_mr = 1.
- New-class weights are imprinted (`imprinted_weights`, `--imprint_weights` in the authors' run.sh, computed
  with the model as the previous task left it, on the new classes' training images, test transform; PyCIL
  keeps the random initialisation).
- Class-balanced finetuning (authors' cbf_class_incremental_cosine_cifar100.py; PyCIL does not implement it):
  after each incremental task, on the exemplars only (20 per class), ft_epochs = 20, ft_base_lr = 0.01 divided
  by 10 at epoch 10, SGD momentum 0.9, weight decay 5e-4; default ft_flag = 2: feature extractor frozen (lr 0,
  BatchNorm in eval mode), old AND new class weights trained (sigma is in no optimiser group: not trained),
  with the same CE + less-forget + ranking losses (the less-forget term is left out here: with the backbone
  frozen it is a constant, without gradient). The harness runs it as the FINETUNE phase on the memory,
  `finetuning_*` options. run.sh lists it as the last variant (LF + MR + CBF); the
  CIFAR rows without it use 160 epochs only.
- Evaluation: the authors' code reports the CNN (the cosine classifier) and NME (class means of the herded
  exemplars, each averaged with its mirror image); PyCIL reports NME. `main_head` says which comes first
  (cnn: the paper's unified classifier).

Not implemented: the authors' other variants (`--amr_loss`, `--rs_ratio` resampling, `--mimic_score`). PyCIL's
departures (no imprinting, no finetuning, NME reported, class means without flip) are options
(recipes/ucir/cifar100_pycil.yaml).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
import torch.nn.functional as F

from harness.core.backbones import CifarResNet, ImageNetResNet18, TinyCNN, build_backbone
from harness.core.method import Method, PhaseConfig, PhaseKind, TaskInfo
from harness.core.registry import register_method
from harness.errors import ConfigError
from methods.common import ClassMeansState
from methods.icarl import class_means, nme_scores

HEADS = ("cnn", "nme")


class CosineLinear(nn.Module):
    """logits = sigma * cos(x, w_c) (the paper's cosine normalisation). Weights ~ U(-1/sqrt(in), 1/sqrt(in))
    and sigma = 1 at init, as the authors' modified_linear.py and PyCIL; `sigma=False` gives the raw cosine."""

    def __init__(self, in_features: int, out_features: int, sigma: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1)) if sigma else None

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, p=2, dim=1), F.normalize(self.weight, p=2, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cosine(x)
        return out if self.sigma is None else self.sigma * out


class SplitCosineLinear(nn.Module):
    """The classifier of every task after the first: old-class rows `fc1`, new-class rows `fc2`, shared sigma.

    `grown_from` copies the previous classifier's rows (both halves of a split one) into `fc1` and its sigma, as
    the authors' code does at each step. The authors and PyCIL freeze `fc1` by giving it lr 0 and weight decay 0
    in its own optimiser group; `freeze_old()` is the same (no update) without the extra group.
    """

    def __init__(self, in_features: int, num_old: int, num_new: int) -> None:
        super().__init__()
        self.fc1 = CosineLinear(in_features, num_old, sigma=False)
        self.fc2 = CosineLinear(in_features, num_new, sigma=False)
        self.sigma = nn.Parameter(torch.ones(1))

    @classmethod
    def grown_from(cls, previous: CosineLinear | SplitCosineLinear, num_new: int) -> SplitCosineLinear:
        old = previous.weight
        split = cls(old.shape[1], old.shape[0], num_new)
        with torch.no_grad():
            split.fc1.weight.copy_(old)
            split.sigma.copy_(previous.sigma)
        return split

    @property
    def weight(self) -> torch.Tensor:
        """All class weights, old rows first (a new tensor: for growing and imprinting, not for training)."""
        return torch.cat([self.fc1.weight, self.fc2.weight]).detach()

    def freeze_old(self) -> None:
        self.fc1.weight.requires_grad_(False)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled scores in [-1, 1], old classes first: what the margin ranking loss reads."""
        return torch.cat([self.fc1.cosine(x), self.fc2.cosine(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(x)


def imprinted_weights(class_features: list[torch.Tensor], old_weight: torch.Tensor) -> torch.Tensor:
    """One row per new class: the L2-normalised mean of the class's L2-normalised features, times the mean norm
    of the old classes' weight rows (authors' code, `--imprint_weights`). `class_features[i]`: (n_i, D)."""
    scale = old_weight.norm(dim=1).mean()
    means = torch.stack([F.normalize(f, p=2, dim=1).mean(dim=0) for f in class_features])
    return F.normalize(means, p=2, dim=1) * scale


def adaptive_lambda(lambda_base: float, num_old: int, num_new: int) -> float:
    """lambda = lambda_base * sqrt(num_old / num_new): the authors' code (`lamda_mult = out_features / nb_cl`)
    and PyCIL, whose comment says the paper's printed formula differs (not checked: the paper was not readable here)."""
    return lambda_base * math.sqrt(num_old / num_new)


def less_forget_loss(new_feat: torch.Tensor, old_feat: torch.Tensor, lambda_base: float, num_old: int,
                     num_new: int) -> torch.Tensor:
    """adaptive_lambda * mean over the batch of (1 - cos(new_feat, old_feat)) (the paper's L_dis^G): the
    CosineEmbeddingLoss with target 1 that both codes use. `old_feat` (the frozen model's) gets no gradient."""
    ones = torch.ones(new_feat.shape[0], device=new_feat.device)
    dist = F.cosine_embedding_loss(new_feat, old_feat.detach(), ones)
    return dist * adaptive_lambda(lambda_base, num_old, num_new)


def margin_ranking_loss(logits: torch.Tensor, targets: torch.Tensor, num_old: int, margin: float = 0.5,
                        k: int = 2) -> torch.Tensor:
    """The paper's L_mr: for each sample of an OLD class, max(0, margin - s_gt + s_neg) against each of its `k`
    highest new-class scores (hard negatives), averaged over the n x k pairs. `logits`: the unscaled cosine
    scores (`SplitCosineLinear.cosine`), old classes first. No old-class sample in the batch: 0."""
    old = targets < num_old
    if not bool(old.any()):
        return logits.new_zeros(())
    scores = logits[old]
    positive = scores.gather(1, targets[old].unsqueeze(1))
    hard_negatives = scores[:, num_old:].topk(k, dim=1).values
    return F.margin_ranking_loss(positive.expand_as(hard_negatives), hard_negatives,
                                 torch.ones_like(hard_negatives), margin=margin)


# ---- the network: backbone without its last ReLU, cosine classifier ------------------------------------------
class BlockWithoutFinalReLU(nn.Module):
    """A residual basic block (the harness's CIFAR block or torchvision's) returning its sum before the final
    ReLU: the authors' and PyCIL's `last=True` block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
        if hasattr(b, "shortcut"):          # harness.core.backbones.BasicBlock
            return out + b.shortcut(x)
        return out + (x if b.downsample is None else b.downsample(x))     # torchvision's BasicBlock


def without_final_relu(backbone: nn.Module) -> nn.Module:
    """`backbone` (changed in place) whose features are taken before its last ReLU."""
    if isinstance(backbone, CifarResNet):
        backbone.stages[-1][-1] = BlockWithoutFinalReLU(backbone.stages[-1][-1])
    elif isinstance(backbone, ImageNetResNet18):
        backbone.net.layer4[-1] = BlockWithoutFinalReLU(backbone.net.layer4[-1])
    elif isinstance(backbone, TinyCNN):
        last = max(i for i, m in enumerate(backbone.body) if isinstance(m, nn.ReLU))
        backbone.body[last] = nn.Identity()
    else:
        raise ConfigError(f"ucir: cannot remove the last ReLU of {type(backbone).__name__}")
    return backbone


class UCIRNet(nn.Module):
    """Backbone (last ReLU removed) + cosine classifier: `CosineLinear` on the first task, `SplitCosineLinear`
    after. `backbone_frozen`: no gradient and BatchNorm in eval mode even when the loop calls `train()` (the
    class-balanced finetuning)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = without_final_relu(backbone)
        self.fc: CosineLinear | SplitCosineLinear | None = None
        self.backbone_frozen = False

    def add_classes(self, num_new: int) -> None:
        """Grow the classifier; from the second task on the old rows are `fc1`, frozen."""
        device = next(self.backbone.parameters()).device
        if self.fc is None:
            self.fc = CosineLinear(self.backbone.out_dim, num_new).to(device)
        else:
            self.fc = SplitCosineLinear.grown_from(self.fc, num_new).to(device)
            self.fc.freeze_old()

    def freeze_backbone(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "UCIRNet":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.train(False)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        cosine = self.fc.cosine(features)
        return {"features": features, "cosine": cosine, "logits": self.fc.sigma * cosine}


# ---- the method ------------------------------------------------------------------------------------------------
@register_method("ucir")
class UCIR(ClassMeansState, Method):
    """UCIR: cosine classifier, less-forget distillation, margin ranking, imprinting, class-balanced finetuning
    (the FINETUNE phase on the memory, `finetuning_*` options); heads `cnn` and `nme`, `main_head` first."""

    requires_memory = True              # the ranking loss needs old-class samples, the NME head exemplars
    balanced_phase = PhaseKind.FINETUNE

    def build(self) -> None:
        c = self.config
        if c["main_head"] not in HEADS:
            raise ConfigError(f"main_head must be one of {', '.join(HEADS)}, got {c['main_head']!r}")
        if int(c["mr_k"]) < 1 or float(c["mr_margin"]) < 0 or float(c["lf_lambda"]) < 0 or float(c["mr_weight"]) < 0:
            raise ConfigError("ucir: mr_k must be >= 1 and mr_margin, lf_lambda, mr_weight >= 0")
        backbone = build_backbone(c["backbone"], c.get("backbone_width"), c.get("resnet_shortcut"))
        self.model = UCIRNet(backbone).to(self.device)
        self.teacher: UCIRNet | None = None
        self.class_means: torch.Tensor | None = None      # (seen classes, D), L2-normalised rows
        self.class_valid: torch.Tensor | None = None
        self._unit_features = False                         # features() returns normalised rows when set

    # ---- growth --------------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        # The teacher is the model as the previous task (and its finetuning) left it; copied before the
        # classifier grows. Taken here so that a resumed trial, which loads the weights first, gets it too.
        self.teacher = None
        if task.task_id > 0:
            if task.num_new_classes < int(self.config["mr_k"]):
                raise ConfigError(f"ucir: mr_k = {self.config['mr_k']} hard negatives, but task {task.task_id} "
                                  f"has {task.num_new_classes} new classes; lower mr_k")
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.add_classes(task.num_new_classes)

    def before_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.FINETUNE:
            # The authors' ft_flag 2: backbone frozen (BatchNorm included), old and new class rows trained.
            self.model.freeze_backbone(True)
            self.model.fc.fc1.weight.requires_grad_(True)
        elif task.task_id > 0 and self.config["imprint_weights"]:
            self._imprint(task)

    def after_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.FINETUNE:       # back to the state before_task left
            self.model.freeze_backbone(False)
            self.model.fc.freeze_old()

    @torch.no_grad()
    def _imprint(self, task: TaskInfo) -> None:
        data = self.tools.task_data()
        feats = self.tools.features(data)
        labels = torch.as_tensor(data.y, dtype=torch.long)
        fc = self.model.fc
        rows = imprinted_weights([feats[labels == c] for c in task.new_classes], fc.fc1.weight.cpu())
        fc.fc2.weight.copy_(rows.to(fc.fc2.weight))

    def parameters_to_optimize(self, phase: PhaseConfig):
        if phase.kind is PhaseKind.FINETUNE:
            return [self.model.fc.fc1.weight, self.model.fc.fc2.weight]    # not sigma: in no group of the authors'
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        loss = F.cross_entropy(out["logits"], y)
        if task.num_old_classes == 0:            # the first task: cross-entropy only
            return loss
        c = self.config
        if phase.kind is not PhaseKind.FINETUNE:   # finetuning freezes the backbone: this term is constant there
            with torch.no_grad():
                old_features = self.teacher.features(x)
            loss = loss + less_forget_loss(out["features"], old_features, float(c["lf_lambda"]),
                                           task.num_old_classes, task.num_new_classes)
        ranking = margin_ranking_loss(out["cosine"], y, task.num_old_classes, float(c["mr_margin"]), int(c["mr_k"]))
        return loss + float(c["mr_weight"]) * ranking

    def after_task(self, task: TaskInfo) -> None:
        # The memory already holds this task's exemplars (the trial updates it before after_task). Each
        # exemplar's feature L2-normalised, averaged with its mirror's with `nme_flip` (the authors'), the class
        # mean normalised again (PyCIL: no flip).
        data = self.tools.memory_data()
        if data is None:
            raise RuntimeError("ucir: the rehearsal memory is empty after the update; the NME head needs exemplars")
        self._unit_features = True
        try:
            feats = self.tools.features(data, flip=bool(self.config["nme_flip"]))
        finally:
            self._unit_features = False
        labels = torch.as_tensor(data.y, dtype=torch.long)
        self.class_means, self.class_valid = class_means(feats, labels, task.num_seen_classes)
        self.teacher = None            # the finetuning after this does not need it (see training_step): free it

    # ---- inference -----------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.features(x)
        return F.normalize(f.float(), p=2, dim=1) if self._unit_features else f

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.class_means is None:
            raise RuntimeError("ucir: NME class means are computed in after_task; predict was called before")
        out = self.model(x)
        heads = {"cnn": out["logits"], "nme": nme_scores(out["features"], self.class_means, self.class_valid)}
        main = self.config["main_head"]
        return {main: heads[main], **{k: v for k, v in heads.items() if k != main}}

