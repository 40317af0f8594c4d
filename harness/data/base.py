"""The in-memory form every loader returns, dataset descriptions, and where data and caches live."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from harness.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]            # the project root (holds harness/, benchmarks/)
SHARED_DATA = ROOT.parent / "shared" / "data"         # real data kept beside the project, when present
SHIPPED_DATA = ROOT / "benchmarks" / "data"           # data committed with the project

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ArrayData:
    """One split: images in memory, or file paths for large images decoded lazily by the loader."""
    x: np.ndarray          # uint8 (N, H, W, C), or (N,) str paths
    y: np.ndarray          # int64 (N,) ORIGINAL class ids 0..K-1
    class_names: list[str]

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=np.int64)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def is_paths(self) -> bool:
        return self.x.ndim == 1 and self.x.dtype.kind in "UO"

    def subset(self, indices) -> "ArrayData":
        idx = np.asarray(indices)
        return ArrayData(self.x[idx], self.y[idx], self.class_names)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int | None          # None: decided by the data (imagefolder)
    image_size: int | None           # side of the (square) images the model sees; None: from the data
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...] | None = None   # natural order (label id -> name), when fixed
    description: str = ""


def cache_dir() -> Path:
    """Decoded-image caches: $CLBENCH_CACHE or ~/.cache/clbench."""
    return Path(os.environ.get("CLBENCH_CACHE") or Path.home() / ".cache" / "clbench")


def default_data_dir() -> Path:
    """Where datasets without --data-path are looked for (and downloaded to): $CLBENCH_DATA or <cache>/data."""
    env = os.environ.get("CLBENCH_DATA")
    return Path(env) if env else cache_dir() / "data"


def check_split(split: str) -> str:
    if split in ("test", "val"):
        return "test"
    if split != "train":
        raise ConfigError(f"unknown split {split!r}: use 'train' or 'test'")
    return split


def draw_per_class(y: np.ndarray, count: Callable[[int], int], seed: int = 0) -> np.ndarray:
    """Boolean mask over `y`: for every class c with n samples, `count(n)` of them, drawn with
    np.random.default_rng([seed, c]) -- the same draw whatever the class order, the trial's seed or the number
    of workers (reduced training sets, the sweeps' validation split)."""
    y = np.asarray(y)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        mask[idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))[:count(len(idx))]]] = True
    return mask


def subsample_per_class(data: ArrayData, per_class: int, seed: int = 0) -> ArrayData:
    """At most `per_class` samples of every class (draw_per_class), kept in their original order. For reduced
    budgets on CPU (option `train_per_class`); classes with fewer samples keep them all."""
    if per_class < 1:
        raise ConfigError(f"train_per_class must be >= 1, got {per_class}")
    return data.subset(np.flatnonzero(draw_per_class(data.y, lambda n: min(n, per_class), seed)))


def validation_split(train: ArrayData, validation: dict) -> tuple[ArrayData, ArrayData]:
    """The sweeps' tuning protocol (harness.sweep): (train minus validation, validation): `fraction` of EVERY class's training samples, drawn with a fixed
    seed per class, so the split depends neither on the class order, nor on k, nor on the trial's seed.

    Only the classes of the first k tasks are ever trained or evaluated on (run_trial stops after k tasks);
    later classes are held out the same way so the scenario keeps every class. The test split is never read.
    """
    fraction, seed = float(validation.get("fraction", 0.1)), int(validation.get("seed", 0))
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    y = np.asarray(train.y)
    for c, n in zip(*np.unique(y, return_counts=True)):
        if n < 2:
            raise DataError(f"class {int(c)} has {n} training sample(s): a validation split needs at least 2")
    held = draw_per_class(y, lambda n: min(n - 1, max(1, int(round(fraction * n)))), seed)
    keep, val = np.flatnonzero(~held), np.flatnonzero(held)
    return (ArrayData(train.x[keep], y[keep], train.class_names),
            ArrayData(train.x[val], y[val], train.class_names))
