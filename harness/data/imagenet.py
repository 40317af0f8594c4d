"""ImageNet-100 (image folders + DyTox/PODNet split files) and ImageNet-1000 (train/ and val/ ImageFolder layout).

Both return file paths: images are decoded lazily by the data loader."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data.base import ArrayData
from harness.data.image_folder import load_image_folder
from harness.errors import DataError

SPLIT_FILES = {"train": "train_100.txt", "test": "val_100.txt"}


def find_split_file(data_path: Path, split: str, split_dir: Path | None) -> Path:
    fname = SPLIT_FILES[split]
    candidates = [split_dir] if split_dir else [data_path, data_path / "imagenet100_splits"]
    for d in candidates:
        if (d / fname).is_file():
            return d / fname
    where = " or ".join(str(d / fname) for d in candidates)
    raise DataError(f"ImageNet-100 split file not found: {where}; put DyTox's imagenet100_splits/{fname} there "
                    "(lines like `train/n01440764/n01440764_10026.JPEG 0`)")


def read_split_file(path: Path) -> tuple[list[str], np.ndarray]:
    """Lines `relative/path.JPEG label`; blank lines are skipped."""
    rels, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{lineno}: expected `relative/path.JPEG label`, got {line.strip()!r}")
        rels.append(parts[0])
        labels.append(int(parts[1]))
    if not rels:
        raise DataError(f"{path} lists no images; use DyTox's imagenet100_splits files")
    return rels, np.asarray(labels, dtype=np.int64)


def load_imagenet100(data_path: Path, split: str, split_dir: Path | None = None) -> ArrayData:
    split_file = find_split_file(data_path, split, split_dir)
    rels, y = read_split_file(split_file)
    if y.min() < 0:
        raise DataError(f"{split_file} has negative labels; labels must be 0..K-1")
    # The class name of a label is the folder its images sit in (the wnid); one folder per label.
    names: dict[int, str] = {}
    for rel, label in zip(rels, y.tolist()):
        wnid = Path(rel).parent.name
        if names.setdefault(label, wnid) != wnid:
            raise DataError(f"{split_file}: label {label} is used for both {names[label]} and {wnid}; "
                            "each label must be one class folder")
    missing = sorted(set(range(int(y.max()) + 1)) - set(names))
    if missing:
        raise DataError(f"{split_file} has no images for labels {missing[:5]}: labels must be 0..K-1 without gaps")
    first = data_path / rels[0]
    if not first.is_file():
        raise DataError(f"{first} (listed in {split_file}) not found: --data-path must be the folder holding "
                        "ImageNet's train/ and val/ folders")
    x = np.asarray([str(data_path / r) for r in rels])
    return ArrayData(x, y, [names[i] for i in range(len(names))])


def require_imagenet1000(data_path: Path) -> None:
    if not (data_path / "train").is_dir():
        raise DataError(f"ImageNet not found in {data_path}: --data-path must hold train/<wnid>/*.JPEG and "
                        "val/<wnid>/*.JPEG")


def load_imagenet1000(data_path: Path, split: str) -> ArrayData:
    require_imagenet1000(data_path)
    return load_image_folder(data_path, split, decode=False)
