"""Bad input is rejected by the driver's pre-flight: exit code 2, ONE `error:` line on stderr, no traceback, and
nothing written (the output folder is not created, an existing one is left byte for byte as it was).

Every case runs the CLI entry point (`run_benchmark.cli`, what `python run_benchmark.py` runs); the cases marked
CLI also run as a real `python run_benchmark.py` process (a sixth of them: each costs seconds of imports).
Each case names the words its error line must contain, so a case cannot pass by failing for another reason.
"""
from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--method", "replay", "--suite", "digits-5x2", "--launcher", "local", "--quiet"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")
AS_ROOT = pytest.mark.skipif(getattr(os, "geteuid", lambda: 1)() == 0, reason="root writes through permission bits")
LINUX = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
CLI = "cli"        # also run as a real process


# ---- files some cases point at (created in the test's tmp folder, part of what must stay unchanged) -----------
def _write_inputs(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    (tmp / "file.txt").write_text("a file, not a folder\n")
    (tmp / "malformed.yaml").write_text("lr: 0.1\nmilestones: [1, 2\n")
    (tmp / "list.yaml").write_text("- lr\n- 0.1\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp / "typo.yaml").write_text("learning_rat: 0.1\n")
    (tmp / "tag.yaml").write_text("lr: !!python/object/apply:os.system ['echo pwned']\n")
    (tmp / "lr_text.yaml").write_text("lr: fast\n")
    (tmp / "lr_inf.yaml").write_text("lr: .inf\n")
    (tmp / "seeds.yaml").write_text("seeds: [a, b]\n")
    (tmp / "orders.yaml").write_text("orders: natural\n")
    (tmp / "milestones.yaml").write_text("milestones: 5\n")
    (tmp / "garbage.zip").write_bytes(b"PK this is not an archive")
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp / "broken_images" / split / cls).mkdir(parents=True)
            (tmp / "broken_images" / split / cls / "0.png").write_bytes(b"not a png")
    (tmp / "garbage.db").write_bytes(b"hello, I am not a database")
    con = sqlite3.connect(tmp / "other_app.db")
    con.execute("CREATE TABLE notes (text TEXT)")
    con.commit()
    con.close()


def _existing_output(out: Path) -> None:
    """A previous run's output folder: it must come out of a rejected command untouched."""
    (out / "trials" / "old_trial").mkdir(parents=True)
    (out / "trials" / "old_trial" / "result.json").write_text('{"status": "finished"}\n')
    (out / "summary.md").write_text("| old | table |\n")


# (id, arguments, words the error line must contain, CLI or "", [a skip mark]). {tmp} and {port} are filled in.
CASES = [
    # values of the wrong type or range, from --set and the flags
    ("lr-text", ["--set", "lr=abc"], "option lr: 'abc' (from command line)", CLI),
    ("momentum-list", ["--set", "momentum=[0.9]"], "option momentum: [0.9]", ""),
    ("lr-negative", ["--lr", "-0.1"], "option lr: -0.1", ""),
    ("lr-nan", ["--lr", "nan"], "option lr: nan", ""),
    ("epochs-zero", ["--epochs", "0"], "--epochs must be an integer >= 1", ""),
    ("epochs-negative", ["--epochs", "-1"], "--epochs must be", ""),
    ("epochs-not-int", ["--epochs", "2.5"], "argument --epochs: invalid int value", CLI),
    ("batch-size-zero", ["--batch-size", "0"], "option batch_size: 0", ""),
    ("num-workers-zero", ["--num-workers", "0"], "option num_workers: 0", ""),
    ("batch-not-divisible", ["--batch-size", "33", "--num-workers", "2"], "divisible by num_workers", ""),
    ("max-concurrent-zero", ["--max-concurrent-trials", "0"], "--max-concurrent-trials must be >= 1", ""),
    ("cpus-per-worker-negative", ["--cpus-per-worker", "-1"], "option cpus_per_worker: -1.0", ""),
    ("gpus-per-worker-negative", ["--gpus-per-worker", "-1"], "option gpus_per_worker: -1.0", ""),
    ("max-failures-negative", ["--max-failures", "-3"], "--max-failures must be >= 0", ""),
    ("memory-size-negative", ["--memory-size", "-5"], "option memory_size: -5", ""),
    ("epochs-bool", ["--set", "epochs=true"], "option epochs: True", ""),
    ("batch-size-float", ["--set", "batch_size=32.5"], "option batch_size: 32.5", ""),
    ("optimizer-unknown", ["--set", "opt=sgdd"], "option opt: 'sgdd'", ""),
    ("augment-unknown", ["--set", "augment=heavy"], "option augment: 'heavy'", ""),
    ("backbone-unknown", ["--set", "backbone=resnet9000"], "option backbone: 'resnet9000'", ""),
    ("amp-unknown", ["--set", "amp=fp8"], "option amp: 'fp8'", ""),
    ("compile-not-bool", ["--set", "compile=maybe"], "option compile: 'maybe'", ""),
    ("milestones-strings", ["--set", "milestones=[a, b]"], "option milestones: ['a', 'b']", ""),
    ("train-per-class-zero", ["--set", "train_per_class=0"], "option train_per_class: 0", ""),
    ("dataset-unknown", ["--set", "dataset=mnist"], "option dataset: 'mnist'", CLI),
    ("dytox-freeze-group", ["--method", "dytox", "--set", "freeze_ft=[encoder]"], "option freeze_ft", ""),
    ("icarl-without-memory", ["--method", "icarl", "--memory-size", "0"], "icarl needs a rehearsal memory", ""),
    # seeds and class orders
    ("seed-negative", ["--seeds", "-1"], "seed -1 is out of range", ""),
    ("seeds-duplicate", ["--seeds", "0", "0"], "seed 0 is listed more than once", ""),
    ("seeds-not-int", ["--seeds", "x"], "argument --seeds: invalid int value", ""),
    ("order-unknown", ["--orders", "order9"], "unknown class order 'order9'", ""),
    ("orders-duplicate", ["--orders", "natural", "natural"], "'natural' is listed twice", CLI),
    ("orders-same-permutation", ["--suite", "cifar100", "--orders", "order1", "podnet1"],
     "'podnet1' is the same permutation as 'order1'", ""),
    ("class-order-duplicate-ids", ["--set", "class_order=[0,0,1,2,3,4,5,6,7,8]"], "class order repeats ids [0]", CLI),
    ("class-order-out-of-range", ["--set", "class_order=[0,1,2,3,4,5,6,7,8,10]"], "ids out of range 0..9: [10]", ""),
    ("class-order-too-short", ["--set", "class_order=[0,1,2]"], "has 3 ids but there are 10 classes", ""),
    ("increment-does-not-fit", ["--set", "increment=3"], "cannot cover 10 classes", ""),
    ("initial-increment-too-big", ["--set", "initial_increment=11"], "initial_increment must be an integer in 1..10",
     ""),
    # the command line itself
    ("unknown-flag", ["--bogus-flag"], "unrecognized arguments: --bogus-flag", CLI),
    ("no-suite", ["--suite", ""], "--method and --suite are required", ""),
    ("unknown-method", ["--method", "nope"], "unknown method 'nope'", ""),
    ("unknown-suite", ["--suite", "nope"], "unknown suite 'nope'", ""),
    ("unknown-recipe", ["--recipe", "nope"], "no recipe 'nope' for method 'replay'", ""),
    ("unknown-launcher", ["--launcher", "slurm"], "argument --launcher: invalid choice: 'slurm'", ""),
    ("address-with-local-launcher", ["--address", "127.0.0.1:6379"], "--address joins a Ray cluster", ""),
    ("device-unknown", ["--device", "tpu"], "option device: 'tpu'", ""),
    ("device-cuda-without-gpu", ["--device", "cuda"], "--device cuda: no GPU is visible", CLI, NO_GPU),
    ("device-cuda-index", ["--device", "cuda:99"], "--device cuda:99", ""),
    ("set-unknown-key", ["--set", "learning_rate=0.1"], "unknown option 'learning_rate' in command line", ""),
    ("set-no-equals", ["--set", "lr"], "--set expects KEY=VALUE, got 'lr'", ""),
    ("set-no-key", ["--set", "=3"], "has no option name", ""),
    ("set-malformed-yaml", ["--set", "milestones=[1,2"], "cannot parse value '[1,2' in --set", ""),
    # option files
    ("options-missing", ["--options", "{tmp}/nope.yaml"], "nope.yaml not found", ""),
    ("options-folder", ["--options", "{tmp}/empty"], "is a folder, not a file", ""),
    ("options-malformed", ["--options", "{tmp}/malformed.yaml"], "malformed YAML in", ""),
    ("options-not-mapping", ["--options", "{tmp}/list.yaml"], "must be a mapping of option: value", ""),
    ("options-not-text", ["--options", "{tmp}/binary.yaml"], "(not UTF-8 text)", ""),
    ("options-unknown-key", ["--options", "{tmp}/typo.yaml"], "unknown option 'learning_rat'", ""),
    ("options-python-tag", ["--options", "{tmp}/tag.yaml"], "malformed YAML", ""),
    ("options-lr-text", ["--options", "{tmp}/lr_text.yaml"], "option lr: 'fast' (from {tmp}/lr_text.yaml)", CLI),
    ("options-lr-infinite", ["--options", "{tmp}/lr_inf.yaml"], "option lr: inf", ""),
    ("options-seeds-text", ["--options", "{tmp}/seeds.yaml"], "seeds must be a list of integers", ""),
    ("options-orders-scalar", ["--options", "{tmp}/orders.yaml"], "orders must be a list of class orders", ""),
    ("options-milestones-scalar", ["--options", "{tmp}/milestones.yaml"], "option milestones: 5", ""),
    # data
    ("data-path-missing", ["--data-path", "{tmp}/nope"], "--data-path {tmp}/nope does not exist", CLI),
    ("dataset-missing", ["--suite", "cifar100", "--data-path", "{tmp}/empty"], "cifar100 not found", ""),
    ("dataset-zip-garbage", ["--set", "dataset=imagefolder", "--data-path", "{tmp}/garbage.zip"],
     "is not a readable zip file", ""),
    ("dataset-image-broken", ["--set", "dataset=imagefolder", "--data-path", "{tmp}/broken_images"],
     "cannot decode image", CLI),
    # output folder
    ("output-dir-is-file", ["--output-dir", "{tmp}/file.txt"], "is a file, not a folder", ""),
    ("output-dir-under-file", ["--output-dir", "{tmp}/file.txt/results"], "file.txt is a file, not a folder", ""),
    ("output-dir-unwritable", ["--output-dir", "/proc/clbench-results", "--no-tracking"],
     "--output-dir /proc/clbench-results is not writable", CLI, LINUX),
    # tracking
    ("tracking-ftp", ["--tracking-uri", "ftp://x"], "unsupported scheme 'ftp://'", ""),
    ("tracking-sqlite-no-file", ["--tracking-uri", "sqlite://relative.db"], "give a file", ""),
    ("tracking-sqlite-memory", ["--tracking-uri", "sqlite:///:memory:"], "give a file", ""),
    ("tracking-file-store", ["--tracking-uri", "./mlruns"], "no longer writes the ./mlruns file store", ""),
    ("tracking-no-host", ["--tracking-uri", "http://"], "has no host", ""),
    ("tracking-unreachable", ["--tracking-uri", "http://127.0.0.1:{port}"], "is unreachable", CLI),
    ("tracking-not-a-database", ["--tracking-uri", "sqlite:///{tmp}/garbage.db"], "not an SQLite database", ""),
    ("tracking-other-database", ["--tracking-uri", "sqlite:///{tmp}/other_app.db"], "without MLflow's tables", ""),
    ("tracking-folder", ["--tracking-uri", "sqlite:///{tmp}/empty"], "is a folder", ""),
    # the Ray launcher: rejected before Ray starts
    ("ray-lr-text", ["--launcher", "ray", "--set", "lr=abc"], "option lr: 'abc'", CLI),
    ("ray-device-cuda-index", ["--launcher", "ray", "--device", "cuda:99"], "--device cuda:99", CLI),
]


def _fill(text: str, tmp: Path, port: int) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{port}", str(port))


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _run(argv: list[str], real_process: bool, cwd: Path) -> tuple[int, str, str]:
    if real_process:
        out = subprocess.run([sys.executable, str(ROOT / "run_benchmark.py"), *argv], cwd=cwd, capture_output=True,
                             text=True, timeout=180)
        return out.returncode, out.stdout, out.stderr
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run_benchmark.cli(argv)
    return code, stdout.getvalue(), stderr.getvalue()


# Every other case starts from a previous run's output folder (it must stay as it was), the others from none.
PARAMS = [pytest.param(case[0], case[1], case[2], case[3], i % 2 == 1, id=case[0], marks=case[4:])
          for i, case in enumerate(CASES)]


@pytest.mark.parametrize("case_id,extra,words,how,prefilled", PARAMS)
def test_bad_input_is_one_error_line_and_nothing_is_written(case_id, extra, words, how, prefilled, tmp_path,
                                                            monkeypatch, free_port):
    port = free_port()
    _write_inputs(tmp_path)
    out = tmp_path / "out"
    if prefilled:
        _existing_output(out)
    argv = [*DIGITS, "--output-dir", str(out)]
    for arg in extra:              # a case's flag replaces the default one (--method, --suite, --output-dir ...)
        if arg.startswith("--") and arg in argv and arg not in ("--set", "--options"):
            i = argv.index(arg)
            del argv[i: i + 2]
    argv += [_fill(a, tmp_path, port) for a in extra]
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)    # a stray relative write (./results, ./mlruns) would land in the snapshot

    for real_process in ([False, True] if how == CLI else [False]):
        code, stdout, stderr = _run(argv, real_process, tmp_path)
        where = "process" if real_process else "cli()"
        assert code == 2, f"{where}: exit {code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: {stderr[-2000:]}"
        assert "Traceback" not in stderr + stdout
        assert _fill(words, tmp_path, port) in lines[0], f"{where}: {lines[0]}"
        assert _snapshot(tmp_path) == before, f"{where}: files changed under {tmp_path}"
        assert not Path("/proc/clbench-results").exists()
    assert out.is_dir() == prefilled


@AS_ROOT
def test_read_only_output_dir_with_no_tracking_is_one_error_line(tmp_path):
    out = tmp_path / "out"
    _existing_output(out)
    before = _snapshot(tmp_path)
    out.chmod(0o555)
    try:
        code, _, stderr = _run([*DIGITS, "--output-dir", str(out / "new"), "--no-tracking"], True, tmp_path)
    finally:
        out.chmod(0o755)
    assert code == 2 and stderr.strip().startswith("error: ") and "not writable" in stderr
    assert len(stderr.strip().splitlines()) == 1 and _snapshot(tmp_path) == before


def test_there_are_at_least_forty_distinct_bad_inputs():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) >= 40
    assert sum(case[3] == CLI for case in CASES) >= len(CASES) // 6      # a good share through a real process


SWEEP = ["sweep", "--method", "finetune", "--suite", "digits-5x2",
         "--space", str(ROOT / "benchmarks" / "sweeps" / "finetune.yaml")]


@pytest.mark.parametrize("extra,words", [
    (["--num-samples", "many"], "argument --num-samples: invalid int value"),
    (["--set", "lr=abc"], "option lr: 'abc'"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--seed", "-4"], "seed -4 is out of range"),
], ids=["sweep-num-samples-text", "sweep-lr-text", "sweep-device-cuda-index", "sweep-seed-negative"])
def test_sweep_runs_the_same_pre_flight(extra, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = _run([*SWEEP, "--output-dir", str(tmp_path / "out"), *extra], False, tmp_path)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: ") and words in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_while_writing_results_is_one_line(tmp_path):
    from harness.errors import ResourceError

    with pytest.raises(ResourceError) as err:
        with run_benchmark.os_errors_as_one_line(tmp_path):
            (tmp_path / "gone" / "summary.csv").write_text("x")
    assert "\n" not in str(err.value) and "gone/summary.csv" in str(err.value) and "rerun" in str(err.value)
