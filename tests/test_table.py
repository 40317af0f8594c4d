"""`run_benchmark.py table`: several methods on one suite as one grid, the paper-style table with paired
differences, and its bad inputs (one line, exit 2, nothing written)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _table(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_benchmark.py", "table", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--methods"], "--methods: expected at least one argument"),
    (["--methods", "replay", "nosuch"], "unknown method 'nosuch'"),
    (["--methods", "replay", "finetune", "replay"], "lists a method twice"),
    (["--methods", "replay", "finetune", "--reference", "icarl"], "--reference icarl is not one of --methods"),
    # the suite's budget must exist for every method: replay has no PyCIL recipe
    (["--methods", "replay", "icarl", "--recipe", "cifar100_pycil"], "no recipe 'cifar100_pycil' for method 'replay'"),
    (["--methods", "replay", "finetune", "--set", "lr=abc"], "lr"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out_dir = tmp_path / "out"
    proc = _table("--suite", "digits-5x2", "--launcher", "local", "--output-dir", str(out_dir), *args, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not out_dir.exists()


def test_a_method_without_the_suites_recipe_is_refused(tmp_path):
    """A suite names the recipe of its budget; a method that lacks it would silently get its full paper recipe."""
    suite = tmp_path / "digits-budget.yaml"
    text = (ROOT / "benchmarks" / "suites" / "digits-5x2.yaml").read_text()
    suite.write_text("\n".join(line for line in text.splitlines() if not line.startswith(("name:", "recipe:")))
                     + "\nname: digits-budget\nrecipe: cifar100_pycil\n")
    proc = _table("--suite", str(suite), "--launcher", "local", "--output-dir", str(tmp_path / "o"),
                  "--methods", "replay", "icarl", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: replay cannot run on suite digits-budget: it has no 'cifar100_pycil' "
                                   "recipe (benchmarks/recipes/replay/cifar100_pycil.yaml); add one, or run "
                                   "another method")
    assert not (tmp_path / "o").exists()


def test_two_methods_two_seeds_one_table_with_paired_differences_and_a_rerun_skips(tmp_path):
    out_dir = tmp_path / "out"
    args = ("--suite", "digits-5x2", "--methods", "replay", "finetune", "--seeds", "0", "1", "--launcher", "local",
            "--no-tracking", "--quiet", "--output-dir", str(out_dir))
    proc = _table(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("trials/*/result.json"))]
    assert sorted((r["method"], r["seed"]) for r in results) == [("finetune", 0), ("finetune", 1),
                                                                ("replay", 0), ("replay", 1)]
    import torch        # the machine behind the numbers (float rounding follows the CPU's kernels)
    assert {r["machine"]["cpu_capability"] for r in results} == {torch.backends.cpu.get_cpu_capability()}
    rows = list(csv.DictReader((out_dir / "table_digits-5x2.csv").open()))
    assert [r["Method"] for r in rows] == ["replay", "finetune"]      # the order asked for
    assert rows[0]["Δ avg vs replay [95% CI]"] == "reference"
    # the paired difference is the mean of finetune - replay over the same seeds, from the result files
    main = {(r["method"], r["seed"]): next(iter(r["metrics"].values()))["average_incremental_accuracy"]
            for r in results}
    diff = ((main["finetune", 0] - main["replay", 0]) + (main["finetune", 1] - main["replay", 1])) / 2
    assert rows[1]["Δ avg vs replay [95% CI]"].startswith(f"{diff:+.2f} [")
    assert (out_dir / "table_digits-5x2.md").read_text().startswith("| Method |")
    assert (out_dir / "table_digits-5x2_curves.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.glob("trials/*/result.json")}
    again = _table(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("trials/*/result.json")} == stamps   # nothing re-run
    assert list(csv.DictReader((out_dir / "table_digits-5x2.csv").open())) == rows


def test_compare_cifar10_is_the_table_command_plus_its_checks(tmp_path):
    """benchmarks/compare_cifar10.py on digits (seconds): the table command's rows, the ordering checks, and a
    results page that names the command with repository-relative paths, never this machine's."""
    out_dir, page = ROOT / "results" / f"test_compare_{tmp_path.name}", tmp_path / "page.md"
    try:
        proc = subprocess.run(
            [sys.executable, "benchmarks/compare_cifar10.py", "--suite", "digits-5x2", "--methods", "finetune",
             "replay", "icarl", "der", "--output-dir", str(out_dir), "--markdown", str(page), "--",
             "--launcher", "local", "--no-tracking", "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = page.read_text()
        assert (f"`python run_benchmark.py table --suite digits-5x2 --methods finetune replay icarl der --reference "
                f"finetune --output-dir results/{out_dir.name} --launcher local") in text
        assert str(ROOT) not in text and f"--output-dir results/{out_dir.name} --markdown" in text
        rows = list(csv.DictReader((out_dir / "table_digits-5x2.csv").open()))
        assert [r["Method"] for r in rows] == ["finetune", "replay", "icarl", "der"]
        checks = [line for line in text.splitlines() if line.startswith("- ")]
        assert [c.split(" ", 2)[2] for c in checks] == [
            "last accuracy: icarl > finetune", "last accuracy: der > finetune",
            "avg incremental accuracy: finetune < replay", "avg incremental accuracy: replay <= icarl"]
        assert all(c.split(" ")[1] in ("PASS", "FAIL") for c in checks)
    finally:
        import shutil
        shutil.rmtree(out_dir, ignore_errors=True)
