"""Class orders and class-incremental task splits (on top of continuum's ClassIncremental).

Convention (PyCIL / continuum / DyTox): original class `class_order[i]` becomes label `i`, so task 0 holds
labels 0..initial_increment-1, task 1 the next `increment` labels, and so on.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from continuum.datasets import InMemoryDataset
from continuum.scenarios import ClassIncremental
from continuum.tasks import TaskType

from harness.data.base import ArrayData
from harness.errors import ConfigError, DataError

ORDERS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "orders"
ALIASES = {f"{p}{i}": f"cifar100_order{i}" for p in ("order", "podnet") for i in (1, 2, 3)}


def named_orders() -> list[str]:
    return ["natural", "seedN"] + sorted(ALIASES) + sorted(p.stem for p in ORDERS_DIR.glob("*.yaml"))


def _order_file(name: str) -> list[int]:
    path = ORDERS_DIR / f"{ALIASES.get(name, name)}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown class order {name!r}: use one of {', '.join(named_orders())}, or a list of ids")
    order = (yaml.safe_load(path.read_text()) or {}).get("class_order")
    if not isinstance(order, list):
        raise ConfigError(f"{path} must hold `class_order: [ids...]`")
    return order


def seed_order(seed: int, num_classes: int) -> list[int]:
    """np.random.seed(seed); np.random.permutation(K) (PyCIL/FACIL's seed-1993 order), without touching the
    global numpy RNG: a RandomState with the same seed gives the same permutation."""
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def resolve_class_order(order: str | Sequence[int] | None, num_classes: int,
                        dataset_name: str | None = None) -> list[int]:
    """A name (natural, seedN, order1..3, imagenet100_order1, imagenet1000_order1, a file in benchmarks/orders)
    or an explicit list -> a checked permutation of 0..num_classes-1."""
    where = f"dataset {dataset_name}" if dataset_name else "the dataset"
    if order is None or order == "natural":
        return list(range(num_classes))
    if isinstance(order, str):
        m = re.fullmatch(r"seed(\d+)", order)
        if m:
            return seed_order(int(m.group(1)), num_classes)
        ids = _order_file(order)
        if len(ids) != num_classes:
            raise ConfigError(f"class order {order!r} is for {len(ids)} classes but {where} has {num_classes}; "
                              f"use natural, seedN or a list of {num_classes} ids")
        return check_order(ids, num_classes, f"class order {order!r}")
    return check_order(order, num_classes, "class order")


def check_order(order, num_classes: int, what: str = "class order") -> list[int]:
    fix = f"list each of 0..{num_classes - 1} exactly once"
    if not isinstance(order, (list, tuple, np.ndarray)) or not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in order):
        raise ConfigError(f"{what} must be a name (natural, seed1993, order1, ...) or a list of integer class ids, "
                          f"got {order!r}"[:300])
    ids = [int(c) for c in order]
    bad = sorted({c for c in ids if not 0 <= c < num_classes})
    if bad:
        raise ConfigError(f"{what} has ids out of range 0..{num_classes - 1}: {bad[:10]}; {fix}")
    dups = sorted({c for c in ids if ids.count(c) > 1})
    if dups:
        raise ConfigError(f"{what} repeats ids {dups[:10]}; {fix}")
    if len(ids) != num_classes:
        missing = sorted(set(range(num_classes)) - set(ids))
        raise ConfigError(f"{what} has {len(ids)} ids but there are {num_classes} classes (missing {missing[:10]}); "
                          f"{fix}")
    return ids


def make_increments(num_classes: int, initial_increment: int | None, increment: int | Sequence[int]) -> list[int]:
    """B0 (initial = increment) or Bk (initial k then `increment` per task); a list gives every task's size."""
    if isinstance(increment, (list, tuple)):
        incs = [*([initial_increment] if initial_increment else []), *increment]
    else:
        if not isinstance(increment, int) or isinstance(increment, bool) or increment <= 0:
            raise ConfigError(f"increment must be a positive integer, got {increment!r}")
        first = initial_increment or increment
        if not isinstance(first, int) or first <= 0 or first > num_classes:
            raise ConfigError(f"initial_increment must be an integer in 1..{num_classes}, got {initial_increment!r}")
        rest = num_classes - first
        if rest % increment:
            raise ConfigError(f"initial_increment {first} + tasks of {increment} cannot cover {num_classes} classes "
                              f"({rest} left is not a multiple of {increment}); change increment or initial_increment")
        incs = [first] + [increment] * (rest // increment)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in incs):
        raise ConfigError(f"task sizes must be positive integers, got {incs}")
    if sum(incs) != num_classes:
        raise ConfigError(f"task sizes {incs} sum to {sum(incs)} but there are {num_classes} classes; make them "
                          f"sum to {num_classes}")
    return incs


class Scenario:
    """Class-incremental tasks over a train and a test split; labels are remapped to order positions."""

    def __init__(self, train: ArrayData, test: ArrayData, initial_increment: int | None,
                 increment: int | Sequence[int], class_order: Sequence[int]) -> None:
        num_classes = len(train.class_names)
        self.class_order = check_order(list(class_order), num_classes)
        self.increments = make_increments(num_classes, initial_increment, increment)
        self.offsets = np.concatenate([[0], np.cumsum(self.increments)]).astype(int).tolist()
        # class_names[label] for the NEW labels
        self.class_names = [train.class_names[c] for c in self.class_order]
        self._train = self._build(train, "train")
        self._test = self._build(test, "test")

    def _build(self, data: ArrayData, split: str) -> ClassIncremental:
        missing = sorted(set(range(len(self.class_order))) - set(np.unique(data.y).tolist()))
        if missing:
            raise DataError(f"the {split} split has no samples of classes {missing[:10]}: every class needs "
                            f"{split} images")
        dtype = TaskType.IMAGE_PATH if data.is_paths else TaskType.IMAGE_ARRAY
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # continuum warns about defaults we set on purpose
            return ClassIncremental(InMemoryDataset(data.x, data.y, data_type=dtype, train=split == "train"),
                                    increment=list(self.increments), class_order=list(self.class_order))

    @property
    def num_tasks(self) -> int:
        return len(self.increments)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def classes_of_task(self, t: int) -> list[int]:
        """The NEW labels task t introduces."""
        self._check_task(t)
        return list(range(self.offsets[t], self.offsets[t + 1]))

    def _check_task(self, t: int) -> None:
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task {t} out of range 0..{self.num_tasks - 1}")

    def _take(self, scenario: ClassIncremental, tasks) -> tuple[ArrayData, np.ndarray]:
        x, y, task_ids = scenario[tasks].get_raw_samples()
        return ArrayData(x, y.astype(np.int64), self.class_names), task_ids.astype(np.int64)

    def train_task(self, t: int) -> ArrayData:
        self._check_task(t)
        return self._take(self._train, t)[0]

    def test_task(self, t: int) -> ArrayData:
        self._check_task(t)
        return self._take(self._test, t)[0]

    def test_upto(self, t: int) -> tuple[ArrayData, np.ndarray]:
        """Test data of tasks 0..t and each sample's task id."""
        self._check_task(t)
        return self._take(self._test, slice(0, t + 1))
