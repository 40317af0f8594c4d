"""Pre-flight: every check of the user's input that can run before anything is written.

The driver (run_benchmark.py, the sweep subcommand) calls `preflight(...)` after composing the config and
before it creates the output folder, the MLflow store or a Ray session. Each failure is one HarnessError line
(ConfigError, DataError, ResourceError) saying what is wrong and how to fix it. Nothing here writes a file,
except a probe file that is created and deleted at once to learn whether a folder is writable.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

from harness.errors import ConfigError, HarnessError, ResourceError

# Tracking URI schemes MLflow can log to (besides http(s) servers and sqlite files): SQLAlchemy databases.
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
MAX_SEED = 2**32 - 1          # numpy's seeding range


def preflight(config: dict, origins: dict[str, str] | None = None, *, output_dir: str | Path,
              launcher: str = "ray", address: str | None = None, tracking_uri: str | None = None,
              tracking: bool = True, experiment: str = "clbench", splits: tuple[str, ...] = ("train", "test")) -> None:
    """Run every check; the first failure raises a one-line HarnessError. `splits`: the dataset splits whose
    files are opened (a sweep passes ("train",): its trials never read the test split, nor does its driver)."""
    check_config(config, origins)
    check_scenario(config)
    check_method(config)
    check_device(config, launcher, address)
    check_dataset_files(config, splits)
    output = check_output_dir(output_dir)
    if tracking:
        check_tracking_store(tracking_uri, output, experiment)


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, `--epochs abc`) as one `error:` line, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


# ---- options ----------------------------------------------------------------------------------------------
def check_config(config: dict, origins: dict[str, str] | None = None) -> None:
    """Types and ranges of every option (harness.config.schema), then the checks across options."""
    from harness.config.compose import check_required, defaults, method_recipe, validate
    from harness.config.schema import check_options

    check_required(config)
    # Options without a schema entry are checked against their default: the harness's, or the method's own.
    check_options(config, {**defaults(), **method_recipe(config["method"], None, explicit=False)[0]}, origins)
    validate(config)


def check_scenario(config: dict) -> list[list[int]]:
    """Class orders are permutations of the dataset's classes, increments fit, orders and seeds are distinct.
    Returns the resolved orders (empty when the dataset's class count is only known from its files)."""
    from harness.data import dataset_info
    from harness.core.scenarios import make_increments, resolve_class_order

    seeds = config["seeds"]
    if not seeds:
        raise ConfigError("no seeds to run: give at least one, e.g. --seeds 0")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ConfigError(f"seed {bad[0]} is out of range: seeds must be integers in 0..{MAX_SEED}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"seed {repeated[0]} is listed more than once: list each seed once (seeds {seeds})")
    if not config["orders"]:
        raise ConfigError("no class orders to run: give at least one, e.g. --orders natural")
    info = dataset_info(config["dataset"], config.get("data_path"))
    if info.num_classes is None:      # imagefolder without --data-path: the dataset check says so
        return []
    make_increments(info.num_classes, config["initial_increment"], config["increment"])
    resolved: list[list[int]] = []
    for order in config["orders"]:
        if not isinstance(order, (str, list)):
            raise ConfigError(f"class order {order!r} must be a name (natural, seed1993, order1, ...) or a list of "
                              "class ids")
        ids = resolve_class_order(order, info.num_classes, config["dataset"])
        if ids in resolved:
            twin = config["orders"][resolved.index(ids)]
            same = "is listed twice" if twin == order else f"is the same permutation as {_short(twin)}"
            raise ConfigError(f"class order {_short(order)} {same}: list each order once")
        resolved.append(ids)
    return resolved


def _short(order) -> str:
    text = repr(order)
    return text if len(text) <= 60 else text[:57] + "..."


def check_method(config: dict) -> None:
    """The method's own option checks, by building it on the meta device (shapes only, no memory, no data).
    Only the user's errors (HarnessError) count: anything else the real build would meet is left to the trial."""
    import torch

    from harness.config.catalog import get_method

    method = get_method(config["method"])
    try:
        method(dict(config), torch.device("meta")).build()
    except HarnessError:
        raise
    except Exception:  # noqa: BLE001 -- not a verdict on the user's input (e.g. an op without a meta kernel)
        pass


# ---- device -----------------------------------------------------------------------------------------------
def check_device(config: dict, launcher: str, address: str | None = None) -> None:
    """`--device cuda[:N]` needs a GPU here when the trials run on this machine (local launcher, embedded Ray).
    On a Ray cluster the launcher checks the cluster's GPUs itself."""
    device = str(config.get("device", "auto"))
    if not device.startswith("cuda"):
        return
    on_this_machine = launcher == "local" or not (address or os.environ.get("RAY_ADDRESS"))
    if not on_this_machine:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ResourceError(f"--device {device}: no GPU is visible on this machine (torch.cuda.is_available() is "
                            "False); use --device auto or cpu, or run on a machine with a GPU")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= count:
        raise ResourceError(f"--device {device}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1}); "
                            "pick one of them or use --device cuda")


# ---- data -------------------------------------------------------------------------------------------------
def check_dataset_files(config: dict, splits: tuple[str, ...] = ("train", "test")) -> None:
    """The dataset is present and readable (a few files of each split are opened), and an explicit data path
    exists even for datasets that do not read one: see harness.data.check_dataset."""
    from harness.data import check_dataset

    check_dataset(config, splits)


# ---- output folder ----------------------------------------------------------------------------------------
def check_output_dir(output_dir: str | Path) -> Path:
    """The output folder can be created (or is) a writable folder; nothing is left behind. Returns it, resolved."""
    path = Path(output_dir).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} is a file, not a folder; give a folder (it is created if missing)")
    check_creatable(path, f"--output-dir {path}")
    return path


def check_creatable(path: Path, what: str) -> None:
    """`path` exists or can be created: its nearest existing ancestor is a writable folder."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise ConfigError(f"{what} cannot be created: {existing} is a file, not a folder")
    probe_writable(existing if existing.is_dir() else existing.parent, what)


def probe_writable(folder: Path, what: str) -> None:
    """Create and delete a temporary file in `folder` (permission bits do not tell: root, read-only mounts)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".clbench-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ResourceError(f"{what} is not writable ({reason} in {folder}); choose a folder you can write to") \
            from None


# ---- tracking ---------------------------------------------------------------------------------------------
def check_tracking_store(uri: str | None, output_dir: Path, experiment: str = "clbench") -> None:
    """The MLflow store will work, checked without writing to it: the URI is well formed, a server answers,
    an existing sqlite file is an MLflow database whose experiment is not deleted, a new one can be created."""
    from harness.tracking.store import check_sqlite_store, is_server, probe_server, resolve_tracking_uri, sqlite_path

    resolved = resolve_tracking_uri(uri, output_dir)
    scheme = urlparse(resolved).scheme.lower()
    if is_server(resolved):
        probe_server(resolved)
        # MLflow's HTTP defaults (7 retries with backoff) would turn a flaky server into minutes of waiting
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        _check_experiment(resolved, experiment)
        return
    db = sqlite_path(resolved)
    if db is None:
        if scheme.split("+")[0] not in DATABASE_SCHEMES:
            raise ConfigError(f"--tracking-uri {uri!r}: unsupported scheme {scheme + '://' if scheme else ''!r}; use "
                              "http://host:port (an MLflow server), sqlite:////abs/path/mlflow.db, or a "
                              "postgresql:// / mysql:// database")
        return     # a database server: MLflow connects to it when the tracker starts
    if db.is_dir():
        raise ConfigError(f"--tracking-uri {uri!r}: {db} is a folder; give the path of an sqlite file")
    if not db.exists():
        check_creatable(db, f"the MLflow store {db}")
        return
    check_sqlite_store(db)               # garbage, a damaged database, another program's database
    if db.stat().st_size:                # an existing store: its experiment must not be deleted
        _check_experiment(resolved, experiment)


def _check_experiment(uri: str, experiment: str) -> None:
    """Read-only: the experiment, when it exists, is not deleted (a deleted one cannot take new runs)."""
    from harness.tracking.store import make_client

    try:
        exp = make_client(uri).get_experiment_by_name(experiment)
    except Exception as exc:  # noqa: BLE001 -- any store failure: one actionable line
        text = " ".join(str(exc).split())[:200]
        raise ResourceError(f"MLflow tracking store {uri} is not usable ({type(exc).__name__}: {text}); check the "
                            "URI, that the server/database is up, or drop --tracking-uri") from None
    if exp is not None and exp.lifecycle_stage != "active":
        raise ResourceError(f"MLflow experiment {experiment!r} is deleted in {uri}; restore it (mlflow experiments "
                            f"restore --experiment-id {exp.experiment_id}) or pick another --experiment")
