"""PODNet (Douillard et al., "PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning",
ECCV 2020): its parts, then the registered method `podnet` (class PODNet). Sources: the authors' code
(arthurdouillard/incremental_learning.pytorch: inclearn/models/podnet.py, lib/losses/distillation.py `pod`,
lib/losses/base.py `nca`, lib/network/classifiers.py `CosineClassifier`, options/podnet/podnet_cnn_cifar100.yaml)
and PyCIL's models/podnet.py + convs/linears.py.

Loss of an incremental task: nca_loss(LSC similarities) + lambda_f * factor * pod_flat_loss
+ lambda_c * factor * pod_spatial_loss, factor = `adaptive_factor` = sqrt(n_seen / n_new). lambda_f = 1;
lambda_c = 3 in the authors' CIFAR config (`pod_spatial.scheduled_factor: 3.0`), 5 in PyCIL.
The authors also clamp every gradient to [-5, 5] (a hook per parameter) and freeze the old classes' proxies
(`groupwise_factors: old_weights: 0`; PyCIL: lr 0 for them).
After each incremental task, a class-balanced finetuning on the memory: the authors train the classifier only
(`finetuning_config`: undersampling, lr 0.05, 20 epochs, no schedule); PyCIL trains everything but the old
proxies (lr 0.005, 20 epochs, cosine schedule).

The method follows the authors' CIFAR-100 CNN config: POD-spatial on every stage's output map, POD-flat on the
pooled embedding, LSC (10 proxies) with NCA and a learned scale, old proxies frozen, gradients clamped to [-5, 5],
then the balanced finetuning of the classifier (the harness's FINETUNE phase on the updated memory: options
`finetuning_*`; every proxy trains, old ones included, as the authors' `classifier.parameters()`; the backbone and
the scale do not, BatchNorm stays in training mode as theirs). Heads: `cnn` (the LSC, the authors'
`eval_type: cnn`, reported first) and `nme` (iCaRL's class means of the exemplars, image and mirror).
NCA: the released code's by default (`nca_released_code`): with the scale learned from 1, the paper's formula
lowers it while the true class's cosine is below the margin, which it is at the start; it turns negative within
the first steps and the LSC ranks classes backwards (cifar10-5x2, order natural, cpu recipe: scale -2.3 after the
first task, whose 2 classes the CNN head then gets 50% right; the released loss: scale 2.4, 85.0%).
Stage maps: one per residual stage; the authors' ResNet-32 also hands POD-spatial the map before its last block.
New classes' proxies are imprinted (`lsc_imprint`, the authors' `weight_generation: imprinted, kmeans`; PyCIL
keeps the random init): before the main phase of every task but the first, `kmeans_proxies` of the task's own
images (test transform) under the model the previous task left.
Not implemented: the authors' 2 cos - 2 similarity (see the LSC).
"""
from __future__ import annotations

import copy
import math

import torch
from sklearn.cluster import KMeans
from torch import nn
import torch.nn.functional as F

from harness.core.backbones import CifarResNet, ImageNetResNet18, TinyCNN, build_backbone
from harness.core.method import Method, PhaseConfig, PhaseKind, TaskInfo
from harness.core.registry import register_method
from harness.errors import ConfigError
from methods.common import ClassMeansState
from methods.icarl import class_means, nme_scores


def backbone_stages(backbone: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(stem, stages) of a harness backbone, the stages being what POD-spatial distils: the residual stages of
    the ResNets, the two conv-BN-ReLU blocks of tiny_cnn (smoke tests). ConfigError for another backbone."""
    if isinstance(backbone, CifarResNet):
        return backbone.stem, list(backbone.stages)
    if isinstance(backbone, ImageNetResNet18):
        net = backbone.net
        return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), [net.layer1, net.layer2, net.layer3,
                                                                          net.layer4]
    if isinstance(backbone, TinyCNN):
        return nn.Identity(), [backbone.body[:3], backbone.body[3:7]]
    raise ConfigError(f"podnet reads the stage maps of the CIFAR ResNets, resnet18 and tiny_cnn, not of "
                      f"{type(backbone).__name__}")


def stage_maps(backbone: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every stage's output map and the pooled features (equal to `backbone(x)`): POD-spatial reads the maps,
    POD-flat and the classifier the features. The authors and PyCIL take the last stage before its final ReLU;
    this backbone keeps that ReLU."""
    stem, stages = backbone_stages(backbone)
    h = stem(x)
    maps = []
    for stage in stages:
        h = stage(h)
        maps.append(h)
    return maps, torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


def adaptive_factor(num_seen: int, num_new: int) -> float:
    """sqrt(n_seen / n_new), n_seen counting the new classes: the multiplier of lambda_c and lambda_f (authors'
    `math.sqrt(self._n_classes / self._task_size)`; PyCIL: sqrt(total / (total - known)))."""
    return math.sqrt(num_seen / num_new)


def pod_spatial_loss(old_maps: list[torch.Tensor], new_maps: list[torch.Tensor],
                     normalize: bool = True) -> torch.Tensor:
    """POD-spatial, exactly as the authors' `pod(collapse_channels="spatial")` and PyCIL's `pod_spatial_loss`.

    Per stage (maps (B, C, H, W)): square the activations; sum over the last axis (B, C*H) and, separately, over
    the second-to-last (B, C*W); concatenate; L2-normalise each sample's vector; take the L2 distance between
    old and new per sample and average it over the batch. The result is averaged over the stages.
    """
    loss = new_maps[0].new_zeros(())
    for old, new in zip(old_maps, new_maps, strict=True):
        old, new = old.pow(2), new.pow(2)
        old = torch.cat([old.sum(dim=3).flatten(1), old.sum(dim=2).flatten(1)], dim=1)
        new = torch.cat([new.sum(dim=3).flatten(1), new.sum(dim=2).flatten(1)], dim=1)
        if normalize:
            old, new = F.normalize(old, p=2, dim=1), F.normalize(new, p=2, dim=1)
        loss = loss + torch.linalg.vector_norm(old - new, dim=1).mean()
    return loss / len(new_maps)


def pod_flat_loss(old_emb: torch.Tensor, new_emb: torch.Tensor) -> torch.Tensor:
    """POD-flat: mean over the batch of 1 - cos(old, new) on the final embeddings (the authors'
    `embeddings_similarity`, a CosineEmbeddingLoss with target 1). `old_emb` gets no gradient."""
    ones = torch.ones(new_emb.shape[0], device=new_emb.device)
    return F.cosine_embedding_loss(new_emb, old_emb.detach(), ones)


class LocalSimilarityClassifier(nn.Module):
    """LSC: K proxies per class; a class's similarity is the softmax-weighted sum of the cosines to its proxies,
    y_c = sum_k softmax_k(<theta_ck, h>) <theta_ck, h> (the paper's LSC, PyCIL's `reduce_proxies`).

    Proxies are stored class-major (class c owns rows c*K .. c*K + K - 1), one Parameter per `add_classes` call
    so that `freeze_old` can stop the old ones. They start ~ U(-1/sqrt(D), 1/sqrt(D)) (PyCIL; the authors imprint
    new classes with k-means centres of their features: pass them as `weights`). `eta`, the learned scale of the
    NCA loss, starts at 1 (`learned_scaling: initial_value 1.0`); `forward` returns the UNSCALED similarities.
    The authors compute -||h/|h| - theta/|theta|||^2 = 2 cos - 2 instead of cos (`neg_stable_cosine_distance`):
    a proxy softmax twice as sharp and a margin on a doubled range; PyCIL uses the plain cosine, as here.
    """

    def __init__(self, in_features: int, num_classes: int, num_proxies: int = 10, eta: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.num_proxies = in_features, num_proxies
        self.proxies = nn.ParameterList()
        self.eta = nn.Parameter(torch.full((1,), float(eta)))
        self.add_classes(num_classes)

    @property
    def num_classes(self) -> int:
        return sum(p.shape[0] for p in self.proxies) // self.num_proxies

    def add_classes(self, num_new: int, weights: torch.Tensor | None = None) -> None:
        """Appends `num_new` classes' proxies: `weights` (num_new * K, D), class-major, or a random init."""
        shape = (num_new * self.num_proxies, self.in_features)
        if weights is None:
            bound = 1.0 / math.sqrt(self.in_features)
            weights = torch.empty(shape, device=self.eta.device).uniform_(-bound, bound)
        if tuple(weights.shape) != shape:
            raise ValueError(f"proxy weights of shape {tuple(weights.shape)}, expected {shape}")
        self.proxies.append(nn.Parameter(weights.detach().clone().to(self.eta.device)))

    def freeze_old(self) -> None:
        """Every proxy but the last `add_classes` call's stops training."""
        for p in list(self.proxies)[:-1]:
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proxies = torch.cat(list(self.proxies))
        cosines = F.linear(F.normalize(x, p=2, dim=1), F.normalize(proxies, p=2, dim=1))
        per_class = cosines.view(x.shape[0], -1, self.num_proxies)
        return (F.softmax(per_class, dim=-1) * per_class).sum(dim=-1)


def nca_loss(similarities: torch.Tensor, targets: torch.Tensor, margin: float = 0.6,
             scale: float | torch.Tensor = 1.0, released_code: bool = False) -> torch.Tensor:
    """The LSC loss, averaged over the batch.

    Paper (default): [ -log( exp(eta (y_t - delta)) / sum_{i != t} exp(eta y_i) ) ]_+ with the margin delta on
    the true class only, the true class out of the denominator, and a hinge at 0.

    `released_code=True` reproduces the authors' `nca` (and PyCIL's copy) with their CIFAR options: the margin is
    subtracted from EVERY class (so it cancels: no effect), the logits are shifted by their row maximum, the
    true class's slot in the denominator is set to 0 rather than removed (an extra exp(0) = 1 term), no hinge.
    """
    rows = torch.arange(similarities.shape[0], device=similarities.device)
    if released_code:
        shifted = scale * (similarities - margin)
        shifted = shifted - shifted.max(dim=1, keepdim=True).values
        positive = shifted[rows, targets]
        denominator = shifted.index_put((rows, targets), shifted.new_zeros(()))
        return (torch.log(torch.exp(denominator).sum(dim=1)) - positive).mean()
    scaled = scale * similarities
    positive = scaled[rows, targets] - scale * margin
    negatives = scaled.index_put((rows, targets), scaled.new_tensor(float("-inf")))
    return (torch.logsumexp(negatives, dim=1) - positive).clamp(min=0.0).mean()


def kmeans_proxies(features: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...], num_proxies: int,
                   norm: float, seed: int) -> torch.Tensor:
    """Imprinted proxies, class-major (num_classes * K, D), as the authors' `add_imprinted_classes` with
    `multi_class_diff: kmeans`: per class, the K k-means centres of its L2-normalised features (sklearn's KMeans,
    10 initialisations as their sklearn's default, `random_state` = seed + class), times `norm`, the mean norm
    of the existing proxies."""
    rows = []
    for c in classes:
        unit = F.normalize(features[labels == c].float(), p=2, dim=1).numpy()
        if len(unit) < num_proxies:
            raise ConfigError(f"podnet: class {c} has {len(unit)} training images, fewer than its {num_proxies} "
                              "proxies to imprint; lower lsc_proxies or set lsc_imprint: false")
        kmeans = KMeans(n_clusters=num_proxies, n_init=10, random_state=seed + c).fit(unit)
        rows.append(torch.from_numpy(kmeans.cluster_centers_).float() * norm)
    return torch.cat(rows)


# ---- the method ------------------------------------------------------------------------------------------------
class PODNetNet(nn.Module):
    """A backbone and an LSC classifier growing with each task; the forward returns what the losses read."""

    def __init__(self, backbone: nn.Module, num_proxies: int) -> None:
        super().__init__()
        backbone_stages(backbone)                 # a backbone without stage maps fails here, before any task
        self.backbone, self.num_proxies = backbone, num_proxies
        self.classifier: LocalSimilarityClassifier | None = None

    @property
    def num_classes(self) -> int:
        return 0 if self.classifier is None else self.classifier.num_classes

    def add_classes(self, num_new: int) -> None:
        if self.classifier is None:
            device = next(self.backbone.parameters()).device
            self.classifier = LocalSimilarityClassifier(self.backbone.out_dim, num_new, self.num_proxies).to(device)
        else:
            self.classifier.add_classes(num_new)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict:
        maps, features = stage_maps(self.backbone, x)
        # The learned scale leaves through the forward so that DDP finds it in the graph and averages its gradient.
        return {"maps": maps, "features": features, "logits": self.classifier(features),
                "scale": self.classifier.eta.view(1)}


@register_method("podnet")
class PODNet(ClassMeansState, Method):
    """PODNet-CNN: POD-spatial + POD-flat distillation, LSC classifier with NCA, balanced classifier finetuning."""

    requires_memory = True                  # rehearsal, the balanced finetuning and the NME head need exemplars
    balanced_phase = PhaseKind.FINETUNE     # the authors' `finetuning_config` (options finetuning_*)

    def build(self) -> None:
        c = self.config
        backbone = build_backbone(c["backbone"], c.get("backbone_width"), c.get("resnet_shortcut"))
        self.model = PODNetNet(backbone, int(c["lsc_proxies"])).to(self.device)
        self.margin, self.released_nca = float(c["nca_margin"]), bool(c["nca_released_code"])
        self.lambda_flat, self.lambda_spatial = float(c["pod_flat_lambda"]), float(c["pod_spatial_lambda"])
        self.grad_clamp = float(c["grad_clamp"] or 0.0)
        self.imprint = bool(c["lsc_imprint"])
        self.teacher: PODNetNet | None = None
        self.class_means: torch.Tensor | None = None      # (seen classes, D), L2-normalised rows
        self.class_valid: torch.Tensor | None = None
        self._unit_features = False                         # features() returns normalised rows when set

    # ---- growth --------------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        # The previous model, taken here (not in after_task) so that a resumed trial, which loads the weights
        # before the next before_task, distils from the right one.
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if task.task_id > 0 else None
        self.model.add_classes(task.num_new_classes)
        self.model.classifier.freeze_old()             # the authors' `old_weights: 0` (PyCIL: lr 0)

    def after_task(self, task: TaskInfo) -> None:
        # The trial updated the memory before after_task: the class means are the new exemplars'.
        self.teacher = None                            # the finetuning trains the classifier only: no distillation
        self._update_class_means(task.num_seen_classes)

    @torch.no_grad()
    def _imprint(self, task: TaskInfo) -> None:
        # Here rather than in before_task, which a resumed trial replays without the task's data.
        data = self.tools.task_data()
        proxies = self.model.classifier.proxies
        norm = float(torch.cat(list(proxies[:-1])).norm(dim=1).mean())
        rows = kmeans_proxies(self.tools.features(data), torch.as_tensor(data.y), task.new_classes,
                              self.model.num_proxies, norm, seed=int(self.config.get("seed", 0)) * 1000)
        proxies[-1].copy_(rows.to(proxies[-1]))

    # ---- phases: imprinting before the main one, the balanced finetuning -------------------------
    def before_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.TRAIN and task.task_id > 0 and self.imprint:
            self._imprint(task)
        if phase.kind is PhaseKind.FINETUNE:          # the authors' `tuning: classifier`: every proxy, no scale
            self.model.requires_grad_(False)
            for proxies in self.model.classifier.proxies:
                proxies.requires_grad_(True)

    def after_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.FINETUNE:
            self.model.requires_grad_(True)            # back to the state before_task left
            self.model.classifier.freeze_old()
            self._update_class_means(task.num_seen_classes)   # the authors compute them after the finetuning

    # ---- training ------------------------------------------------------------------------------
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, phase: PhaseConfig,
                       task: TaskInfo) -> torch.optim.Optimizer:
        """Clamps every gradient to [-grad_clamp, grad_clamp] before each step (the authors' per-parameter hook;
        after a grad scaler's unscaling, before weight decay and momentum)."""
        if self.grad_clamp > 0:
            bound = self.grad_clamp

            def clamp(opt: torch.optim.Optimizer, args, kwargs) -> None:
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.clamp_(-bound, bound)

            optimizer.register_step_pre_hook(clamp)
        return optimizer

    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        loss = nca_loss(out["logits"], y, self.margin, out["scale"], self.released_nca)
        if self.teacher is None:      # the first task; the finetuning, where the POD terms would move no weight
            return loss
        with torch.no_grad():
            old = self.teacher(x)
        factor = adaptive_factor(task.num_seen_classes, task.num_new_classes)
        return loss + factor * (self.lambda_flat * pod_flat_loss(old["features"], out["features"])
                                + self.lambda_spatial * pod_spatial_loss(old["maps"], out["maps"]))

    # ---- inference -----------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.features(x)
        return F.normalize(f.float(), p=2, dim=1) if self._unit_features else f

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.model.features(x)
        return {"cnn": self.model.classifier(f), "nme": nme_scores(f, self.class_means, self.class_valid)}

    def _update_class_means(self, num_classes: int) -> None:
        data = self.tools.memory_data()
        if data is None:
            raise RuntimeError("podnet: the rehearsal memory is empty after the update; the NME head needs exemplars")
        self._unit_features = True     # each exemplar's (and its mirror's) features L2-normalised, as iCaRL's
        try:
            feats = self.tools.features(data, flip=bool(self.config.get("nme_flip", True)))
        finally:
            self._unit_features = False
        self.class_means, self.class_valid = class_means(feats, torch.as_tensor(data.y), num_classes)

