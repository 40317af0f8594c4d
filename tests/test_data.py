"""Loaders on files written in each dataset's official on-disk format, the real CIFAR-10 JPEG zip, transforms."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import (DATASETS, ArrayData, TaskDataset, build_transform, check_dataset, dataset_fingerprint,
                          dataset_info, load_dataset)
from harness.data.base import SHARED_DATA
from harness.data.registry import CIFAR10_NAMES, CIFAR100_NAMES, MINI_ZIP
from harness.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Decoded-image caches go to a fresh folder, so each test sees a cold cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CLBENCH_CACHE", str(path))
    return path


# ---- CIFAR official pickles ------------------------------------------------------------------------------

def _rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> the official (N, 3072) rows: the red plane, then green, then blue, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)   # the official files are protocol-2 pickles (Python 2 cPickle)


def write_cifar10(root: Path, per_batch: int = 6) -> dict:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out = {"train_x": [], "train_y": []}
    for i in range(1, 7):
        x = RNG.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = [int(v) for v in RNG.integers(0, 10, per_batch)]
        name = f"data_batch_{i}" if i < 6 else "test_batch"
        _dump(d / name, {b"batch_label": name.encode(), b"labels": y, b"data": _rows(x),
                         b"filenames": [f"img_{j}.png".encode() for j in range(per_batch)]})
        if i < 6:
            out["train_x"].append(x)
            out["train_y"] += y
        else:
            out["test_x"], out["test_y"] = x, y
    _dump(d / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch,
                               b"num_vis": 3072})
    return out


def write_cifar100(root: Path, n: int = 200) -> dict:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for split in ("train", "test"):
        x = RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = [i % 100 for i in range(n)]
        _dump(d / split, {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                          b"coarse_labels": [f // 5 for f in fine], b"data": _rows(x)})
        out[split] = (x, fine)
    _dump(d / "meta", {b"fine_label_names": [s.encode() for s in CIFAR100_NAMES],
                       b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    return out


def test_cifar10_official_pickles(tmp_path):
    ref = write_cifar10(tmp_path)
    train = load_dataset("cifar10", str(tmp_path), "train")
    test = load_dataset("cifar10", str(tmp_path), "test")
    assert train.x.shape == (30, 32, 32, 3) and train.x.dtype == np.uint8 and train.y.dtype == np.int64
    np.testing.assert_array_equal(train.x, np.concatenate(ref["train_x"]))   # planes -> HWC done right
    assert train.y.tolist() == ref["train_y"]
    np.testing.assert_array_equal(test.x, ref["test_x"])
    assert test.y.tolist() == ref["test_y"] and train.class_names == list(CIFAR10_NAMES)
    # the extracted folder itself is accepted too
    assert len(load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"), "test")) == 6


def test_cifar100_fine_labels(tmp_path):
    ref = write_cifar100(tmp_path)
    train = load_dataset("cifar100", str(tmp_path), "train")
    np.testing.assert_array_equal(train.x, ref["train"][0])
    assert train.y.tolist() == ref["train"][1]            # fine labels, not the 20 coarse ones
    assert train.class_names[:3] == ["apple", "aquarium_fish", "baby"] and len(train.class_names) == 100
    assert len(load_dataset("cifar100", str(tmp_path), "test")) == 200


def test_cifar_missing_files_says_what_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", str(tmp_path), "train")
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python") in msg and "train, test, meta" in msg and "--download" in msg
    assert "\n" not in msg


def test_cifar_malformed_and_hostile_files(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path), "train")
    _dump(batch, {b"labels": [1, 2]})                       # a dict without b'data'
    with pytest.raises(DataError, match="official CIFAR layout"):
        load_dataset("cifar10", str(tmp_path), "train")
    marker = tmp_path / "pwned"
    _dump(batch, _Hostile(str(marker)))                     # a pickle that would run code
    with pytest.raises(DataError, match="not a valid CIFAR pickle"):
        load_dataset("cifar10", str(tmp_path), "train")
    assert not marker.exists()


class _Hostile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ---- image folders ---------------------------------------------------------------------------------------

def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")          # lossless: pixels can be compared exactly
    return buf.getvalue()


def make_image_tree(size: int = 8, classes=("zebra", "ant", "moth"), n_train: int = 4, n_test: int = 2) -> dict:
    """{relative path: (bytes, pixels)}; class folders deliberately not in sorted order of creation."""
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in range(n):
                img = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
                files[f"{split}/{c}/{i:03d}.png"] = (_png(img), img)
    return files


def write_tree(root: Path, files: dict) -> Path:
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_zip(path: Path, files: dict, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for rel, (data, _) in files.items():
            z.writestr(prefix + rel, data)
    return path


def _check_tree(data: ArrayData, files: dict, split: str) -> None:
    assert data.class_names == ["ant", "moth", "zebra"]           # sorted by name
    expected = sorted((rel, img) for rel, (_, img) in files.items() if rel.startswith(split + "/"))
    expected.sort(key=lambda r: (r[0].split("/")[1], r[0]))
    assert not data.is_paths and data.x.dtype == np.uint8 and len(data) == len(expected)
    for k, (rel, img) in enumerate(expected):
        np.testing.assert_array_equal(data.x[k], img)
        assert data.y[k] == data.class_names.index(rel.split("/")[1])


@pytest.mark.parametrize("kind", ["dir", "zip", "zip-with-top-folder"])
def test_image_folder_small_images_are_decoded(tmp_path, cache, kind):
    files = make_image_tree()
    if kind == "dir":
        path = write_tree(tmp_path / "imgs", files)
    else:
        path = write_zip(tmp_path / "imgs.zip", files, prefix="imgs/" if kind != "zip" else "")
    for split, n in (("train", 12), ("test", 6)):
        data = load_dataset("imagefolder", str(path), split)
        assert len(data) == n
        _check_tree(data, files, split)
    info = dataset_info("imagefolder", str(path))
    assert info.num_classes == 3 and info.image_size == 8 and info.class_names == ("ant", "moth", "zebra")


def test_image_folder_cache_is_used_and_invalidated(tmp_path, cache):
    files = make_image_tree()
    path = write_zip(tmp_path / "imgs.zip", files)
    first = load_dataset("imagefolder", str(path), "train")
    cached = list((cache / "decoded").glob("imgs-train-*.npz"))
    assert len(cached) == 1
    again = load_dataset("imagefolder", str(path), "train")
    np.testing.assert_array_equal(first.x, again.x)
    # a changed archive (size/mtime) gets a new cache entry, never the stale pixels
    files2 = make_image_tree(n_train=5)
    write_zip(path, files2)
    os.utime(path, ns=(1, 1))
    changed = load_dataset("imagefolder", str(path), "train")
    assert len(changed) == 15
    _check_tree(changed, files2, "train")


def test_image_folder_large_images_stay_paths(tmp_path, cache):
    files = make_image_tree(size=80, n_train=2, n_test=1)
    for path in (write_tree(tmp_path / "big", files), write_zip(tmp_path / "big.zip", files)):
        data = load_dataset("imagefolder", str(path), "train")
        assert data.is_paths and len(data) == 6
        for p, label in zip(data.x, data.y):
            img = np.asarray(Image.open(p).convert("RGB"))
            rel = "/".join(Path(p).parts[-3:])
            np.testing.assert_array_equal(img, files[rel][1])
            assert data.class_names[label] == rel.split("/")[1]
    forced = load_dataset("imagefolder", str(tmp_path / "big"), "test", decode=True)
    assert forced.x.shape == (3, 80, 80, 3)


def test_image_folder_errors(tmp_path, cache):
    files = make_image_tree()
    files["train/ant/odd.png"] = (_png(np.zeros((9, 8, 3), np.uint8)), None)
    path = write_tree(tmp_path / "odd", files)
    with pytest.raises(DataError, match="same size"):
        load_dataset("imagefolder", str(path), "train")
    with pytest.raises(DataError, match="not found"):
        load_dataset("imagefolder", str(tmp_path / "nowhere"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train/<class>"):
        load_dataset("imagefolder", str(tmp_path / "empty"), "train")
    with pytest.raises(ConfigError, match="--data-path"):
        load_dataset("imagefolder", None, "train")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("cifar1000", None, "train")


def test_cifar10_jpeg_missing_says_where(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10-jpeg", str(tmp_path), "train")
    assert str(tmp_path / "cifar10-jpeg.zip") in str(err.value)


# ---- ImageNet --------------------------------------------------------------------------------------------

def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), seed % 256, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_imagenet(root: Path, num_classes: int, val_layout: str) -> list[str]:
    """Tiny JPEGs in ImageNet's layout; val either in class folders (ImageFolder) or flat."""
    wnids = [f"n{1440764 + 7 * i:08d}" for i in range(num_classes)]
    data = _jpeg(1)
    for i, w in enumerate(wnids):
        (root / "train" / w).mkdir(parents=True)
        for j in range(2):
            (root / "train" / w / f"{w}_{j}.JPEG").write_bytes(data)
        val = root / "val" / w if val_layout == "folders" else root / "val"
        val.mkdir(parents=True, exist_ok=True)
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(data)
    return wnids


def test_imagenet100_split_files(tmp_path):
    root = tmp_path / "imagenet"
    wnids = write_imagenet(root, 100, "folders")
    splits = root / "imagenet100_splits"
    splits.mkdir()
    # DyTox's format: `relative/path label`; labels follow the file, not folder order
    (splits / "train_100.txt").write_text("".join(
        f"train/{w}/{w}_{j}.JPEG {99 - i}\n" for i, w in enumerate(wnids) for j in range(2)))
    (splits / "val_100.txt").write_text("".join(
        f"val/{w}/ILSVRC2012_val_{i:08d}.JPEG {99 - i}\n" for i, w in enumerate(wnids)))
    train = load_dataset("imagenet100", str(root), "train")
    test = load_dataset("imagenet100", str(root), "test")
    assert train.is_paths and len(train) == 200 and len(test) == 100
    assert train.y[0] == 99 and train.class_names[99] == wnids[0] and train.class_names == test.class_names
    assert Path(train.x[0]).is_file() and Path(train.x[0]).parent.name == wnids[0]
    # the split files may live elsewhere
    other = tmp_path / "splits"
    splits.rename(other)
    assert len(load_dataset("imagenet100", str(root), "test", split_dir=str(other))) == 100
    with pytest.raises(DataError, match="val_100.txt"):
        load_dataset("imagenet100", str(root), "test")
    (root / "val_100.txt").write_text("val/n01440764/ILSVRC2012_val_00000000.JPEG\n")
    with pytest.raises(DataError, match="val_100.txt:1"):
        load_dataset("imagenet100", str(root), "test")


def test_imagenet1000_folders(tmp_path):
    root = tmp_path / "imagenet"
    wnids = write_imagenet(root, 1000, "folders")
    train = load_dataset("imagenet1000", str(root), "train")
    val = load_dataset("imagenet1000", str(root), "test")
    assert train.is_paths and len(train) == 2000 and len(val) == 1000
    assert train.class_names == sorted(wnids) and val.y.tolist() == list(range(1000))
    with pytest.raises(DataError, match="train/<wnid>"):
        load_dataset("imagenet1000", str(tmp_path / "missing"), "train")


# ---- digits, shipped mini set, real data -----------------------------------------------------------------

def test_digits_real_split():
    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    assert train.x.shape == (1437, 8, 8, 3) and test.x.shape == (360, 8, 8, 3) and train.x.dtype == np.uint8
    assert train.x.max() == 255 and train.x.min() == 0
    assert (train.x[..., 0] == train.x[..., 2]).all()                        # grey replicated as RGB
    assert set(train.y.tolist()) == set(range(10)) and train.class_names[3] == "3"
    assert np.all(np.abs(np.bincount(test.y) / np.bincount(train.y) - 0.25) < 0.03)   # stratified 80/20
    np.testing.assert_array_equal(load_dataset("digits", None, "test").x, test.x)    # deterministic


def test_cifar10_mini_is_shipped(cache):
    assert MINI_ZIP.is_file() and MINI_ZIP.stat().st_size < 8e6
    train, test = load_dataset("cifar10-mini", None, "train"), load_dataset("cifar10-mini", None, "test")
    assert train.x.shape == (3000, 32, 32, 3) and test.x.shape == (1000, 32, 32, 3)
    assert np.bincount(train.y).tolist() == [300] * 10 and np.bincount(test.y).tolist() == [100] * 10
    assert train.class_names == list(CIFAR10_NAMES)
    assert 60 < train.x.mean() < 190 and train.x.std() > 30                  # real photos, not blank


def test_cifar10_mini_bytes_come_unchanged_from_the_real_zip(shared_data_dir):
    with zipfile.ZipFile(MINI_ZIP) as mini, zipfile.ZipFile(shared_data_dir / "cifar10-jpeg.zip") as full:
        names = mini.namelist()
        assert "train/cat/0000.jpg" in names and "train/cat/0300.jpg" not in names
        for name in names[::97]:
            assert mini.read(name) == full.read(name)


def test_cifar10_jpeg_real_zip(shared_data_dir):
    train = load_dataset("cifar10-jpeg", str(shared_data_dir), "train")
    default = shared_data_dir.resolve() == SHARED_DATA.resolve()     # then also check the default location
    test = load_dataset("cifar10-jpeg", None if default else str(shared_data_dir), "test")
    assert train.x.shape == (50000, 32, 32, 3) and test.x.shape == (10000, 32, 32, 3)
    assert train.class_names == list(CIFAR10_NAMES) and len(set(train.y.tolist())) == 10
    assert np.bincount(train.y).tolist() == [5000] * 10 and np.bincount(test.y).tolist() == [1000] * 10
    mean = train.x[::10].reshape(-1, 3).mean(0) / 255    # every class (they are grouped)
    assert np.allclose(mean, DATASETS["cifar10-jpeg"].mean, atol=0.03)       # real CIFAR statistics


# ---- pre-flight check and fingerprint --------------------------------------------------------------------

def _tree_snapshot(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_check_dataset_passes_on_good_data_and_writes_nothing(tmp_path, cache):
    write_cifar10(tmp_path / "c10")
    files = make_image_tree()
    folder, archive = write_tree(tmp_path / "imgs", files), write_zip(tmp_path / "imgs.zip", files, prefix="x/")
    before = _tree_snapshot(tmp_path)
    for config in ({"dataset": "cifar10-mini"}, {"dataset": "digits"}, {"dataset": "cifar10", "data_path": str(
            tmp_path / "c10")}, {"dataset": "imagefolder", "data_path": str(folder)},
            {"dataset": "imagefolder", "data_path": str(archive)}):
        check_dataset(config)
    assert _tree_snapshot(tmp_path) == before and not cache.exists()


def test_check_dataset_refuses_a_data_path_that_does_not_exist(tmp_path):
    for name in ("digits", "cifar10-mini"):
        with pytest.raises(DataError, match=f"--data-path .*nowhere does not exist; dataset {name} does not read"):
            check_dataset({"dataset": name, "data_path": str(tmp_path / "nowhere")})
    check_dataset({"dataset": "digits", "data_path": str(tmp_path)})     # an existing one is simply not read
    with pytest.raises(DataError, match="nowhere does not exist; pass the folder"):
        check_dataset({"dataset": "imagefolder", "data_path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="needs --data-path"):
        check_dataset({"dataset": "imagefolder"})


def test_check_dataset_cifar_missing_fails_unless_download_which_it_leaves_to_the_trial(tmp_path):
    target = tmp_path / "new"
    with pytest.raises(DataError, match="new does not exist; pass the folder holding cifar-10-batches-py/, or add "
                                        "--download"):
        check_dataset({"dataset": "cifar10", "data_path": str(target)})
    target.mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-py/ with data_batch_1.*--download"):
        check_dataset({"dataset": "cifar10", "data_path": str(target)})
    target.rmdir()
    check_dataset({"dataset": "cifar10", "data_path": str(target), "download": True})
    assert not target.exists()                      # no download, nothing created


def test_check_dataset_image_folder_layout_errors(tmp_path, cache):
    files = {k: v for k, v in make_image_tree().items() if k.startswith("train/")}
    with pytest.raises(DataError, match="no images under test/<class>/"):
        check_dataset({"dataset": "imagefolder", "data_path": str(write_tree(tmp_path / "notest", files))})
    files = make_image_tree()
    files["test/ant/0.png"] = (_png(np.zeros((9, 8, 3), np.uint8)), None)     # the first image of a test class
    with pytest.raises(DataError, match="test/ant/0.png is 8x9 .*same size"):
        check_dataset({"dataset": "imagefolder", "data_path": str(write_tree(tmp_path / "odd", files))})
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK but not really a zip")
    with pytest.raises(DataError, match=f"{fake} is not a readable zip"):
        check_dataset({"dataset": "imagefolder", "data_path": str(fake)})


def test_fingerprint_follows_the_files_not_their_mtimes(tmp_path):
    folder = write_tree(tmp_path / "imgs", make_image_tree())
    config = {"dataset": "imagefolder", "data_path": str(folder)}
    first = dataset_fingerprint(config)
    assert len(first) == 12 and dataset_fingerprint(config) == first
    for f in folder.rglob("*.png"):                 # copied again over the same place: same digest
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(1, 1))
    assert dataset_fingerprint(config) == first
    twin = write_tree(tmp_path / "twin", {rel: (p.read_bytes(), None) for rel, p in
                                           ((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*.png"))})
    assert dataset_fingerprint({"dataset": "imagefolder", "data_path": str(twin)}) != first     # another place
    (folder / "train" / "ant" / "new.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    assert dataset_fingerprint(config) != first                                                 # a file added
    assert dataset_fingerprint({**config, "dataset": "cifar10-jpeg"}) != dataset_fingerprint(config)   # the name


def test_fingerprint_of_a_zip_reads_its_directory(tmp_path):
    files = make_image_tree()
    archive = write_zip(tmp_path / "imgs.zip", files)
    config = {"dataset": "imagefolder", "data_path": str(archive)}
    first = dataset_fingerprint(config)
    write_zip(archive, files)                       # the same members written again (new timestamps)
    os.utime(archive, ns=(5, 5))
    assert dataset_fingerprint(config) == first
    files["test/ant/extra.png"] = files["test/ant/000.png"]
    write_zip(archive, files)
    assert dataset_fingerprint(config) != first


def test_fingerprint_of_cifar_shipped_and_digits(tmp_path):
    write_cifar10(tmp_path)
    parent = dataset_fingerprint({"dataset": "cifar10", "data_path": str(tmp_path)})
    assert dataset_fingerprint({"dataset": "cifar10", "data_path": str(tmp_path / "cifar-10-batches-py")}) == parent
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-2] + b"\x00.")          # same size, other content
    assert dataset_fingerprint({"dataset": "cifar10", "data_path": str(tmp_path)}) != parent
    # files still to download count as the official release (what torchvision verifies), and nothing is written
    pending = dataset_fingerprint({"dataset": "cifar10", "data_path": str(tmp_path / "later"), "download": True})
    assert pending != dataset_fingerprint({"dataset": "cifar10", "data_path": str(tmp_path / "later")})
    assert not (tmp_path / "later").exists()
    for name in ("digits", "cifar10-mini"):
        assert dataset_fingerprint({"dataset": name}) == dataset_fingerprint({"dataset": name, "data_path": None})


def test_check_and_fingerprint_of_the_real_zip(shared_data_dir, cache):
    config = {"dataset": "cifar10-jpeg", "data_path": str(shared_data_dir)}
    check_dataset(config)
    assert dataset_fingerprint(config) == dataset_fingerprint(dict(config))
    assert not cache.exists()


# ---- zip-slip ----------------------------------------------------------------------------------------------

def _crafted_zip(path: Path, evil: zipfile.ZipInfo, payload: bytes) -> Path:
    files = make_image_tree(size=80, n_train=1, n_test=1)    # large images: extracted into the cache
    path.parent.mkdir(parents=True, exist_ok=True)
    write_zip(path, files)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(evil, payload)
    return path


def _symlink_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3                                   # unix: the mode bits below are honoured
    info.external_attr = (0o120777 << 16)                    # S_IFLNK | rwx
    return info


@pytest.mark.parametrize("member", ["../evil.jpg", "/abs.jpg", "train/ant/../../../evil.jpg", "symlink"])
def test_zip_members_that_escape_the_cache_are_refused(tmp_path, cache, member):
    evil = _symlink_member("train/ant/link.jpg") if member == "symlink" else zipfile.ZipInfo(member)
    payload = b"/etc/passwd" if member == "symlink" else _jpeg(3)
    archive = _crafted_zip(tmp_path / "data" / "crafted.zip", evil, payload)
    before = _tree_snapshot(tmp_path)
    for call in (lambda: load_dataset("imagefolder", str(archive), "train"),
                 lambda: check_dataset({"dataset": "imagefolder", "data_path": str(archive)})):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert str(archive) in msg and repr(evil.filename) in msg and "refusing" in msg and "\n" not in msg
    assert _tree_snapshot(tmp_path) == before                # nothing extracted, in the cache or beside it
    assert not Path("/abs.jpg").exists()


# ---- transforms ------------------------------------------------------------------------------------------

def test_transforms_small_images():
    info = DATASETS["cifar10"]
    img = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    test_tf = build_transform(info, train=False, options={})
    out = test_tf(img)
    expected = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(info.mean)[:, None, None]) \
        / torch.tensor(info.std)[:, None, None]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(test_tf(Image.fromarray(img)), expected)      # PIL input gives the same
    train_tf = build_transform(info, train=True, options={"augment": "randaugment"})
    torch.manual_seed(0)
    outs = [train_tf(img) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs) and not torch.equal(outs[0], outs[1])
    assert build_transform(info, train=False, options={"image_size": 48})(img).shape == (3, 48, 48)
    with pytest.raises(ConfigError, match="augment"):
        build_transform(info, train=True, options={"augment": "mixup"})


def test_transforms_large_images_and_task_dataset(tmp_path):
    info = DATASETS["imagenet100"]
    path = tmp_path / "big.jpg"
    Image.fromarray(RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(tmp_path / "grey.png")   # grey -> RGB on open
    data = ArrayData(np.asarray([str(path), str(tmp_path / "grey.png")]), np.asarray([3, 1]), ["a"] * 4)
    for train in (True, False):
        ds = TaskDataset(data, build_transform(info, train=train, options={"rand_augment": train}))
        x, y = ds[0]
        assert x.shape == (3, 224, 224) and y == 3 and ds[1][0].shape == (3, 224, 224)
    arrays = ArrayData(RNG.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), np.arange(5), list("abcde"))
    batch = next(iter(torch.utils.data.DataLoader(TaskDataset(arrays, build_transform(
        DATASETS["digits"], True, {})), batch_size=5)))
    assert batch[0].shape == (5, 3, 8, 8) and batch[1].tolist() == [0, 1, 2, 3, 4]


def test_array_data_helpers():
    d = ArrayData(np.zeros((4, 2, 2, 3), np.uint8), np.asarray([0, 1, 2, 1]), ["a", "b", "c"])
    sub = d.subset([1, 3])
    assert sub.y.tolist() == [1, 1] and sub.x.shape == (2, 2, 2, 3) and not sub.is_paths
    assert ArrayData(np.asarray(["a.jpg"]), np.asarray([0]), ["a"]).is_paths
    with pytest.raises(ValueError):
        ArrayData(np.zeros((2, 2, 2, 3)), np.asarray([0]), ["a"])


def test_train_per_class_subsample_is_stratified_fixed_and_ordered():
    from harness.data.base import subsample_per_class

    y = np.repeat(np.arange(3), [10, 4, 7])
    data = ArrayData(np.arange(len(y) * 2, dtype=np.uint8).reshape(len(y), 2, 1, 1), y, ["a", "b", "c"])
    sub = subsample_per_class(data, 5)
    assert np.bincount(sub.y).tolist() == [5, 4, 5]                      # class b has only 4: all kept
    again = subsample_per_class(data, 5)
    assert np.array_equal(sub.x, again.x)                              # fixed draw
    firsts = sub.x[:, 0, 0, 0]
    assert np.all(np.diff(firsts.astype(int)) > 0)                     # original order kept
    assert not np.array_equal(sub.x[:5], data.x[:5])                  # a draw, not the first 5
    with pytest.raises(ConfigError):
        subsample_per_class(data, 0)
