"""PNG plots of continual-learning results: accuracy curves and the accuracy-matrix heatmap.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch, safe in
any thread or headless worker). Each function returns the Figure, so callers (and tests) can inspect it;
`save_png` writes and releases it. Curves take the colours of the tab10 cycle in order (curve i -> C{i}).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf"]


@dataclass
class Curve:
    """One line: `y[i]` at `x[i]`; an optional `std` draws a shaded +- band around it."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    std: Sequence[float | None] | None = None


def _arr(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def accuracy_curve_figure(curves: Sequence[Curve], title: str = "", xlabel: str = "classes seen",
                          ylabel: str = "top-1 accuracy (%)") -> Figure:
    """One line per curve (markers at each step), legend with the labels."""
    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, curve in enumerate(curves):
        color = TAB10[i % len(TAB10)]
        x, y = _arr(curve.x), _arr(curve.y)
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.8, color=color, label=curve.label)
        if curve.std is not None:
            s = np.nan_to_num(_arr(curve.std))
            ax.fill_between(x, y - s, y + s, color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def accuracy_matrix_figure(matrix: Sequence[Sequence[float | None]], title: str = "") -> Figure:
    """Heatmap of R[i][j] (accuracy on task j after training task i); blank above the diagonal, values
    written in the cells when there are at most 12 tasks."""
    n = len(matrix)
    data = np.full((n, n), np.nan)
    for i, row in enumerate(matrix):
        values = _arr(list(row)[:n])
        data[i, : len(values)] = values
    size = min(3.5 + 0.45 * n, 12.0)
    fig = Figure(figsize=(size + 1.2, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100, origin="upper")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ticks = range(n) if n <= 20 else range(0, n, max(1, n // 10))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if not math.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="black" if data[i, j] > 60 else "white")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()   # figures made without pyplot are freed by the garbage collector; clear drops the artists now
    return path


def mean_accuracy_curves(results: Sequence[dict], label_keys: Sequence[str] = ("method",)) -> list[Curve]:
    """One curve per group of FINISHED trial results (default: per method): the mean over its orders x seeds
    of the accuracy after each step, with the sample std (ddof=1) as a band. Failed trials are left out."""
    from harness.tracking.store import classes_seen

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("status") == "finished" and r.get("history"):
            groups.setdefault(tuple(str(r.get(k)) for k in label_keys), []).append(r)
    curves = []
    for key, members in groups.items():
        steps = min(len(r["history"]) for r in members)    # same suite -> same length; guard anyway
        values = np.array([[_nan(row.get("accuracy")) for row in r["history"][:steps]] for r in members])
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(members) > 1 else None
        config = members[0].get("config") or {}
        curves.append(Curve(f"{' '.join(key)} (n={len(members)})", classes_seen(config, steps), list(mean),
                            None if std is None else list(std)))
    return curves


def _nan(value) -> float:
    return float("nan") if value is None else float(value)
