"""Class orders (named, seeded, explicit, invalid) and class-incremental task splits with remapped labels."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.data import ArrayData, load_dataset
from harness.errors import ConfigError, DataError
from harness.core.scenarios import ORDERS_DIR, Scenario, resolve_class_order

DYTOX_REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "dytox.md"


# ---- class orders ----------------------------------------------------------------------------------------

def test_seed1993_is_pycil_order_and_leaves_global_rng_alone():
    np.random.seed(7)
    before = np.random.random()
    np.random.seed(7)
    assert resolve_class_order("seed1993", 100)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert np.random.random() == before
    for k in (10, 100):
        np.random.seed(1993)
        assert resolve_class_order("seed1993", k) == np.random.permutation(k).tolist()
    assert resolve_class_order("seed0", 10) != resolve_class_order("seed1", 10)


def test_named_orders():
    assert resolve_class_order("order1", 100, "cifar100")[:6] == [87, 0, 52, 58, 44, 91]
    assert resolve_class_order("order2", 100)[:6] == [58, 30, 93, 69, 21, 77]
    assert resolve_class_order("order3", 100)[:6] == [71, 54, 45, 32, 4, 8]
    assert resolve_class_order("podnet1", 100) == resolve_class_order("cifar100_order1", 100)
    assert resolve_class_order("imagenet100_order1", 100)[:4] == [68, 56, 78, 8]
    assert resolve_class_order("imagenet1000_order1", 1000)[:10] == [54, 7, 894, 512, 126, 337, 988, 11, 284, 493]
    assert resolve_class_order("natural", 5) == [0, 1, 2, 3, 4] == resolve_class_order(None, 5)
    assert resolve_class_order([2, 0, 1], 3) == [2, 0, 1]


def test_every_shipped_order_is_a_permutation():
    files = sorted(ORDERS_DIR.glob("*.yaml"))
    assert {p.stem for p in files} >= {"cifar100_order1", "cifar100_order2", "cifar100_order3",
                                       "imagenet100_order1", "imagenet1000_order1"}
    for path in files:
        order = yaml.safe_load(path.read_text())["class_order"]
        assert sorted(order) == list(range(len(order))), path.name


@pytest.mark.skipif(not DYTOX_REF.is_file(), reason=f"DyTox reference not found: {DYTOX_REF}")
def test_orders_match_dytox_verbatim():
    text = DYTOX_REF.read_text()
    for name in ("cifar100_order1", "cifar100_order2", "cifar100_order3", "imagenet100_order1"):
        ref = ast.literal_eval(re.search(rf"`options/data/{name}\.yaml`:\n(\[[^\]]*\])", text).group(1))
        assert resolve_class_order(name, len(ref)) == ref, name
    ref = ast.literal_eval(re.search(r"## Appendix A[^\n]*\n(\[[^\]]*\])", text).group(1))
    assert resolve_class_order("imagenet1000_order1", 1000) == ref


@pytest.mark.parametrize("order, k, words", [
    ([0, 1, 1, 3], 4, ["repeats", "[1]", "exactly once"]),
    ([0, 1, 2, 7], 4, ["out of range", "[7]"]),
    ([0, -1, 2, 3], 4, ["out of range", "[-1]"]),
    ([0, 2, 3], 4, ["3 ids", "4 classes", "missing [1]"]),
    ([0, 1, 2, 3, 4], 4, ["out of range", "[4]"]),
    ([0, 1, "x", 3], 4, ["list of integer"]),
    ([0.0, 1, 2, 3], 4, ["list of integer"]),
    ("order1", 10, ["100 classes", "has 10", "natural"]),
    ("order9", 100, ["unknown class order", "order1", "seedN"]),
    ("imagenet1000_order1", 100, ["1000 classes"]),
])
def test_bad_orders_raise_one_clear_line(order, k, words):
    with pytest.raises(ConfigError) as err:
        resolve_class_order(order, k, "cifar10")
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


# ---- scenarios -------------------------------------------------------------------------------------------

def fake_split(num_classes: int, per_class: int) -> ArrayData:
    """Each image carries its original class id in pixel (0, 0, 0) and its index in (0, 0, 1)."""
    y = np.repeat(np.arange(num_classes), per_class)
    x = np.zeros((len(y), 2, 2, 3), np.uint8)
    x[:, 0, 0, 0] = y
    x[:, 0, 0, 1] = np.arange(len(y)) % 256
    return ArrayData(x, y, [f"c{i}" for i in range(num_classes)])


def test_b0_splits_and_remaps_labels():
    order = resolve_class_order("seed1993", 10)       # [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]
    train, test = fake_split(10, 5), fake_split(10, 2)
    s = Scenario(train, test, 2, 2, order)
    assert s.num_tasks == 5 and s.class_order == order and s.num_classes == 10
    assert s.class_names[0] == f"c{order[0]}"
    for t in range(5):
        assert s.classes_of_task(t) == [2 * t, 2 * t + 1]
        task = s.train_task(t)
        assert sorted(set(task.y.tolist())) == [2 * t, 2 * t + 1] and len(task) == 10
        originals = task.x[:, 0, 0, 0]
        np.testing.assert_array_equal(np.asarray(order)[task.y], originals)   # label i <- original order[i]
        assert len(s.test_task(t)) == 4
    data, task_ids = s.test_upto(2)
    assert len(data) == 12 and sorted(set(data.y.tolist())) == list(range(6))
    np.testing.assert_array_equal(task_ids, data.y // 2)
    assert task_ids.dtype == np.int64 and data.y.dtype == np.int64
    with pytest.raises(IndexError):
        s.train_task(5)


def test_bk_half_then_steps_on_100_classes():
    order = resolve_class_order("order1", 100)
    s = Scenario(fake_split(100, 3), fake_split(100, 1), 50, 10, order)
    assert s.num_tasks == 6 and s.increments == [50, 10, 10, 10, 10, 10]
    assert s.classes_of_task(0) == list(range(50)) and s.classes_of_task(1) == list(range(50, 60))
    first = s.train_task(0)
    assert len(first) == 150 and set(first.x[:, 0, 0, 0].tolist()) == set(order[:50])
    last = s.train_task(5)
    np.testing.assert_array_equal(np.asarray(order)[last.y], last.x[:, 0, 0, 0])
    data, task_ids = s.test_upto(5)
    assert len(data) == 100 and np.bincount(task_ids).tolist() == [50, 10, 10, 10, 10, 10]


def test_scenario_on_paths_and_real_digits(tmp_path):
    paths = ArrayData(np.asarray([f"/img/{i}.jpg" for i in range(6)]), np.asarray([0, 0, 1, 1, 2, 2]), list("abc"))
    s = Scenario(paths, paths, 1, 1, [2, 0, 1])
    t0 = s.train_task(0)
    assert t0.is_paths and t0.x.tolist() == ["/img/4.jpg", "/img/5.jpg"] and t0.y.tolist() == [0, 0]
    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    s = Scenario(train, test, 2, 2, resolve_class_order("seed1993", 10))
    sizes = [len(s.train_task(t)) for t in range(s.num_tasks)]
    assert sum(sizes) == len(train) and all(250 < n < 320 for n in sizes)


@pytest.mark.parametrize("init, inc, words", [
    (3, 2, ["not a multiple", "increment"]),
    (0, 3, ["not a multiple"]),
    (2, 0, ["positive"]),
    (2, -2, ["positive"]),
    (12, 2, ["initial_increment"]),
    (None, [4, 4], ["sum to 8", "10 classes"]),
    (None, [4, 0, 6], ["positive"]),
])
def test_bad_increments(init, inc, words):
    with pytest.raises(ConfigError) as err:
        Scenario(fake_split(10, 1), fake_split(10, 1), init, inc, list(range(10)))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_increment_list_and_missing_classes():
    s = Scenario(fake_split(10, 1), fake_split(10, 1), None, [4, 3, 3], list(range(10)))
    assert [s.classes_of_task(t) for t in range(3)][2] == [7, 8, 9]
    test = fake_split(10, 1).subset(np.arange(9))       # class 9 has no test image
    with pytest.raises(DataError, match=r"test split has no samples of classes \[9\]"):
        Scenario(fake_split(10, 1), test, 5, 5, list(range(10)))
    with pytest.raises(ConfigError):
        Scenario(fake_split(10, 1), fake_split(10, 1), 5, 5, list(range(9)))
