"""Training augmentations applied to a whole batch of uint8 images at once, on the batch's device.

Why: the per-image torchvision path (`build_transform`) runs in the DataLoader, on the CPU, one image at a time.
That is fine for a CPU model, but a GPU trains ResNet-32 or DyTox far faster than a few CPU cores can augment
images one by one. With `batched_augment` the Dataset only hands out the decoded uint8 pixels (CIFAR-sized
images are already decoded in memory; large images are decoded and resized-cropped per image, because they do
not have a common size before that), the loop moves the uint8 batch to the device (4x fewer bytes than float32)
and `BatchedTrainTransform` does the rest there:

    [resize]  ->  pad + random crop  ->  horizontal flip  ->  [brightness jitter]  ->  to float, normalise
    (small images; large images: per-image random resized crop in the Dataset, then flip onwards)

Every random choice is drawn PER SAMPLE, with the same distributions as the per-image torchvision transforms
in `build_transform`, and each sample gets the same pixels the per-image transform would give it for the same
choices (tests/test_perf.py checks both).

RandAugment is timm's `rand-m9-mstd0.5-inc1` (what DyTox trained with), which works on PIL images one at a time;
no batched kernel reproduces its PIL operations, so with RandAugment the whole random part (crop, flip, jitter,
RandAugment) stays per image in the Dataset -- exactly the per-image path -- and only the conversion to float and
the normalisation run batched on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as nnf
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from harness.data.base import DatasetInfo
from harness.data.image_folder import SMALL_IMAGE
from harness.data.transforms import augment_name, augment_steps, normalization
from harness.errors import ConfigError

# ---- crop, flip, normalise ----------------------------------------------------------------------------------


def random_crop_params(n: int, height: int, width: int, size: int, padding: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (top, left) offsets into the padded image, uniform in [0, H + 2p - size] like v2.RandomCrop.
    Drawn on the CPU (tiny), so a GPU batch needs no synchronisation to use them."""
    top = torch.randint(0, height + 2 * padding - size + 1, (n,), generator=generator)
    left = torch.randint(0, width + 2 * padding - size + 1, (n,), generator=generator)
    return top, left


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, padding: int,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-pad every image by `padding`, cut a `size` x `size` window at (top[i], left[i]) of the padded image,
    and mirror it horizontally where flip[i]: one gather for the whole batch (the flip is folded into the
    column indices, so it costs nothing). x: (N, C, H, W) any dtype -> (N, C, size, size)."""
    n = x.shape[0]
    if padding:
        x = nnf.pad(x, (padding, padding, padding, padding))          # constant 0, as v2.RandomCrop(fill=0)
    steps = torch.arange(size, device=x.device)
    top, left = top.to(x.device), left.to(x.device)
    rows = top[:, None] + steps                                          # (N, size)
    if flip is not None:
        flip = flip.to(x.device)
        cols = left[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)
    else:
        cols = left[:, None] + steps
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice: result (N, size, size, C), a channels-last view back.
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where flip[i] (N,) bool."""
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std, with the same operations as v2.ToDtype(scale=True) and
    v2.Normalize, so the result is bit-identical to the per-image path."""
    out = x.to(torch.float32).mul_(1.0 / 255)
    return out.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def adjust_brightness(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """uint8 images times a per-sample factor, clamped and truncated back to uint8: torchvision's
    adjust_brightness (a blend with black) for each image, in one operation."""
    out = x.mul(factors.to(x.device, torch.float32).view(-1, 1, 1, 1))
    return out.clamp_(0, 255).to(torch.uint8)


# ---- the training transform ---------------------------------------------------------------------------------

@dataclass
class BatchedTrainTransform:
    """Device-side half of the training transform: uint8 (N, C, H, W) on any device -> normalised float32.

    `per_image` is the CPU half the Dataset applies to each image first (None for in-memory images of one size;
    ToImage + random resized crop for large images, which have no common size before it).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None            # small images shown at another size (bicubic, antialias)
    crop: int | None = None              # pad + random crop to this side
    padding: int = 0
    flip: bool = False
    brightness: float = 0.0              # ColorJitter(brightness=b): factor uniform in [max(0, 1 - b), 1 + b]
    per_image: Callable | None = None

    def __post_init__(self) -> None:
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device),
                                   torch.tensor(self.std, dtype=torch.float32, device=device))
        return self._stats[device]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise TypeError(f"batched augmentation expects a uint8 (N, C, H, W) batch, got {x.dtype} "
                            f"{tuple(x.shape)}: the Dataset must return raw images (batched_augment)")
        n = x.shape[0]
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.resize(x, [self.resize, self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else None    # v2: rand(1) < p
        if self.crop is not None:
            top, left = random_crop_params(n, x.shape[-2], x.shape[-1], self.crop, self.padding, generator)
            x = crop_flip(x, top, left, self.crop, self.padding, flips)
        elif flips is not None:
            x = hflip(x, flips)
        if self.brightness > 0:
            low = max(0.0, 1.0 - self.brightness)
            factors = torch.empty(n).uniform_(low, 1.0 + self.brightness, generator=generator)
            x = adjust_brightness(x, factors)
        return normalize(x, *self._mean_std(x.device))

    def describe(self) -> str:
        steps = [f"resize {self.resize}"] if self.resize else []
        if self.crop:
            steps.append(f"pad {self.padding} + random crop {self.crop}")
        if self.flip:
            steps.append("flip")
        if self.brightness:
            steps.append(f"brightness {self.brightness:g}")
        if self.per_image is not None:
            steps.insert(0, "per image: " + ", ".join(type(t).__name__ for t in self.per_image.transforms[1:]))
        return " -> ".join(steps + ["normalise"])


def build_batched_transform(info: DatasetInfo, options: dict | None = None) -> BatchedTrainTransform:
    """The batched equivalent of `build_transform(info, train=True, options)`: same steps, same parameters."""
    options = options or {}
    augment = augment_name(options)
    native = info.image_size or 224
    size = int(options.get("image_size") or native)
    mean, std = normalization(info, options)
    tf = BatchedTrainTransform(mean=tuple(mean), std=tuple(std))
    bicubic = InterpolationMode.BICUBIC
    small = native <= SMALL_IMAGE
    randaugment = augment != "none" and (bool(options.get("rand_augment")) or augment == "randaugment")
    if randaugment:
        # timm's PIL RandAugment has no batched twin: the random part stays per image (the module docstring).
        resize = [v2.Resize((size, size), interpolation=bicubic, antialias=True)] if small and size != native else []
        tf.per_image = v2.Compose([v2.ToImage(), *resize, *augment_steps(info, size, options)])
        return tf
    if augment != "none":
        tf.brightness = float(options.get("brightness_jitter") or 0.0)
    if small:
        tf.resize = size if size != native else None
        if augment != "none":
            tf.crop, tf.padding, tf.flip = size, max(1, size // 8), True
        return tf
    # Large images: decoded from files of any size, so the random resized crop (which makes them one size)
    # stays per image, in the Dataset; flip onwards is batched.
    if augment != "none":
        tf.per_image = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True)])
        tf.flip = True
    else:
        tf.per_image = v2.Compose([v2.ToImage(), v2.Resize(int(round(size * 256 / 224)), interpolation=bicubic,
                                                           antialias=True), v2.CenterCrop(size)])
    return tf


def resolve_batched_augment(option, device: torch.device) -> bool:
    """`batched_augment`: auto (on when training on a GPU, where per-image CPU augmentation falls behind) |
    true | false."""
    if option in (None, "auto"):
        return device.type == "cuda"
    if isinstance(option, str):
        if option.lower() in ("true", "on", "yes", "1"):
            return True
        if option.lower() in ("false", "off", "no", "0"):
            return False
        raise ConfigError(f"batched_augment must be auto, true or false, got {option!r}")
    return bool(option)
