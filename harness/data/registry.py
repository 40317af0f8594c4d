"""Dataset names -> descriptions and loaders: `DATASETS`, `dataset_info`, `load_dataset`."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from harness.data import cifar
from harness.data.base import (IMAGENET_MEAN, IMAGENET_STD, SHARED_DATA, SHIPPED_DATA, ArrayData, DatasetInfo,
                               check_split, default_data_dir)
from harness.data.digits import load_digits_split
from harness.data.image_folder import SMALL_IMAGE, load_image_folder, probe_image_folder
from harness.data.imagenet import load_imagenet100, load_imagenet1000
from harness.errors import ConfigError, DataError

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_NAMES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())

_C10 = dict(num_classes=10, image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
            class_names=CIFAR10_NAMES)
DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo("cifar10", **_C10, description="CIFAR-10, official python pickles"),
    DatasetInfo("cifar10-jpeg", **_C10, description="CIFAR-10 as JPEGs in an image-folder zip (../shared/data)"),
    DatasetInfo("cifar10-mini", **_C10, description="300 train / 100 test CIFAR-10 JPEGs per class, shipped"),
    # CIFAR-100 statistics as DyTox uses them.
    DatasetInfo("cifar100", 100, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), CIFAR100_NAMES,
                "CIFAR-100, official python pickles, fine labels"),
    DatasetInfo("imagefolder", None, None, IMAGENET_MEAN, IMAGENET_STD, None,
                "train/<class>/*, test/<class>/* from a folder or a .zip"),
    DatasetInfo("imagenet100", 100, 224, IMAGENET_MEAN, IMAGENET_STD, None,
                "ImageNet-100: image folders + DyTox's train_100.txt / val_100.txt"),
    DatasetInfo("imagenet1000", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, None, "ImageNet-1000: train/ and val/"),
    DatasetInfo("digits", 10, 8, (0.3054,) * 3, (0.3760,) * 3, tuple(str(i) for i in range(10)),
                "scikit-learn digits, 8x8 grey as RGB, stratified 80/20 split"),
]}
MINI_ZIP = SHIPPED_DATA / "cifar10-mini.zip"


def dataset_info(name: str, data_path: str | None = None) -> DatasetInfo:
    """`imagefolder` learns its classes and image size from `data_path` when given."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if name == "imagefolder" and data_path:
        names, side = probe_image_folder(Path(data_path).expanduser())
        info = replace(info, num_classes=len(names), class_names=tuple(names),
                       image_size=side if side <= SMALL_IMAGE else 224)
    return info


def cifar10_jpeg_source(data_path: str | None) -> Path:
    base = Path(data_path).expanduser() if data_path else SHARED_DATA
    for cand in (base, base / "cifar10-jpeg.zip", base / "cifar10-jpeg"):
        if (cand.suffix == ".zip" and cand.is_file()) or (cand / "train").is_dir():
            return cand
    raise DataError(f"cifar10-jpeg not found: expected {base / 'cifar10-jpeg.zip'}; put the zip there or pass "
                    "--data-path DIR holding cifar10-jpeg.zip")


def cifar_root(data_path: str | None) -> Path:
    return Path(data_path).expanduser() if data_path else default_data_dir()


def cifar_missing_error(name: str, root: Path, missing: list[str]) -> DataError:
    folder = cifar.cifar_dir(name, root)
    return DataError(f"{name} not found: expected {folder}/ with {', '.join(missing)}; pass --download to fetch "
                     f"it, or --data-path DIR holding {cifar.LAYOUTS[name][0]}/")


def mini_zip() -> Path:
    if not MINI_ZIP.is_file():
        raise DataError(f"{MINI_ZIP} is missing from the checkout; rebuild it with "
                        "python benchmarks/data/make_cifar10_mini.py")
    return MINI_ZIP


def image_folder_path(data_path: str | None) -> Path:
    if not data_path:
        raise ConfigError("dataset imagefolder needs --data-path: a folder or .zip with train/<class>/* and "
                          "test/<class>/*")
    return Path(data_path).expanduser()


def imagenet_root(name: str, data_path: str | None) -> Path:
    return Path(data_path).expanduser() if data_path else default_data_dir() / name


def _load_cifar(name: str, data_path: str | None, split: str, download: bool) -> ArrayData:
    root = cifar_root(data_path)
    missing = cifar.missing_files(name, root)
    if missing and download:
        cifar.download(name, root)
        missing = cifar.missing_files(name, root)
    if missing:
        raise cifar_missing_error(name, root, missing)
    return cifar.load_cifar(name, root, split)


def load_dataset(name: str, data_path: str | None, split: str, download: bool = False, *,
                 decode: bool | None = None, split_dir: str | None = None) -> ArrayData:
    """One split ('train' or 'test') of a dataset, with ORIGINAL class ids.

    `decode` (image folders): force keeping pixels (True) or paths (False). `split_dir`: where ImageNet-100's
    split files are, when not in data_path or data_path/imagenet100_splits."""
    info = dataset_info(name)
    split = check_split(split)
    if name in ("cifar10", "cifar100"):
        data = _load_cifar(name, data_path, split, download)
    elif name == "cifar10-jpeg":
        data = load_image_folder(cifar10_jpeg_source(data_path), split, decode)
    elif name == "cifar10-mini":
        data = load_image_folder(mini_zip(), split, decode)
    elif name == "imagefolder":
        data = load_image_folder(image_folder_path(data_path), split, decode)
    elif name in ("imagenet100", "imagenet1000"):
        root = imagenet_root(name, data_path)
        if name == "imagenet100":
            data = load_imagenet100(root, split, Path(split_dir).expanduser() if split_dir else None)
        else:
            data = load_imagenet1000(root, split)
    else:  # digits
        data = load_digits_split(split)
    if info.num_classes is not None and len(data.class_names) != info.num_classes:
        raise DataError(f"{name} ({split}) has {len(data.class_names)} classes, expected {info.num_classes}; "
                        "check --data-path")
    return data
