"""BiC (Wu et al., "Large Scale Incremental Learning", CVPR 2019): parts.

Building blocks only (no Method yet). Sources: the paper and PyCIL's models/bic.py, utils/inc_net.py
(`BiasLayer_BIC`, `IncrementalNetWithBias`), utils/data_manager.py (`get_dataset_with_split`).

Two stages per incremental task:
1. Train everything but the bias layers on (new data + memory) minus a held-out validation set
   (`split_for_bias_correction`), with `balanced_kd_loss`: lambda * KD + (1 - lambda) * CE, lambda = n_old /
   (n_old + n_new) (the paper's n / (n + m)), KD at temperature 2 on the old classes.
2. Train only the newest `BiasLayer` (alpha, beta) on the validation set with cross-entropy on the corrected
   logits (the paper's bias-correction loss). PyCIL applies `cross_entropy(softmax(logits))` there: a softmax
   too many.

PyCIL keeps one bias layer per task, each on its own class range, all applied in order; earlier ones stay at
their trained values and get lr 0 afterwards.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from harness.errors import ConfigError
from methods.losses import kd_loss


class BiasLayer(nn.Module):
    """q_k = alpha * o_k + beta for the classes [start, stop) (the last task's new classes), q_k = o_k for the
    others (the paper's bias correction layer). alpha = 1, beta = 0 at init: the identity."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        before, new, after = logits[:, :self.start], logits[:, self.start:self.stop], logits[:, self.stop:]
        return torch.cat([before, self.alpha * new + self.beta, after], dim=1)


def distillation_weight(num_old: int, num_new: int) -> float:
    """lambda = n_old / (n_old + n_new): the paper's n / (n + m) (PyCIL: known / total classes)."""
    return num_old / (num_old + num_new)


def balanced_kd_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 2.0) -> torch.Tensor:
    """lambda * KD + (1 - lambda) * CE, lambda from the teacher's and the student's class counts.

    KD: `methods.losses.kd_loss` (soft cross-entropy on the old classes, no T^2), as PyCIL's BiC and WA.
    """
    num_old = teacher_logits.shape[1]
    lam = distillation_weight(num_old, logits.shape[1] - num_old)
    return lam * kd_loss(logits, teacher_logits, temperature) + (1 - lam) * F.cross_entropy(logits, targets)


def bias_val_per_class(memory_size: int, num_old: int, ratio: float = 0.1) -> int:
    """Validation samples per class: `ratio` of an old class's exemplars, int(ratio * memory_size / num_old)
    (PyCIL, split_ratio 0.1: the paper's 9:1 train:val split of the exemplars). New classes give as many."""
    return int(ratio * memory_size / num_old)


def split_for_bias_correction(memory_indices_by_class: Mapping[int, Sequence[int]],
                              new_indices_by_class: Mapping[int, Sequence[int]], val_per_class: int,
                              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: `val_per_class` samples of every class held out, old (memory) and new alike, so the
    validation set is class-balanced (the paper; PyCIL's get_dataset_with_split).

    Pass indices of the TRAINING split only: the validation set must never come from the test split. Classes
    are visited in increasing order and drawn without replacement from numpy's Generator(`seed`) (PyCIL draws
    from the global numpy state instead). Every class must keep at least one training sample.
    """
    overlap = set(memory_indices_by_class) & set(new_indices_by_class)
    if overlap:
        raise ConfigError(f"classes {sorted(overlap)} are both in the memory and new: one source per class")
    by_class = {**memory_indices_by_class, **new_indices_by_class}
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in sorted(by_class):
        indices = np.asarray(by_class[cls], dtype=np.int64)
        if not 0 < val_per_class < len(indices):
            raise ConfigError(f"class {cls} has {len(indices)} samples: cannot hold out {val_per_class} for bias "
                              "correction and keep one to train on; lower the validation ratio")
        held = np.zeros(len(indices), dtype=bool)
        held[rng.choice(len(indices), val_per_class, replace=False)] = True
        val.append(indices[held])
        train.append(indices[~held])
    return np.concatenate(train), np.concatenate(val)
