"""The driver's Ray session: join a Ray cluster or start an embedded one (`init_ray`).

`join_cluster(address)` replaces a bare `ray.init(address=...)`, whose failures are a traceback after up to
40 s of retries. It first probes the address with one bounded gRPC call to Ray's GCS, so that a malformed
address, nothing listening, a port that is not Ray's, or a missing/wrong authentication token is one line.
Token authentication (Ray's default whenever a token exists, e.g. after any `ray.init()` on the head) is
detected here: when the cluster asks for a token and one is found on this machine (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray looks for it), this process switches to RAY_AUTH_MODE=token.


`keep_embedded_ray_local()` makes an embedded Ray bind its servers to 127.0.0.1 (docs/CLUSTER.md lists what
listens where).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from harness.errors import ConfigError, ResourceError, one_line

ROOT = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT_S = 5.0          # TCP connect, gRPC handshake and the GCS call, each
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
                                f"{one_line(exc.details())}); check that its head node is up (`ray status "
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
        raise ResourceError(f"cannot join the Ray cluster at {target} ({source}): {one_line(str(exc))}") from None


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
# Starting or joining Ray
# ---------------------------------------------------------------------------------------------------------
def ray_env(embedded: bool) -> dict[str, str]:
    """Environment for the Tune trainables, which Ray Train propagates to its controller and workers.

    Values already set in the driver's environment win (e.g. a longer health-check interval on a big cluster).
    """
    env = {
        "RAY_TRAIN_V2_ENABLED": "1",
        # Keep the launch directory as cwd (relative data paths keep working; ours are absolute anyway).
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        # The controller polls its workers every 2 s by default: each report, and the end of every run,
        # waits up to one interval. 0.2 s makes that negligible at the cost of a few cheap RPCs.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }
    if embedded:
        # One machine, no autoscaler, no metrics collector: preemption watching and Prometheus metrics only cost
        # an extra actor process per trial.
        env.update(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_TRAIN_METRICS_ENABLED="0")
    return {key: os.environ.get(key, value) for key, value in env.items()}


def _quiet_driver(verbose: bool) -> None:
    """Ray's own output is off by default (the driver prints one line per task and trial); --verbose shows it."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")              # legacy Tune reporter: silent at verbose=0
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # results live in trials/<name>/result.json
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    level = logging.INFO if verbose else logging.ERROR
    # ...including the notice that the embedded Ray uses token authentication (it should: keep it on).
    for name in ("ray.tune", "ray.train", "ray.air", "ray.data", "ray._private.authentication"):
        logging.getLogger(name).setLevel(level)


def init_ray(address: str | None = None, verbose: bool = False) -> bool:
    """Join `address` (else RAY_ADDRESS), or start an embedded single-machine Ray bound to 127.0.0.1. True when
    Ray was started here (the caller shuts it down). An already initialised Ray session is reused as is.
    Joining probes the address first and picks up the cluster's token authentication (join_cluster above): a bad
    address or a missing token is one error line, not a traceback after 40 s of retries."""
    _quiet_driver(verbose)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    target, source = cluster_address(address)
    if target:
        join_cluster(target, source, verbose)
        return True
    keep_embedded_ray_local()      # before Ray is imported where possible: Ray reads it at import
    import ray

    # Embedded: workers must import harness/ and methods/ whatever the driver's cwd is.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    # The dashboard (bound to 127.0.0.1; needs ray[default]) serves Ray's state API, which Ray Train's
    # PlacementGroupCleaner needs to see that a trial's controller is gone: without it, a trial that Tune stops
    # early (ASHA) keeps its workers' CPUs reserved forever and later trials wait for ever (measured: a sweep on
    # 2 CPUs hung after its second early stop).
    # address="local": a new instance even when `ray start` runs on this machine (ray.init() would join that one).
    level = logging.INFO if verbose else logging.WARNING
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=verbose, logging_level=level,
             include_dashboard=True, dashboard_host="127.0.0.1", **embedded_state_api())
    return True
