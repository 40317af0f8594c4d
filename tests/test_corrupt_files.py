"""Every file the harness reads can be damaged: images, zips, CIFAR pickles, result.json, checkpoints, mlflow.db.
Each gives one line naming the file and what to do (never a traceback), and one bad trial file never blocks the
other trials. The files are real ones, damaged the way files break: cut short, overwritten, or the wrong thing."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config.compose import resolve_config
from harness.data import TaskDataset, check_dataset, dataset_info, load_dataset
from harness.errors import CheckpointError, ConfigError, DataError
from harness.run.local import run_local
from harness.run.results import read_result, result_path
from harness.tracking.store import check_sqlite_store
from harness.run.trial import latest_checkpoint, load_checkpoint
from harness.config.identity import expand_trials

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Decoded images are cached per test: a damaged file is never hidden by an earlier good decode."""
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_benchmark.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# ---- images and zips --------------------------------------------------------------------------------------

def _png(side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_files(classes: int = 2, side: int = 8) -> dict[str, bytes]:
    return {f"{split}/c{c}/{i:03d}.png": _png(side) for split, n in (("train", 3), ("test", 1))
            for c in range(classes) for i in range(n)}


def _write(kind: str, root: Path, files: dict[str, bytes]) -> Path:
    if kind == "zip":
        path = root.with_suffix(".zip")
        with zipfile.ZipFile(path, "w") as z:
            for rel, data in files.items():
                z.writestr(rel, data)
        return path
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


DAMAGES = {"garbage": lambda data: b"\x00\x13 not an image " * 8, "truncated": lambda data: data[: len(data) // 2]}


@pytest.mark.parametrize("kind", ["dir", "zip"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("member", ["train/c0/000.png", "train/c1/002.png"])   # the very first image, a later one
def test_a_broken_image_names_the_folder_and_the_file(tmp_path, kind, damage, member):
    files = _image_files()
    files[member] = DAMAGES[damage](files[member])
    path = _write(kind, tmp_path / "imgs", files)
    where = f"{path}:{member}" if kind == "zip" else str(path / member)
    calls = [lambda: load_dataset("imagefolder", str(path), "train")]
    if member == "train/c0/000.png":          # the pre-flight decodes the first image of each class
        calls.append(lambda: check_dataset({"dataset": "imagefolder", "data_path": str(path)}))
        if damage == "garbage":               # sizing the model reads the first image's header
            calls.append(lambda: dataset_info("imagefolder", str(path)))
    for call in calls:
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"cannot decode image {where} ") and "replace it" in msg and "delete it" in msg
        assert "\n" not in msg


def test_a_broken_large_image_read_during_training_names_the_file(tmp_path):
    files = _image_files(side=80)             # large images stay paths, decoded by the data loader
    files["train/c1/001.png"] = b"garbage"
    path = _write("dir", tmp_path / "big", files)
    data = load_dataset("imagefolder", str(path), "train")
    assert data.is_paths
    dataset = TaskDataset(data, transform=None)
    dataset[0]
    with pytest.raises(DataError, match=f"cannot decode image {path / 'train/c1/001.png'} .*replace it"):
        [dataset[i] for i in range(len(dataset))]


def test_a_damaged_zip_member_or_archive_names_it(tmp_path):
    files = _image_files()
    archive = _write("zip", tmp_path / "imgs", files)
    raw = archive.read_bytes()
    at = raw.index(files["train/c1/001.png"]) + 40     # stored uncompressed: flip a byte of that member
    archive.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", str(archive), "train")
    assert str(err.value).startswith(f"cannot read train/c1/001.png from {archive} (BadZipFile")
    assert "replace it with a good copy" in str(err.value)
    archive.write_bytes(raw[: len(raw) // 2])          # cut short: the central directory is gone
    for call in (lambda: load_dataset("imagefolder", str(archive), "train"),
                 lambda: check_dataset({"dataset": "imagefolder", "data_path": str(archive)})):
        with pytest.raises(DataError, match=f"^{archive} is not a readable zip file .*replace it"):
            call()


def test_cli_stops_on_a_broken_first_image_with_one_line_and_writes_nothing(tmp_path):
    files = _image_files(classes=10)
    files["train/c0/000.png"] = b"garbage"
    archive = _write("zip", tmp_path / "imgs", files)
    out = _cli("--method", "finetune", "--suite", "digits-5x2", "--set", "dataset=imagefolder", "--data-path",
               str(archive), "--output-dir", str(tmp_path / "out"), "--launcher", "local", "--no-tracking",
               "--quiet")
    line = _one_error_line(out)
    assert f"{archive}:train/c0/000.png" in line and "replace it" in line
    assert not (tmp_path / "out").exists()


# ---- CIFAR pickles ----------------------------------------------------------------------------------------

def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump(d / name, {b"labels": [int(v) for v in RNG.integers(0, 10, 4)],
                         b"data": RNG.integers(0, 256, (4, 3072), dtype=np.uint8)})
    _dump(d / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    return d


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("damage", ["truncated", "not a pickle", "wrong keys", "runs code", "meta without names"])
def test_a_damaged_cifar_pickle_is_named_and_never_run(tmp_path, damage):
    d = _write_cifar10(tmp_path)
    marker = tmp_path / "code-ran"
    name = {"truncated": "data_batch_2", "not a pickle": "test_batch", "meta without names": "batches.meta"}.get(
        damage, "data_batch_1")
    path = d / name
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "not a pickle":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif damage == "wrong keys":
        _dump(path, {b"labels": [1, 2]})
    elif damage == "runs code":
        _dump(path, {b"data": _RunsCode(str(marker)), b"labels": []})
    else:
        _dump(path, {b"num_vis": 3072})
    split = "test" if name == "test_batch" else "train"
    for call in (lambda: check_dataset({"dataset": "cifar10", "data_path": str(tmp_path)}),
                 lambda: load_dataset("cifar10", str(tmp_path), split)):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(str(path)) and "download the official files again" in msg and "\n" not in msg
    assert not marker.exists()


# ---- result.json ------------------------------------------------------------------------------------------

def _finished(name: str = "t") -> dict:
    return {"name": name, "status": "finished", "metrics": {"cnn": {"last_accuracy": 50.0}}, "history": [{}]}


@pytest.mark.parametrize("content", [
    b'{"name": "t", "status": "fini', b"\xff\xfe\x00 binary garbage", b"[1, 2, 3]", b"null",
    b'{"status": "finished", "metrics": {}, "history": []}', b'{"name": "t", "status": "finished", "history": []}'],
    ids=["truncated", "not-utf8", "a-list", "null", "no-name", "finished-without-metrics"])
def test_a_damaged_result_json_is_moved_aside_with_one_warning(tmp_path, content):
    path = result_path(tmp_path, "t")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    warnings = []
    assert read_result(tmp_path, "t", warn=warnings.append) is None       # not finished: the trial resumes
    assert len(warnings) == 1 and str(path) in warnings[0] and "result.json.corrupt" in warnings[0]
    assert not path.exists() and path.with_name("result.json.corrupt").read_bytes() == content
    path.write_bytes(b"{")                                                # damaged again: the first copy is kept
    assert read_result(tmp_path, "t", warn=warnings.append) is None
    assert path.with_name("result.json.corrupt").read_bytes() == content
    assert path.with_name("result.json.corrupt-2").read_bytes() == b"{"


def test_good_results_are_read_unchanged_and_warnings_go_to_stderr(tmp_path, capsys):
    for name, result in (("ok", _finished("ok")), ("failed", {"name": "failed", "status": "failed", "error": "x"})):
        path = result_path(tmp_path, name)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(result))
        assert read_result(tmp_path, name) == result
    assert read_result(tmp_path, "absent") is None
    result_path(tmp_path, "ok").write_text("{oops")
    assert read_result(tmp_path, "ok") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {result_path(tmp_path, 'ok')} is unusable")


def _digits_args(output_dir: Path, *extra: str) -> list[str]:
    return ["--method", "finetune", "--suite", "digits-5x2", "--output-dir", str(output_dir), "--launcher", "local",
            "--no-tracking", "--quiet", "--epochs", "1", *extra]


def test_one_corrupt_result_json_does_not_block_the_other_trial(tmp_path, capsys):
    specs = expand_trials(_digits("finetune", seeds=[0, 1], epochs=1, base_epochs=1))
    run_local(specs[:1], tmp_path, log=lambda s: None, progress=False)
    damaged = result_path(tmp_path, specs[0]["name"])
    damaged.write_text('{"name": ')                                     # cut short by a full disk
    logs = []
    results = run_local(specs, tmp_path, log=logs.append, progress=False)
    assert [r["status"] for r in results] == ["finished", "finished"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(damaged) in warnings[0]
    assert damaged.with_name("result.json.corrupt").read_text() == '{"name": '
    assert any("resumed" in line and "task_004" in line for line in logs)   # not trained again
    assert json.loads(damaged.read_text())["status"] == "finished"


@pytest.mark.slow
def test_cli_one_corrupt_result_json_does_not_block_the_other_trial(tmp_path):
    first = _cli(*_digits_args(tmp_path, "--seeds", "0"))
    assert first.returncode == 0, first.stderr
    (damaged,) = (tmp_path / "trials").glob("*/result.json")
    damaged.write_text('{"name": ')                                     # cut short by a full disk
    out = _cli(*_digits_args(tmp_path, "--seeds", "0", "1"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(damaged) in warnings[0]
    assert damaged.with_name("result.json.corrupt").read_text() == '{"name": '
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "trials").glob("*/result.json"))]
    assert sorted(r["seed"] for r in results) == [0, 1] and all(r["status"] == "finished" for r in results)
    assert "task_004" in out.stdout      # seed 0 resumed from its last checkpoint instead of training again


# ---- checkpoints ------------------------------------------------------------------------------------------

def _state(task: int) -> dict:
    return {"task": task, "method": {"w": torch.ones(2)}, "memory": None, "metrics": {}, "history": [{"task": task}]}


def test_damaged_checkpoints_are_moved_aside_and_the_previous_one_is_used(tmp_path):
    for t in range(4):
        torch.save(_state(t), tmp_path / f"task_{t:03d}.pt")
    good = (tmp_path / "task_001.pt").read_bytes()
    (tmp_path / "task_001.pt").write_bytes(good[: len(good) // 2])                 # truncated
    (tmp_path / "task_002.pt").write_bytes(b"\x00" * 64)                            # garbage
    torch.save({"task": 3, "weights": {}}, tmp_path / "task_003.pt")               # loads, keys missing
    warnings = []
    path = latest_checkpoint(str(tmp_path), warn=warnings.append)
    assert path == tmp_path / "task_000.pt"
    assert load_checkpoint(path)["history"] == [{"task": 0}]
    assert [w.split()[:4] for w in warnings] == [
        ["checkpoint", str(tmp_path / "task_003.pt"), "is", "not"], ["cannot", "read", "checkpoint",
                                                                     str(tmp_path / "task_002.pt")],
        ["cannot", "read", "checkpoint", str(tmp_path / "task_001.pt")]]
    assert all("moved it to task_00" in w and ".pt.corrupt" in w for w in warnings)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "task_000.pt", "task_001.pt.corrupt", "task_002.pt.corrupt", "task_003.pt.corrupt"]
    (tmp_path / "task_000.pt").write_bytes(b"PK\x03\x04 cut")                       # nothing usable: start over
    assert latest_checkpoint(str(tmp_path), warn=warnings.append) is None
    (tmp_path / "task_000.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"^cannot read checkpoint {tmp_path / 'task_000.pt'} .*delete it"):
        load_checkpoint(tmp_path / "task_000.pt")


def _digits(method: str = "replay", **overrides) -> dict:
    return resolve_config(method, "digits-5x2", overrides={"backbone": "tiny_cnn", "epochs": 2, "base_epochs": 2,
                                                           "augment": "none", **overrides})


def test_a_trial_resumes_from_the_last_usable_checkpoint_with_the_same_numbers(tmp_path, capsys):
    clean = run_local(expand_trials(_digits()), tmp_path, log=lambda s: None, progress=False)[0]
    trial = tmp_path / "trials" / clean["name"]
    (trial / "result.json").unlink()
    last = trial / "checkpoints" / "task_004.pt"
    last.write_bytes(last.read_bytes()[:1000])
    torch.save({"task": 3}, trial / "checkpoints" / "task_003.pt")
    logs = []
    resumed = run_local(expand_trials(_digits()), tmp_path, log=logs.append, progress=False)[0]
    assert resumed["status"] == "finished"
    assert any("resumed" in line and "task_002.pt" in line for line in logs)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "task_004.pt" in warnings[0] and "task_003.pt" in warnings[1]
    assert resumed["metrics"]["cnn"]["accuracies"] == pytest.approx(clean["metrics"]["cnn"]["accuracies"], abs=1e-6)


@pytest.mark.slow
def test_cli_resumes_past_a_garbage_checkpoint(tmp_path):
    crash = _cli(*_digits_args(tmp_path, "--set", "fault_at_task=0"))
    assert crash.returncode == 1, crash.stderr            # the trial died after task 0's checkpoint
    (ckpt,) = (tmp_path / "trials").glob("*/checkpoints/task_000.pt")
    ckpt.write_bytes(b"not a checkpoint")
    out = _cli(*_digits_args(tmp_path, "--set", "fault_at_task=0"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    (warning,) = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert f"cannot read checkpoint {ckpt}" in warning and "task_000.pt.corrupt" in warning
    assert json.loads((ckpt.parents[1] / "result.json").read_text())["status"] == "finished"


# ---- mlflow.db --------------------------------------------------------------------------------------------

def test_check_sqlite_store(tmp_path):
    db = tmp_path / "mlflow.db"
    check_sqlite_store(db)                                 # absent: MLflow creates it
    db.write_bytes(b"")
    check_sqlite_store(db)                                 # empty: a new sqlite database
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()     # a real store
    check_sqlite_store(db)
    damaged = db.read_bytes()
    cases = {"garbage": b"\x89 random bytes, not a database" * 40,
             "damaged": damaged[:16] + b"\xff" * 200 + damaged[216:],
             "foreign": None, "folder": None}
    for case, content in cases.items():
        path = tmp_path / case / "mlflow.db"
        path.parent.mkdir()
        if case == "foreign":
            import sqlite3

            con = sqlite3.connect(path)
            con.execute("CREATE TABLE photos (id INTEGER)")
            con.commit()
            con.close()
        elif case == "folder":
            path.mkdir()
        else:
            path.write_bytes(content)
        with pytest.raises(ConfigError) as err:
            check_sqlite_store(path)
        msg = str(err.value)
        assert str(path) in msg and "move it away or pass --tracking-uri / --no-tracking" in msg and "\n" not in msg
        if case != "folder":
            assert msg.startswith(f"{path} is not an MLflow sqlite store (")


def test_cli_refuses_a_garbage_mlflow_db_with_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not sqlite" * 100)
    line = _one_error_line(_cli(*[a for a in _digits_args(tmp_path) if a != "--no-tracking"]))
    assert str(db) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]     # nothing else written
