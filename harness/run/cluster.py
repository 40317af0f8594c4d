"""Checking a Ray cluster before a benchmark or a sweep launches on it.

`check_cluster(output_dir, data_path, tracking_uri)` runs, on every alive node, a zero-CPU task that checks
what a multi-node run needs: the output folder is shared (it reads a marker the driver wrote), the data path
exists, and Ray's state API answers. The tracking server is checked from the driver, which is where runs are
logged. Joining the cluster itself: harness.run.ray_session.
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from harness.errors import DataError, HarnessError, ResourceError, one_line
from harness.run.ray_session import cluster_address, init_ray
from harness.tracking.store import is_server, probe_server

NODE_CHECK_TIMEOUT_S = 120.0   # a node must run the check task within this (worker start-up on a busy node)
STATE_API_TIMEOUT_S = 10       # Ray Train's own state queries use a few seconds too


# ---------------------------------------------------------------------------------------------------------
# What a multi-node run needs
# ---------------------------------------------------------------------------------------------------------
def node_report(marker: str, nonce: str, data_path: str | None = None, state_api: bool = True) -> dict:
    """What one node sees. Runs in a Ray task on that node (and in tests, directly): the marker the driver
    wrote in the output folder, that folder being writable, the data path, Ray's state API."""
    problems: dict[str, str] = {}
    path = Path(marker)
    try:
        if path.read_text() != nonce:
            problems["output_dir"] = "sees another folder at that path (the marker it holds is not the driver's)"
    except FileNotFoundError:
        problems["output_dir"] = "does not see the file the driver just wrote there"
    except OSError as exc:
        problems["output_dir"] = f"cannot read it ({exc.strerror or type(exc).__name__})"
    if "output_dir" not in problems:
        probe = path.with_name(f"{path.name}.{os.getpid()}")
        try:
            probe.write_text(nonce)
            probe.unlink()
        except OSError as exc:
            problems["output_dir"] = f"cannot write there ({exc.strerror or type(exc).__name__})"
    if data_path and not Path(data_path).exists():
        problems["data_path"] = "does not exist there"
    if state_api:
        problems.update(state_api_problem())
    return {"host": socket.gethostname(), "problems": problems}


def state_api_problem() -> dict[str, str]:
    """Ray's state API as Ray Train's PlacementGroupCleaner calls it from this node (no address: Ray finds the
    dashboard from RAY_API_SERVER_ADDRESS, RAY_ADDRESS or the last `ray start` in /tmp/ray). It must answer, and
    for this cluster: with several Ray instances on a node it can answer for another one, or not at all."""
    import ray
    from ray.util.state import list_nodes

    find_it = ("export RAY_API_SERVER_ADDRESS=http://HEAD:DASHBOARD_PORT before `ray start` on every node (needed "
               "with several Ray instances on a node, or a `ray start --temp-dir` other than /tmp/ray)")
    try:
        nodes = list_nodes(limit=10_000, timeout=STATE_API_TIMEOUT_S, raise_on_missing_output=False)
    except ConnectionError as exc:     # Ray could not tell which local Ray instance to ask
        return {"state_api": f"{_short(exc)}; {find_it}"}
    except Exception as exc:  # noqa: BLE001 -- any failure means Ray Train's cleaner would fail the same way
        return {"state_api": f"{type(exc).__name__}: {_short(exc)}; the head must run the dashboard where every node "
                             "reaches it: `ray start --head --dashboard-host=0.0.0.0` (or the head's IP; not "
                             "--include-dashboard=false), with ray[default] installed on every node"}
    if ray.get_runtime_context().get_node_id() not in {n.node_id for n in nodes}:
        return {"state_api": f"it answers for another Ray cluster; {find_it}"}
    return {}


def check_cluster(output_dir: str | Path, data_path: str | None = None, tracking_uri: str | None = None,
                  download: bool = False, timeout: float = NODE_CHECK_TIMEOUT_S) -> int:
    """Check, on every alive node of the connected cluster, what a multi-node run needs; returns the number of
    nodes checked. The first problem raises one line (ResourceError, DataError). Leaves nothing behind: the
    marker file, and the folders created to hold it, are removed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if tracking_uri:
        _check_tracking_from_driver(tracking_uri)
    output_dir = Path(output_dir).resolve()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check = ray.remote(num_cpus=0, max_retries=0)(node_report)
    nonce = secrets.token_hex(16)
    marker = output_dir / f".clbench-cluster-check-{nonce[:12]}"
    created = _missing_parents(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(nonce)
        # The data path only has to exist up front when the trials will not download it.
        wanted_data = None if download else data_path
        refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), nonce, wanted_data): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in pending:
            ray.cancel(ref, force=True)
        reports = [(refs[ref], ray.get(ref)) for ref in ready]
    finally:
        marker.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass
    if pending:
        node = refs[pending[0]]
        raise ResourceError(f"Ray node {_node_name(node)} did not run the cluster check within {timeout:g} s; check "
                            "`ray status` and that node's logs (is it overloaded, or missing this Python "
                            "environment?)")
    raise_first_problem(reports, output_dir, data_path)
    if (warning := state_api_warning(reports)) is not None:
        print(warning, file=sys.stderr)
    return len(reports)


def raise_first_problem(reports: list[tuple[dict, dict]], output_dir: Path, data_path: str | None) -> None:
    """One line for the first kind of problem the nodes reported ((ray.nodes() entry, node_report) pairs)."""
    for key in ("output_dir", "data_path"):
        bad = [(node, rep) for node, rep in reports if key in rep["problems"]]
        if not bad:
            continue
        node, rep = bad[0]
        names = _node_name(node, rep) + (f" and {len(bad) - 1} more node(s)" if len(bad) > 1 else "")
        reason = rep["problems"][key]
        if key == "output_dir":
            raise ResourceError(f"--output-dir {output_dir} must be shared storage that every node writes, but Ray "
                                f"node {names} {reason}; mount the same shared folder (NFS, Lustre, EFS, ...) at the "
                                "same path on every node and use it as --output-dir")
        if key == "data_path":
            raise DataError(f"--data-path {data_path} {reason} on Ray node {names}: make the dataset readable at the "
                            "same path on every node (shared storage, or a copy on each)")


def state_api_warning(reports: list[tuple[dict, dict]]) -> str | None:
    """A warning (not an error) when Ray's state API fails on some node: Ray Train's own background cleaner needs
    it to free a stopped multi-worker trial's placement group, but the driver frees those itself
    (harness.run.ray_cleanup), so runs go on; `ray list ...` and the dashboard will not work from there."""
    bad = [(node, rep) for node, rep in reports if "state_api" in rep["problems"]]
    if not bad:
        return None
    node, rep = bad[0]
    names = _node_name(node, rep) + (f" and {len(bad) - 1} more node(s)" if len(bad) > 1 else "")
    return (f"warning: Ray's state API fails on Ray node {names}: {rep['problems']['state_api']} (the harness frees "
            "stopped trials' resources itself; Ray's own tools that need the state API will not work there)")


def _check_tracking_from_driver(uri: str) -> None:
    """Runs are logged by the driver only, so the driver is where the server must answer."""
    if not is_server(uri):
        return
    try:
        probe_server(uri)
    except HarnessError as exc:
        raise ResourceError(f"{exc} (checked on {socket.gethostname()}, where this benchmark's driver logs its runs; "
                            "with `ray job submit` that is the head node)") from None


def _missing_parents(folder: Path) -> list[Path]:
    """The folders that do not exist yet from `folder` up, deepest first (removed again after the check)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _node_name(node: dict, report: dict | None = None) -> str:
    host = (report or {}).get("host") or node.get("NodeManagerHostname") or "?"
    return f"{node.get('NodeManagerAddress', '?')} ({host})"


def _short(exc: BaseException, limit: int = 200) -> str:
    return one_line(exc, limit)


def preflight_cluster(address: str | None, output_dir: str | Path, data_path: str | None = None,
                      tracking_uri: str | None = None, download: bool = False, verbose: bool = False) -> bool:
    """For a run on a cluster (an address given or in RAY_ADDRESS): join it and check it, before anything
    else is written. The connection is kept for the run. False (and nothing done) for an embedded Ray."""
    joined, _ = cluster_address(address)
    if joined is None:
        return False
    init_ray(address, verbose)
    check_cluster(output_dir, data_path, tracking_uri, download)
    return True
