"""scikit-learn's digits (1,797 real 8x8 handwritten digits, shipped inside the wheel): seconds-long smoke runs."""
from __future__ import annotations

import numpy as np

from harness.data.base import ArrayData

TEST_FRACTION = 0.2
SPLIT_SEED = 0      # fixed: every run, order and method sees the same split


def load_digits_split(split: str) -> ArrayData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)      # 0..16 -> 0..255
    x = np.repeat(grey[..., None], 3, axis=-1)                            # (N, 8, 8, 3): the RGB the models take
    idx = np.arange(len(x))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=bunch.target)
    pick = np.sort(train_idx if split == "train" else test_idx)
    return ArrayData(np.ascontiguousarray(x[pick]), bunch.target[pick].astype(np.int64),
                     [str(c) for c in range(10)])
