"""Tiny separable image data for method tests: 3x8x8 images whose mean is their label, a fixed draw."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def toy_data(n: int, classes: int) -> TensorDataset:
    """`n` images over `classes` classes (labels cycle 0..classes-1), the same tensors every call."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % classes
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None].float(), y)
