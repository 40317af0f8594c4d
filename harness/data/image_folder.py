"""Image folders `train/<class>/*` and `test/<class>/*` (or `val/`), from a directory or a .zip read in place.

Small images (<= 64 px) are decoded once into a uint8 array and cached as .npz under the cache dir, keyed by
the source's size and mtime, so later loads take a fraction of a second. Larger images stay file paths
(members of a zip are extracted once into the cache dir) and are decoded lazily by the data loader.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from harness.data.base import ArrayData, cache_dir
from harness.errors import DataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
SMALL_IMAGE = 64          # images up to this side are decoded into memory
CACHE_VERSION = 1         # bump when the cached arrays' layout changes


class _Source:
    """The files of an image folder, from a directory or a zip, as relative posix names (`train/cat/1.jpg`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.is_file()
        if not (self.is_zip or path.is_dir()):
            raise DataError(f"image folder {path} not found: give a directory or a .zip with train/<class>/* "
                            "and test/<class>/*")
        self._files: list[str] | None = None
        self._zip: zipfile.ZipFile | None = None
        self.prefix = ""

    @property
    def files(self) -> list[str]:
        """Listed on first use: a cached zip is loaded without parsing its 60k-entry directory."""
        if self._files is None:
            if self.is_zip:
                try:
                    self._zip = zipfile.ZipFile(self.path)
                except (zipfile.BadZipFile, OSError) as exc:
                    raise DataError(f"{self.path} is not a readable zip file ({exc}); replace it with a valid "
                                    "archive") from None
                names = [n for n in self._zip.namelist() if not n.endswith("/")]
                self.prefix = _zip_prefix(names)   # archives often wrap everything in one top folder
                cut = len(self.prefix)
                self._files = sorted(n[cut:] for n in names if n.startswith(self.prefix))
            else:
                self._files = []
                for d in sorted({d for dirs in SPLIT_DIRS.values() for d in dirs}):
                    for base, _, fnames in os.walk(self.path / d):
                        rel = Path(base).relative_to(self.path).as_posix()
                        self._files += [f"{rel}/{f}" for f in fnames]
                self._files.sort()
        return self._files

    def read(self, name: str) -> bytes:
        if self.is_zip:
            _ = self.files          # listing opens the zip and finds its prefix
            return self._zip.read(self.prefix + name)
        return (self.path / name).read_bytes()

    def key(self) -> str:
        """Changes when the data does: size + mtime of the zip, or of every file of a directory."""
        h = hashlib.sha1(f"{CACHE_VERSION}:{self.path.resolve()}".encode())
        stats = [self.path.stat()] if self.is_zip else [(self.path / f).stat() for f in self.files]
        for st in stats:
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]


def _zip_prefix(names: list[str]) -> str:
    best = None
    for n in names:
        parts = n.split("/")
        if "train" in parts[:-2]:
            prefix = "/".join(parts[:parts.index("train")])
            prefix = prefix + "/" if prefix else ""
            if best is None or len(prefix) < len(best):
                best = prefix
                if not best:
                    break
    return best or ""


def _split_files(src: _Source, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Files of one split and their class ids; classes are the sorted folder names under train/."""
    tops: dict[str, dict[str, list[str]]] = {}
    for f in src.files:
        parts = f.split("/")
        if len(parts) >= 3 and os.path.splitext(f)[1].lower() in IMAGE_EXTS:
            tops.setdefault(parts[0], {}).setdefault(parts[1], []).append(f)
    train = tops.get("train", {})
    if not train:
        raise DataError(f"{src.path} has no images under train/<class>/: lay it out as train/<class>/*.jpg and "
                        "test/<class>/*.jpg")
    class_names = sorted(train)
    if split == "train":
        groups = train
    else:
        top = next((d for d in SPLIT_DIRS["test"] if d in tops), None)
        if top is None:
            raise DataError(f"{src.path} has no images under test/<class>/ (or val/<class>/): add the test split")
        groups = tops[top]
        unknown = sorted(set(groups) - set(class_names))
        if unknown:
            raise DataError(f"{src.path}: {top}/ has classes missing from train/ ({', '.join(unknown[:5])}); "
                            "use the same class folders in both splits")
    files, labels = [], []
    for label, name in enumerate(class_names):
        members = sorted(groups.get(name, []))
        files += members
        labels += [label] * len(members)
    return files, np.asarray(labels, dtype=np.int64), class_names


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for broken files
        raise DataError(f"cannot decode image {where} ({type(exc).__name__}); remove or replace it") from None


def _decode_all(src: _Source, files: list[str]) -> np.ndarray:
    first = _decode(src.read(files[0]), f"{src.path}:{files[0]}")
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, f in enumerate(files[1:], start=1):
        img = _decode(src.read(f), f"{src.path}:{f}")
        if img.shape != first.shape:
            raise DataError(f"{src.path}:{f} is {img.shape[1]}x{img.shape[0]} but {files[0]} is "
                            f"{first.shape[1]}x{first.shape[0]}: small images must all have the same size")
        out[i] = img
    return out


def _cache_file(src: _Source, split: str) -> Path:
    return cache_dir() / "decoded" / f"{src.path.stem}-{split}-{src.key()}.npz"


def _load_cached(path: Path) -> ArrayData | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return ArrayData(z["x"], z["y"], [str(n) for n in z["class_names"]])
    except Exception:  # noqa: BLE001 -- a missing or damaged cache is simply rebuilt
        return None


def _save_cached(path: Path, data: ArrayData) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, x=data.x, y=data.y, class_names=np.asarray(data.class_names))
        os.replace(tmp, path)    # atomic: parallel workers never read a half-written cache
    except OSError:
        pass                     # a read-only cache dir only costs speed


def _extract(src: _Source, files: list[str]) -> np.ndarray:
    """Large images in a zip: extract once into the cache dir; return their paths."""
    dest = cache_dir() / "extracted" / f"{src.path.stem}-{src.key()}"
    done = dest / f".complete-{hashlib.sha1('|'.join(files).encode()).hexdigest()[:12]}"
    if not done.exists():
        for f in files:
            target = dest / f
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read(f))
        done.touch()
    return np.asarray([str(dest / f) for f in files])


def probe_image_folder(path: Path) -> tuple[list[str], int]:
    """Class names and the larger side of the first training image (to pick transforms)."""
    src = _Source(path)
    files, _, class_names = _split_files(src, "train")
    with Image.open(io.BytesIO(src.read(files[0]))) as img:
        return class_names, max(img.size)


def load_image_folder(path: Path, split: str, decode: bool | None = None) -> ArrayData:
    """`decode`: True keeps pixels in memory, False keeps paths, None decides from the first image's size."""
    src = _Source(path)
    if decode is not False and src.is_zip:    # a zip's cache key needs no listing: try the cache first
        cached = _load_cached(_cache_file(src, split))
        if cached is not None:
            return cached
    files, labels, class_names = _split_files(src, split)
    if not files:
        raise DataError(f"{path} has no images in its {split} split")
    if decode is None:
        with Image.open(io.BytesIO(src.read(files[0]))) as img:
            decode = max(img.size) <= SMALL_IMAGE
    if not decode:
        x = _extract(src, files) if src.is_zip else np.asarray([str(path / f) for f in files])
        return ArrayData(x, labels, class_names)
    cached_path = _cache_file(src, split)
    cached = _load_cached(cached_path)
    if cached is not None and np.array_equal(cached.y, labels):
        return cached
    data = ArrayData(_decode_all(src, files), labels, class_names)
    _save_cached(cached_path, data)
    return data
