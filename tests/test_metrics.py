"""Continual metrics on hand-built predictions, checked by hand and against continuum's own functions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from harness.core.metrics import ContinualMetrics, topk_correct

SIZES = [10, 20, 5]                       # test samples of tasks 0, 1, 2 (unequal: sample weighting matters)
# CORRECT[i][j]: correct predictions on task j's samples after training task i.
CORRECT = [[9], [6, 16], [5, 10, 4]]
# As percentages: R = [[90], [60, 80], [50, 50, 80]].


def _step_data(step: int, correct_row: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test data of tasks 0..step (task j owns labels 2j, 2j+1); the first correct_row[j] samples of task j are
    predicted right, the rest as another class."""
    preds, targets, tids = [], [], []
    for j in range(step + 1):
        y = 2 * j + np.arange(SIZES[j]) % 2
        p = y.copy()
        p[correct_row[j]:] = (y[correct_row[j]:] + 1) % 6
        preds.append(p), targets.append(y), tids.append(np.full(SIZES[j], j))
    return np.concatenate(preds), np.concatenate(targets), np.concatenate(tids)


def _filled(rows=CORRECT, head: str = "cnn", metrics: ContinualMetrics | None = None):
    metrics = metrics or ContinualMetrics()
    logged = []
    for i, row in enumerate(rows):
        p, y, t = _step_data(i, row)
        metrics.add_task(i, p, y, t, head=head)
        logged.append((p, y, t))
    return metrics, logged


def test_accuracy_matrix_and_accuracies_by_hand() -> None:
    m, _ = _filled()
    r = m.accuracy_matrix()
    expected = np.array([[90, np.nan, np.nan], [60, 80, np.nan], [50, 50, 80]], dtype=float)
    np.testing.assert_allclose(r, expected, equal_nan=True)
    assert np.isnan(r[np.triu_indices(3, 1)]).all()
    acc = [90.0, 100 * 22 / 30, 100 * 19 / 35]         # sample weighted, not the mean of the row
    assert m.accuracies() == pytest.approx(acc)
    assert m.accuracies()[2] != pytest.approx(np.mean([50, 50, 80]))
    assert m.average_incremental_accuracy() == pytest.approx(np.mean(acc))
    assert m.average_incremental_accuracy(step=1) == pytest.approx((acc[0] + acc[1]) / 2)
    assert m.average_incremental_accuracy(step=0) == pytest.approx(90.0)
    assert m.last_accuracy() == pytest.approx(acc[2])
    assert m.per_task_accuracy(1) == pytest.approx([60, 80]) and m.per_task_accuracy() == pytest.approx([50, 50, 80])


def test_forgetting_and_bwt_by_hand_and_as_continuum() -> None:
    m, logged = _filled()
    # continuum, k = 3: j in range(1) -> only task 0; max over l in range(1) -> R00 only; divided by k-1 = 2.
    assert m.forgetting() == pytest.approx((90 - 50) / 2)                  # 20.0
    # Chaudhry eq. 3 would be ((max(90, 60) - 50) + (80 - 50)) / 2 = 35: continuum skips task 1.
    assert m.forgetting() != pytest.approx(35.0)
    assert m.forgetting(step=1) == 0.0 and m.forgetting(step=0) == 0.0    # continuum: 0 for k <= 2
    # continuum, T = 3: only (i=2, j=0): (R20 - R00) / (3*2/2).
    assert m.backward_transfer() == pytest.approx((50 - 90) / 3)
    # Lopez-Paz: ((50 - 90) + (50 - 80)) / 2 = -35.
    assert m.backward_transfer() != pytest.approx(-35.0)
    assert m.backward_transfer(step=1) == 0.0

    metrics = pytest.importorskip("continuum.metrics.metrics")
    preds, targets, tids = (list(v) for v in zip(*logged))
    assert m.forgetting() == pytest.approx(100 * metrics.forgetting(preds, targets, tids))
    assert m.backward_transfer() == pytest.approx(100 * metrics.backward_transfer(preds, targets, tids))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_continuum_logger_on_random_predictions(seed: int) -> None:
    """Five tasks of random predictions: every metric after every step equals continuum's (x100)."""
    cm = pytest.importorskip("continuum.metrics")
    from continuum.metrics import metrics as cfn
    rng = np.random.default_rng(seed)
    ours, logger = ContinualMetrics(), cm.Logger(list_subsets=["test"])
    sizes = rng.integers(3, 12, size=5)
    preds, targets, tids = [], [], []
    for t in range(5):
        tid = np.repeat(np.arange(t + 1), sizes[: t + 1])
        y = rng.integers(0, 2 * (t + 1), size=len(tid))
        p = np.where(rng.random(len(tid)) < 0.6, y, rng.integers(0, 2 * (t + 1), size=len(tid)))
        ours.add_task(t, p, y, tid)
        logger.add([p, y, tid], subset="test")
        preds.append(p), targets.append(y), tids.append(tid)
        assert ours.accuracies()[t] == pytest.approx(100 * logger.accuracy)
        assert ours.average_incremental_accuracy() == pytest.approx(100 * logger.average_incremental_accuracy)
        assert ours.forgetting() == pytest.approx(100 * logger.forgetting)
        assert ours.backward_transfer() == pytest.approx(100 * logger.backward_transfer)
        assert ours.per_task_accuracy() == pytest.approx([100 * a for a in logger.accuracy_per_task])
        logger.end_task()
    for s in range(5):   # the per-step variants, from the same predictions
        k = s + 1
        assert ours.forgetting(step=s) == pytest.approx(100 * cfn.forgetting(preds[:k], targets[:k], tids[:k]))
        assert ours.backward_transfer(step=s) == pytest.approx(
            100 * cfn.backward_transfer(preds[:k], targets[:k], tids[:k]))
    assert ours.forgetting() != 0.0   # five tasks: continuum's definition is no longer trivially zero


def test_multiple_heads_are_independent_and_ordered() -> None:
    m, _ = _filled(head="cnn")
    _filled(rows=[[10], [10, 20], [10, 20, 5]], head="nme", metrics=m)   # a perfect NME head
    assert m.heads == ["cnn", "nme"]
    assert m.accuracies("nme") == [100.0, 100.0, 100.0] and m.forgetting("nme") == 0.0
    assert m.accuracies("cnn")[2] == pytest.approx(100 * 19 / 35)
    summary = m.summary()
    assert list(summary) == ["cnn", "nme"]
    assert summary["nme"]["last_accuracy"] == 100.0
    assert summary["cnn"]["forgetting"] == pytest.approx(20.0)
    with pytest.raises(KeyError, match="recorded"):
        m.accuracies("ncm")


def test_top5_and_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4, 0.5],
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    # Row 0 ranks 1, 6, 5, 4, 3, 0, 2; row 1 ranks 0..6 in order.
    assert topk_correct(logits, torch.tensor([3, 4]), k=5).tolist() == [True, True]
    assert topk_correct(logits, torch.tensor([0, 5]), k=5).tolist() == [False, False]
    assert topk_correct(logits, torch.tensor([6, 0]), k=1).tolist() == [False, True]
    few = torch.randn(4, 3)                     # fewer classes than k: every target is in the top-k
    assert topk_correct(few, torch.tensor([0, 1, 2, 2]), k=5).all()

    m = ContinualMetrics()
    for i, row in enumerate(CORRECT):
        p, y, t = _step_data(i, row)
        hits = p == y
        hits[t == 0] = True                     # top-5 rescues every task-0 sample
        m.add_task(i, p, y, t, top5_correct=hits)
    top5 = [100.0, 100 * (10 + 16) / 30, 100 * (10 + 10 + 4) / 35]
    assert m.top5_accuracies() == pytest.approx(top5)
    assert m.average_top5_accuracy() == pytest.approx(np.mean(top5))
    m.add_task(2, *_step_data(2, CORRECT[2]))   # re-recording a step replaces it (here: without top-5)
    assert math.isnan(m.top5_accuracies()[2]) and m.summary()["cnn"]["top5_accuracies"][2] is None
    assert m.accuracies()[2] == pytest.approx(100 * 19 / 35)


def test_summary_and_state_dict_round_trip(tmp_path) -> None:
    m, _ = _filled()
    _filled(rows=[[4], [3, 7]], head="nme", metrics=m)
    summary = m.summary()
    text = json.dumps(summary, allow_nan=False)             # strict JSON: NaN became null
    assert json.loads(text)["cnn"]["accuracy_matrix"][0] == [90.0, None, None]
    assert summary["cnn"]["average_incremental_accuracy_per_step"][1] == pytest.approx((90 + 100 * 22 / 30) / 2)
    assert summary["cnn"]["per_task_accuracy"] == pytest.approx([50, 50, 80])
    assert summary["nme"]["num_tasks"] == 2

    torch.save(m.state_dict(), tmp_path / "metrics.pt")
    back = ContinualMetrics()
    back.load_state_dict(torch.load(tmp_path / "metrics.pt", weights_only=True))
    assert back.summary() == summary and back.heads == ["cnn", "nme"]
    back.add_task(2, *_step_data(2, [1, 2, 3]), head="nme")   # and it goes on after a resume
    assert back.num_steps("nme") == 3 and back.per_task_accuracy(head="nme") == pytest.approx([10, 10, 60])


def test_rejects_inconsistent_input() -> None:
    m = ContinualMetrics()
    with pytest.raises(ValueError, match="in order"):
        m.add_task(1, *_step_data(1, [1, 1]))
    assert m.heads == []                                     # a rejected call leaves no trace
    p, y, t = _step_data(1, [1, 1])
    with pytest.raises(ValueError, match="tasks 0..0"):
        m.add_task(0, p, y, t)                               # samples of a task not trained yet
    with pytest.raises(ValueError, match="tasks 0..1"):
        m.add_task(0, *_step_data(0, [1]))
        m.add_task(1, p[t == 1], y[t == 1], t[t == 1])       # task 0's test data missing
    with pytest.raises(ValueError, match="length"):
        m.add_task(1, p[:-1], y, t)
