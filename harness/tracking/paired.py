"""Paired comparisons of methods that ran on the same class orders and seeds.

Every method of a table sees the same (order, seed) pairs, so the fair question is not "do the two means differ"
but "how much better is method A than the reference on the SAME trial". For each method and metric the table
gives the mean of the per-trial differences (method - reference) and a paired Student-t 95% interval:

    d_i = metric(method, order_i, seed_i) - metric(reference, order_i, seed_i),  i = 1..n
    mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)          (sd with ddof=1)

The t interval is used rather than a bootstrap because benchmark grids are small (3 orders x 1 seed is the
papers' protocol): a bootstrap over 3 pairs can only take 10 distinct values. A difference whose interval
contains 0 is "within noise". With one pair the interval is undefined (n/a), never zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats

METRICS = {"avg": "average_incremental_accuracy", "last": "last_accuracy"}


@dataclass(frozen=True)
class PairedDifference:
    """method - reference over `n` paired trials, with its two-sided interval at `confidence`."""

    method: str
    reference: str
    metric: str
    n: int
    mean: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def within_noise(self) -> bool | None:
        """True when the interval contains 0; None when it is undefined (fewer than 2 pairs)."""
        if math.isnan(self.low):
            return None
        return self.low <= 0.0 <= self.high

    def text(self, digits: int = 2) -> str:
        """`+1.23 [-0.40, +2.86]`, `+1.23 [n/a]` for one pair, `n/a` for none; `(noise)` when it contains 0."""
        if self.n == 0:
            return "n/a"
        mean = f"{self.mean:+.{digits}f}"
        if math.isnan(self.low):
            return f"{mean} [n/a]"
        noise = " (noise)" if self.within_noise else ""
        return f"{mean} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{noise}"


def paired_interval(differences: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired-t interval of `differences`; low/high NaN below 2 pairs."""
    d = np.asarray(list(differences), dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, df=d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def main_head_metric(result: dict, metric: str) -> float | None:
    """The value of `metric` ("average_incremental_accuracy", "last_accuracy") of a finished trial's main head."""
    if result.get("status") != "finished":
        return None
    heads = result.get("metrics") or {}
    if not heads:
        return None
    value = next(iter(heads.values())).get(metric)
    return None if value is None else float(value)


def trial_key(result: dict) -> tuple:
    """What pairs two trials: the same suite, class order and seed."""
    return result.get("suite"), result.get("order"), result.get("seed")


def paired_differences(results: list[dict], reference: str, metric: str = METRICS["avg"],
                       confidence: float = 0.95) -> list[PairedDifference]:
    """One PairedDifference per method other than `reference`, over the (suite, order, seed) both finished."""
    by_method: dict[str, dict[tuple, float]] = {}
    for r in results:
        value = main_head_metric(r, metric)
        if value is not None:
            by_method.setdefault(str(r.get("method")), {})[trial_key(r)] = value
    ref = by_method.get(reference, {})
    out = []
    for method in sorted(m for m in by_method if m != reference):
        mine = by_method[method]
        shared = sorted(set(mine) & set(ref), key=str)
        mean, low, high = paired_interval([mine[k] - ref[k] for k in shared], confidence)
        out.append(PairedDifference(method, reference, metric, len(shared), mean, low, high, confidence))
    return out
