"""DyTox's losses (dytox.md section 2.2), written from the specification.

Every function takes raw logits and casts them to float32 first: under AMP (bf16/fp16 autocast) the network's
outputs are half precision, and sigmoid-BCE / log-softmax over a few classes lose too much there.

Reductions matter because they set the gradient scale the published learning rates were tuned for:
- classification and divergence BCE: mean over batch x classes (`F.binary_cross_entropy_with_logits` default);
- KD: the original `F.kl_div(..., reduction='mean')`, i.e. the mean over batch x OLD classes (not `batchmean`),
  times tau^2. That divides the KL of each sample by the number of old classes, so KD gets weaker as classes
  accumulate; it is what produced the paper's numbers, so it is the default (`kd_reduction: mean`).
  `kd_reduction: batchmean` gives the textbook KL (sum over classes, mean over the batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KD_REDUCTIONS = ("mean", "batchmean")


def hard_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot float32 targets (the original's `bce_with_logits` one-hot encodes inside the loss)."""
    return F.one_hot(labels.long(), num_classes).float()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid binary cross-entropy, mean over batch x classes. `targets`: (B, C) hard or soft (MixUp)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy on (B, C) soft targets, mean over the batch (`bce_loss: false`)."""
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, bce: bool = True) -> torch.Tensor:
    """DyTox's classification criterion: sigmoid BCE (default) or softmax CE, on (B, C) targets."""
    return bce_loss(logits, targets) if bce else soft_cross_entropy(logits, targets)


def kd_loss(student_old_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
            reduction: str = "mean") -> torch.Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)) * tau^2 on the old classes' logits.

    `student_old_logits` must already be cut to the teacher's classes (logits[:, :n_old]). `reduction='mean'`
    averages the element-wise KL terms over batch x classes (the original), 'batchmean' sums over classes and
    averages over the batch."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    if student_old_logits.shape != teacher_logits.shape:
        raise ValueError(f"student old logits {tuple(student_old_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: cut the student to logits[:, :n_old]")
    log_p_student = F.log_softmax(student_old_logits.float() / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=1)
    # Written out rather than F.kl_div(reduction='mean'), whose meaning PyTorch announces it will change to
    # 'batchmean': the original's numbers were made with the element-wise mean.
    terms = log_p_teacher.exp() * (log_p_teacher - log_p_student)
    kl = terms.mean() if reduction == "mean" else terms.sum() / terms.shape[0]
    return kl * (tau ** 2)


def auto_kd_weight(num_old: int, num_seen: int) -> float:
    """lambda = |C_old| / |C_all| (WA-inspired): loss = (1 - lambda) * classification + lambda * KD."""
    return num_old / num_seen if num_seen > 0 else 0.0


def divergence_targets(targets: torch.Tensor, num_old: int) -> torch.Tensor:
    """Targets of the divergence head (|new| + 1 outputs): column 0 = "any old class", then the new classes.

    Hard labels (B,): old class -> 0, new class num_old + j -> 1 + j (returned as (B, |new| + 1) one-hot is left
    to the caller). Soft targets (B, C_seen) (MixUp): [sum of the old classes' mass, new classes' masses]."""
    if targets.ndim == 1:
        return torch.where(targets < num_old, torch.zeros_like(targets), targets - num_old + 1)
    old_mass = targets[:, :num_old].sum(dim=1, keepdim=True)
    return torch.cat([old_mass, targets[:, num_old:]], dim=1)


def dytox_loss(logits: torch.Tensor, targets: torch.Tensor, *, num_old: int,
               teacher_logits: torch.Tensor | None = None, div_logits: torch.Tensor | None = None,
               head_div: float = 0.0, auto_kd: bool = True, kd_weight: float = 1.0, tau: float = 1.0,
               kd_reduction: str = "mean", bce: bool = True) -> dict[str, torch.Tensor]:
    """The full DyTox objective of one batch. Returns {"loss", "classification", "kd"?, "divergence"?}.

    `targets`: (B, C_seen) hard one-hot or soft (MixUp + label smoothing) targets over every seen class.
    - classification: BCE (or CE) over all seen classes;
    - KD when `teacher_logits` is given: auto_kd -> (1 - l) * cls + l * KD with l = num_old / C_seen,
      else cls + kd_weight * KD;
    - divergence when `div_logits` is given and head_div > 0: + head_div * BCE(div_logits, div targets).
    """
    num_seen = logits.shape[1]
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be (batch, seen classes) = {tuple(logits.shape)}")
    cls = classification_loss(logits, targets, bce)
    out = {"classification": cls.detach()}
    loss = cls
    if teacher_logits is not None and num_old > 0:
        kd = kd_loss(logits[:, :num_old], teacher_logits, tau, kd_reduction)
        if auto_kd:
            lam = auto_kd_weight(num_old, num_seen)
            loss = (1.0 - lam) * cls + lam * kd
        else:
            loss = cls + kd_weight * kd
        out["kd"] = kd.detach()
    if div_logits is not None and head_div > 0:
        div_t = divergence_targets(targets, num_old)
        div = classification_loss(div_logits, div_t, bce)
        loss = loss + head_div * div
        out["divergence"] = div.detach()
    out["loss"] = loss
    return out
