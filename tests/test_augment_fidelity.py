"""The training transforms are the originals': timm's RandAugment `rand-m9-mstd0.5-inc1` exactly as DyTox built it
(ops, probabilities, magnitudes, fill colour, resampling), PyCIL's brightness jitter and normalisation constants,
and the batched path gives the same pixels as the per-image one for the same random draws."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import v2

from harness.data import DatasetInfo, build_transform, dataset_info
from harness.data.batched import adjust_brightness, build_batched_transform
from harness.data.transforms import TimmRandAugment, normalization, posterize_any_bits

CIFAR = dataset_info("cifar10")
# timm's "increasing" RandAugment set, as listed in timm.data.auto_augment (_RAND_INCREASING_TRANSFORMS)
INCREASING = {"AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _seed(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def test_randaugment_is_timms_m9_mstd05_inc1_as_dytox_built_it() -> None:
    ra = TimmRandAugment(32).transform
    assert ra.num_layers == 2 and ra.choice_weights is None          # 2 ops, drawn with replacement
    assert {op.name for op in ra.ops} == INCREASING                   # Invert, SolarizeAdd; no Identity
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 9, 0.5)
        assert op.kwargs["fillcolor"] == (124, 116, 104)              # timm's default (ImageNet) mean
        assert op.kwargs["resample"] == Image.BICUBIC                 # DyTox passed interpolation='bicubic'
    assert ra.ops[0].hparams["translate_const"] == int(32 * 0.45)
    assert TimmRandAugment(224).hparams["translate_const"] == 100


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_pipeline_equals_crop_flip_and_timm_randaugment_by_hand(seed: int) -> None:
    """Same seeds, same draws: our transform gives exactly the pixels of the original's pipeline built by hand
    (RandomCrop(32, 4) -> flip -> timm's RandAugment on PIL -> ToTensor -> Normalize)."""
    img = _images(1, seed=seed)[0]
    ours = build_transform(CIFAR, train=True, options={"augment": "randaugment"})
    hparams = dict(translate_const=14, img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
    theirs = rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
    for op in theirs.ops:            # with the Pillow of the original's time (see the posterize test)
        if op.name == "PosterizeIncreasing":
            op.aug_fn = posterize_any_bits
    crop, flip = v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()
    for draw in range(20):
        _seed(1000 * seed + draw)
        got = ours(img)
        _seed(1000 * seed + draw)
        pil = v2.functional.to_pil_image(flip(crop(v2.ToImage()(img))).as_subclass(torch.Tensor))
        expected = v2.functional.normalize(v2.functional.to_dtype(v2.functional.pil_to_tensor(theirs(pil)),
                                                                  torch.float32, scale=True),
                                           list(CIFAR.mean), list(CIFAR.std))
        assert torch.equal(got, expected)


def test_batched_path_falls_back_to_the_per_image_randaugment() -> None:
    """timm's RandAugment works on PIL images: with it, the batched transform keeps the whole random part per
    image and gives, for the same seeds, the per-image path's pixels."""
    options = {"augment": "randaugment"}
    per_image, batched = build_transform(CIFAR, True, options), build_batched_transform(CIFAR, options)
    assert batched.crop is None and not batched.flip and batched.per_image is not None
    x = _images(6, seed=5)
    _seed(3)
    expected = torch.stack([per_image(img) for img in x])
    _seed(3)
    raw = torch.stack([batched.per_image(img).as_subclass(torch.Tensor) for img in x])
    assert raw.dtype == torch.uint8
    assert torch.equal(batched(raw), expected)


def test_brightness_jitter_batched_equals_torchvision_per_image() -> None:
    x = _images(16, seed=7)
    factors = torch.empty(16).uniform_(1 - 63 / 255, 1 + 63 / 255)
    expected = torch.stack([v2.functional.adjust_brightness(img, float(f)) for img, f in zip(x, factors)])
    assert torch.equal(adjust_brightness(x, factors), expected)
    steps = build_transform(CIFAR, True, {"brightness_jitter": 63 / 255}).transforms
    jitter = [s for s in steps if isinstance(s, v2.ColorJitter)]
    assert len(jitter) == 1 and jitter[0].brightness == pytest.approx((1 - 63 / 255, 1 + 63 / 255))
    assert build_batched_transform(CIFAR, {"brightness_jitter": 63 / 255}).brightness == pytest.approx(63 / 255)
    assert not any(isinstance(s, v2.ColorJitter) for s in build_transform(CIFAR, True, {}).transforms)


def test_pycil_normalisation_constants() -> None:
    assert normalization(CIFAR, {}) == (CIFAR.mean, CIFAR.std)
    assert normalization(CIFAR, {"normalize": "pycil"})[1] == (0.2023, 0.1994, 0.2010)     # not the data's std
    assert normalization(dataset_info("cifar100"), {"normalize": "pycil"}) == (
        (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    norm = [s for s in build_transform(CIFAR, False, {"normalize": "pycil"}).transforms
            if isinstance(s, v2.Normalize)][0]
    assert tuple(norm.std) == (0.2023, 0.1994, 0.2010)
    with pytest.raises(Exception, match="pycil"):
        normalization(DatasetInfo("digits", 10, 8, (0.3,) * 3, (0.4,) * 3), {"normalize": "pycil"})


def test_posterize_at_the_maximum_magnitude_gives_black_as_the_originals_pillow() -> None:
    """PosterizeIncreasing keeps 4 - int(4 m / 10) bits: 1 bit at m9 and 0 bits when the magnitude noise hits the
    cap of 10. Pillow < 10 (the original's) returned black for 0 bits; newer Pillow raises, which would stop
    training about once every 50 RandAugment draws of that op."""
    ra = TimmRandAugment(32).transform
    (op,) = [o for o in ra.ops if o.name == "PosterizeIncreasing"]
    op.prob, op.magnitude_std, op.magnitude = 1.0, 0.0, 10
    img = v2.functional.to_pil_image(_images(1, seed=9)[0])
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 9
    assert set(np.unique(np.asarray(op(img)))) <= {0, 128}              # 1 bit kept


def test_per_image_copies_on_different_ranks_get_different_augmentations() -> None:
    """Every rank seeds its global generators alike at the start of a task; the loop gives each rank its own
    streams for the phase, so the copies of an image that repeated augmentation sends to two ranks are
    augmented differently by the per-image path too (timm's RandAugment draws from numpy and Python)."""
    from harness.data import ArrayData, TaskDataset
    from harness.core.loop import train_phase
    from harness.core.method import Method, PhaseConfig, TaskInfo
    from harness.core.runtime import RuntimeContext, seed_everything

    class Record(Method):
        def __init__(self) -> None:
            super().__init__({}, torch.device("cpu"))
            self.model, self.inputs = torch.nn.Linear(1, 2), []

        def training_step(self, batch, task, phase):
            self.inputs.append(batch[0].clone())
            return self.model(batch[0].mean((1, 2, 3))[:, None]).sum() * 0

    arr = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    data = TaskDataset(ArrayData(arr, np.arange(8) % 2, ["a", "b"]),
                       build_transform(CIFAR, True, {"augment": "randaugment"}))
    phase = PhaseConfig(epochs=1, batch_size=8, lr=0.0, sched="constant", repeated_aug=2)
    seen = []
    for rank in (0, 1):
        seed_everything(0)
        method = Record()
        train_phase(method, data, phase, TaskInfo(0, 1, (0, 1), 0, 2),
                    RuntimeContext(rank=rank, world_size=2, progress=False), seed=0)
        seen.append(method.inputs[0])
    assert not torch.allclose(seen[0], seen[1])     # same images (the copies), different augmentations
