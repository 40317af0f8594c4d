"""Two Ray nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`: a head and a worker node, each its own raylet):
a 2-worker DDP trial places one worker on each node and matches 1 worker within the stated tolerance; removing
the worker node in the middle of the trial makes it resume from its last finished task on the head node, with
the final metrics of the uninterrupted trial.

Slow (two clusters' worth of Ray processes on 2 cores); CI runs it after the fast suite.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from harness.run.events import LaunchOptions

from harness.run.events import TrialEvents  # noqa: E402
from harness.run.ray_grid import run_ray  # noqa: E402
from test_ray import assert_same_accuracy_within_tolerance, digits_specs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def two_nodes(monkeypatch):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Every raylet's workers import the harness and the test backbone (tests/test_ray.py's setup hook).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                      *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes(timeout=120)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": "test_ray.register_norm_free_backbone"})
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def _specs(**overrides) -> list[dict]:

    # 0.9 CPU per worker: two workers fit the 2-CPU head alone (after the worker node is gone), and SPREAD puts
    # them on different nodes while both nodes are there.
    return digits_specs(**{"epochs": 4, "base_epochs": 4, "cpus_per_worker": 0.9, "placement_strategy": "SPREAD",
                           **overrides})


def _run(specs: list[dict], out: Path, lines: list[str]) -> dict:
    (result,) = run_ray(specs, out, LaunchOptions(max_failures=2), events=TrialEvents(lines.append))
    return result


def test_ddp_trial_spreads_over_two_nodes_and_survives_losing_one(two_nodes, tmp_path):
    cluster, worker_node = two_nodes
    head_id = ray.get_runtime_context().get_node_id()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2

    one = _run(_specs(num_workers=1), tmp_path / "one", [])
    clean = _run(_specs(num_workers=2), tmp_path / "clean", [])
    assert one["status"] == clean["status"] == "finished", (one.get("error"), clean.get("error"))
    assert clean["world_size"] == 2 and clean["backend"] == "gloo"
    assert len(set(clean["worker_nodes"])) == 2, clean["worker_nodes"]        # a worker on each node
    # matches 1 worker within the tolerance stated in tests/test_ray.py (float rounding only; no BatchNorm)
    assert_same_accuracy_within_tolerance(clean, one)

    # The same trial again; the worker node is removed once task 2's checkpoint exists.
    out = tmp_path / "lost"
    specs = _specs(num_workers=2)
    ckpts = out / "trials" / specs[0]["name"] / "checkpoints"
    removed = threading.Event()

    def remove_worker_node_after_task_2() -> None:
        deadline = time.monotonic() + 600
        while not (ckpts / "task_001.pt").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.remove_node(worker_node, allow_graceful=False)
        removed.set()

    killer = threading.Thread(target=remove_worker_node_after_task_2, daemon=True)
    killer.start()
    lines: list[str] = []
    lost = _run(specs, out, lines)
    killer.join(timeout=60)
    assert removed.is_set()
    assert lost["status"] == "finished", lost.get("error")
    # it went on without the lost node, from a task checkpoint (not from scratch)...
    assert set(lost["worker_nodes"]) == {head_id}, lost["worker_nodes"]
    assert lost["resumed_from"] in {f"task_{t:03d}.pt" for t in range(1, 4)}, lost["resumed_from"]
    # ...to the uninterrupted trial's numbers (same world size, same threads: same float operations)
    assert lost["metrics"] == clean["metrics"]
    assert sum(" task 5 " in line for line in lines) == 1
