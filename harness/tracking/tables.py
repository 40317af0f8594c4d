"""Mean ± std cells and Markdown tables, for the leaderboard (harness.tracking.report) and the end-of-benchmark
summary (harness.run.results): one convention for both. The std is the sample std (ddof=1); for one trial it is
undefined, printed `n/a`, never 0.00."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import pandas as pd

MISSING = "–"


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def signed(value: float | None) -> str:
    """A difference with its sign (`+1.23`), `–` when there is none."""
    return MISSING if missing(value) else f"{value:+.2f}"


def mean_std(values: pd.Series) -> tuple[float, float]:
    """(mean, sample std) of the values present; the std is NaN for one value, both are NaN for none."""
    values = values.dropna().astype(float)
    if values.empty:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def mean_std_text(mean: float, std: float, n: int, plus: str = "±", empty: str = MISSING) -> str:
    """`mean ± std` (2 decimals) over `n` trials: `mean ± n/a` for one, `mean` alone when the std is missing for
    another reason, `empty` without a mean. `plus` / `empty`: the summary table keeps its ASCII `+-` / `-`."""
    if missing(mean):
        return empty
    if n == 1:
        return f"{mean:.2f} {plus} n/a"
    if missing(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} {plus} {std:.2f}"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table, written by hand (no `tabulate` dependency); `|` and line breaks in cells are escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
