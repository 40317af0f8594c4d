"""Joining a Ray cluster, and checking it before a benchmark launches on it.

`join_cluster(address)` replaces a bare `ray.init(address=...)`, whose failures are a traceback after up to
40 s of retries. It first probes the address with one bounded gRPC call to Ray's GCS, so that a malformed
address, nothing listening, a port that is not Ray's, or a missing/wrong authentication token is one line.
Token authentication (Ray's default whenever a token exists, e.g. after any `ray.init()` on the head) is
detected here: when the cluster asks for a token and one is found on this machine (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray looks for it), this process switches to RAY_AUTH_MODE=token.

`check_cluster(output_dir, data_path, tracking_uri)` runs, on every alive node, a zero-CPU task that checks
what a multi-node run needs: the output folder is shared (it reads a marker the driver wrote), the data path
exists, and Ray's state API answers (Ray Train needs it to free a stopped trial's resources). The tracking
server is checked from the driver, which is where runs are logged.

`keep_embedded_ray_local()` makes an embedded Ray bind its servers to 127.0.0.1 (docs/CLUSTER.md lists what
listens where).
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from harness.errors import ConfigError, DataError, HarnessError, ResourceError

PROBE_TIMEOUT_S = 5.0          # TCP connect, gRPC handshake and the GCS call, each
NODE_CHECK_TIMEOUT_S = 120.0   # a node must run the check task within this (worker start-up on a busy node)
STATE_API_TIMEOUT_S = 10       # Ray Train's own state queries use a few seconds too
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"   # cheap, and every GCS serves it
TOKEN_FILE = "~/.ray/auth_token"
# Ray's switch for "no multi-node cluster": the node IP becomes 127.0.0.1 and every server binds there.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOCAL_ONLY_SET_HERE = False


# ---------------------------------------------------------------------------------------------------------
# The address
# ---------------------------------------------------------------------------------------------------------
def cluster_address(address: str | None) -> tuple[str | None, str]:
    """(address to join or None for an embedded Ray, where it came from: '--address' or 'RAY_ADDRESS')."""
    if address:
        return address.strip(), "--address"
    env = (os.environ.get("RAY_ADDRESS") or "").strip()
    if not env or env == "local":       # Ray's own spelling for "start a local instance"
        return None, "RAY_ADDRESS"
    return env, "RAY_ADDRESS"


def parse_address(address: str, source: str = "--address") -> tuple[str, int]:
    """host:port of a GCS, or ConfigError (one line) saying which address to give instead."""
    gcs_hint = "give the GCS address that `ray start --head` prints, host:port (port 6379 by default)"
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme in ("http", "https"):
        raise ConfigError(f"{source} {address!r} is a dashboard/Jobs address (it is for `ray job submit --address`); "
                          f"to run from a node of the cluster, {gcs_hint}")
    if scheme == "ray":
        raise ConfigError(f"{source} {address!r} is a Ray Client address, which this harness does not use: run it "
                          f"on a node of the cluster with the GCS address (host:port, port 6379 by default), or "
                          "submit it with `ray job submit --address http://HEAD:8265 --working-dir . -- python "
                          "run_benchmark.py ...`")
    if address == "auto":
        return _local_cluster(source)
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")       # [::1]:6379
    if scheme or not sep or not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(f"{source} {address!r} is not a Ray cluster address: {gcs_hint}, e.g. 10.0.0.1:6379")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"{source} {address!r} has no valid port (1..65535): {gcs_hint}, e.g. {host}:6379")
    return host, port


def _local_cluster(source: str) -> tuple[str, int]:
    """`auto`: the cluster `ray start` last started on this machine."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        found = canonicalize_bootstrap_address_or_die("auto")
    except Exception:  # noqa: BLE001 -- Ray raises ConnectionError, or others when several clusters run
        raise ResourceError(f"{source} 'auto': no single Ray cluster started by `ray start` runs on this machine; "
                            "start one (`ray start --head`) or give its address, host:port") from None
    return parse_address(found, source)


# ---------------------------------------------------------------------------------------------------------
# Probing the GCS and its authentication
# ---------------------------------------------------------------------------------------------------------
def probe_gcs(host: str, port: int, token: str | None = None, source: str = "--address",
              timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One GCS call, bounded by `timeout` at each step. True when it answered, False when it asked for a token
    (or rejected `token`); ResourceError (one line) when the address is unreachable or is not Ray's GCS."""
    import grpc

    where = f"{host}:{port}"
    _check_tcp(host, port, source, timeout)
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else where)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ResourceError(f"{where} ({source}) accepts connections but does not speak gRPC, so it is not a "
                                "Ray cluster address (the dashboard port, 8265 by default, is for `ray job submit`); "
                                "give the address `ray start --head` prints, host:port (port 6379 by default)") \
                from None
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            channel.unary_unary(GCS_PROBE_METHOD)(b"", timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return False
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                raise ResourceError(f"{where} ({source}) is a gRPC server but not a Ray cluster's GCS (it does not "
                                    "know Ray's GCS calls; a raylet or agent port?): give the address `ray start "
                                    "--head` prints, host:port (port 6379 by default)") from None
            raise ResourceError(f"the Ray cluster at {where} ({source}) did not answer ({code.name}: "
                                f"{_one_line(exc.details())}); check that its head node is up (`ray status "
                                f"--address {where}` on the head)") from None
        return True
    finally:
        channel.close()


def _check_tcp(host: str, port: int, source: str, timeout: float) -> None:
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.gaierror as exc:
        raise ResourceError(f"cannot resolve the host of the Ray cluster address {where} ({source}): "
                            f"{exc.strerror}; check the head node's name or IP") from None
    except ConnectionRefusedError:
        raise ResourceError(f"nothing listens at {where} ({source}): start the cluster there (`ray start --head "
                            f"--port={port}` on {host}) or fix {source}") from None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ResourceError(f"cannot reach the Ray cluster at {where} ({source}): {reason} within "
                            f"{timeout:g} s; check the host, the port, and firewalls between this machine and "
                            "the head node") from None


def local_token() -> tuple[str | None, str]:
    """(the token Ray would send, where it comes from), looked up as Ray does; (None, ...) when there is none."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        where = TOKEN_FILE
    loader = AuthenticationTokenLoader.instance()
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None, where
        return loader.get_raw_token(ignore_auth_mode=True), where
    except AuthenticationError:     # RAY_AUTH_TOKEN_PATH names a missing or empty file
        return None, where


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process (and what it starts), as `ray start` does for a head with a token."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")      # Ray reads its config once; re-read it so this process sends the token


def prepare_connection(address: str, source: str = "--address") -> str:
    """Check `address` and set up the authentication its cluster wants; returns host:port for ray.init.
    Every failure is one line (ConfigError, ResourceError), within a few seconds."""
    host, port = parse_address(address, source)
    where = f"{host}:{port}"
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token" and probe_gcs(host, port, None, source):
        return where                                      # no authentication asked for
    copy = (f"copy the head node's {TOKEN_FILE} to {TOKEN_FILE} on this machine (or export "
            "RAY_AUTH_TOKEN_PATH=<that file> or RAY_AUTH_TOKEN=<its content>)")
    if mode == "disabled":
        raise ResourceError(f"the Ray cluster at {where} uses token authentication but RAY_AUTH_MODE=disabled is "
                            "set here: unset it (the token is then found and used) or export RAY_AUTH_MODE=token")
    token, token_source = local_token()
    if token is None and mode == "token":        # Ray itself refuses to connect in token mode without a token
        raise ResourceError(f"RAY_AUTH_MODE=token is set here but no authentication token was found ({token_source}): "
                            f"{copy}; or unset RAY_AUTH_MODE if the cluster at {where} runs without authentication")
    if token is None:
        raise ResourceError(f"the Ray cluster at {where} uses token authentication (Ray's default) and no token was "
                            f"found on this machine ({token_source}): {copy}, then rerun")
    if not probe_gcs(host, port, token, source):
        raise ResourceError(f"the Ray cluster at {where} rejected the authentication token from {token_source}: it is "
                            f"not this cluster's; {copy}")
    if mode != "token":
        enable_token_auth()
    return where


def join_cluster(address: str, source: str = "--address", verbose: bool = False) -> None:
    """Probe `address`, set up its authentication, then ray.init(address=...). One-line errors."""
    import logging

    import ray

    target = prepare_connection(address, source)
    _allow_multi_node()
    try:
        # Joining a cluster: resources are the cluster's (passing num_cpus here raises).
        ray.init(address=target, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:   # e.g. Ray or Python version mismatch
        raise ResourceError(f"cannot join the Ray cluster at {target} ({source}): {_one_line(str(exc))}") from None


def keep_embedded_ray_local() -> None:
    """Make an embedded Ray bind to 127.0.0.1: its node IP becomes 127.0.0.1, so the GCS, the raylet, the
    agents and the metrics servers listen there instead of on every interface (measured in docs/CLUSTER.md).
    The user's own setting of the variable wins."""
    global _LOCAL_ONLY_SET_HERE
    if LOCAL_ONLY_ENV in os.environ:
        return
    os.environ[LOCAL_ONLY_ENV] = "0"          # read by Ray's processes when they start
    _LOCAL_ONLY_SET_HERE = True
    _set_ray_cluster_constant(False)


def embedded_state_api() -> dict:
    """ray.init arguments that let every process of an embedded Ray find its own state API (Ray Train's
    PlacementGroupCleaner asks it whether a trial's controller is gone). Without an address Ray looks for the
    dashboard through the last `ray start` or the GCS processes of the machine, and fails ("Found multiple active
    Ray instances") as soon as another Ray runs there: a trial stopped early then keeps its CPUs for ever.
    The dashboard gets a known free port, and the job's runtime env (inherited by every task and actor) names it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"dashboard_port": port, "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def _allow_multi_node() -> None:
    """Undo keep_embedded_ray_local() before joining a cluster from the same process (a loopback node IP
    would not match any node of the cluster)."""
    global _LOCAL_ONLY_SET_HERE
    if _LOCAL_ONLY_SET_HERE:
        os.environ.pop(LOCAL_ONLY_ENV, None)
        _LOCAL_ONLY_SET_HERE = False
        _set_ray_cluster_constant(True)


def _set_ray_cluster_constant(value: bool) -> None:
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:                  # Ray already imported here: it read the variable at import
        constants.ENABLE_RAY_CLUSTER = value


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
        problems.update(_state_api_problem())
    return {"host": socket.gethostname(), "problems": problems}


def _state_api_problem() -> dict[str, str]:
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
    (harness.ray_cleanup), so runs go on; `ray list ...` and the dashboard will not work from there."""
    bad = [(node, rep) for node, rep in reports if "state_api" in rep["problems"]]
    if not bad:
        return None
    node, rep = bad[0]
    names = _node_name(node, rep) + (f" and {len(bad) - 1} more node(s)" if len(bad) > 1 else "")
    return (f"warning: Ray's state API fails on Ray node {names}: {rep['problems']['state_api']} (the harness frees "
            "stopped trials' resources itself; Ray's own tools that need the state API will not work there)")


def _check_tracking_from_driver(uri: str) -> None:
    """Runs are logged by the driver only, so the driver is where the server must answer."""
    from harness.tracking import is_server, probe_server

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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _short(exc: BaseException, limit: int = 200) -> str:
    text = _one_line(str(exc))
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def preflight_cluster(address: str | None, output_dir: str | Path, data_path: str | None = None,
                      tracking_uri: str | None = None, download: bool = False, verbose: bool = False) -> bool:
    """For a run on a cluster (an address given or in RAY_ADDRESS): join it and check it, before anything
    else is written. The connection is kept for the run. False (and nothing done) for an embedded Ray."""
    joined, _ = cluster_address(address)
    if joined is None:
        return False
    from harness.ray_launch import init_ray

    init_ray(address, verbose)
    check_cluster(output_dir, data_path, tracking_uri, download)
    return True
