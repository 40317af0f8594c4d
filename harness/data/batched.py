"""Training augmentations applied to a whole batch of uint8 images at once, on the batch's device.

Why: the per-image torchvision path (`build_transform`) runs in the DataLoader, on the CPU, one image at a time.
That is fine for a CPU model, but a GPU trains ResNet-32 or DyTox far faster than a few CPU cores can augment
images one by one. With `batched_augment` the Dataset only hands out the decoded uint8 pixels (CIFAR-sized
images are already decoded in memory; large images are decoded and resized-cropped per image, because they do
not have a common size before that), the loop moves the uint8 batch to the device (4x fewer bytes than float32)
and `BatchedTrainTransform` does the rest there:

    [resize]  ->  pad + random crop  ->  horizontal flip  ->  [RandAugment]  ->  to float, normalise
    (small images; large images: per-image random resized crop in the Dataset, then flip onwards)

Every random choice is drawn PER SAMPLE, with the same distributions as the per-image torchvision transforms
in `build_transform`, and each sample gets the same pixels the per-image transform would give it for the same
choices (tests/test_perf.py checks both).

RandAugment: torchvision's v2.RandAugment draws ONE op and sign per call, so applied to a batch it would give
every image the same op. Here each sample draws its own op and sign (uniform over torchvision's 14 ops, sign
+-1 with probability 1/2, for each of the `num_ops` rounds) and samples that drew the same (op, sign) are
transformed together with the same torchvision functional kernel the per-image path uses: at most 14 + 9
kernel calls per round whatever the batch size, and per-sample fidelity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as nnf
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from harness.data.base import DatasetInfo
from harness.data.image_folder import SMALL_IMAGE
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


# ---- RandAugment, per sample ----------------------------------------------------------------------------------

def _linspace(lo: float, hi: float) -> Callable[[int, int, int], torch.Tensor]:
    return lambda bins, h, w: torch.linspace(lo, hi, bins)


# name -> (magnitudes(num_bins, height, width) or None, signed): torchvision's RandAugment search space.
RANDAUGMENT_OPS: dict[str, tuple[Callable[[int, int, int], torch.Tensor] | None, bool]] = {
    "Identity": (None, False),
    "ShearX": (_linspace(0.0, 0.3), True),
    "ShearY": (_linspace(0.0, 0.3), True),
    "TranslateX": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins), True),
    "TranslateY": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins), True),
    "Rotate": (_linspace(0.0, 30.0), True),
    "Brightness": (_linspace(0.0, 0.9), True),
    "Color": (_linspace(0.0, 0.9), True),
    "Contrast": (_linspace(0.0, 0.9), True),
    "Sharpness": (_linspace(0.0, 0.9), True),
    "Posterize": (lambda bins, h, w: (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(), False),
    "Solarize": (_linspace(1.0, 0.0), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
OP_NAMES = tuple(RANDAUGMENT_OPS)


def apply_op(x: torch.Tensor, name: str, magnitude: float,
             interpolation: InterpolationMode = InterpolationMode.NEAREST) -> torch.Tensor:
    """One RandAugment op on uint8 images (..., C, H, W), with the kernels and arguments torchvision's
    RandAugment uses (fill 0). Every kernel works per image, so a batch gives each image its own result."""
    if name == "Identity":
        return x
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, interpolation=interpolation, fill=None,
                        shear=[shear, 0.0] if name == "ShearX" else [0.0, shear], center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return F.affine(x, angle=0.0, translate=shift, scale=1.0, interpolation=interpolation,
                        shear=[0.0, 0.0], fill=None)
    if name == "Rotate":
        return F.rotate(x, angle=magnitude, interpolation=interpolation, fill=None)
    if name == "Brightness":
        return F.adjust_brightness(x, brightness_factor=1.0 + magnitude)
    if name == "Color":
        return F.adjust_saturation(x, saturation_factor=1.0 + magnitude)
    if name == "Contrast":
        return F.adjust_contrast(x, contrast_factor=1.0 + magnitude)
    if name == "Sharpness":
        return F.adjust_sharpness(x, sharpness_factor=1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(x, bits=int(magnitude))
    if name == "Solarize":
        return F.solarize(x, threshold=255.0 * magnitude)
    if name == "AutoContrast":
        return F.autocontrast(x)
    if name == "Equalize":
        return F.equalize(x)
    raise ValueError(f"unknown RandAugment op {name!r}")


class BatchedRandAugment:
    """RandAugment(num_ops, magnitude, num_magnitude_bins) with an independent op and sign per sample.

    `__call__(x)` draws the choices; `apply(x, ops, signs)` applies given choices ((num_ops, N) op indices into
    OP_NAMES and (num_ops, N) bools, True = negative magnitude), so tests can compare with per-image results.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
                 interpolation: InterpolationMode = InterpolationMode.NEAREST) -> None:
        self.num_ops, self.magnitude, self.bins = int(num_ops), int(magnitude), int(num_magnitude_bins)
        self.interpolation = interpolation
        self._magnitudes: dict[tuple[str, int, int], float] = {}

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ops = torch.randint(len(OP_NAMES), (self.num_ops, n), generator=generator)
        signs = torch.rand((self.num_ops, n), generator=generator) <= 0.5     # as v2: rand() <= 0.5 -> negative
        return ops, signs

    def magnitude_of(self, name: str, height: int, width: int, negative: bool) -> float:
        key = (name, height, width)
        if key not in self._magnitudes:           # cached: one linspace per op and image size
            fn = RANDAUGMENT_OPS[name][0]
            self._magnitudes[key] = 0.0 if fn is None else float(fn(self.bins, height, width)[self.magnitude])
        value = self._magnitudes[key]
        return -value if RANDAUGMENT_OPS[name][1] and negative else value

    def apply(self, x: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"RandAugment expects uint8 images, got {x.dtype}")
        height, width = x.shape[-2:]
        x = x.contiguous()                      # our own copy: groups are written back in place
        if x.shape[0] == 0:
            return x
        for round_ops, round_signs in zip(ops.tolist(), signs.tolist()):
            groups: dict[tuple[int, bool], list[int]] = {}
            for i, (op, negative) in enumerate(zip(round_ops, round_signs)):
                name = OP_NAMES[op]
                if name == "Identity":
                    continue
                signed = RANDAUGMENT_OPS[name][1] and RANDAUGMENT_OPS[name][0] is not None
                groups.setdefault((op, bool(negative) and signed), []).append(i)
            for (op, negative), members in groups.items():
                name = OP_NAMES[op]
                idx = torch.tensor(members, device=x.device)
                out = apply_op(x.index_select(0, idx), name, self.magnitude_of(name, height, width, negative),
                               self.interpolation)
                x.index_copy_(0, idx, out)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        ops, signs = self.sample(x.shape[0], generator)
        return self.apply(x, ops, signs)


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
    rand_augment: BatchedRandAugment | None = None
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
        if self.rand_augment is not None:
            x = self.rand_augment(x, generator)
        return normalize(x, *self._mean_std(x.device))

    def describe(self) -> str:
        steps = [f"resize {self.resize}"] if self.resize else []
        if self.crop:
            steps.append(f"pad {self.padding} + random crop {self.crop}")
        if self.flip:
            steps.append("flip")
        if self.rand_augment is not None:
            steps.append(f"RandAugment n{self.rand_augment.num_ops} m{self.rand_augment.magnitude} (per sample)")
        return " -> ".join(steps + ["normalise"])


def build_batched_transform(info: DatasetInfo, options: dict | None = None) -> BatchedTrainTransform:
    """The batched equivalent of `build_transform(info, train=True, options)`: same steps, same parameters."""
    from harness.data.transforms import AUGMENTS

    options = options or {}
    augment = options.get("augment") or "standard"
    if augment not in AUGMENTS:
        raise ConfigError(f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    rand_augment = bool(options.get("rand_augment")) or augment == "randaugment"
    native = info.image_size or 224
    size = int(options.get("image_size") or native)
    tf = BatchedTrainTransform(mean=tuple(info.mean), std=tuple(info.std),
                               rand_augment=BatchedRandAugment(num_ops=2, magnitude=9) if rand_augment else None)
    if native <= SMALL_IMAGE:
        tf.resize = size if size != native else None
        if augment != "none":
            tf.crop, tf.padding, tf.flip = size, max(1, size // 8), True
        return tf
    # Large images: decoded from files of any size, so the random resized crop (which makes them one size)
    # stays per image, in the Dataset; flip onwards is batched.
    bicubic = InterpolationMode.BICUBIC
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
