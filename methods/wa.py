"""WA, Weight Aligning (Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning",
CVPR 2020): parts.

Building blocks only (no Method yet). Sources: PyCIL's models/wa.py and utils/inc_net.py (`weight_align`), and
the official DER code's WA (Rhyssiyan/DER-ClassIL.pytorch, inclearn/models/align.py).

- Training loss: (1 - lambda) * CE + lambda * KD, lambda = n_old / (n_old + n_new), KD at temperature 2:
  `methods.bic.balanced_kd_loss` (current PyCIL and DER's align.py; an older PyCIL revision used CE + 2 * KD).
- After each incremental task: `align_weights` on the linear classifier's weight rows (bias untouched).
  PyCIL calls it twice (end of `_train` and `after_task`); the second call finds gamma = 1 up to rounding.
- Weight clipping: DER's WA clamps every classifier parameter (weight and bias) to >= 0 after every optimiser
  step (`p.data.clamp_(0.0)`), which is what the paper pairs with WA; PyCIL's WA does not clip.
  `clip_positive` is that step.
"""
from __future__ import annotations

import torch
from torch import nn


def align_weights(fc_weight: torch.Tensor, num_old: int, num_new: int) -> float:
    """Rescales, in place, the new classes' rows [num_old, num_old + num_new) by gamma = mean_j ||w_old_j|| /
    mean_j ||w_new_j|| (the paper's weight aligning) and returns gamma. The old rows are left unchanged."""
    with torch.no_grad():
        old = fc_weight[:num_old]
        new = fc_weight[num_old:num_old + num_new]
        gamma = old.norm(p=2, dim=1).mean() / new.norm(p=2, dim=1).mean()
        new.mul_(gamma)
    return gamma.item()


def clip_positive(module: nn.Module) -> None:
    """Clamps every parameter of `module` (the classifier) to be non-negative, in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.clamp_(min=0.0)
