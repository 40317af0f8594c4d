"""Paired method-vs-reference differences (harness.tracking.paired), with values worked out by hand."""
from __future__ import annotations

import math

import pytest

from harness.tracking.paired import paired_differences, paired_interval

T_0975_DF2 = 4.302652729911275      # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def _result(method: str, order: str, avg: float, last: float, status: str = "finished", seed: int = 0) -> dict:
    return {"method": method, "suite": "s", "order": order, "seed": seed, "status": status,
            "metrics": {"cnn": {"average_incremental_accuracy": avg, "last_accuracy": last}}}


def test_interval_by_hand() -> None:
    # d = 1, 2, 3: mean 2, sd 1, half-width t * 1 / sqrt(3)
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    half = T_0975_DF2 / math.sqrt(3)
    assert mean == pytest.approx(2.0) and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)


def test_one_pair_has_no_interval_and_none_has_no_mean() -> None:
    mean, low, high = paired_interval([1.5])
    assert mean == 1.5 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in paired_interval([]))


def test_pairs_by_order_and_seed_and_flags_noise() -> None:
    results = [_result("ref", "o1", 50.0, 40.0), _result("ref", "o2", 60.0, 41.0), _result("ref", "o3", 55.0, 42.0),
               # +2, +2.5, +3 on avg: sd 0.5 -> [2.5 -+ 1.242], clearly above 0
               _result("a", "o1", 52.0, 41.0), _result("a", "o2", 62.5, 41.0), _result("a", "o3", 58.0, 39.0),
               # +1, +2, +3 on avg: the interval [2 -+ 2.484] contains 0
               _result("b", "o3", 58.0, 42.0), _result("b", "o1", 51.0, 40.0), _result("b", "o2", 62.0, 41.0)]
    a, b = paired_differences(results, reference="ref")
    assert (a.method, a.n, b.method, b.n) == ("a", 3, "b", 3)
    assert a.mean == pytest.approx(2.5) and a.low == pytest.approx(2.5 - 0.5 * T_0975_DF2 / math.sqrt(3))
    assert a.within_noise is False and b.within_noise is True
    assert a.text().startswith("+2.50 [+1.26, +3.74]") and b.text().endswith("(noise)")
    last = {d.method: d for d in paired_differences(results, reference="ref", metric="last_accuracy")}
    assert last["a"].mean == pytest.approx((1 + 0 - 3) / 3)


def test_only_trials_finished_by_both_are_paired() -> None:
    results = [_result("ref", "o1", 50.0, 40.0), _result("ref", "o2", 60.0, 41.0, status="failed"),
               _result("a", "o1", 51.0, 40.0), _result("a", "o2", 61.0, 41.0), _result("a", "o3", 70.0, 41.0)]
    (a,) = paired_differences(results, reference="ref")
    assert a.n == 1 and a.mean == pytest.approx(1.0) and a.within_noise is None and a.text() == "+1.00 [n/a]"
