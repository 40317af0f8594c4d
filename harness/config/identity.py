"""The grid of a benchmark: one trial per (class order x seed), each a plain picklable dict."""
from __future__ import annotations

import hashlib
import json

from harness.config.compose import config_hash
from harness.data.checks import dataset_fingerprint

# Options that do not change a trial's results: excluded from the trial name's hash. What does change them and
# is not an option is added to the config before naming: `data_fingerprint` (the files actually read, their
# location included, instead of `data_path`) and the resolved `threads_per_worker`; `num_workers` is the world size.
RUNTIME_KEYS = {"orders", "seeds", "seed", "class_order", "output_dir", "loader_workers", "fault_at_task",
                "options_files", "recipe_files", "published", "device", "cpus_per_worker",
                "gpus_per_worker", "data_path", "download", "eval_batch_size", "placement_strategy",
                "placement_timeout_s", "progress_interval_s"}


def fix_identity(config: dict, threads_per_worker: int) -> None:
    """Add to `config` what changes a trial's numbers without being an option: the data actually read and the
    torch threads per worker (harness.run.launch.resolve_threads). A changed input then gets new trial names and is
    never served an old result."""
    config["data_fingerprint"] = dataset_fingerprint(config)
    config["threads_per_worker"] = int(threads_per_worker)


def order_name(order) -> str:
    if isinstance(order, str):
        return order
    digest = hashlib.sha1(json.dumps(list(order)).encode()).hexdigest()[:6]
    return f"custom-{digest}"


def expand_trials(config: dict) -> list[dict]:
    """Deterministic names (no timestamps): rerunning the same command finds the same trials."""
    digest = config_hash(config, exclude=RUNTIME_KEYS)
    specs = []
    for order in config["orders"]:
        for seed in config["seeds"]:
            name = f"{config['method']}_{config['suite']}_{order_name(order)}_seed{seed}_{digest}"
            specs.append({"name": name, "order": order, "order_name": order_name(order), "seed": int(seed),
                          "config": {**config, "seed": int(seed)}})
    return specs
