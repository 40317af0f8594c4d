"""Joining a Ray cluster (harness.run.cluster): bad addresses are one line within seconds, what each node reports
for the multi-node checks, and an embedded Ray that listens on 127.0.0.1 only. The README's cluster section
itself runs in tests/test_cluster_readme.py (slow)."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import pytest

from harness.run.cluster import node_report, raise_first_problem
from harness.run.ray_session import parse_address, prepare_connection
from harness.errors import ConfigError, DataError, ResourceError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("address, phrase", [
    ("10.0.0.1", "is not a Ray cluster address"),
    ("10.0.0.1:http", "no valid port"),
    ("10.0.0.1:70000", "no valid port"),
    (":6379", "is not a Ray cluster address"),
    ("http://10.0.0.1:8265", "dashboard/Jobs address"),
    ("ray://10.0.0.1:10001", "Ray Client address"),
])
def test_malformed_addresses_are_one_config_error(address: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase) as info:
        parse_address(address, "RAY_ADDRESS")
    assert "\n" not in str(info.value) and "RAY_ADDRESS" in str(info.value)


def test_ipv6_address_parses() -> None:
    assert parse_address("[::1]:6379") == ("::1", 6379)


def test_nothing_listening_is_one_line_at_once(free_port) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ResourceError, match=f"nothing listens at 127.0.0.1:{port}"):
        prepare_connection(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_a_port_that_is_not_rays_is_one_line_bounded() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        with pytest.raises(ResourceError, match="does not speak gRPC"):
            prepare_connection(f"127.0.0.1:{server.server_address[1]}", "RAY_ADDRESS")
        assert time.monotonic() - start < 15          # 5 s handshake limit, on a loaded machine
    finally:
        server.shutdown()
        server.server_close()


def test_a_grpc_server_that_is_not_a_gcs_is_one_line() -> None:
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(ResourceError, match="not a Ray cluster's GCS"):
            prepare_connection(f"127.0.0.1:{port}")
    finally:
        server.stop(0)


def test_unreachable_address_from_the_cli_is_one_line_and_writes_nothing(tmp_path: Path, free_port) -> None:
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    proc = subprocess.run([sys.executable, "run_benchmark.py", "--method", "replay", "--suite", "digits-5x2",
                           "--output-dir", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: nothing listens at 127.0.0.1:{port}"), proc.stderr
    assert not (tmp_path / "out").exists()


# ---- what each node reports (node_report runs in a Ray task per node; here directly) ---------------------------
def test_node_report_sees_a_shared_folder(tmp_path: Path) -> None:
    marker = tmp_path / ".marker"
    marker.write_text("nonce")
    data = tmp_path / "data"
    data.mkdir()
    assert node_report(str(marker), "nonce", str(data), state_api=False)["problems"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".marker", "data"]      # its write probe is gone


def test_node_report_names_what_a_node_does_not_see(tmp_path: Path) -> None:
    missing = node_report(str(tmp_path / ".marker"), "nonce", str(tmp_path / "no-data"), state_api=False)
    assert set(missing["problems"]) == {"output_dir", "data_path"}
    other = tmp_path / ".marker"
    other.write_text("another driver")
    assert "another folder" in node_report(str(other), "nonce", state_api=False)["problems"]["output_dir"]


def test_problems_become_one_line_naming_the_node_and_the_fix(tmp_path: Path) -> None:
    node = {"NodeManagerAddress": "10.0.0.2", "NodeManagerHostname": "node-b"}
    unshared = {"host": "node-b", "problems": {"output_dir": "does not see the file the driver just wrote there"}}
    with pytest.raises(ResourceError, match=r"10\.0\.0\.2 \(node-b\) does not see .* shared folder") as info:
        raise_first_problem([({}, {"host": "a", "problems": {}}), (node, unshared)], tmp_path, None)
    assert "\n" not in str(info.value)
    no_data = {"host": "node-b", "problems": {"data_path": "does not exist there"}}
    with pytest.raises(DataError, match="--data-path /data does not exist there on Ray node 10.0.0.2"):
        raise_first_problem([(node, no_data)], tmp_path, "/data")
    raise_first_problem([(node, {"host": "node-b", "problems": {}})], tmp_path, None)     # all good: no error


# ---- embedded Ray: 127.0.0.1 only --------------------------------------------------------------------------------
LISTENERS = r"""
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from harness.run.ray_session import init_ray
init_ray()
import ray
ray.get(ray.remote(lambda: 1).remote())       # a worker process too

def tree(root):
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, grew = {root}, True
    while grew:
        kids = {c for c, pp in parent.items() if pp in found} - found
        found |= kids
        grew = bool(kids)
    return found

inodes = set()
for pid in tree(os.getpid()):
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in Path(table).read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:          # state LISTEN, owned by our processes
            listening.append(fields[1])
print("LISTEN", " ".join(listening))
ray.shutdown()
"""

LOOPBACK = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
def test_embedded_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX"))}
    proc = subprocess.run([sys.executable, "-c", LISTENERS, str(ROOT)], env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    addresses = next(line for line in proc.stdout.splitlines() if line.startswith("LISTEN")).split()[1:]
    assert len(addresses) >= 5, addresses       # GCS, raylet, dashboard, agents, the worker...
    assert all(a.startswith(LOOPBACK) for a in addresses), addresses
