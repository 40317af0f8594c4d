"""The paper-style table of several methods on one suite (`run_benchmark.py table`), from their trials' results.

One row per method, in the order asked: finished trials, average incremental and last accuracy (mean ± sample
std over orders x seeds, main head), parameters, compute, the published number of the same protocol and the
difference to it, and the paired difference to a reference method with its 95% interval (harness.tracking.paired).
Written as CSV, Markdown and one PNG with every method's mean accuracy curve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from harness.tracking import plots
from harness.tracking.paired import METRICS, main_head_metric, paired_differences
from harness.tracking.report import find_published, run_protocol
from harness.tracking.store import variant_of
from harness.tracking.tables import MISSING, markdown_table, mean_std, mean_std_text, signed

COLUMNS = ["Method", "Variant", "Trials", "Avg inc acc", "Last acc", "Params (M)", "Compute (worker-h)",
           "Published avg / last", "Δ published avg / last"]


def comparison_table(results: list[dict], methods: Sequence[str], reference: str,
                     published: Sequence[dict] = ()) -> pd.DataFrame:
    """One row per method of `methods`; `reference` is the method the paired differences are taken against."""
    paired = {metric: {d.method: d for d in paired_differences(results, reference, METRICS[metric])}
              for metric in ("avg", "last")}
    rows = []
    for method in methods:
        mine = [r for r in results if r.get("method") == method]
        ok = [r for r in mine if r.get("status") == "finished"]
        config = (ok or mine or [{}])[0].get("config") or {}
        avg = mean_std(pd.Series([main_head_metric(r, METRICS["avg"]) for r in ok], dtype=float))
        last = mean_std(pd.Series([main_head_metric(r, METRICS["last"]) for r in ok], dtype=float))
        params = max((r.get("parameters") or 0 for r in ok), default=0)
        compute = sum(float(r.get("wall_time_s") or 0.0) * int(r.get("world_size") or 1) for r in ok) / 3600
        entry = find_published(published, method, str(config.get("suite")), variant_of(config),
                               run_protocol(config)) if config else None
        pub_avg, pub_last = (entry or {}).get("avg_inc_acc"), (entry or {}).get("last_acc")
        row = {"Method": method, "Variant": variant_of(config) if config else MISSING,
               "Trials": f"{len(ok)}/{len(mine)}",
               "Avg inc acc": mean_std_text(*avg, len(ok)), "Last acc": mean_std_text(*last, len(ok)),
               "Params (M)": f"{params / 1e6:.2f}" if params else MISSING,
               "Compute (worker-h)": f"{compute:.2f}" if ok else MISSING,
               "Published avg / last": (f"{pub_avg if pub_avg is not None else MISSING} / "
                                        f"{pub_last if pub_last is not None else MISSING}") if entry else MISSING,
               "Δ published avg / last": (f"{signed(avg[0] - pub_avg if pub_avg is not None else None)} / "
                                          f"{signed(last[0] - pub_last if pub_last is not None else None)}")
               if entry else MISSING}
        for metric, label in (("avg", "avg"), ("last", "last")):
            diff = paired[metric].get(method)
            row[f"Δ {label} vs {reference} [95% CI]"] = "reference" if method == reference else (
                diff.text() if diff is not None else "n/a")
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    return markdown_table(list(table.columns), table.itertuples(index=False))


def write_comparison(table: pd.DataFrame, results: list[dict], output_dir: str | Path,
                     name: str = "table") -> list[Path]:
    """`<name>.csv`, `<name>.md` and `<name>_curves.png` (mean accuracy per step, one curve per method)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out / f"{name}.csv", out / f"{name}.md", out / f"{name}_curves.png"
    table.to_csv(csv_path, index=False)
    md_path.write_text(comparison_markdown(table) + "\n\n" + PAIRED_NOTE + "\n")
    written = [csv_path, md_path]
    curves = plots.mean_accuracy_curves(results)
    if curves:
        suites = sorted({str(r.get("suite")) for r in results})
        plots.save_png(plots.accuracy_curve_figure(curves, title=f"accuracy per step: {', '.join(suites)}"),
                       png_path)
        written.append(png_path)
    return written


PAIRED_NOTE = ("Δ vs the reference: mean of the per-trial differences over the (order, seed) pairs both methods "
               "finished, with a paired Student-t 95% interval; `(noise)` when the interval contains 0, `[n/a]` "
               "with one pair.")
