"""Train/test transforms (torchvision v2) and the Dataset that applies them to an `ArrayData`."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from harness.data.base import ArrayData, DatasetInfo
from harness.data.image_folder import SMALL_IMAGE, open_rgb
from harness.errors import ConfigError

AUGMENTS = ("none", "standard", "randaugment")


def build_transform(info: DatasetInfo, train: bool, options: dict | None = None) -> v2.Compose:
    """Options: `augment` none|standard|randaugment (or `rand_augment: true`), `image_size` (resize).

    Input: uint8 HWC numpy, PIL image or CHW uint8 tensor; output: normalised float32 CHW tensor."""
    options = options or {}
    augment = options.get("augment") or "standard"
    if augment not in AUGMENTS:
        raise ConfigError(f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    rand_augment = bool(options.get("rand_augment")) or augment == "randaugment"
    native = info.image_size or 224
    size = int(options.get("image_size") or native)
    small = native <= SMALL_IMAGE     # CIFAR-style pad + crop; above: ImageNet-style resized crops
    bicubic = InterpolationMode.BICUBIC     # DyTox/DeiT resize with bicubic

    steps: list = [v2.ToImage()]
    if small:
        if size != native:
            steps.append(v2.Resize((size, size), interpolation=bicubic, antialias=True))
        if train and augment != "none":
            # padding 4 at 32 px (the CIFAR standard), scaled with the image so 8x8 digits get 1
            steps += [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    elif train and augment != "none":
        steps += [v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True), v2.RandomHorizontalFlip()]
    else:
        # the usual 256 -> 224 centre crop, scaled for other sizes
        steps += [v2.Resize(int(round(size * 256 / 224)), interpolation=bicubic, antialias=True),
                  v2.CenterCrop(size)]
    if train and rand_augment:
        steps.append(v2.RandAugment(num_ops=2, magnitude=9))   # close to timm's rand-m9-mstd0.5 used by DyTox
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std))]
    return v2.Compose(steps)


class TaskDataset(Dataset):
    """(image tensor, label) pairs of an ArrayData; file paths are opened with PIL (RGB) when read.

    transform None (batched augmentation, harness.data.batched): in-memory images come back as uint8 CHW views
    and the loop augments whole batches on the device."""

    def __init__(self, data: ArrayData, transform) -> None:
        self.data = data
        self.transform = transform
        self.is_paths = data.is_paths

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.data.x[index]
        if self.is_paths:
            image = open_rgb(str(x))
        else:
            image = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)   # HWC -> CHW, no copy of pixels
        if self.transform is None:
            return (v2.functional.pil_to_tensor(image) if self.is_paths else image), int(self.data.y[index])
        return self.transform(image), int(self.data.y[index])
