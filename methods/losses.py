"""Distillation losses shared by the CNN methods (iCaRL's two formulations, knowledge distillation).

All take raw logits; reductions are spelled out in each docstring because they set the gradient scale (and so
the learning rate a recipe needs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def icarl_bce_loss(logits: torch.Tensor, targets: torch.Tensor,
                   teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The original iCaRL loss: sigmoid binary cross-entropy over every seen class.

    The target of column c is the one-hot label, except on the old classes (the first
    `teacher_logits.shape[1]` columns), whose targets are the frozen teacher's sigmoid outputs -- so old
    classes, exemplars included, are learnt only through distillation. Mean over batch x classes, as in the
    original code (hence its large learning rate, 2.0).
    """
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    if teacher_logits is not None and teacher_logits.shape[1] > 0:
        old = teacher_logits.shape[1]
        soft = torch.sigmoid(teacher_logits.detach().to(logits.dtype))
        onehot = torch.cat([soft, onehot[:, old:]], dim=1)
    return F.binary_cross_entropy_with_logits(logits, onehot)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft cross-entropy -sum_c softmax(t/T)_c log softmax(s/T)_c, summed over classes, mean over the batch.

    `student_logits` are cut to the teacher's classes. No T^2 factor (PyCIL's iCaRL adds none either).
    """
    old = teacher_logits.shape[1]
    log_p = F.log_softmax(student_logits[:, :old] / temperature, dim=1)
    q = F.softmax(teacher_logits.detach().to(log_p.dtype) / temperature, dim=1)
    return -(q * log_p).sum(dim=1).mean()


def icarl_kd_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """PyCIL's iCaRL: cross-entropy over every seen class + softmax KD on the old classes (weight 1)."""
    loss = F.cross_entropy(logits, targets)
    if teacher_logits is not None and teacher_logits.shape[1] > 0:
        loss = loss + kd_loss(logits, teacher_logits, temperature)
    return loss
