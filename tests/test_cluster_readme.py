"""The README's "Running on a cluster" section, executed on 127.0.0.1 as a user would (issue 16).

`ray start --head` (token authentication on, as Ray sets it up whenever a token exists), a worker node joining it,
`RAY_ADDRESS=... python run_benchmark.py ...`, `ray job submit --working-dir . -- python run_benchmark.py ...`,
then the cluster is stopped. Both runs must give the local launcher's numbers, a missing or wrong token must be
one error line, and no process of the test cluster may be left running, even when the test fails.

Isolation on a shared machine: own ports, own --temp-dir (short: Ray's unix socket paths are limited to 107
characters), own token file (RAY_AUTH_TOKEN_PATH). The cluster is stopped by killing its own processes (found by
its temp dir) rather than `ray stop`, which stops every Ray instance on the machine, other users' included.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = Path(sys.executable).with_name("ray")
BENCH = ["run_benchmark.py", "--method", "replay", "--suite", "digits-5x2"]

# pytest-timeout ends a test without running its `finally`: its limit must exceed the sum of the subprocess
# timeouts below (120 + 120 + 60 + 300 + 400 + 400 s) plus the clean-up.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1600),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray clusters run on Linux"),
              pytest.mark.skipif(not RAY_CLI.exists(), reason=f"no ray CLI next to {sys.executable}")]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- the processes of one cluster, by its temp dir (Linux /proc) --------------------------------------------
def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def cluster_processes(temp_dir: str, gcs_port: int | None = None) -> dict[int, str]:
    """Processes naming `temp_dir` on their command line (GCS, raylets, dashboard, monitors) or the GCS address
    (the Ray client server), and all their descendants (workers, agents and the job's driver rename themselves
    `ray::...`)."""
    table = _processes()
    mine, pid = set(), os.getpid()         # this process and its ancestors may name temp_dir too: never them
    while pid in table and pid not in mine:
        mine.add(pid)
        pid = table[pid][0]
    gcs = re.compile(rf"--address=\S+:{gcs_port}\b") if gcs_port else None
    found = {pid for pid, (_, cmd) in table.items()
             if temp_dir in cmd or (gcs is not None and "ray" in cmd and gcs.search(cmd))} - mine
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    return {pid: table[pid][1] for pid in found}


def stop_cluster(temp_dir: str, gcs_port: int | None = None, grace_s: float = 15.0) -> dict[int, str]:
    """SIGTERM the cluster's processes, SIGKILL what is left after `grace_s`; returns what still runs."""
    procs = cluster_processes(temp_dir, gcs_port)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in procs:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and cluster_processes(temp_dir, gcs_port):
            time.sleep(0.5)
        procs = cluster_processes(temp_dir, gcs_port)
        if not procs:
            break
    return procs


# ---- running things ---------------------------------------------------------------------------------------------
def run(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start(cmd: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def numbers(output_dir: Path) -> tuple[float, float]:
    """(average incremental accuracy, last accuracy) of the single trial run into `output_dir`."""
    results = list(output_dir.glob("trials/*/result.json"))
    assert len(results) == 1, f"expected one trial in {output_dir}, found {results}"
    result = json.loads(results[0].read_text())
    assert result["status"] == "finished", result.get("error")
    main = next(iter(result["metrics"].values()))
    return main["average_incremental_accuracy"], main["last_accuracy"]


def alive_nodes(address: str, env: dict) -> int:
    out = run([RAY_CLI, "status", "--address", address], env, timeout=60).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return active.count("node_")


def assert_one_error_line(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


EMBEDDED_STATE_API = """
import ray
from harness.run.cluster import state_api_problem
from harness.run.ray_session import init_ray
init_ray()
print("state API:", ray.get(ray.remote(num_cpus=0)(state_api_problem).remote()))
ray.shutdown()
"""


def test_readme_cluster_section(tmp_path: Path) -> None:
    gcs, dashboard, agent_head, agent_worker, client, metrics_a, metrics_b = free_ports(7)
    # Short paths (unix sockets live under them). Each node gets its own, as on separate machines: two nodes in
    # one temp dir share runtime_resources/, and one node's runtime-env agent then deletes the job's working_dir
    # that the other node's driver runs in.
    head_dir = tempfile.mkdtemp(prefix="clbr", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="clbw", dir="/tmp")
    token = Path(head_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER"))}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    address, jobs = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    # Ray's state API, called without an address in the nodes' processes (Ray Train's PlacementGroupCleaner),
    # looks for the cluster in /tmp/ray: with our own --temp-dir, and other Ray instances on this machine, it
    # must be told (the harness's pre-flight check fails without this; docs/CLUSTER.md).
    node_env = {**env, "RAY_API_SERVER_ADDRESS": jobs,
                # The head's two metrics servers have fixed default ports; another Ray on the machine may hold them.
                "AUTOSCALER_METRIC_PORT": str(metrics_a), "DASHBOARD_METRIC_PORT": str(metrics_b)}
    token_env = {**env, "RAY_AUTH_MODE": "token"}
    bench = [sys.executable, *BENCH]
    try:
        # README: ray start --head --port=6379 (Ray turns token authentication on: a token exists)
        head = check(run([RAY_CLI, "start", "--head", f"--port={gcs}", "--num-cpus=1", f"--temp-dir={head_dir}",
                          f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_head}",
                          f"--ray-client-server-port={client}", "--disable-usage-stats"],
                         node_env, timeout=120), "ray start --head")
        assert "Ray runtime started" in head
        # README: RAY_AUTH_MODE=token ray start --address=HEAD:6379 (a worker node needs the mode exported)
        check(run([RAY_CLI, "start", f"--address={address}", "--num-cpus=1", f"--temp-dir={worker_dir}",
                   f"--dashboard-agent-listen-port={agent_worker}"], {**node_env, "RAY_AUTH_MODE": "token"},
                  timeout=120), "ray start --address (worker node)")
        deadline = time.monotonic() + 60
        while alive_nodes(address, token_env) < 2:       # each call is bounded (60 s) too
            assert time.monotonic() < deadline, "the worker node did not join within 60 s"
            time.sleep(2)

        # Side by side: the reference (the local launcher with one torch thread, as each Ray worker gets with
        # --cpus-per-worker 1), and a missing and a wrong token, each one line saying where the token is and
        # what to copy or export, with nothing written.
        wrong = tmp_path / "wrong_token"
        wrong.write_text(secrets.token_hex(32))
        side = {
            "local": start([*bench, "--launcher", "local", "--output-dir", tmp_path / "local", "--no-tracking"],
                           {**env, "OMP_NUM_THREADS": "1"}),
            "no_token": start([*bench, "--output-dir", tmp_path / "no_token"],
                              {**env, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent")}),
            "bad_token": start([*bench, "--output-dir", tmp_path / "bad_token"],
                               {**env, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN_PATH": str(wrong)}),
        }
        # An embedded Ray started meanwhile (another Ray runs on this machine: the test cluster) must still
        # find its own state API from its workers, or Ray Train could not free a stopped trial's resources.
        side["embedded"] = start([sys.executable, "-c", EMBEDDED_STATE_API], env)
        until = time.monotonic() + 300       # one limit for the four together
        done = {name: finish(proc, timeout=max(1.0, until - time.monotonic())) for name, proc in side.items()}
        assert check(done["embedded"], "embedded Ray next to the cluster").strip().endswith("state API: {}")
        check(done["local"], "local launcher")
        expected = numbers(tmp_path / "local")
        assert_one_error_line(done["no_token"], "token authentication", "no token was found", "RAY_AUTH_TOKEN_PATH")
        assert_one_error_line(done["bad_token"], "rejected the authentication token", str(wrong))
        assert not (tmp_path / "no_token").exists() and not (tmp_path / "bad_token").exists()

        # README: RAY_ADDRESS=HEAD:6379 python run_benchmark.py ... (no RAY_AUTH_MODE: the harness detects it)
        out = check(run([*bench, "--cpus-per-worker", "1", "--output-dir", tmp_path / "address"],
                        {**env, "RAY_ADDRESS": address}, timeout=400), "RAY_ADDRESS run")
        assert "Traceback" not in out
        assert numbers(tmp_path / "address") == pytest.approx(expected, abs=0.01)

        # README: ray job submit --address http://HEAD:8265 --working-dir . -- python run_benchmark.py ...
        job = check(run([RAY_CLI, "job", "submit", "--address", jobs, "--working-dir", ".", "--", "python", *BENCH,
                         "--cpus-per-worker", "1", "--output-dir", tmp_path / "job"], token_env, timeout=400),
                    "ray job submit")
        assert "succeeded" in job
        assert numbers(tmp_path / "job") == pytest.approx(expected, abs=0.01)
    finally:
        # README: ray stop (on every node)
        leftovers = {**stop_cluster(worker_dir, gcs), **stop_cluster(head_dir, gcs)}
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
    assert not leftovers, f"still running after the cluster was stopped: {leftovers}"
