"""MLflow tracking against real stores: an sqlite file in tmp_path and a real `mlflow server` on 127.0.0.1.

The trial results are made the way run_trial makes them (harness.metrics.ContinualMetrics fed with predictions
whose per-task accuracies are known), so the numbers read back can be checked exactly.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")

from harness.tracking import plots  # noqa: E402
from harness.errors import ConfigError, ResourceError  # noqa: E402
from harness.run.events import TrialEvents  # noqa: E402
from harness.core.metrics import ContinualMetrics  # noqa: E402
from harness.run.trial import task_row  # noqa: E402
from harness.tracking.store import TRUNCATED, check_tracking, resolve_tracking_uri  # noqa: E402
from harness.tracking.trackers import BenchmarkTracker  # noqa: E402
from harness.tracking.trial_logger import TrialLogger  # noqa: E402

PER_TASK = 200            # test images per task (cifar10-mini: 100 per class, 2 classes per task)
LONG_ORDER = list(range(100000, 101500))   # a class-order-like option longer than MLflow's 6000-char param limit


# ---------------------------------------------------------------------------------------------------------
# Results made like run_trial makes them
# ---------------------------------------------------------------------------------------------------------
def accuracy_matrix(accs: list[float]) -> list[list[float]]:
    """R[t][j] = accs[t] + 4j - 2t: newest task best, and the mean of row t is exactly accs[t]."""
    return [[accs[t] + 4 * j - 2 * t for j in range(t + 1)] for t in range(len(accs))]


class _Counted:
    """What task_row asks of a method: its parameter count."""

    def __init__(self, parameters: int) -> None:
        self.parameters = parameters

    def parameter_count(self) -> int:
        return self.parameters


def row_after(metrics: ContinualMetrics, t: int) -> dict:
    """The row run_trial makes after task t (harness.run.trial.task_row), with made-up but plausible training
    stats and parameter count."""
    stats = {"loss": 2.3 / (t + 1), "epoch_time": 4.0 + t, "images_per_s": 510.0 + 10 * t}
    return task_row(metrics, t, stats, _Counted(464_154 + 130 * t))


def make_result(spec: dict, accs: list[float], fail_after: int | None = None, wall: float = 90.0) -> dict:
    """A finished trial with accuracies `accs` per step (cnn head; nme = cnn - 1.5), or a trial that failed
    after task `fail_after` (its rows up to there, then the failed result the launchers write)."""
    metrics, history = ContinualMetrics(), []
    matrix = accuracy_matrix(accs)
    for t in range(len(accs)):
        task_ids = np.repeat(np.arange(t + 1), PER_TASK)
        targets = task_ids * 2
        for head, shift in (("cnn", 0.0), ("nme", -1.5)):
            correct = np.concatenate([np.arange(PER_TASK) < round((matrix[t][j] + shift) * PER_TASK / 100)
                                      for j in range(t + 1)])
            preds = np.where(correct, targets, targets + 1)
            metrics.add_task(t, preds, targets, task_ids, head=head,
                             top5_correct=np.ones(len(targets), bool) if head == "cnn" else None)
        history.append(row_after(metrics, t))
        if fail_after is not None and t == fail_after:
            return {"name": spec["name"], "method": spec["config"]["method"], "suite": spec["config"]["suite"],
                    "order": spec["order_name"], "seed": spec["seed"], "status": "failed",
                    "error": "RuntimeError: CUDA error: an illegal memory access was encountered",
                    "traceback": "Traceback ...", "config": spec["config"], "launcher": "local",
                    "_rows": history}
    return {"name": spec["name"], "method": spec["config"]["method"], "suite": spec["config"]["suite"],
            "order": spec["order_name"], "seed": spec["seed"], "status": "finished", "history": history,
            "metrics": metrics.summary(), "num_tasks": len(accs), "parameters": history[-1]["parameters"],
            "wall_time_s": wall, "world_size": 2, "config": spec["config"], "launcher": "local"}


def make_config(method: str = "replay", **extra) -> dict:
    cfg = {"method": method, "suite": "cifar10-mini", "dataset": "cifar10-mini", "data_path": None,
           "initial_increment": 2, "increment": 2, "memory_size": 200, "memory_per_class": None,
           "backbone": "resnet32", "epochs": 4, "milestones": [], "lr": 0.1, "batch_size": 64, "num_workers": 2,
           "orders": ["natural", "seed1993"], "seeds": [0, 1], "class_order": LONG_ORDER,
           "recipe_files": [f"benchmarks/recipes/{method}/default.yaml", f"benchmarks/recipes/{method}/cpu.yaml"],
           "options_files": [], "budget": {"epochs": 4, "base_epochs": 4}}
    cfg.update(extra)
    return cfg


def make_specs(config: dict, grid: list[tuple[str, int]], tag: str = "a1b2c3d4") -> list[dict]:
    return [{"name": f"{config['method']}_{config['suite']}_{o}_seed{s}_{tag}", "order": o, "order_name": o,
             "seed": s, "config": {**config, "seed": s}} for o, s in grid]


ACCS_A = [90.0, 80.0, 70.0, 60.0, 50.0]     # AIA 70.0, last 50.0
ACCS_B = [92.0, 84.0, 74.0, 66.0, 58.0]     # AIA 74.8, last 58.0
ACCS_C = [88.0, 76.0, 64.0, 52.0, 40.0]     # fails after task 1


def download(client, run_id: str, path: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=client.tracking_uri))


def color_pixels(png: Path, hex_color: str, tol: float = 0.03) -> int:
    """How many pixels of `png` have (almost exactly) this colour: each curve has its own tab10 colour."""
    import matplotlib.image

    img = matplotlib.image.imread(str(png))[..., :3]
    target = np.array([int(hex_color[i: i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - target).max(axis=-1) < tol).sum())


def run_benchmark_logging(uri: str | None, out: Path) -> dict:
    """What a launcher does: tracker before training, TrialEvents hooks during, end_benchmark after.
    Trial A logs live, B was 'already finished' (only given to end_benchmark: backfilled), C fails."""
    config = make_config()
    specs = make_specs(config, [("natural", 0), ("seed1993", 0), ("natural", 1)])
    lines: list[str] = []
    tracker = BenchmarkTracker.for_benchmark(uri, out, config, specs, log=lines.append)
    events = TrialEvents(lines.append, tracker=tracker)
    a, b = make_result(specs[0], ACCS_A), make_result(specs[1], ACCS_B, wall=110.0)
    c = make_result(specs[2], ACCS_C, fail_after=1)
    for row in a["history"]:
        events.task_finished(specs[0], row)
    events.trial_finished(specs[0], a)
    for row in c.pop("_rows"):
        events.task_finished(specs[2], row)
    events.trial_finished(specs[2], c)
    table = tracker.end_benchmark([a, b, c], specs)
    return {"tracker": tracker, "config": config, "specs": specs, "results": [a, b, c], "table": table,
            "lines": lines, "out": out}


@pytest.fixture(scope="module")
def sqlite_bench(tmp_path_factory, server_process):
    out = tmp_path_factory.mktemp("bench")     # (server_process: only so the server boots meanwhile)
    return run_benchmark_logging(None, out)


# ---------------------------------------------------------------------------------------------------------
# URIs and the pre-flight check
# ---------------------------------------------------------------------------------------------------------
def test_resolve_tracking_uri_is_always_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, "results") == f"sqlite:///{tmp_path}/results/mlflow.db"
    assert resolve_tracking_uri(None, "results").startswith("sqlite:////")
    assert resolve_tracking_uri("sqlite:///rel/m.db", "x") == f"sqlite:///{tmp_path}/rel/m.db"
    assert resolve_tracking_uri("runs.db", "x") == f"sqlite:///{tmp_path}/runs.db"
    assert resolve_tracking_uri("http://10.0.0.5:5000/", "x") == "http://10.0.0.5:5000"
    for bad in ("./mlruns", "file:///tmp/mlruns", "sqlite:///:memory:"):
        with pytest.raises(ConfigError):
            resolve_tracking_uri(bad, "x")


def test_unreachable_server_fails_fast_with_one_line(free_port):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(ResourceError) as info:
        check_tracking(uri)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and uri in message and "mlflow server" in message


def test_silent_server_times_out():
    """A port that accepts connections but never answers (a hung server): the short timeout fires."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(ResourceError, match="unreachable"):
            check_tracking(uri, timeout=1.0)
        assert time.perf_counter() - start < 5


def test_plain_makes_results_json_and_yaml_safe(tmp_path):
    """One helper for every file written from results (MLflow artifacts, result.json, a sweep's best.yaml)."""
    from harness.run.results import write_json
    from harness.tracking.store import plain

    value = {1: (np.float32(0.5), np.int64(3)), "order": np.arange(3), "nan": float("nan"), "inf": np.float64("inf"),
             "path": tmp_path, "flag": True, "none": None, "nested": [{"x": np.bool_(False)}]}
    out = plain(value)
    assert out == {"1": [0.5, 3], "order": [0, 1, 2], "nan": None, "inf": None, "path": str(tmp_path), "flag": True,
                   "none": None, "nested": [{"x": False}]}
    assert type(out["1"][1]) is int and type(out["nested"][0]["x"]) is bool
    assert yaml.safe_load(yaml.safe_dump(out)) == out and json.loads(json.dumps(out, allow_nan=False)) == out
    # result.json: json's own types as they are (a float NaN stays NaN), plain only for what json cannot write
    write_json(tmp_path / "result.json", {"loss": float("nan"), "acc": np.float32(0.25), "order": np.arange(2)})
    back = json.loads((tmp_path / "result.json").read_text())
    assert np.isnan(back["loss"]) and back["acc"] == 0.25 and back["order"] == [0, 1]


def test_check_tracking_creates_store_once(sqlite_bench):
    out = sqlite_bench["out"]
    uri = f"sqlite:///{out}/mlflow.db"
    assert (out / "mlflow.db").is_file()
    first = check_tracking(uri)
    assert check_tracking(uri) == first                    # idempotent: no second experiment
    exp = mlflow.MlflowClient(uri).get_experiment(first)
    assert exp.name == "clbench"
    assert exp.artifact_location == (out / "mlartifacts").as_uri()   # beside the DB, never ./mlruns of the cwd


# ---------------------------------------------------------------------------------------------------------
# Runs, params, metrics, artifacts (sqlite)
# ---------------------------------------------------------------------------------------------------------
def _children(client, tracker) -> dict:
    runs = client.search_runs([tracker.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'")
    return {r.info.run_name: r for r in runs}


def test_parent_and_child_runs(sqlite_bench):
    tracker, specs = sqlite_bench["tracker"], sqlite_bench["specs"]
    client = mlflow.MlflowClient(tracker.uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FAILED"                  # one trial failed
    assert parent.data.tags["run_kind"] == "benchmark"
    assert parent.data.tags["method"] == "replay" and parent.data.tags["suite"] == "cifar10-mini"
    assert parent.data.tags["benchmark"] == parent.info.run_name
    assert parent.data.params["version.mlflow"] == mlflow.__version__
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_finished"] == 2

    children = _children(client, tracker)
    assert set(children) == {s["name"] for s in specs}      # run name = trial name, one run per trial
    status = {name: run.info.status for name, run in children.items()}
    assert status == {specs[0]["name"]: "FINISHED", specs[1]["name"]: "FINISHED", specs[2]["name"]: "FAILED"}
    failed = children[specs[2]["name"]]
    assert "illegal memory access" in failed.data.tags["error"]
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
        assert run.data.tags["run_kind"] == "trial" and run.data.tags["variant"] == "cpu"
        assert run.data.tags["benchmark"] == parent.info.run_name


def test_params_are_the_flattened_config(sqlite_bench):
    tracker, specs = sqlite_bench["tracker"], sqlite_bench["specs"]
    client = mlflow.MlflowClient(tracker.uri)
    params = _children(client, tracker)[specs[1]["name"]].data.params
    assert params["memory_size"] == "200" and params["lr"] == "0.1" and params["backbone"] == "resnet32"
    assert params["seed"] == "0" and params["order_name"] == "seed1993" and params["world_size"] == "2"
    assert params["budget.epochs"] == "4"                               # nested dicts flattened
    assert json.loads(params["milestones"]) == []
    assert params["version.python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "unknown"
    assert params["git_commit"] == head and params["git_dirty"] in ("true", "false", "unknown")
    assert params["version.torch"] and params["version.ray"]
    long_value = params["class_order"]
    assert len(long_value) <= 6000 and long_value.endswith(TRUNCATED)  # MLflow's limit; the YAML has it all
    assert long_value.startswith("[100000,100001,")


def test_metrics_per_step(sqlite_bench):
    tracker, specs = sqlite_bench["tracker"], sqlite_bench["specs"]
    client = mlflow.MlflowClient(tracker.uri)
    children = _children(client, tracker)

    def history(name, key):
        """[(step, value), ...] flattened to [step, value, step, value, ...] for pytest.approx."""
        ms = sorted(client.get_metric_history(children[name].info.run_id, key), key=lambda m: m.step)
        return [x for m in ms for x in (m.step, m.value)]

    def pairs(items):
        return [x for pair in items for x in pair]

    for spec, accs in ((specs[0], ACCS_A), (specs[1], ACCS_B)):        # live-logged and backfilled alike
        name = spec["name"]
        assert history(name, "accuracy") == pytest.approx(pairs(enumerate(accs)))
        aia = [sum(accs[: t + 1]) / (t + 1) for t in range(len(accs))]
        assert history(name, "avg_inc_accuracy") == pytest.approx(pairs(enumerate(aia)))
        matrix = accuracy_matrix(accs)
        assert history(name, "acc_task_2") == pytest.approx(pairs((t, matrix[t][2]) for t in range(2, 5)))
        assert history(name, "nme_accuracy") == pytest.approx(pairs((t, v - 1.5) for t, v in enumerate(accs)))
        assert history(name, "nme_acc_task_0") == pytest.approx(pairs((t, matrix[t][0] - 1.5) for t in range(5)))
        assert history(name, "top5") == pytest.approx(pairs((t, 100.0) for t in range(5)))
        assert history(name, "forgetting")[::2] == [0, 1, 2, 3, 4]
        assert history(name, "loss") == pytest.approx(pairs((t, 2.3 / (t + 1)) for t in range(5)))
        assert history(name, "parameters")[-2:] == [4, 464_154 + 130 * 4]
        assert history(name, "epoch_time_s")[::2] == [0, 1, 2, 3, 4]
        assert history(name, "images_per_s")[::2] == [0, 1, 2, 3, 4]
        assert history(name, "nme_top5") == []                          # null values are not logged
        final = children[name].data.metrics
        assert final["final_avg_inc_accuracy"] == pytest.approx(sum(accs) / 5)
        assert final["final_last_accuracy"] == pytest.approx(accs[-1])
        assert final["final_nme_avg_inc_accuracy"] == pytest.approx(sum(accs) / 5 - 1.5)
    failed = specs[2]["name"]                                           # failed after task 1: its 2 steps stay
    assert history(failed, "accuracy") == pytest.approx([0, 88.0, 1, 76.0])


def test_artifacts(sqlite_bench, tmp_path):
    import matplotlib.image
    import pandas as pd

    tracker, specs, config = sqlite_bench["tracker"], sqlite_bench["specs"], sqlite_bench["config"]
    client = mlflow.MlflowClient(tracker.uri)
    run_id = _children(client, tracker)[specs[0]["name"]].info.run_id
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"accuracy_matrix.csv", "accuracy_matrix_nme.csv", "accuracy_matrix.png", "accuracy_matrix_nme.png",
            "accuracy_curve.png", "config.yaml", "result.json"} <= names

    csv = pd.read_csv(download(client, run_id, "accuracy_matrix.csv", tmp_path), index_col="after_task")
    expected = accuracy_matrix(ACCS_A)
    assert list(csv.columns) == [f"task_{j}" for j in range(5)]
    for i in range(5):
        assert csv.iloc[i, : i + 1].tolist() == pytest.approx(expected[i])
        assert csv.iloc[i, i + 1:].isna().all()                         # nothing above the diagonal

    logged = yaml.safe_load(download(client, run_id, "config.yaml", tmp_path).read_text())
    assert logged["class_order"] == LONG_ORDER and logged["seed"] == 0 and logged["method"] == config["method"]

    for png in ("accuracy_matrix.png", "accuracy_curve.png"):
        img = matplotlib.image.imread(str(download(client, run_id, png, tmp_path)))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # the trial's curve: one line per head (cnn, nme), i.e. tab10 colours C0 and C1, not C2
    curve = download(client, run_id, "accuracy_curve.png", tmp_path)
    assert color_pixels(curve, plots.TAB10[0]) > 50 and color_pixels(curve, plots.TAB10[1]) > 50
    assert color_pixels(curve, plots.TAB10[2]) == 0

    # the benchmark's curve on the parent: one mean curve for the one method of this benchmark
    bench_curve = download(client, tracker.parent_run_id, "accuracy_curve.png", tmp_path / "parent")
    assert color_pixels(bench_curve, plots.TAB10[0]) > 50 and color_pixels(bench_curve, plots.TAB10[1]) == 0
    assert {"leaderboard.csv", "leaderboard.md", "config.yaml"} <= {
        f.path for f in client.list_artifacts(tracker.parent_run_id)}


def test_dataset_input(sqlite_bench):
    tracker, specs = sqlite_bench["tracker"], sqlite_bench["specs"]
    client = mlflow.MlflowClient(tracker.uri)
    children = _children(client, tracker)
    digests = {}
    for spec in specs:
        inputs = client.get_run(children[spec["name"]].info.run_id).inputs.dataset_inputs
        assert len(inputs) == 1
        dataset = inputs[0].dataset
        assert dataset.name == "cifar10-mini" and dataset.digest
        assert json.loads(dataset.profile)["num_rows"] == 1            # a descriptor, not the images
        digests[spec["order_name"]] = dataset.digest
    assert digests["natural"] != digests["seed1993"]                    # the class order is part of the data


def test_leaderboard_of_the_benchmark(sqlite_bench):
    table = sqlite_bench["table"]
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["finished"], row["failed"], row["unfinished"]) == (2, 1, 0)
    # hand-computed over the 2 finished trials (the failed one is not averaged in): AIA 70.0 and 74.8
    assert row["avg_inc_acc_mean"] == pytest.approx(72.4)
    assert row["avg_inc_acc_std"] == pytest.approx(4.8 / 2 ** 0.5)     # sample std, ddof=1
    assert row["last_acc_mean"] == pytest.approx(54.0)
    assert row["last_acc_std"] == pytest.approx(8.0 / 2 ** 0.5)
    assert row["nme_avg_inc_acc_mean"] == pytest.approx(72.4 - 1.5)
    assert row["compute_h"] == pytest.approx((90.0 + 110.0) * 2 / 3600)
    assert "FAILED" in row["not_finished_trials"] and "natural seed 1" in row["not_finished_trials"]
    assert any(line.startswith("mlflow: sqlite:////") for line in sqlite_bench["lines"])
    assert not any(line.startswith("warning") for line in sqlite_bench["lines"])


# ---------------------------------------------------------------------------------------------------------
# Resume, rerun
# ---------------------------------------------------------------------------------------------------------
def test_rerun_reuses_parent_and_children(sqlite_bench):
    """The same command again (every trial skipped as finished): same parent run, no duplicate child."""
    old, config, specs = sqlite_bench["tracker"], sqlite_bench["config"], sqlite_bench["specs"]
    tracker = BenchmarkTracker.for_benchmark(None, sqlite_bench["out"], config, specs, log=lambda _: None)
    assert tracker.parent_run_id == old.parent_run_id
    logger = tracker.trial_logger(specs[0])
    assert logger.resumed and logger.status == "FINISHED" and logger.logged_steps == {0, 1, 2, 3, 4}
    assert logger.log_task(sqlite_bench["results"][0]["history"][2]) is False
    client = mlflow.MlflowClient(tracker.uri)
    assert len(_children(client, tracker)) == 3
    assert len(client.get_metric_history(logger.run_id, "accuracy")) == 5


def test_resumed_trial_continues_its_run(sqlite_bench):
    config = make_config(lr=0.05)
    specs = make_specs(config, [("natural", 7)], tag="resume01")
    tracker = BenchmarkTracker.for_benchmark(None, sqlite_bench["out"], config, specs, log=lambda _: None)
    result = make_result(specs[0], ACCS_B)
    first = TrialLogger(tracker.uri, tracker.experiment_id, tracker.parent_run_id, specs[0])
    assert [first.log_task(r) for r in result["history"][:2]] == [True, True]
    # the worker died; a new process (fresh client) re-creates the logger and the trial resumes from task 2
    second = TrialLogger(tracker.uri, tracker.experiment_id, tracker.parent_run_id, specs[0])
    assert second.resumed and second.run_id == first.run_id and second.logged_steps == {0, 1}
    assert [second.log_task(r) for r in result["history"]] == [False, False, True, True, True]
    second.finish(result)
    client = mlflow.MlflowClient(tracker.uri)
    runs = _children(client, tracker)
    assert list(runs) == [specs[0]["name"]]
    assert [m.step for m in client.get_metric_history(first.run_id, "accuracy")] == [0, 1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(first.run_id, "acc_task_0")] == [0, 1, 2, 3, 4]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_tracking_failure_mid_benchmark_warns_and_goes_on(sqlite_bench, monkeypatch, free_port):
    """The server dies after the pre-flight check: one warning line, live logging pauses, no exception."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    lines: list[str] = []
    old = sqlite_bench["tracker"]
    tracker = BenchmarkTracker(dead, "clbench", old.experiment_id, old.parent_run_id, mlflow.MlflowClient(dead),
                               old.name, log=lines.append)
    events = TrialEvents(lambda _: None, tracker=tracker)
    spec, result = sqlite_bench["specs"][0], sqlite_bench["results"][0]
    for row in result["history"]:
        events.task_finished(spec, row)
    events.trial_finished(spec, result)
    assert tracker.end_benchmark([result], [spec]) is None
    warnings = [line for line in lines if line.startswith("warning: MLflow logging")]
    assert len(warnings) == 2 and "paused" in warnings[0]     # once live, once more at the end: not per task


# ---------------------------------------------------------------------------------------------------------
# A real MLflow server
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_process(tmp_path_factory, free_port):
    """`mlflow server` on 127.0.0.1 (free port, sqlite backend and artifacts in tmp). Booting takes 20-40 s on
    a small machine, so the sqlite fixture requests this first: the server boots while those tests run."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)     # the server and its uvicorn worker: the group we started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(server_process):
    proc, uri, root = server_process
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    return uri, root
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.25)


def test_round_trip_over_http(mlflow_server, tmp_path):
    import pandas as pd

    from harness.tracking.report import leaderboard

    uri, root = mlflow_server
    bench = run_benchmark_logging(uri, tmp_path / "out")
    tracker, specs = bench["tracker"], bench["specs"]
    assert tracker.uri == uri and not (tmp_path / "out" / "mlflow.db").exists()   # nothing local
    assert not any(line.startswith("warning") for line in bench["lines"])
    assert any(line.startswith(f"mlflow: {uri}/#/experiments/") for line in bench["lines"])
    client = mlflow.MlflowClient(uri)
    children = _children(client, tracker)
    assert {n: r.info.status for n, r in children.items()} == {
        specs[0]["name"]: "FINISHED", specs[1]["name"]: "FINISHED", specs[2]["name"]: "FAILED"}
    run_id = children[specs[0]["name"]].info.run_id
    assert children[specs[0]["name"]].data.params["memory_size"] == "200"
    steps = sorted(client.get_metric_history(run_id, "accuracy"), key=lambda m: m.step)
    assert [m.step for m in steps] == [0, 1, 2, 3, 4]
    assert [m.value for m in steps] == pytest.approx(ACCS_A)
    csv = pd.read_csv(download(client, run_id, "accuracy_matrix.csv", tmp_path), index_col="after_task")
    assert csv.iloc[4].tolist() == pytest.approx(accuracy_matrix(ACCS_A)[4])
    assert list((root / "artifacts").rglob("accuracy_matrix.csv"))   # stored by the server, not by us
    table = leaderboard(uri, "clbench")
    row = table.iloc[0]
    assert (row["finished"], row["failed"]) == (2, 1)
    assert row["avg_inc_acc_mean"] == pytest.approx(72.4)
