"""Image folders `train/<class>/*` and `test/<class>/*` (or `val/`), from a directory or a .zip read in place.

Small images (<= 64 px) are decoded once into a uint8 array and cached as .npz under the cache dir, keyed by
the source's size and mtime, so later loads take a fraction of a second. Larger images stay file paths
(members of a zip are extracted once into the cache dir) and are decoded lazily by the data loader.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
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


class ImageSource:
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
                infos = self._zip.infolist()
                for info in infos:
                    refuse_unsafe_member(self.path, info)
                names = [i.filename for i in infos if not i.is_dir()]
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

    @property
    def archive(self) -> zipfile.ZipFile:
        """The open zip (listing it first: that checks every member name)."""
        _ = self.files
        return self._zip

    def read(self, name: str) -> bytes:
        """The bytes of one file; a damaged zip member or an unreadable file is a DataError naming both."""
        if self.is_zip:
            _ = self.files          # listing opens the zip and finds its prefix
            try:
                return self._zip.read(self.prefix + name)
            except Exception as exc:  # noqa: BLE001 -- BadZipFile (CRC), zlib.error, EOFError: a damaged archive
                raise DataError(f"cannot read {self.prefix + name} from {self.path} ({type(exc).__name__}: {exc}); "
                                "the archive is damaged: replace it with a good copy") from None
        try:
            return (self.path / name).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {self.path / name} ({type(exc).__name__}: {exc.strerror or exc}); "
                            "fix its permissions, or replace or delete it") from None

    def where(self, name: str) -> str:
        """How error messages name a file: `archive.zip:member` or the file's path."""
        return f"{self.path}:{self.prefix + name}" if self.is_zip else str(self.path / name)

    def key(self) -> str:
        """Changes when the data does: size + mtime of the zip, or of every file of a directory."""
        h = hashlib.sha1(f"{CACHE_VERSION}:{self.path.resolve()}".encode())
        stats = [self.path.stat()] if self.is_zip else [(self.path / f).stat() for f in self.files]
        for st in stats:
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]


def unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could write outside the destination, or None when it is safe."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in parts:
        return "a path with a '..' component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def refuse_unsafe_member(archive: Path, info: zipfile.ZipInfo) -> None:
    """Zip-slip guard: members that could escape the extraction folder stop the run before anything is written."""
    reason = unsafe_member_reason(info)
    if reason is not None:
        raise DataError(f"{archive} contains {info.filename!r}, {reason}; refusing to read this archive: remove "
                        "that member or re-create the zip with relative paths and no links")


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


def split_files(src: ImageSource, split: str) -> tuple[list[str], np.ndarray, list[str]]:
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
        raise DataError(f"cannot decode image {where} ({type(exc).__name__}); replace it with a good copy or "
                        "delete it") from None


def decode_file(src: ImageSource, name: str) -> np.ndarray:
    """One image of the source as uint8 HWC RGB; a broken file is a DataError naming the folder/zip and file."""
    return _decode(src.read(name), src.where(name))


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as an RGB PIL image (the data loader's lazy path); a broken file is a DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for broken files
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}); replace it with a good copy or "
                        "delete it") from None


def decode_path(path: str | Path) -> np.ndarray:
    """An image file outside any ImageSource (ImageNet-100's listed files)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc.strerror or exc}); put the file "
                        "back, or fix its permissions") from None
    return _decode(data, str(path))


def _decode_all(src: ImageSource, files: list[str]) -> np.ndarray:
    first = decode_file(src, files[0])
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, f in enumerate(files[1:], start=1):
        img = decode_file(src, f)
        if img.shape != first.shape:
            raise DataError(f"{src.path}:{f} is {img.shape[1]}x{img.shape[0]} but {files[0]} is "
                            f"{first.shape[1]}x{first.shape[0]}: small images must all have the same size")
        out[i] = img
    return out


def _cache_file(src: ImageSource, split: str) -> Path:
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


def _extract(src: ImageSource, files: list[str]) -> np.ndarray:
    """Large images in a zip: extract once into the cache dir; return their paths."""
    dest = cache_dir() / "extracted" / f"{src.path.stem}-{src.key()}"
    done = dest / f".complete-{hashlib.sha1('|'.join(files).encode()).hexdigest()[:12]}"
    if not done.exists():
        root = dest.resolve()
        for f in files:
            target = dest / f
            refuse_unsafe_member(src.path, src.archive.getinfo(src.prefix + f))
            if not target.resolve().is_relative_to(root):   # second line of defence: never write outside dest
                raise DataError(f"{src.path} member {src.prefix + f!r} would be written outside {dest}; "
                                "re-create the zip with relative paths")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read(f))
        done.touch()
    return np.asarray([str(dest / f) for f in files])


def probe_image_folder(path: Path) -> tuple[list[str], int]:
    """Class names and the larger side of the first training image (to pick transforms)."""
    src = ImageSource(path)
    files, _, class_names = split_files(src, "train")
    return class_names, image_side(src, files[0])


def image_side(src: ImageSource, name: str) -> int:
    """The larger side of one image, read from its header when the header is sound (no full decode)."""
    try:
        with Image.open(io.BytesIO(src.read(name))) as img:
            return max(img.size)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for broken files
        raise DataError(f"cannot decode image {src.where(name)} ({type(exc).__name__}); replace it with a good "
                        "copy or delete it") from None


def load_image_folder(path: Path, split: str, decode: bool | None = None) -> ArrayData:
    """`decode`: True keeps pixels in memory, False keeps paths, None decides from the first image's size."""
    src = ImageSource(path)
    if decode is not False and src.is_zip:    # a zip's cache key needs no listing: try the cache first
        cached = _load_cached(_cache_file(src, split))
        if cached is not None:
            return cached
    files, labels, class_names = split_files(src, split)
    if not files:
        raise DataError(f"{path} has no images in its {split} split")
    if decode is None:
        decode = image_side(src, files[0]) <= SMALL_IMAGE
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
