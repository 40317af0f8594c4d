"""CIFAR-10 / CIFAR-100 in the official python-pickle layout (what torchvision and the authors' site ship)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from harness.data.base import ArrayData
from harness.errors import DataError

# name -> (folder, train files, test files, labels key, meta file, class names key)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                "batches.meta", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """The official files hold dicts of bytes, lists and numpy arrays: refuse any other global, so a
    tampered file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()   # bytes: the files were written by Python 2
    except Exception as exc:  # noqa: BLE001 -- any failure means the file is not an official CIFAR pickle
        raise DataError(f"{path} is not a valid CIFAR pickle ({type(exc).__name__}: {exc}); "
                        "delete it and download the official files again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a valid CIFAR pickle (expected a dict); download the official files again")
    return obj


def cifar_dir(name: str, data_path: Path) -> Path:
    """Accept the parent folder (torchvision's `root`) or the extracted folder itself."""
    folder = LAYOUTS[name][0]
    return data_path if data_path.name == folder else data_path / folder


def missing_files(name: str, data_path: Path) -> list[str]:
    folder, train, test, _, meta, _ = LAYOUTS[name]
    d = cifar_dir(name, data_path)
    return [f for f in [*train, *test, meta] if not (d / f).is_file()]


def download(name: str, data_path: Path) -> None:
    """Fetch the official archive with torchvision (it checks the md5 and extracts the pickles)."""
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        data_path.mkdir(parents=True, exist_ok=True)
        cls(root=str(data_path), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 -- network or disk failure: tell the user what to do
        raise DataError(f"could not download {name} into {data_path} ({type(exc).__name__}: {exc}); put the "
                        f"official {LAYOUTS[name][0]}/ folder there yourself") from None


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images HWC uint8, labels) of one official batch file."""
    batch = _unpickle(path)
    try:
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path} does not have the official CIFAR layout ({type(exc).__name__}: {exc}); "
                        "download the official files again") from None
    if len(x) != len(y):
        raise DataError(f"{path} has {len(x)} images but {len(y)} labels; download the official files again")
    return x.transpose(0, 2, 3, 1), y     # the files store planes (C, H, W); we keep HWC


def _read_class_names(path: Path, names_key: bytes) -> list[str]:
    names = _unpickle(path).get(names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{path} has no {names_key.decode()} list; download the official files again")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _looks_complete(path: Path) -> bool:
    """A pickle ends with the STOP opcode '.': a truncated or overwritten file almost never does."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"."
    except OSError:
        return False


def check_cifar_files(name: str, data_path: Path) -> None:
    """Cheap pre-flight: every file ends like a pickle; the class-name file and the first training batch are read
    in full (restricted unpickler) and must have the official layout."""
    _, train, test, label_key, meta, names_key = LAYOUTS[name]
    d = cifar_dir(name, data_path)
    for fname in [*train, *test, meta]:
        if not _looks_complete(d / fname):
            raise DataError(f"{d / fname} is truncated or not a pickle; delete it and download the official "
                            "files again")
    class_names = _read_class_names(d / meta, names_key)
    _, y = _read_batch(d / train[0], label_key)
    if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
        raise DataError(f"{d / train[0]} has labels outside 0..{len(class_names) - 1}; download the official "
                        "files again")


def official_md5s(name: str) -> dict[str, str]:
    """File name -> md5 of the official release, as torchvision verifies it after a download."""
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    return {**{f: md5 for f, md5 in cls.train_list + cls.test_list}, cls.meta["filename"]: cls.meta["md5"]}


def load_cifar(name: str, data_path: Path, split: str) -> ArrayData:
    folder, train, test, label_key, meta, names_key = LAYOUTS[name]
    d = cifar_dir(name, data_path)
    xs, ys = [], []
    for fname in train if split == "train" else test:
        x, y = _read_batch(d / fname, label_key)
        xs.append(x)
        ys.append(y)
    class_names = _read_class_names(d / meta, names_key)
    y = np.concatenate(ys)
    if y.min() < 0 or y.max() >= len(class_names):
        raise DataError(f"{d} has labels outside 0..{len(class_names) - 1}; download the official files again")
    return ArrayData(np.ascontiguousarray(np.concatenate(xs)), y, class_names)
