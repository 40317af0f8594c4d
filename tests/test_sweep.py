"""Hyper-parameter sweeps (harness.sweep.driver): real Ray Tune + Ray Train, real digits data, a tiny CNN, real MLflow.

What is shown:
1. bad spaces (unknown key, empty choice, low > high, log scale from 0, unknown distribution, ...) fail with one
   ConfigError line before Ray is started, and optuna is asked for by name when it is not installed;
2. the tuning protocol's split: stratified, disjoint from the rest of the training data, fixed;
3. a 4-trial grid sweep on 2 CPUs end to end: ASHA stops the bad learning rates after their first task (their
   checkpoints stop there), every trial is a child MLflow run under the sweep's run, the best config is written
   as a YAML file, and NOT ONE image of the digits test split was read by any process. The last point is
   checked by content, in every Python process Ray starts: a `sitecustomize` put on PYTHONPATH wraps
   ArrayData (every split or subset built in memory) and TaskDataset.__getitem__ (every sample fed to a model)
   and appends a hash of each image to a file per process; the test split's images are then looked up there;
4. the best-config YAML goes into a normal benchmark run (`run_benchmark.py --options best.yaml`) unchanged;
5. (slow) an interrupted sweep continues with `--resume` without rerunning its finished trials.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ray = pytest.importorskip("ray")

from harness.errors import ConfigError  # noqa: E402
from harness.sweep.driver import main as sweep_main  # noqa: E402
from harness.data.base import validation_split  # noqa: E402
from harness.sweep.space import load_space, option_keys, parse_space  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "benchmarks" / "sweeps"
# Tiny and quick: 1 epoch on the first task (where ASHA decides), more on the next ones so that a STOP lands
# while the bad trials are still training their second task (a stop takes a moment to reach the worker).
FAST = ["--set", "base_epochs=1", "--set", "epochs=20", "--set", "backbone=tiny_cnn"]

# The instrument: loaded by every Python process whose PYTHONPATH holds its folder (Ray's workers inherit the
# driver's environment). It patches harness.data when harness.data imports it, in that process.
AUDIT_SITECUSTOMIZE = r'''
import hashlib, importlib.abc, importlib.machinery, os, sys

_DIR = os.environ.get("CLBENCH_AUDIT_DIR")
_FILE = None


def _digest(image):
    import numpy as np
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).hexdigest()


def _write(kind, hashes):
    global _FILE
    if _FILE is None:
        _FILE = open(os.path.join(_DIR, f"{os.getpid()}.log"), "a", buffering=1)
    _FILE.write("".join(f"{kind} {h}\n" for h in hashes))
    _FILE.flush()


def patch_base(module):
    cls, original = module.ArrayData, module.ArrayData.__post_init__

    def __post_init__(self):
        original(self)
        if getattr(self.x, "dtype", None) is not None and self.x.dtype.kind == "u" and self.x.ndim == 4:
            _write("A", [_digest(img) for img in self.x])
    cls.__post_init__ = __post_init__


def patch_transforms(module):
    cls, original = module.TaskDataset, module.TaskDataset.__getitem__

    def __getitem__(self, index):
        if not self.is_paths:
            _write("G", [_digest(self.data.x[index])])
        return original(self, index)
    cls.__getitem__ = __getitem__


_PATCHES = {"harness.data.base": patch_base, "harness.data.transforms": patch_transforms}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module, run=run, name=name):
            run(module)
            _PATCHES[name](module)
        spec.loader.exec_module = exec_module
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
'''


def _digest(image) -> str:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).hexdigest()


def _records(audit_dir: Path) -> dict[int, list[tuple[str, str]]]:
    out = {}
    for path in audit_dir.glob("*.log"):
        out[int(path.stem)] = [tuple(line.split()) for line in path.read_text().splitlines() if line.strip()]
    return out


@pytest.fixture
def audited_env(tmp_path, monkeypatch):
    """PYTHONPATH with the instrument for every process started from now on; returns the records folder."""
    if ray.is_initialized():
        ray.shutdown()
    site_dir, audit_dir = tmp_path / "site", tmp_path / "audit"
    site_dir.mkdir()
    audit_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    paths = [str(site_dir), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv("CLBENCH_AUDIT_DIR", str(audit_dir))
    return site_dir, audit_dir


def _install_in_process(site_dir: Path, monkeypatch) -> None:
    """The same instrument in this (driver) process, undone by monkeypatch at the end of the test."""
    import harness.data.base as base
    import harness.data.transforms as transforms

    spec = importlib.util.spec_from_file_location("audit_site", site_dir / "sitecustomize.py")
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    monkeypatch.setattr(base.ArrayData, "__post_init__", base.ArrayData.__post_init__)
    monkeypatch.setattr(transforms.TaskDataset, "__getitem__", transforms.TaskDataset.__getitem__)
    audit.patch_base(base)
    audit.patch_transforms(transforms)


def _digits_hashes() -> tuple[set[str], set[str]]:
    """(hashes of the train split, hashes of test images that are not also in the train split)."""
    from harness.data.digits import load_digits_split

    train = {_digest(x) for x in load_digits_split("train").x}
    test = {_digest(x) for x in load_digits_split("test").x}
    return train, test - train


def _args(tmp_path: Path, space: Path, *extra: str) -> list[str]:
    return ["--method", "finetune", "--suite", "digits-5x2", "--space", str(space), "--output-dir",
            str(tmp_path / "out"), *FAST, *extra]


def _write_space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# 1. bad spaces: one clear line, before Ray starts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("learning_rate: {loguniform: [1.0e-3, 1.0e-1]}", "unknown option 'learning_rate'"),
    ("kd_temperature: {uniform: [1.0, 4.0]}", "unknown option 'kd_temperature'"),   # iCaRL's, not finetune's
    ("memory_size: {choice: []}", "memory_size: choice has no values"),
    ("lr: {uniform: [0.1, 0.01]}", "lr: uniform low 0.1 > high 0.01"),
    ("lr: {loguniform: [0.0, 0.1]}", "lr: loguniform needs low > 0"),
    ("lr: {lognormal: [0.0, 1.0]}", "lr: unknown distribution 'lognormal'"),
    ("lr: {uniform: [0.1]}", "lr: uniform takes 2 numbers [low, high]"),
    ("epochs: {randint: [3, 3]}", "epochs: randint [3, 3] is empty"),
    ("epochs: {uniform: [1, 4]}", "epochs takes integers"),
    ("seed: {choice: [0, 1]}", "seed defines the benchmark, not a hyper-parameter"),
    ("lr: {loguniform: [1.0e-3, 1.0e-1], choice: [0.1]}", "lr must be a fixed value or ONE distribution"),
    ("lr: 0.1", "sweeps nothing"),
    ("- lr", "must be a mapping of option: value, got list"),
])
def test_bad_space_is_rejected_before_ray_starts(tmp_path, text, message):
    assert not ray.is_initialized()
    with pytest.raises(ConfigError) as info:
        sweep_main(_args(tmp_path, _write_space(tmp_path, text + "\n")))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()          # nothing written: no MLflow store, no sweep folder


def test_search_mode_mismatches_and_missing_optuna(tmp_path):
    space = _write_space(tmp_path, "lr: {loguniform: [1.0e-3, 1.0e-1]}\nmemory_size: {grid: [50, 100]}\n")
    with pytest.raises(ConfigError, match="--search grid enumerates grid/choice values only, not loguniform"):
        sweep_main(_args(tmp_path, space, "--search", "grid"))
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match=r"^optuna is not installed: pip install optuna"):
            sweep_main(_args(tmp_path, space, "--search", "optuna"))
    else:
        with pytest.raises(ConfigError, match="optuna does not take grid values"):
            sweep_main(_args(tmp_path, space, "--search", "optuna"))
    with pytest.raises(ConfigError, match="--val-fraction must be between 0 and 1"):
        sweep_main(_args(tmp_path, space, "--val-fraction", "1.5"))
    with pytest.raises(ConfigError, match="nothing to resume"):
        sweep_main(_args(tmp_path, space, "--resume"))
    # --set is read as run_benchmark.py reads it (harness.config.compose.parse_overrides)
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE, got 'lr'"):
        sweep_main(_args(tmp_path, space, "--set", "lr"))
    with pytest.raises(ConfigError, match="--set '=3' has no option name"):
        sweep_main(_args(tmp_path, space, "--set", "=3"))
    assert not ray.is_initialized()


def test_example_spaces_are_valid_for_their_methods():
    from harness.config.compose import defaults, resolve_config
    from harness.config.catalog import list_methods

    files = {p.stem: p for p in SWEEPS.glob("*.yaml")}
    assert {"finetune", "replay", "icarl", "der", "dytox"} <= set(files)
    for method, path in files.items():
        data = yaml.safe_load(path.read_text())
        if method not in list_methods():
            # not registered yet (DyTox's method is being written): its keys must at least be harness options
            assert set(data) <= set(defaults()), f"{path}: {set(data) - set(defaults())}"
            continue
        base = resolve_config(method, "cifar10-5x2")
        for search in ("random", "optuna"):
            space = load_space(path, method, "cifar10-5x2", base=base, search=search)
            assert space.swept
        assert set(space.params) <= option_keys(method, "cifar10-5x2")[0]


def test_space_becomes_tune_objects():
    from ray.tune.search.sample import Categorical, Float, Integer

    known, _ = option_keys("replay", "digits-5x2")
    space = parse_space({"lr": {"loguniform": [1e-3, 1e-1]}, "memory_size": {"choice": [50, 100]},
                         "epochs": {"qrandint": [1, 9, 2]}, "incremental_lr": None,
                         "memory_selection": {"grid_search": ["random", "herding"]}}, "x.yaml", known)
    tune_space = space.to_tune("random")
    assert isinstance(tune_space["lr"], Float) and tune_space["lr"].lower == 1e-3
    assert isinstance(tune_space["memory_size"], Categorical)
    assert isinstance(tune_space["epochs"], Integer)
    assert tune_space["incremental_lr"] is None
    assert tune_space["memory_selection"] == {"grid_search": ["random", "herding"]}
    assert space.grid_size("random") == 2
    grid = parse_space({"memory_size": {"choice": [50, 100]}, "memory_selection": {"grid": ["random", "herding"]}},
                       "x.yaml", known, search="grid")
    assert grid.to_tune("grid")["memory_size"] == {"grid_search": [50, 100]}
    assert grid.grid_size("grid") == 4


# ---------------------------------------------------------------------------------------------------------
# 2. the validation split
# ---------------------------------------------------------------------------------------------------------
def test_validation_split_is_stratified_disjoint_and_fixed():
    from harness.data.digits import load_digits_split

    train = load_digits_split("train")
    rest, val = validation_split(train, {"tasks": 3, "fraction": 0.1, "seed": 0})
    assert len(rest) + len(val) == len(train)
    counts, val_counts = np.bincount(train.y), np.bincount(val.y, minlength=10)
    assert np.all(np.abs(val_counts - 0.1 * counts) <= 0.5 + 1e-9)        # 10% of EVERY class, rounded
    rest_h, val_h = {_digest(x) for x in rest.x}, [_digest(x) for x in val.x]
    all_train = [_digest(x) for x in train.x]
    assert sorted(rest_h | set(val_h)) == sorted(set(all_train))
    # disjoint by sample (digits has a few duplicate images, so compare positions, not pixels)
    assert len(set(map(bytes, val.x.reshape(len(val), -1)))) <= len(val)
    again_rest, again_val = validation_split(train, {"tasks": 5, "fraction": 0.1, "seed": 0})
    assert np.array_equal(again_val.x, val.x) and np.array_equal(again_val.y, val.y)   # not k-dependent
    other = validation_split(train, {"tasks": 3, "fraction": 0.1, "seed": 1})[1]
    assert not np.array_equal(other.x, val.x)


# ---------------------------------------------------------------------------------------------------------
# 3 + 4. the sweep end to end, no test sample read, the best config into a normal run
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(1500)   # ~100 s alone; each Ray trial start is slow on a loaded 2-core box
def test_sweep_end_to_end_asha_mlflow_no_test_reads_and_best_config(tmp_path, audited_env, monkeypatch):
    from mlflow import MlflowClient

    site_dir, audit_dir = audited_env
    train_hashes, test_only = _digits_hashes()
    assert len(test_only) > 300                      # the instrument below has something to find
    _install_in_process(site_dir, monkeypatch)      # the driver too (it must not read data either)

    # lr 1e-6 / 1e-7 barely move the network: chance (~50%) on the first 2-class task, against ~65-90% for the
    # two good ones. One trial at a time: the bad ones start only after a good one has passed the rung, so ASHA
    # (rung after task 1 only, reduction 4) must stop them. One at a time also means each trial takes the whole
    # machine (1.95 CPU): a stopped trial whose CPUs Ray failed to free would hang the next one (it did, before
    # the embedded Ray got its dashboard: see harness.ray_launch.init_ray).
    space = _write_space(tmp_path, "lr: {grid: [0.05, 0.03, 1.0e-6, 1.0e-7]}\n")
    started = time.perf_counter()
    rc = sweep_main(_args(tmp_path, space, "--search", "grid", "--reduction-factor", "4", "--val-tasks", "3",
                          "--max-concurrent-trials", "1"))
    elapsed = time.perf_counter() - started
    assert rc == 0
    assert not ray.is_initialized()                  # the sweep shut down the Ray it started
    sweep_dir = next((tmp_path / "out" / "sweeps").iterdir())

    # ---- no test image anywhere, in any process ---------------------------------------------------------
    records = _records(audit_dir)
    worker_pids = [pid for pid in records if pid != os.getpid()]
    assert worker_pids, "the instrument recorded nothing in Ray's worker processes"
    seen = {h for rows in records.values() for _, h in rows}
    fed = {h for rows in records.values() for kind, h in rows if kind == "G"}
    assert len(fed) > 200                            # training and validation samples went through a model
    assert not (seen & test_only), f"{len(seen & test_only)} test-split image(s) were read during the sweep"
    assert seen <= train_hashes                      # everything read came from the training split

    # ---- trials, ASHA -------------------------------------------------------------------------------
    table = {row["lr"]: row for row in _csv(sweep_dir / "results.csv")}
    assert set(table) == {0.05, 0.03, 1e-6, 1e-7}
    stopped = [lr for lr, row in table.items() if row["outcome"] == "early_stopped"]
    assert {1e-6, 1e-7} <= set(stopped), table
    assert table[0.05]["outcome"] == "completed" and int(table[0.05]["tasks_seen"]) == 3
    for lr in (1e-6, 1e-7):
        ckpts = sorted(p.name for p in (sweep_dir / "trials" / table[lr]["name"] / "checkpoints").glob("*.pt"))
        assert ckpts and "task_002.pt" not in ckpts, (lr, ckpts)     # really stopped before its last task
        assert not (sweep_dir / "trials" / table[lr]["name"] / "result.json").exists()

    # ---- MLflow: the sweep's run, one child per trial -------------------------------------------------
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clbench-sweeps")
    parents = client.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    assert {c.data.tags["run_kind"] for c in children} == {"sweep_trial"}
    assert {c.data.tags["eval_split"] for c in children} == {"validation"}
    by_lr = {float(c.data.params["lr"]): c for c in children}
    assert by_lr[0.05].info.status == "FINISHED"
    assert len(client.get_metric_history(by_lr[0.05].info.run_id, "val_accuracy")) == 3
    for lr in (1e-6, 1e-7):
        assert by_lr[lr].info.status == "KILLED" and by_lr[lr].data.tags["sweep_outcome"] == "early_stopped"
        assert len(client.get_metric_history(by_lr[lr].info.run_id, "val_accuracy")) < 3
    assert parent.data.metrics["trials_early_stopped"] >= 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "results.csv", "space.yaml"} <= artifacts

    # ---- the best configuration -------------------------------------------------------------------
    best_path = sweep_dir / "best.yaml"
    text = best_path.read_text()
    assert text.startswith("# best configuration of sweep") and "method: finetune  suite: digits-5x2" in text
    best = yaml.safe_load(text)
    assert set(best) == {"lr"} and best["lr"] in (0.05, 0.03)
    assert best["lr"] == max((lr for lr, r in table.items() if r["outcome"] == "completed"),
                             key=lambda lr: (float(table[lr]["val_accuracy"]), float(table[lr]["avg_inc_accuracy"])))
    print(f"sweep wall time {elapsed:.0f} s")

    # ---- round trip: `run_benchmark.py --options best.yaml` (the test split is read here, legitimately)
    monkeypatch.undo()
    from harness.config.compose import resolve_config

    config = resolve_config("finetune", "digits-5x2", [str(best_path)])
    assert config["lr"] == best["lr"]
    sys.path.insert(0, str(ROOT))
    import run_benchmark

    out = tmp_path / "bench"
    assert run_benchmark.main(["--method", "finetune", "--suite", "digits-5x2", "--options", str(best_path),
                               "--launcher", "local", "--epochs", "1", "--output-dir", str(out), "--quiet"]) == 0
    result = json.loads(next(out.glob("trials/*/result.json")).read_text())
    assert result["status"] == "finished" and result["config"]["lr"] == best["lr"] and result["num_tasks"] == 5


def test_the_instrument_sees_a_test_split_read(audited_env):
    """Positive control: a process that loads the digits test split leaves its images in the records."""
    _, audit_dir = audited_env
    subprocess.run([sys.executable, "-c", "from harness.data import load_dataset; load_dataset('digits', None, 'test')"],
                   check=True, cwd=str(ROOT), timeout=300)
    _, test_only = _digits_hashes()
    seen = {h for rows in _records(audit_dir).values() for _, h in rows}
    assert test_only <= seen


def _csv(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


# ---------------------------------------------------------------------------------------------------------
# 5. resume
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """Ctrl-C (SIGINT) after the first trial finished, then `sweep --resume`: the finished trial is kept (its
    result.json is untouched), the others run, and MLflow holds one child run per trial."""
    space = _write_space(tmp_path, "lr: {grid: [0.05, 0.04, 0.03]}\n")
    argv = [sys.executable, str(ROOT / "run_benchmark.py"), "sweep",
            *_args(tmp_path, space, "--search", "grid", "--scheduler", "fifo", "--max-concurrent-trials", "1")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = tmp_path / "out"
    deadline = time.time() + 600
    first = None
    while time.time() < deadline and proc.poll() is None:
        done = list(out.glob("sweeps/*/trials/*/result.json"))
        if done:
            first = done[0]
            break
        time.sleep(0.5)
    assert first is not None, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    stamp = first.stat().st_mtime_ns
    finished_before = {p.parent.name for p in out.glob("sweeps/*/trials/*/result.json")}
    assert len(finished_before) < 3

    rc = subprocess.run(argv + ["--resume"], cwd=str(ROOT), env=env, timeout=900, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    assert first.stat().st_mtime_ns == stamp                    # the finished trial was not run again
    results = list(out.glob("sweeps/*/trials/*/result.json"))
    assert len(results) == 3
    sweep_dir = first.parents[2]
    assert len(_csv(sweep_dir / "results.csv")) == 3 and (sweep_dir / "best.yaml").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clbench-sweeps")
    parents = client.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(c.data.tags["trial"] for c in children) == sorted(p.parent.name for p in results)
