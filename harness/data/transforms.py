"""Train/test transforms (torchvision v2, plus timm's RandAugment) and the Dataset that applies them."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from harness.data.base import IMAGENET_MEAN, ArrayData, DatasetInfo
from harness.data.image_folder import SMALL_IMAGE, open_rgb
from harness.errors import ConfigError

AUGMENTS = ("none", "standard", "randaugment")
NORMALIZATIONS = ("dataset", "pycil")
# DyTox's `aa` (timm): 2 ops per image drawn with replacement from timm's "increasing" set (Invert and SolarizeAdd
# included, no Identity), each applied with probability 0.5 at magnitude 9 + N(0, 0.5) clipped to [0, 10].
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
# PyCIL's normalisation constants (utils/data.py): CIFAR-10 uses a std of (0.2023, 0.1994, 0.2010), not the data's.
PYCIL_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
               "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
               "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def normalization(info: DatasetInfo, options: dict | None = None) -> tuple[tuple, tuple]:
    """(mean, std) of the final Normalize: the dataset's own, or PyCIL's constants (`normalize: pycil`)."""
    choice = (options or {}).get("normalize") or "dataset"
    if choice not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalize {choice!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if choice == "dataset":
        return tuple(info.mean), tuple(info.std)
    family = next((f for f in ("cifar100", "cifar10", "imagenet") if info.name.startswith(f)), None)
    if family is None:
        raise ConfigError(f"normalize: pycil has constants for CIFAR-10, CIFAR-100 and ImageNet only, not "
                          f"{info.name!r}; use normalize: dataset")
    return PYCIL_STATS[family]


def posterize_any_bits(image: Image.Image, bits: int, **_: object) -> Image.Image:
    """timm's posterize, with 0 bits kept allowed again: PosterizeIncreasing asks for 0 bits when the magnitude
    noise reaches the maximum 10 (about 2% of its draws at m9, std 0.5). The Pillow of the original's time
    returned a black image; Pillow >= 10 raises instead."""
    from PIL import ImageOps

    if bits >= 8:
        return image
    if bits <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits)


class TimmRandAugment:
    """timm's RandAugment (`RAND_AUGMENT`) on one uint8 CHW image tensor, through PIL as timm works.

    hparams as timm's `create_transform` built them for DyTox: translate_const = 45% of the image side, fill colour
    = timm's default mean (ImageNet's: DyTox never passed its CIFAR mean), bicubic resampling. Random draws come
    from numpy's and Python's global generators (timm's), seeded per trial and per rank by the harness."""

    def __init__(self, image_size: int) -> None:
        from timm.data.auto_augment import rand_augment_transform

        self.hparams = dict(translate_const=int(image_size * 0.45),
                            img_mean=tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
                            interpolation=Image.BICUBIC)
        self.transform = rand_augment_transform(RAND_AUGMENT, dict(self.hparams))
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pil = v2.functional.to_pil_image(image.as_subclass(torch.Tensor))
        return tv_tensors.Image(v2.functional.pil_to_tensor(self.transform(pil)))


def augment_name(options: dict | None) -> str:
    augment = (options or {}).get("augment") or "standard"
    if augment not in AUGMENTS:
        raise ConfigError(f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    return augment


def augment_steps(info: DatasetInfo, size: int, options: dict) -> list:
    """The random part of the training transform on a uint8 image: crop + flip [+ brightness] [+ RandAugment]."""
    augment = augment_name(options)
    if augment == "none":
        return []
    small = (info.image_size or 224) <= SMALL_IMAGE      # CIFAR-style pad + crop; above: resized crops
    if small:
        # padding 4 at 32 px (the CIFAR standard), scaled with the image so 8x8 digits get 1
        steps: list = [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                 v2.RandomHorizontalFlip()]
    brightness = float(options.get("brightness_jitter") or 0.0)
    if brightness > 0:              # PyCIL's ColorJitter(brightness=63/255)
        steps.append(v2.ColorJitter(brightness=brightness))
    if bool(options.get("rand_augment")) or augment == "randaugment":
        steps.append(TimmRandAugment(size))
    return steps


def build_transform(info: DatasetInfo, train: bool, options: dict | None = None) -> v2.Compose:
    """Options: `augment` none|standard|randaugment (or `rand_augment: true`), `image_size` (resize),
    `brightness_jitter`, `normalize` dataset|pycil.

    Input: uint8 HWC numpy, PIL image or CHW uint8 tensor; output: normalised float32 CHW tensor."""
    options = options or {}
    native = info.image_size or 224
    size = int(options.get("image_size") or native)
    bicubic = InterpolationMode.BICUBIC     # DyTox/DeiT resize with bicubic
    mean, std = normalization(info, options)
    augment = augment_name(options)
    steps: list = [v2.ToImage()]
    if native <= SMALL_IMAGE:
        if size != native:
            steps.append(v2.Resize((size, size), interpolation=bicubic, antialias=True))
        if train:
            steps += augment_steps(info, size, options)
    elif train and augment != "none":
        steps += augment_steps(info, size, options)
    else:
        # the usual 256 -> 224 centre crop, scaled for other sizes
        steps += [v2.Resize(int(round(size * 256 / 224)), interpolation=bicubic, antialias=True),
                  v2.CenterCrop(size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
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
