"""PODNet (Douillard et al., "PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning",
ECCV 2020): parts.

Building blocks only (no Method yet). Sources: the authors' code (arthurdouillard/incremental_learning.pytorch:
inclearn/models/podnet.py, lib/losses/distillation.py `pod`, lib/losses/base.py `nca`,
lib/network/classifiers.py `CosineClassifier`, options/podnet/podnet_cnn_cifar100.yaml) and PyCIL's
models/podnet.py + convs/linears.py.

Loss of an incremental task: nca_loss(LSC similarities) + lambda_f * factor * pod_flat_loss
+ lambda_c * factor * pod_spatial_loss, factor = `adaptive_factor` = sqrt(n_seen / n_new). lambda_f = 1;
lambda_c = 3 in the authors' CIFAR config (`pod_spatial.scheduled_factor: 3.0`), 5 in PyCIL.
The authors also clamp every gradient to [-5, 5] (a hook per parameter) and freeze the old classes' proxies
(`groupwise_factors: old_weights: 0`; PyCIL: lr 0 for them).
After each incremental task, a class-balanced finetuning on the memory: the authors train the classifier only
(`finetuning_config`: undersampling, lr 0.05, 20 epochs, no schedule); PyCIL trains everything but the old
proxies (lr 0.005, 20 epochs, cosine schedule).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from harness.core.backbones import CifarResNet


def stage_maps(backbone: CifarResNet, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every stage's output map and the pooled features (equal to `backbone(x)`): POD-spatial reads the maps,
    POD-flat and the classifier the features. The authors and PyCIL take the last stage before its final ReLU;
    this backbone keeps that ReLU."""
    h = backbone.stem(x)
    maps = []
    for stage in backbone.stages:
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
