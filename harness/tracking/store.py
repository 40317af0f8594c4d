"""The MLflow store: where runs go, the client, what gets logged (params, metrics, tags), provenance.

The tracking layer: store (this) < tables < plots < report < trial_logger < trackers. One parent run per
benchmark or sweep, one child run per trial, logged from the driver.

Where things go:
    default store   sqlite:////<abs output_dir>/mlflow.db, artifacts in <abs output_dir>/mlartifacts/
    a server        --tracking-uri http(s)://host:port (artifacts go wherever the server stores them)

The launchers call, on the driver:
    tracker = BenchmarkTracker.for_benchmark(uri, output_dir, config, specs)   # before any training
    events = TrialEvents(log, tracker=tracker)     # tracker.log_task(spec, row) / tracker.log_trial(spec, result)
    results = launch(specs, output_dir, options, events=events)
    table = tracker.end_benchmark(results, specs)   # backfills, benchmark plot, leaderboard of this benchmark

The parent run's name is deterministic (method_suite_<hash of the trial names>): rerunning the same command
(to resume, or after everything finished) continues the same parent instead of adding an empty twin.
`TrialLogger(client_or_uri, experiment_id, parent_run_id, spec)` is the per-trial logger underneath; a
re-created logger (resume, Ray restart) continues the trial's existing child run: steps already logged are not
logged again.

Runs carry plain tags so filters stay simple: `run_kind` (benchmark | trial), `trial`, `method`, `suite`,
`variant`, `order`, `seed`, `config_hash`, `benchmark`, `main_head`, `heads`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlparse

from harness.errors import ConfigError, ResourceError

if TYPE_CHECKING:   # mlflow and pandas load lazily: importing this module must stay cheap for Ray workers
    import pandas as pd
    from mlflow import MlflowClient

# MLflow 3 sends anonymous usage telemetry by default; a benchmark harness on a cluster should not phone home
# (and offline nodes pay for the attempt). Users opt in with MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXPERIMENT = "clbench"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

MAX_PARAM_VALUE = 6000          # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (3.x)
MAX_KEY = 250                   # MAX_ENTITY_KEY_LENGTH
MAX_TAG_VALUE = 5000            # comfortably below every backend's tag limit
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
SENTINEL_METRIC = "accuracy"    # logged LAST in each step's batch: its history tells which steps are complete
TRUNCATED = "...(truncated; full value in config.yaml)"

STATUS_FINISHED, STATUS_FAILED, STATUS_RUNNING, STATUS_KILLED = "FINISHED", "FAILED", "RUNNING", "KILLED"


# ---------------------------------------------------------------------------------------------------------
# Where to log
# ---------------------------------------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """The tracking URI to use, always absolute: Ray workers change directory, a relative store would split.

    None -> sqlite:////<abs output_dir>/mlflow.db; `x.db` or `sqlite:///rel.db` -> absolute sqlite;
    http(s)://... unchanged (trailing slash removed); the old ./mlruns file store is refused (MLflow 3 does).
    """
    if not uri:
        return "sqlite:///" + str(Path(output_dir).resolve() / DB_NAME)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not parsed.netloc:
            raise ConfigError(f"--tracking-uri {uri!r} has no host; use http://host:port")
        return uri.rstrip("/")
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise ConfigError(f"--tracking-uri {uri!r}: give a file, e.g. sqlite:////abs/path/{DB_NAME}")
        return "sqlite:///" + str(Path(path).expanduser().resolve())
    if scheme in ("", "file") and str(uri).endswith(".db"):
        path = parsed.path if scheme == "file" else uri
        return "sqlite:///" + str(Path(path).expanduser().resolve())
    if scheme in ("", "file"):
        raise ConfigError(f"--tracking-uri {uri!r}: MLflow 3 no longer writes the ./mlruns file store; use "
                          f"sqlite:////abs/path/{DB_NAME} (or omit it for <output_dir>/{DB_NAME}) or http://host:port")
    return uri     # postgresql://, mysql://, databricks ...: MLflow knows them


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme.lower() in ("http", "https")


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_store(path: str | Path) -> None:
    """ConfigError (one line) when an existing file at `path` is not an MLflow sqlite store: garbage bytes, a
    damaged database, another program's database, or unreadable. A missing or empty file is fine: MLflow
    creates the tables. Reads only (the database is opened read-only)."""
    import sqlite3

    path = Path(path)
    fix = "move it away or pass --tracking-uri / --no-tracking"
    if not path.exists():
        return
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(f"cannot read the MLflow store {path} ({type(exc).__name__}: {exc.strerror or exc}); "
                          f"fix its permissions, {fix}") from None
    if not header:
        return
    if header != SQLITE_HEADER:
        raise ConfigError(f"{path} is not an MLflow sqlite store (not an SQLite database); {fix}")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"{path} is not an MLflow sqlite store (sqlite: {exc}); {fix}") from None
    if tables and not {"experiments", "runs"} <= tables:
        raise ConfigError(f"{path} is not an MLflow sqlite store (an SQLite database without MLflow's tables); "
                          f"{fix}")


def probe_server(uri: str, timeout: float = 5.0) -> None:
    """GET <uri>/health with a short timeout; ResourceError (one line) when the server does not answer OK."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:    # noqa: S310 -- http(s) only (checked)
            body = response.read(64).decode(errors="replace").strip()
            status = response.status
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} from {url}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        inner = getattr(exc, "reason", exc)
        reason = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
    else:
        if status == 200:
            return
        reason = f"HTTP {status} from {url}: {body!r}"
    raise ResourceError(f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host "
                        f"127.0.0.1 --port PORT --backend-store-uri sqlite:////abs/path/{DB_NAME}) or drop "
                        f"--tracking-uri to log to <output_dir>/{DB_NAME}")


def _quiet_mlflow_logs() -> None:
    """Table creation/migration chatter of a fresh sqlite store is noise in a benchmark's output."""
    for name in ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic",
                 "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_client(uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    _quiet_mlflow_logs()
    return MlflowClient(tracking_uri=uri)


def error_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` of an exception, on one line, cut at `limit` characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def check_tracking(uri: str, experiment: str = DEFAULT_EXPERIMENT, timeout: float = 5.0,
                   artifact_location: str | None = None) -> str:
    """Make sure logging will work BEFORE any training; returns the experiment id.

    A server must answer /health within `timeout` seconds; a sqlite store gets its folder, tables and the
    experiment (artifacts beside the DB in mlartifacts/, never ./mlruns of whatever the cwd is). Run it once
    on the driver: the DB and the experiment exist before any trial logs, so no two writers race to create
    them. Every failure is a ResourceError with one line: the URI, what failed, how to fix it.
    """
    if is_server(uri):
        probe_server(uri, timeout)
    db = sqlite_path(uri)
    if db is not None:
        check_sqlite_store(db)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResourceError(f"cannot create the MLflow store folder {db.parent} for {uri} ({error_line(exc)}); "
                                "choose a writable --output-dir or --tracking-uri") from None
        if artifact_location is None:
            artifact_location = (db.parent / ARTIFACTS_DIR).as_uri()
    try:
        client = make_client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                return client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:   # noqa: BLE001 -- another driver created it meanwhile: use theirs
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
    except ResourceError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any store failure: one actionable line
        raise ResourceError(f"MLflow tracking store {uri} is not usable ({error_line(exc)}); check the URI, "
                            "that the server/database is up and writable, or drop --tracking-uri") from None
    if exp.lifecycle_stage != "active":
        raise ResourceError(f"MLflow experiment {experiment!r} is deleted in {uri}; restore it (mlflow "
                            f"experiments restore --experiment-id {exp.experiment_id}) or pick another --experiment")
    return exp.experiment_id


# ---------------------------------------------------------------------------------------------------------
# What gets logged
# ---------------------------------------------------------------------------------------------------------
def param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)   # lists (class orders) as compact JSON
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
    return text


def _clean_key(key: str) -> str:
    """MLflow keys allow alphanumerics, _ - . / and space."""
    out = "".join(c if (c.isalnum() or c in "_-./ ") else "_" for c in str(key))
    return out[:MAX_KEY]


def flatten_params(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts become `a.b`; every value a string within MLflow's length limit (long ones truncated)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = _clean_key(f"{prefix}{key}")
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = param_value(value)
    return out


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions that change numbers; read from package metadata (no heavy imports)."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "continuum", "ray", "mlflow", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@functools.lru_cache(maxsize=4)
def git_commit(root: Path = ROOT) -> str:
    """The project's commit (`git rev-parse HEAD`); 'unknown' outside a git checkout or without git."""
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=4)
def git_dirty(root: Path = ROOT) -> str:
    """'true' when tracked files differ from the commit (the numbers may not be reproducible from it)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return "true" if out else "false"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, str]:
    """Params every run carries: code commit and the versions that change numbers."""
    out = {"git_commit": git_commit(), "git_dirty": git_dirty()}
    out.update({f"version.{k}": v for k, v in versions().items()})
    return out


def variant_of(config: dict) -> str:
    """A config's variant: `variant` if set, else the named recipe (+ --options files), else `default`."""
    if config.get("variant"):
        return str(config["variant"])
    recipes = [Path(p).stem for p in config.get("recipe_files") or [] if Path(p).stem != "default"]
    options = [Path(p).stem for p in config.get("options_files") or []]
    return "+".join(recipes + options) or "default"


def config_digest(config: dict) -> str:
    """The hash trial names end with: options that change results (orders and seeds excluded)."""
    from harness.config.compose import config_hash
    from harness.config.identity import RUNTIME_KEYS

    return config_hash(config, exclude=RUNTIME_KEYS)


def benchmark_name(config: dict, specs: Iterable[dict] | None = None) -> str:
    """Deterministic: the same command (same trials) gets the same parent run and the same Ray Tune experiment
    folder (harness.run.ray_grid), so reruns continue both."""
    names = sorted(s["name"] for s in specs) if specs else [config_digest(config)]
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
    return f"{config.get('method')}_{config.get('suite')}_{digest}"


def row_metrics(row: dict) -> dict[str, float]:
    """One task row -> MLflow metrics: numbers as they are, `<head>_accuracy_per_task` -> `<head>_acc_task_<j>`."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "task":
            continue
        if isinstance(value, (list, tuple)):
            if key.endswith("accuracy_per_task"):
                prefix = key[: -len("accuracy_per_task")]
                for j, v in enumerate(value):
                    if finite(v):
                        out[_clean_key(f"{prefix}acc_task_{j}")] = float(v)
            continue
        if finite(value):
            out[_clean_key(key)] = float(value)
    return out


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summary_metrics(summary: dict) -> dict[str, float]:
    """End-of-trial numbers per head: `final_<name>` for the main head, `final_<head>_<name>` for the others."""
    names = {"average_incremental_accuracy": "avg_inc_accuracy", "last_accuracy": "last_accuracy",
             "forgetting": "forgetting", "backward_transfer": "backward_transfer",
             "average_top5_accuracy": "avg_top5_accuracy"}
    out: dict[str, float] = {}
    for i, (head, values) in enumerate((summary or {}).items()):
        prefix = "final_" if i == 0 else f"final_{head}_"
        for key, short in names.items():
            if finite(values.get(key)):
                out[_clean_key(prefix + short)] = float(values[key])
        top5 = [v for v in values.get("top5_accuracies") or [] if finite(v)]
        if top5 and len(top5) == len(values.get("top5_accuracies") or []):
            out[_clean_key(prefix + "last_top5_accuracy")] = float(top5[-1])
    return out


def accuracy_matrix_frame(matrix: list[list[float | None]]) -> "pd.DataFrame":
    """R[i][j] (accuracy on task j after training task i) as a table: rows `after_task`, columns `task_<j>`."""
    import pandas as pd

    n = len(matrix)
    values = [[(float(v) if finite(v) else None) for v in list(row) + [None] * (n - len(row))][:n]
              for row in matrix]
    df = pd.DataFrame(values, columns=[f"task_{j}" for j in range(n)], dtype=float)
    df.index.name = "after_task"
    return df


def classes_seen(config: dict, num_steps: int) -> list[int]:
    """x axis of accuracy curves: classes seen after each step (falls back to the task number)."""
    first, inc = config.get("initial_increment"), config.get("increment")
    if isinstance(first, int) and isinstance(inc, int):
        return [first + t * inc for t in range(num_steps)]
    return list(range(1, num_steps + 1))


def dataset_descriptor(config: dict, spec: dict) -> "pd.DataFrame":
    """What identifies the data of a trial (never the images): name, where it was read, the split protocol."""
    import pandas as pd

    order = spec.get("order")
    return pd.DataFrame([{
        "dataset": str(config.get("dataset")),
        "data_path": str(config.get("data_path") or "(dataset default)"),
        "initial_increment": str(config.get("initial_increment")),
        "increment": str(config.get("increment")),
        "class_order": order if isinstance(order, str) else json.dumps(list(order), separators=(",", ":")),
        "memory_size": str(config.get("memory_size")),
        "memory_per_class": str(config.get("memory_per_class")),
    }])


def escape_filter(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def find_child_run(client: "MlflowClient", experiment_id: str, parent_run_id: str, name: str):
    """The child run of trial `name` under the parent (the most recent one if several), or None."""
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{escape_filter(parent_run_id)}' and tags.trial = '{escape_filter(name)}'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def log_params(client: "MlflowClient", run_id: str, params: list[tuple[str, str]]) -> None:
    from mlflow.entities import Param

    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in params[i: i + MAX_PARAMS_PER_BATCH]])


def log_metrics(client: "MlflowClient", run_id: str, metrics: dict[str, float], step: int) -> None:
    """One batch per step (split only above MLflow's 1000-metric limit), the sentinel metric last: once it is
    in the store, the whole step is (a batch is one transaction)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = sorted(metrics.items(), key=lambda kv: kv[0] == SENTINEL_METRIC)
    entities = [Metric(k, v, now, int(step)) for k, v in items]
    for i in range(0, len(entities), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=entities[i: i + MAX_METRICS_PER_BATCH])


def plain(value: Any) -> Any:
    """A JSON/YAML-safe copy, the one such helper (tracking is the lowest layer that writes files from results:
    run and sweep sit above it): str keys, lists for tuples, Python numbers and lists for numpy/torch scalars and
    arrays, None for NaN/inf, str() for anything else. Also a `json.dumps(default=plain)` fallback."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):                    # numpy's float64 too
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):     # bool is an int
        return value
    if hasattr(value, "tolist"):                    # numpy / torch scalars and arrays
        return plain(value.tolist())
    return str(value)
