"""Pre-flight dataset checks (`check_dataset`) and the digest of the data a trial reads (`dataset_fingerprint`).

Both are cheap. The check decodes a sample (the first image of a few evenly spread classes per split), never the
whole dataset, and writes nothing. The fingerprint reads listings, sizes and a zip's central directory (or the
md5 of CIFAR's pickles), never mtimes, so a copied dataset keeps its digest at the same location.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import zlib
from pathlib import Path
from typing import Callable

from harness.data import cifar, digits
from harness.data.base import ROOT
from harness.data.image_folder import SMALL_IMAGE, ImageSource, decode_file, decode_path, split_files
from harness.data.imagenet import SPLIT_FILES, find_split_file, load_imagenet100, require_imagenet1000
from harness.data.registry import (cifar10_jpeg_source, cifar_missing_error, cifar_root, dataset_info,
                                   image_folder_path, imagenet_root, mini_zip)
from harness.errors import DataError

SAMPLED_CLASSES = 12                       # per split: the first image of this many classes is decoded
PATHLESS = ("cifar10-mini", "digits")      # datasets that do not read data_path
CIFAR = ("cifar10", "cifar100")
_MEMO: dict[tuple, object] = {}            # per-process: (what, file identity) -> digest of a large file


# ---- check ------------------------------------------------------------------------------------------------

def check_dataset(config: dict, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Raise DataError/ConfigError (one line naming the file and what to do) when the dataset of `config` is
    missing or unreadable. With `download` and CIFAR missing it passes: downloading is the trial's job.
    `splits`: whose images are opened (a sweep never opens the test split's)."""
    name, data_path, download = config["dataset"], config.get("data_path"), bool(config.get("download"))
    dataset_info(name)                     # unknown name -> ConfigError
    if data_path and not Path(data_path).expanduser().exists() and not (name in CIFAR and download):
        if name in PATHLESS:
            hint = f"dataset {name} does not read --data-path: drop the option"
        elif name in CIFAR:
            hint = f"pass the folder holding {cifar.LAYOUTS[name][0]}/, or add --download to fetch it there"
        else:
            hint = f"pass the folder (or .zip) that holds the {name} files"
        raise DataError(f"--data-path {data_path} does not exist; {hint}")
    _CHECKS[name](name, data_path, download, splits)


def _check_cifar(name: str, data_path: str | None, download: bool, splits: tuple[str, ...]) -> None:
    root = cifar_root(data_path)
    missing = cifar.missing_files(name, root)
    if missing:
        if download:
            return
        raise cifar_missing_error(name, root, missing)
    cifar.check_cifar_files(name, root)


def _sample(count: int) -> list[int]:
    """Up to SAMPLED_CLASSES indices spread evenly over range(count), the first always included."""
    k = min(count, SAMPLED_CLASSES)
    return sorted({round(i * (count - 1) / max(k - 1, 1)) for i in range(k)})


def _check_image_folder(path: Path, splits: tuple[str, ...]) -> None:
    """The splits laid out right, no unsafe zip members, and the first image of sampled classes decodes (at
    one size, for small images: the loader stacks them)."""
    src = ImageSource(path)
    first = None
    for split in splits:
        files, labels, class_names = split_files(src, split)
        if not files:
            raise DataError(f"{path} has no images in its {split} split; add test/<class>/* images")
        starts = {int(label): i for i, label in reversed(list(enumerate(labels)))}   # class -> its first file
        present = sorted(starts)
        for c in _sample(len(present)):
            name = files[starts[present[c]]]
            shape = decode_file(src, name).shape
            if first is None:
                first = (name, shape)
            elif max(first[1][:2]) <= SMALL_IMAGE and shape != first[1]:
                raise DataError(f"{src.where(name)} is {shape[1]}x{shape[0]} but {first[0]} is "
                                f"{first[1][1]}x{first[1][0]}: small images must all have the same size; resize "
                                "or delete it")


def _check_image_dataset(name: str, data_path: str | None, download: bool, splits: tuple[str, ...]) -> None:
    if name == "cifar10-mini":
        _check_image_folder(mini_zip(), splits)
    elif name == "cifar10-jpeg":
        _check_image_folder(cifar10_jpeg_source(data_path), splits)
    elif name == "imagefolder":
        _check_image_folder(image_folder_path(data_path), splits)
    else:   # imagenet1000
        root = imagenet_root(name, data_path)
        require_imagenet1000(root)
        _check_image_folder(root, splits)


def _check_imagenet100(name: str, data_path: str | None, download: bool, splits: tuple[str, ...]) -> None:
    root = imagenet_root(name, data_path)
    for split in splits:
        data = load_imagenet100(root, split)      # split files parse, the first listed image exists
        starts = {int(label): i for i, label in reversed(list(enumerate(data.y)))}
        present = sorted(starts)
        for c in _sample(len(present)):
            decode_path(data.x[starts[present[c]]])


def _check_digits(name: str, data_path: str | None, download: bool, splits: tuple[str, ...]) -> None:
    """The digits file inside the scikit-learn wheel must read as gzip; importing scikit-learn itself costs
    most of a second, so that only happens when the file is not where scikit-learn keeps it today."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset digits needs scikit-learn: pip install scikit-learn")
    shipped = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    try:
        if shipped.is_file():
            with gzip.open(shipped) as f:
                f.read(1 << 16)
            return
        from sklearn.datasets import load_digits
        load_digits()
    except Exception as exc:  # noqa: BLE001 -- a broken scikit-learn install: say so in one line
        raise DataError(f"scikit-learn's digits cannot be loaded ({type(exc).__name__}: {exc}); reinstall "
                        "scikit-learn (pip install --force-reinstall scikit-learn)") from None


_CHECKS: dict[str, Callable[[str, str | None, bool, tuple[str, ...]], None]] = {
    "cifar10": _check_cifar, "cifar100": _check_cifar, "cifar10-jpeg": _check_image_dataset,
    "cifar10-mini": _check_image_dataset, "imagefolder": _check_image_dataset,
    "imagenet1000": _check_image_dataset, "imagenet100": _check_imagenet100, "digits": _check_digits}


# ---- fingerprint ------------------------------------------------------------------------------------------

def dataset_fingerprint(config: dict) -> str:
    """12 hex digits identifying the data a trial reads: the dataset's name, its resolved location and its
    files (names + sizes; a zip's member names, sizes and CRCs; CIFAR's pickles by md5; digits by the
    scikit-learn version; the shipped mini CIFAR-10 by size + CRC). Adding, removing or resizing a file, or
    pointing --data-path elsewhere, changes it; copying the same files over the same location does not."""
    name, data_path, download = config["dataset"], config.get("data_path"), bool(config.get("download"))
    dataset_info(name)
    lines = [f"dataset {name}", *_FINGERPRINTS[name](name, data_path, download)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def _memo(what: str, path: Path, compute: Callable[[], object]):
    """Digests of large files are computed once per process while the file is unchanged."""
    st = path.stat()
    key = (what, str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def _md5(path: Path) -> str:
    h = hashlib.md5()     # noqa: S324 -- the digest the official CIFAR release publishes, not for security
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cifar_lines(name: str, data_path: str | None, download: bool) -> list[str]:
    """md5 per pickle; files still to be downloaded count as the official release (torchvision checks the md5
    after downloading), so the fingerprint is the same before and after --download."""
    folder = cifar.cifar_dir(name, cifar_root(data_path)).expanduser().resolve()
    _, train, test, _, meta, _ = cifar.LAYOUTS[name]
    official = None
    lines = [f"location {folder}"]
    for fname in [*train, *test, meta]:
        path = folder / fname
        if path.is_file():
            digest = _memo("md5", path, lambda path=path: _md5(path))
        elif download:
            official = official or cifar.official_md5s(name)
            digest = official[fname]
        else:
            digest = "missing"
        lines.append(f"{fname} md5 {digest}")
    return lines


def _zip_members(path: Path) -> list[str]:
    src = ImageSource(path)
    _ = src.files                                   # opens the archive; a broken one is a DataError
    return [f"{i.filename} {i.file_size} {i.CRC:08x}" for i in src.archive.infolist() if not i.is_dir()]


def _folder_lines(path: Path) -> list[str]:
    path = path.expanduser().resolve()
    if path.is_file():
        return [f"location {path}", *_memo("zip", path, lambda: _zip_members(path))]
    src = ImageSource(path)
    return [f"location {path}", *(f"{f} {(path / f).stat().st_size}" for f in src.files)]


def _image_lines(name: str, data_path: str | None, download: bool) -> list[str]:
    if name == "cifar10-mini":
        path = mini_zip()
        crc = _memo("crc", path, lambda: zlib.crc32(path.read_bytes()))
        return [f"shipped {path.relative_to(ROOT).as_posix()} {path.stat().st_size} {crc:08x}"]
    if name == "cifar10-jpeg":
        return _folder_lines(cifar10_jpeg_source(data_path))
    if name == "imagefolder":
        return _folder_lines(image_folder_path(data_path))
    return _folder_lines(imagenet_root(name, data_path))      # imagenet1000


def _imagenet100_lines(name: str, data_path: str | None, download: bool) -> list[str]:
    """The split files say which images are read (and their labels); files outside them do not count."""
    root = imagenet_root(name, data_path).resolve()
    lines = [f"location {root}"]
    for split in SPLIT_FILES:
        path = find_split_file(root, split, None)
        lines.append(f"{split} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return lines


def _digits_lines(name: str, data_path: str | None, download: bool) -> list[str]:
    return [f"scikit-learn {importlib.metadata.version('scikit-learn')}",
            f"split test_fraction={digits.TEST_FRACTION} seed={digits.SPLIT_SEED}"]


_FINGERPRINTS: dict[str, Callable[[str, str | None, bool], list[str]]] = {
    "cifar10": _cifar_lines, "cifar100": _cifar_lines, "cifar10-jpeg": _image_lines, "cifar10-mini": _image_lines,
    "imagefolder": _image_lines, "imagenet1000": _image_lines, "imagenet100": _imagenet100_lines,
    "digits": _digits_lines}
