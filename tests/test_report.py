"""Leaderboard from a real sqlite MLflow store: hand-computed means and sample stds, failed trials shown and
never averaged in, published numbers and differences, Markdown without tabulate, curve plots."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from harness.tracking import plots  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.tracking.report import (PUBLISHED, find_published, leaderboard, load_published, main,  # noqa: E402
                                     summary_by_group, to_markdown)
from harness.tracking.trackers import BenchmarkTracker  # noqa: E402
from test_tracking import color_pixels, make_config, make_result, make_specs  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

# CIFAR-100 B0 10 steps, per-step accuracies of each trial
ICARL_1 = [90.0, 84.0, 78.0, 73.0, 69.0, 65.0, 62.0, 58.0, 55.0, 52.0]   # AIA 68.6, last 52
ICARL_2 = [89.0, 82.0, 77.0, 72.0, 68.0, 64.0, 60.0, 57.0, 54.0, 51.0]   # AIA 67.4, last 51
ICARL_3 = [91.0, 85.0, 79.0, 74.0, 70.0, 66.0, 63.0, 59.0, 56.0, 53.0]   # fails after task 3
DER_1 = [92.0, 88.0, 84.0, 81.0, 78.0, 76.0, 74.0, 72.0, 70.0, 68.0]     # AIA 78.3, last 68
DER_2 = [93.0, 87.0, 85.0, 80.0, 79.0, 75.0, 73.0, 71.0, 69.0, 66.0]     # AIA 77.8, last 66


def cifar100_config(method: str) -> dict:
    return make_config(method, suite="cifar100", dataset="cifar100", initial_increment=10, increment=10,
                       memory_size=2000, orders=["order1", "order2", "order3"], seeds=[1993], class_order=None,
                       recipe_files=[f"benchmarks/recipes/{method}/default.yaml"])


def log_benchmark(out: Path, config: dict, specs: list[dict], results: list[dict]) -> BenchmarkTracker:
    tracker = BenchmarkTracker.for_benchmark(None, out, config, specs, log=lambda _: None)
    for spec, result in zip(specs, results):
        for row in result.pop("_rows", None) or result.get("history", []):
            tracker.log_task(spec, row)
        tracker.log_trial(spec, result)
    tracker.end_benchmark(results, specs)
    return tracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """iCaRL (2 finished, 1 failed) and DER (2 finished) on CIFAR-100, plus iCaRL order1 logged AGAIN under
    a second benchmark run (same trial, same config): it must count once."""
    out = tmp_path_factory.mktemp("report")
    icarl = cifar100_config("icarl")
    specs = make_specs(icarl, [("order1", 1993), ("order2", 1993), ("order3", 1993)], tag="1ca21ca2")
    log_benchmark(out, icarl, specs, [make_result(specs[0], ICARL_1, wall=600.0),
                                      make_result(specs[1], ICARL_2, wall=620.0),
                                      make_result(specs[2], ICARL_3, fail_after=3)])
    log_benchmark(out, icarl, specs[:1], [make_result(specs[0], ICARL_1, wall=600.0)])
    der = cifar100_config("der")
    dspecs = make_specs(der, [("order1", 1993), ("order2", 1993)], tag="de2de2de")
    log_benchmark(out, der, dspecs, [make_result(dspecs[0], DER_1, wall=900.0),
                                     make_result(dspecs[1], DER_2, wall=950.0)])
    return out, f"sqlite:///{out}/mlflow.db"


# ---------------------------------------------------------------------------------------------------------
# Published numbers
# ---------------------------------------------------------------------------------------------------------
DISTRIBUTED = {"memory_mode": "distributed", "memory_shards": 2, "memory_size": 2000}
NUMBER_KEYS = ("avg_inc_acc", "last_acc", "avg_inc_acc_std", "last_acc_std", "top5_avg_inc_acc", "top5_last_acc")


def test_every_published_entry_has_a_source_a_protocol_and_percentages():
    entries = load_published()
    assert len(entries) > 50
    for e in entries:
        where = f"{e['method']} {e['suites']} {e['variant']}"
        assert isinstance(e["source"], str) and e["source"].strip(), where
        assert e["suites"] and all(isinstance(s, str) for s in e["suites"]), where
        protocol = e.get("protocol") or {}          # absent: one global memory of any size (published.yaml)
        assert set(protocol) <= {"memory_mode", "memory_shards", "memory_size"}, where
        assert protocol.get("memory_mode", "global") in ("global", "distributed"), where
        assert all(isinstance(protocol[k], int) and protocol[k] > 0 for k in ("memory_shards", "memory_size")
                   if k in protocol), where
        assert "memory_shards" not in protocol or protocol["memory_mode"] == "distributed", where
        numbers = [e[k] for k in NUMBER_KEYS if e.get(k) is not None]
        assert numbers or e["method"] == "joint", where
        assert all(isinstance(v, (int, float)) and 0 <= v <= 100 for v in numbers), where
    # one primary entry per method x suite x memory placement: what a run without a variant compares to
    primaries = [(e["method"], s, (e.get("protocol") or {}).get("memory_mode", "global"))
                 for e in entries if e.get("primary") for s in e["suites"]]
    assert len(primaries) == len(set(primaries))


def test_a_run_is_compared_with_the_entry_of_its_own_protocol():
    """Which entry find_published picks (by variant and memory protocol); the numbers are checked against the
    reference notes below."""
    entries = load_published()

    def variant(method, suite, name=None, protocol=None):
        e = find_published(entries, method, suite, name, protocol)
        return e and e["variant"]

    # a default run holds one global memory: the erratum's global-memory row; the distributed emulation: its row
    for suite in ("cifar100", "cifar100-10steps", "cifar100-20steps", "cifar100-50steps"):
        assert variant("dytox", suite) == "erratum-globalmem"
        assert variant("dytox", suite, protocol=DISTRIBUTED) == "erratum-distmem"
    assert variant("dytox", "cifar100", "plus", DISTRIBUTED) == "plus-erratum-distmem"    # through an alias
    assert variant("dytox", "cifar100", "plus") is None          # no global-memory DyTox+ CIFAR row
    assert variant("dytox", "cifar100", "erratum-globalmem") == "erratum-globalmem"
    assert variant("dytox", "cifar100", "erratum-distmem") is None    # named, but measured under another protocol
    assert variant("dytox", "cifar100", "paper") is None              # 2 GPUs x 2k: not this run's memory
    assert variant("dytox", "cifar100", "paper", {**DISTRIBUTED, "memory_size": 4000}) == "paper"
    assert variant("dytox", "cifar100", None, {**DISTRIBUTED, "memory_shards": 4}) is None   # other shard count
    assert variant("dytox", "cifar100", "cpu+plus", DISTRIBUTED) == "plus-erratum-distmem"  # last options file
    assert variant("icarl", "cifar100-20steps") == "resnet18"
    assert variant("icarl", "cifar100", protocol=DISTRIBUTED) is None   # entries without protocol: global
    assert variant("dytox", "imagenet100", "plus") == "plus-erratum-globalmem"
    assert variant("replay", "cifar100") is None and variant("dytox", "cifar10-mini") is None


def _reference_table(text: str, heading: str) -> list[list[str]]:
    """The rows of the Markdown table under `heading` in the reference notes (header and rule excluded)."""
    lines = text[text.index(heading):].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]


def _cell(text: str) -> tuple[float | None, float | None]:
    """`65.27±1.02` -> (65.27, 1.02); `50.74` -> (50.74, None); `–` -> (None, None)."""
    if text in ("–", "-", "—"):
        return None, None
    value, _, std = text.partition("±")
    return float(value), float(std) if std else None


# The reference's tables (../shared/reference/dytox.md 4.1 and 4.2): suite -> its columns (#P, then the numbers)
CIFAR_TABLE = {"cifar100-10steps": 1, "cifar100-20steps": 4, "cifar100-50steps": 7}
IMAGENET_TABLE = {"imagenet100": 1, "imagenet1000": 6}


@pytest.mark.skipif(not (REFERENCE / "dytox.md").is_file(), reason=f"reference notes not found: {REFERENCE}")
def test_published_table_numbers_are_the_reference_tables():
    """Every entry taken from the DyTox paper/README CIFAR-100 or ImageNet table equals that table's cell (mean,
    std, #params), read from the reference notes."""
    text = (REFERENCE / "dytox.md").read_text()
    label = lambda name: name.lower().replace(" (pruned)", "")  # noqa: E731  (4.1 says "DER† (pruned)")
    cifar = {label(r[0]): r for r in _reference_table(text, "### 4.1 ")}
    imagenet = {label(r[0]): r for r in _reference_table(text, "### 4.2 ")}
    rows = {("icarl", "resnet18"): "icarl", ("ucir", "resnet18"): "ucir", ("bic", "resnet18"): "bic",
            ("wa", "resnet18"): "wa", ("podnet", "resnet18"): "podnet", ("der", "wo-pruning"): "der w/o p",
            ("der", "pruned"): "der†", ("dytox", "paper"): "dytox", ("dytox", "plus-paper"): "dytox+",
            ("joint", "resnet18"): "resnet18 joint"}
    checked = 0
    for e in load_published():
        if "paper/README CIFAR100 table" in e["source"]:
            table, columns, keys = cifar, CIFAR_TABLE, ("avg_inc_acc", "last_acc")
        elif "paper/README ImageNet table" in e["source"]:
            table, columns, keys = imagenet, IMAGENET_TABLE, ("avg_inc_acc", "last_acc", "top5_avg_inc_acc",
                                                              "top5_last_acc")
        else:
            continue
        row = table[rows[(e["method"], e["variant"])]]
        suite = next(s for s in e["suites"] if s in columns)
        first = columns[suite]
        where = f"{e['method']} {e['variant']} {suite}"
        if "params_m" in e:
            assert _cell(row[first])[0] == e["params_m"], where
        for i, key in enumerate(keys):
            value, std = _cell(row[first + 1 + i])
            assert e.get(key) == value, f"{where} {key}"
            assert e.get(f"{key}_std") == std, f"{where} {key}_std"
        checked += 1
    assert checked >= 40


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference notes not found: {REFERENCE}")
def test_every_published_number_is_in_the_reference_notes():
    """No number from memory: each one appears verbatim (2 decimals) in ../shared/reference."""
    text = "\n".join(p.read_text() for p in sorted(REFERENCE.glob("*.md")))
    for e in load_published():
        for key, value in e.items():
            if isinstance(value, float):
                assert f"{value:.2f}" in text, f"{e['method']} {e['suites']} {e['variant']} {key}={value}"


# ---------------------------------------------------------------------------------------------------------
# Summaries without MLflow
# ---------------------------------------------------------------------------------------------------------
def _trial(method, order, status, aia=math.nan, last=math.nan, params=1e6, wall=100.0, world=1, error=None):
    return {"trial": f"{method}_{order}", "run_id": order, "method": method, "suite": "cifar100", "variant": "default",
            "config_hash": "h", "order": order, "seed": "1993", "status": status, "start_time": 0, "error": error,
            "parameters": params, "wall_time_s": wall, "world_size": world, "initial_increment": "10",
            "increment": "10", "avg_inc_acc": aia, "last_acc": last, "forgetting": math.nan,
            "top5_avg_inc_acc": math.nan, "top5_last_acc": math.nan}


def test_summary_by_group_means_stds_and_failures():
    trials = pd.DataFrame([_trial("icarl", "order1", "FINISHED", 66.0, 51.0, world=2),
                           _trial("icarl", "order2", "FINISHED", 64.0, 49.5, world=2),
                           _trial("icarl", "order3", "FINISHED", 65.5, 50.0, world=2),
                           _trial("icarl", "order4", "FAILED", 10.0, 5.0, error="OOM"),
                           _trial("icarl", "order5", "RUNNING", 99.0, 99.0)])
    row = summary_by_group(trials, load_published()).iloc[0]
    assert (row["trials"], row["finished"], row["failed"], row["unfinished"]) == (5, 3, 1, 1)
    assert row["avg_inc_acc_mean"] == pytest.approx(statistics.mean([66.0, 64.0, 65.5]))     # 65.1667
    assert row["avg_inc_acc_std"] == pytest.approx(statistics.stdev([66.0, 64.0, 65.5]))     # ddof=1
    assert row["last_acc_std"] == pytest.approx(statistics.stdev([51.0, 49.5, 50.0]))
    assert row["published_avg_inc_acc"] == 65.27 and row["published_last_acc"] == 50.74
    assert row["diff_avg_inc_acc"] == pytest.approx(statistics.mean([66.0, 64.0, 65.5]) - 65.27)
    assert row["compute_h"] == pytest.approx(3 * 100.0 * 2 / 3600)     # finished trials, worker-hours
    assert "order4 seed 1993: FAILED (OOM)" in row["not_finished_trials"]
    assert "order5 seed 1993: RUNNING" in row["not_finished_trials"]
    md = to_markdown(summary_by_group(trials, load_published()))
    lines = md.splitlines()
    assert lines[0].startswith("| Method | Suite | Variant |") and set(lines[1]) <= {"|", "-"}
    assert "| icarl | cifar100 | default | 3 | 1 | 1 | 65.17 ± 1.04 | 50.17 ± 0.76 |" in lines[2]
    assert "65.27 / 50.74 (resnet18)" in lines[2] and "-0.10 / -0.57" in lines[2]
    assert "Failed or unfinished trials (not averaged in):" in md


def test_single_trial_has_no_std():
    row = summary_by_group(pd.DataFrame([_trial("icarl", "order1", "FINISHED", 66.0, 51.0)]), []).iloc[0]
    assert row["avg_inc_acc_mean"] == 66.0 and math.isnan(row["avg_inc_acc_std"])
    one = summary_by_group(pd.DataFrame([_trial("icarl", "o", "FINISHED", 66.0, 51.0)]), [])
    assert "| 66.00 ± n/a | 51.00 ± n/a |" in to_markdown(one)          # not "± 0.00": a std needs 2 trials


def test_deltas_compare_runs_of_the_same_memory_protocol():
    """A default DyTox run (one global 2k memory) is compared with the erratum's global-memory row, the
    distributed-memory emulation with the distributed row; each run group with its own."""
    def dytox(order, aia, last, **protocol):
        return {**_trial("dytox", order, "FINISHED", aia, last), "config_hash": protocol.get("memory_mode", "g"),
                **protocol}
    trials = pd.DataFrame([dytox("order1", 68.0, 52.0, memory_mode="global", memory_size=2000),
                           dytox("order2", 66.0, 50.0, memory_mode="global", memory_size=2000),
                           dytox("order1", 72.0, 58.0, memory_mode="distributed", memory_shards=2, memory_size=2000)])
    table = summary_by_group(trials, load_published()).set_index("memory_mode")
    glob, dist = table.loc["global"], table.loc["distributed"]
    assert (glob["published_variant"], glob["published_avg_inc_acc"]) == ("erratum-globalmem", 67.33)
    assert glob["diff_avg_inc_acc"] == pytest.approx(67.0 - 67.33)
    assert glob["diff_last_acc"] == pytest.approx(51.0 - 51.68)
    assert (dist["published_variant"], dist["published_last_acc"]) == ("erratum-distmem", 57.76)
    assert dist["diff_last_acc"] == pytest.approx(58.0 - 57.76)
    md = to_markdown(summary_by_group(trials, load_published()))
    assert "67.33 / 51.68 (erratum-globalmem)" in md and "71.50 / 57.76 (erratum-distmem)" in md
    assert "72.00 ± n/a" in md and "67.00 ± 1.41" in md


# ---------------------------------------------------------------------------------------------------------
# From the store
# ---------------------------------------------------------------------------------------------------------
def test_report_cli_writes_the_hand_computed_leaderboard(store, capsys):
    out, uri = store
    assert main(["--tracking-uri", uri, "--output-dir", str(out / "table"), "--experiment", "clbench"]) == 0
    csv = pd.read_csv(out / "table" / "leaderboard.csv").set_index("method")
    assert sorted(csv.index) == ["der", "icarl"]
    icarl, der = csv.loc["icarl"], csv.loc["der"]
    # iCaRL: order3 failed (counted, not averaged); order1 logged twice (counted once)
    assert (icarl["trials"], icarl["finished"], icarl["failed"], icarl["unfinished"]) == (3, 2, 1, 0)
    aia = [sum(ICARL_1) / 10, sum(ICARL_2) / 10]                              # 68.6, 67.4
    assert icarl["avg_inc_acc_mean"] == pytest.approx(68.0) == pytest.approx(statistics.mean(aia))
    assert icarl["avg_inc_acc_std"] == pytest.approx(statistics.stdev(aia)) == pytest.approx(1.2 / 2 ** 0.5)
    assert icarl["last_acc_mean"] == pytest.approx(51.5)
    assert icarl["last_acc_std"] == pytest.approx(statistics.stdev([52.0, 51.0]))
    assert icarl["nme_avg_inc_acc_mean"] == pytest.approx(68.0 - 1.5)
    assert icarl["published_avg_inc_acc"] == 65.27 and icarl["published_last_acc"] == 50.74
    assert icarl["diff_avg_inc_acc"] == pytest.approx(68.0 - 65.27)
    assert icarl["diff_last_acc"] == pytest.approx(51.5 - 50.74)
    assert "iCaRL 10 steps" in icarl["published_source"]
    assert icarl["compute_h"] == pytest.approx((600.0 + 620.0) * 2 / 3600)
    assert icarl["parameters"] == 464_154 + 130 * 9
    assert "order3 seed 1993: FAILED" in icarl["not_finished_trials"]
    assert (der["finished"], der["failed"]) == (2, 0)
    assert der["avg_inc_acc_mean"] == pytest.approx(statistics.mean([78.3, 77.8]))
    assert der["avg_inc_acc_std"] == pytest.approx(statistics.stdev([78.3, 77.8]))
    assert der["last_acc_mean"] == pytest.approx(67.0) and der["published_last_acc"] == 65.22
    assert der["diff_last_acc"] == pytest.approx(67.0 - 65.22)

    md = (out / "table" / "leaderboard.md").read_text()
    assert "| icarl | cifar100 | default | 2 | 1 | 0 | 68.00 ± 0.85 | 51.50 ± 0.71 |" in md
    assert "| der | cifar100 | default | 2 | 0 | 0 | 78.05 ± 0.35 | 67.00 ± 1.41 |" in md
    assert "- icarl cifar100 default: order order3 seed 1993: FAILED (RuntimeError: CUDA error" in md
    assert md.strip().splitlines()[0] in capsys.readouterr().out

    # the suite's curve plot: one mean curve per method -> 2 curves (tab10 C0 and C1), nothing in C2
    png = out / "table" / "accuracy_curves_cifar100.png"
    assert color_pixels(png, plots.TAB10[0]) > 50 and color_pixels(png, plots.TAB10[1]) > 50
    assert color_pixels(png, plots.TAB10[2]) == 0


def test_leaderboard_filter_and_errors(store, tmp_path):
    out, uri = store
    only_der = leaderboard(uri, filter="tags.method = 'der'")
    assert list(only_der["method"]) == ["der"]
    with pytest.raises(ConfigError, match="no MLflow experiment 'nope'"):
        leaderboard(uri, "nope")
    with pytest.raises(ConfigError, match="bad --filter"):
        leaderboard(uri, filter="this is not a filter")
    # nothing matches: exit status 1, no table written
    assert main(["--tracking-uri", uri, "--output-dir", str(tmp_path), "--filter", "tags.method = 'x'"]) == 1
    assert not (tmp_path / "leaderboard.csv").exists()
    # a store that does not exist is an error, and reading it must not create it
    missing = tmp_path / "none" / "mlflow.db"
    assert main(["--tracking-uri", f"sqlite:///{missing}", "--output-dir", str(tmp_path)]) == 2
    assert not missing.exists()


def test_published_file_is_the_default():
    assert PUBLISHED.name == "published.yaml" and PUBLISHED.parent.name == "benchmarks"


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------
def test_plot_functions_draw_the_expected_artists(tmp_path):
    import matplotlib.image

    curves = [plots.Curve(f"m{i}", [10, 20, 30], [90 - i, 80 - i, 70 - i], std=[1, 1, 1] if i else None)
              for i in range(3)]
    fig = plots.accuracy_curve_figure(curves, title="t")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3 and [t.get_text() for t in ax.get_legend().get_texts()] == ["m0", "m1", "m2"]
    assert list(ax.get_lines()[1].get_ydata()) == [89, 79, 69]
    png = plots.save_png(fig, tmp_path / "c.png")
    assert matplotlib.image.imread(str(png)).shape[2] in (3, 4)

    matrix = [[90.0, None, None], [70.0, 80.0, None], [60.0, 65.0, 75.0]]
    heat = plots.accuracy_matrix_figure(matrix)
    hax = heat.axes[0]
    assert len(hax.get_images()) == 1
    assert sorted(t.get_text() for t in hax.texts) == sorted(["90.0", "70.0", "80.0", "60.0", "65.0", "75.0"])
    data = hax.get_images()[0].get_array()
    assert data.mask[0, 1] and not data.mask[1, 1] and data[2, 0] == 60.0
    plots.save_png(heat, tmp_path / "h.png")
    assert matplotlib.image.imread(str(tmp_path / "h.png")).ndim == 3


def test_mean_curves_leave_failed_trials_out():
    config = cifar100_config("icarl")
    specs = make_specs(config, [("order1", 1993), ("order2", 1993), ("order3", 1993)])
    results = [make_result(specs[0], ICARL_1), make_result(specs[1], ICARL_2), make_result(specs[2], ICARL_3, 3)]
    curves = plots.mean_accuracy_curves(results)
    assert len(curves) == 1 and curves[0].label == "icarl (n=2)"
    assert list(curves[0].x) == [10 * (t + 1) for t in range(10)]
    assert curves[0].y == pytest.approx([(a + b) / 2 for a, b in zip(ICARL_1, ICARL_2)])
    assert curves[0].std == pytest.approx([statistics.stdev([a, b]) for a, b in zip(ICARL_1, ICARL_2)])


def test_end_of_run_table_shows_n_a_for_the_std_of_one_trial():
    from harness.run.results import summary_table

    def result(order, aia):
        return {"method": "icarl", "suite": "digits-5x2", "order": order, "seed": 0, "status": "finished",
                "parameters": 1000, "wall_time_s": 60.0,
                "metrics": {"nme": {"average_incremental_accuracy": aia, "last_accuracy": aia - 10, "forgetting": 5.0}}}
    one = summary_table([result("natural", 70.0)]).iloc[0]
    assert one["avg_inc_acc"] == "70.00 +- n/a" and one["last_acc"] == "60.00 +- n/a"
    two = summary_table([result("natural", 70.0), result("seed1993", 72.0)]).iloc[0]
    assert two["avg_inc_acc"] == "71.00 +- 1.41"


def test_trial_run_records_its_class_permutation(tmp_path):
    """The run's params hold the permutation itself (label i is original class [i]), not only the order's name."""
    import json

    config = cifar100_config("icarl")
    specs = make_specs(config, [("order1", 1993)])
    result = make_result(specs[0], ICARL_1)
    order = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15] + list(range(100, 190))
    result["class_order"] = order
    log_benchmark(tmp_path, config, specs, [result])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.run_kind = 'trial'")
    assert json.loads(run.data.params["class_permutation"]) == order
    assert run.data.params["order_name"] == "order1"
