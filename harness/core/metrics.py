"""Continual-learning metrics from the predictions made after each task, per head (`cnn`, `nme`, ...).

All values are PERCENTAGES (0..100), including forgetting and backward transfer (continuum returns fractions;
ours are 100x those). After training task i the model is evaluated on the test data of tasks 0..i; per head we
keep, for each step i and each seen task j, the number of test samples and of correct top-1 (and top-5)
predictions. Every metric derives from those counts, so the state stays small and checkpointable.

    R[i][j]  accuracy on task j's test samples after training task i   (`accuracy_matrix`, NaN for j > i)
    A_i      accuracy on all seen test data after step i, sample weighted (`accuracies`)
    AIA_t    mean(A_0..A_t), the iCaRL average incremental accuracy     (`average_incremental_accuracy`)
"""
from __future__ import annotations

import math

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Boolean (N,): is the target among the k highest scores? With fewer than k classes, k = #classes."""
    k = max(1, min(int(k), logits.shape[1]))
    top = logits.topk(k, dim=1).indices
    return (top == targets.to(top.device).view(-1, 1)).any(dim=1)


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a).reshape(-1)


def _clean(v: float) -> float | None:
    """JSON has no NaN: report undefined values as null."""
    return None if v is None or math.isnan(v) else float(v)


class _HeadRecord:
    """Per-step, per-task counts for one head."""

    def __init__(self) -> None:
        self.total: list[list[int]] = []     # total[i][j]: test samples of task j evaluated after step i
        self.correct: list[list[int]] = []   # correct top-1 among them
        self.top5: list[list[int] | None] = []  # correct top-5 among them (None: not given at that step)


class ContinualMetrics:
    """Accumulates the evaluation after each task; derives the continual metrics per head (percentages)."""

    def __init__(self) -> None:
        self._heads: dict[str, _HeadRecord] = {}

    # ---- recording ---------------------------------------------------------------------------
    def add_task(self, task_id: int, preds: np.ndarray, targets: np.ndarray, task_ids: np.ndarray,
                 head: str = "cnn", top5_correct: np.ndarray | None = None) -> None:
        """Record the evaluation after training task `task_id` on the test data of tasks 0..task_id.

        `preds`/`targets` are labels in the remapped space; `task_ids` the task of each test sample. Recording
        the same task_id again replaces it (the last evaluation of a task counts, as in continuum's Logger).
        """
        preds, targets, task_ids = _as_numpy(preds), _as_numpy(targets), _as_numpy(task_ids).astype(np.int64)
        if not (len(preds) == len(targets) == len(task_ids)):
            raise ValueError(f"preds, targets and task_ids differ in length: {len(preds)}, {len(targets)}, "
                             f"{len(task_ids)}")
        if len(task_ids) and task_ids.min() < 0:
            raise ValueError(f"task_ids must be non-negative, got {int(task_ids.min())}")
        done = len(self._heads[head].total) if head in self._heads else 0
        step = int(task_id)
        if step < 0 or step not in (done, done - 1):
            raise ValueError(f"head {head!r}: expected task {done} (or {done - 1} again), got {step}; tasks must "
                             "be recorded in order")
        total = np.bincount(task_ids, minlength=step + 1) if len(task_ids) else np.zeros(step + 1, np.int64)
        if len(total) > step + 1 or (total == 0).any():
            raise ValueError(f"after task {step} the test data must cover exactly tasks 0..{step}; samples per "
                             f"task: {total.tolist()}")
        correct = np.bincount(task_ids, weights=(preds == targets), minlength=step + 1)
        top5 = None
        if top5_correct is not None:
            hits = _as_numpy(top5_correct).astype(bool)
            if len(hits) != len(task_ids):
                raise ValueError(f"top5_correct has {len(hits)} entries for {len(task_ids)} samples")
            top5 = [int(round(v)) for v in np.bincount(task_ids, weights=hits, minlength=step + 1)]
        row_total = [int(v) for v in total]
        row_correct = [int(round(v)) for v in correct]
        rec = self._heads.setdefault(head, _HeadRecord())   # only now: a rejected call leaves no trace
        if step == len(rec.total):
            rec.total.append(row_total)
            rec.correct.append(row_correct)
            rec.top5.append(top5)
        else:
            rec.total[step], rec.correct[step], rec.top5[step] = row_total, row_correct, top5

    @property
    def heads(self) -> list[str]:
        """Heads in the order they were first recorded (the method's main head first)."""
        return list(self._heads)

    def num_steps(self, head: str = "cnn") -> int:
        return len(self._rec(head).total)

    def _rec(self, head: str) -> _HeadRecord:
        if head not in self._heads:
            raise KeyError(f"no metrics recorded for head {head!r}; recorded: {self.heads}")
        return self._heads[head]

    def _step(self, head: str, step: int | None) -> int:
        n = self.num_steps(head)
        if n == 0:
            raise ValueError(f"no task recorded for head {head!r}")
        step = n - 1 if step is None else int(step)
        if not 0 <= step < n:
            raise IndexError(f"step {step} out of range: {n} steps recorded for head {head!r}")
        return step

    # ---- derived metrics ---------------------------------------------------------------------
    def accuracy_matrix(self, head: str = "cnn") -> np.ndarray:
        """(T, T) float: [i][j] = accuracy (%) on task j's test data after training task i; NaN above the diagonal."""
        rec = self._rec(head)
        t = len(rec.total)
        out = np.full((t, t), np.nan)
        for i in range(t):
            out[i, : i + 1] = 100.0 * np.asarray(rec.correct[i]) / np.asarray(rec.total[i])
        return out

    def per_task_accuracy(self, step: int | None = None, head: str = "cnn") -> list[float]:
        """Accuracy (%) on each seen task's test data after `step` (default: the last), class-incremental preds."""
        step = self._step(head, step)
        return [float(v) for v in self.accuracy_matrix(head)[step, : step + 1]]

    def accuracies(self, head: str = "cnn") -> list[float]:
        """Per step: accuracy (%) on all seen test data, sample weighted."""
        rec = self._rec(head)
        return [100.0 * sum(c) / sum(n) for c, n in zip(rec.correct, rec.total)]

    def average_incremental_accuracy(self, head: str = "cnn", step: int | None = None) -> float:
        """Mean of the per-step accuracies of steps 0..step (iCaRL; DyTox's `avg_acc`)."""
        step = self._step(head, step)
        return float(np.mean(self.accuracies(head)[: step + 1]))

    def last_accuracy(self, head: str = "cnn") -> float:
        return self.accuracies(head)[self._step(head, None)]

    def top5_accuracies(self, head: str = "cnn") -> list[float]:
        """Per step: top-5 accuracy (%) on all seen test data; NaN for steps recorded without top-5."""
        rec = self._rec(head)
        return [math.nan if h is None else 100.0 * sum(h) / sum(n) for h, n in zip(rec.top5, rec.total)]

    def average_top5_accuracy(self, head: str = "cnn", step: int | None = None) -> float:
        """Mean of the per-step top-5 accuracies of steps 0..step (DyTox's `mean_acc5`)."""
        step = self._step(head, step)
        return float(np.mean(self.top5_accuracies(head)[: step + 1]))

    def forgetting(self, head: str = "cnn", step: int | None = None) -> float:
        """Forgetting (%) after `step`, EXACTLY as continuum 1.2.7 `metrics.forgetting` (what DyTox logs).

        With k = step + 1 tasks seen and R the accuracy matrix:
            f = 1/(k-1) * sum_{j=0}^{k-3} [ max_{l=j}^{k-3} R[l][j] - R[k-1][j] ],   0 when k <= 2.
        Chaudhry et al. (ECCV 2018) eq. 3 instead sums j over ALL old tasks 0..k-2 and takes the max over
        l = 0..k-2: continuum leaves out the most recent old task (j = k-2) and the step l = k-2 from the max,
        yet still divides by k-1. So it is 0 after the second task and biased low; kept for comparability with
        DyTox/continuum logs.
        """
        k = self._step(head, step) + 1
        if k <= 1:
            return 0.0
        r = self.accuracy_matrix(head)
        f = 0.0
        for j in range(k - 2):
            best = max(r[step_l, j] for step_l in range(j, k - 2))
            f += best - r[k - 1, j]
        return float(f / (k - 1))

    def backward_transfer(self, head: str = "cnn", step: int | None = None) -> float:
        """Backward transfer (%) after `step`, EXACTLY as continuum 1.2.7 `metrics.backward_transfer`.

        With T = step + 1 tasks seen:
            bwt = sum_{i=1}^{T-1} sum_{j=0}^{i-2} (R[i][j] - R[j][j]) / (T(T-1)/2),   0 when T <= 1.
        Lopez-Paz & Ranzato (GEM, NeurIPS 2017) define BWT = 1/(T-1) * sum_{j=0}^{T-2} (R[T-1][j] - R[j][j]),
        the last row only; Diaz-Rodriguez et al. (2018) average over all rows with j = 0..i-1. Continuum
        averages over all rows but its inner loop stops at i-2 (skipping j = i-1), while dividing by the full
        T(T-1)/2 pairs, so it is 0 for two tasks.
        """
        t = self._step(head, step) + 1
        if t <= 1:
            return 0.0
        r = self.accuracy_matrix(head)
        bwt = 0.0
        for i in range(1, t):
            for j in range(0, i - 1):
                bwt += r[i, j] - r[j, j]
        return float(bwt / (t * (t - 1) / 2))

    # ---- reporting / checkpointing ---------------------------------------------------------------
    def summary(self) -> dict:
        """{head: {...}} of plain floats and lists (JSON-serialisable; NaN -> None), heads in recording order.

        Scalars are the values after the last step; `*_per_step` lists give them after every step.
        """
        out: dict[str, dict] = {}
        for head in self.heads:
            n = self.num_steps(head)
            if n == 0:
                continue
            steps = range(n)
            out[head] = {
                "num_tasks": n,
                "accuracies": [_clean(v) for v in self.accuracies(head)],
                "average_incremental_accuracy": _clean(self.average_incremental_accuracy(head)),
                "last_accuracy": _clean(self.last_accuracy(head)),
                "forgetting": _clean(self.forgetting(head)),
                "backward_transfer": _clean(self.backward_transfer(head)),
                "top5_accuracies": [_clean(v) for v in self.top5_accuracies(head)],
                "average_top5_accuracy": _clean(self.average_top5_accuracy(head)),
                "accuracy_matrix": [[_clean(v) for v in row] for row in self.accuracy_matrix(head)],
                "per_task_accuracy": [_clean(v) for v in self.per_task_accuracy(None, head)],
                "average_incremental_accuracy_per_step": [
                    _clean(self.average_incremental_accuracy(head, s)) for s in steps],
                "forgetting_per_step": [_clean(self.forgetting(head, s)) for s in steps],
                "backward_transfer_per_step": [_clean(self.backward_transfer(head, s)) for s in steps],
            }
        return out

    def state_dict(self) -> dict:
        """Lists of ints and strings only (readable with `torch.load(weights_only=True)`)."""
        return {"version": 1, "heads": {
            head: {"total": [list(r) for r in rec.total], "correct": [list(r) for r in rec.correct],
                   "has_top5": [0 if r is None else 1 for r in rec.top5],
                   "top5": [[] if r is None else list(r) for r in rec.top5]}
            for head, rec in self._heads.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._heads = {}
        for head, s in state["heads"].items():
            rec = _HeadRecord()
            rec.total = [[int(v) for v in row] for row in s["total"]]
            rec.correct = [[int(v) for v in row] for row in s["correct"]]
            rec.top5 = [[int(v) for v in row] if has else None for has, row in zip(s["has_top5"], s["top5"])]
            self._heads[str(head)] = rec
