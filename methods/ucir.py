"""UCIR / LUCIR (Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019): parts.

Building blocks only (no Method yet). Sources: the authors' code (hshustc/CVPR19_Incremental_Learning,
cifar100-class-incremental/*.py, utils_incremental/incremental_train_and_eval_MR_LF.py) and PyCIL's
models/ucir.py + convs/modified_linear.py, which follow it.

- Cosine normalisation: `CosineLinear`, then `SplitCosineLinear` from the second task on (old rows `fc1`, new
  rows `fc2`, one shared learnable scale sigma, initialised to 1).
- Less-forget constraint: `less_forget_loss` on the features the classifier reads (the original ResNet-32 drops
  the ReLU of its last block there: features may be negative).
- Inter-class separation: `margin_ranking_loss` on the UNSCALED cosine scores (both codes hook fc1/fc2 outputs,
  before sigma), weight lw_mr = 1.
- New-class weights are imprinted (`imprinted_weights`, `--imprint_weights` in the authors' run.sh; PyCIL
  keeps the random initialisation).
- Class-balanced finetuning (authors' cbf_class_incremental_cosine_cifar100.py; PyCIL does not implement it):
  after each incremental task, on the exemplars only (20 per class), ft_epochs = 20, ft_base_lr = 0.01 divided
  by 10 at epoch 10, SGD momentum 0.9, weight decay 5e-4; default ft_flag = 2: feature extractor frozen (lr 0,
  BatchNorm in eval mode), old AND new class weights trained, with the same CE + less-forget + ranking losses.
  run.sh lists it as the last variant (LF + MR + CBF); the CIFAR rows without it use 160 epochs only.
- Evaluation: PyCIL reports NME (class means of the herded exemplars); the authors' code reports both.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


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
