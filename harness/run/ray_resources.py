"""What a trial asks Ray for: sized to the cluster before anything is launched, so a request that cannot fit
is one clear line instead of Ray's endless wait."""
from __future__ import annotations

import math
from dataclasses import dataclass

from harness.errors import ResourceError

TRAINABLE_CPUS = 0.01   # the Tune function trainable only waits on fit(); the Train controller takes 0 CPU
MIN_AUTO_CPUS = 0.25    # the least CPU the automatic sizing gives a worker before it reports "too many workers"


@dataclass(frozen=True)
class ResourcePlan:
    """What each trial asks Ray for, and how many trials run at once."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    trainable_cpus: float
    concurrency: int
    threads_per_worker: int       # torch intra-op threads in each worker (Ray sets OMP_NUM_THREADS=1)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def trial_cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker + self.trainable_cpus

    @property
    def trial_gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker

    def describe(self) -> str:
        gpu = f", {fmt(self.gpus_per_worker)} GPU" if self.use_gpu else ""
        return (f"{self.num_workers} worker(s) x ({fmt(self.cpus_per_worker)} CPU{gpu}, "
                f"{self.threads_per_worker} thread(s)) per trial, {self.concurrency} trial(s) at once")


def fmt(x: float) -> str:
    return f"{x:g}"


def _floor_to(x: float, step: float) -> float:
    return math.floor(x / step + 1e-9) * step


def plan_resources(cluster: dict[str, float], num_workers: int, num_trials: int,
                   cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                   max_concurrent: int | None = None, device: str = "auto",
                   largest_node: dict[str, float] | None = None) -> ResourcePlan:
    """Size each trial's request to the cluster, or raise ResourceError (one line) when one trial cannot fit.

    Ray would otherwise wait forever for resources that never come. Automatic sizing (cpus_per_worker None):
    as many trials run at once as give each worker about one CPU (and one GPU each when there are GPUs),
    and the CPUs are shared among their workers in 0.05 steps. A one-worker trial runs inside its Tune
    trainable (1 trial alone on 2 CPUs: 2 CPU and 2 torch threads; 2 at once: 1 CPU each); a multi-worker
    trial's trainable only waits on Ray Train and takes 0.01 CPU beside its workers (2 workers on 2 CPUs:
    0.95 CPU each).
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    # One worker runs inside its Tune trainable; several are Ray Train workers beside a trainable that waits.
    overhead = TRAINABLE_CPUS if int(num_workers) > 1 else 0.0
    largest_node = largest_node or cluster
    w = int(num_workers)
    if w < 1:
        raise ResourceError(f"num_workers must be >= 1, got {num_workers}")
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 and device != "cpu" else 0.0
    if device == "cuda" and gpus_per_worker <= 0:
        raise ResourceError(f"device cuda was asked for but the Ray cluster has {fmt(gpus)} GPU; use --device cpu "
                            "or join a cluster with GPUs (--address / RAY_ADDRESS)")
    gpw = float(gpus_per_worker)
    wanted = max(1, min(num_trials, max_concurrent or num_trials))
    gpu_fit = math.floor(gpus / (w * gpw) + 1e-9) if gpw > 0 else wanted
    if gpw > 0 and gpu_fit < 1:
        raise ResourceError(
            f"a trial needs {w} worker(s) x {fmt(gpw)} GPU = {fmt(w * gpw)} GPU but the Ray cluster has "
            f"{fmt(gpus)} GPU; use fewer --num-workers, --gpus-per-worker {fmt(gpus / w) if gpus else 0}, "
            "or a bigger cluster (--address / RAY_ADDRESS)")

    if cpus_per_worker is None:
        # About one CPU per worker decides how many trials run at once; the fractions only make room for the
        # trainables (and for trials with more workers than CPUs).
        conc = max(1, min(wanted, gpu_fit, math.floor(cpus / w + 1e-9)))
        share = (cpus - overhead * conc) / (w * conc)
        cpw = _floor_to(share, 0.05)
        if cpw < MIN_AUTO_CPUS:
            least = w * MIN_AUTO_CPUS + overhead
            squeeze = max(0.01, _floor_to((cpus - overhead) / w, 0.01))
            raise ResourceError(
                f"a trial of {w} worker(s) needs at least {w} x {fmt(MIN_AUTO_CPUS)} CPU + {fmt(overhead)} "
                f"= {fmt(least)} CPU but the Ray cluster has {fmt(cpus)} CPU; use fewer --num-workers, "
                f"set --cpus-per-worker explicitly (e.g. {fmt(squeeze)}), or a bigger cluster (--address / RAY_ADDRESS)")
    else:
        cpw = float(cpus_per_worker)
        if cpw <= 0:
            raise ResourceError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    need = w * cpw + overhead
    cpu_fit = math.floor(cpus / need + 1e-9)
    if cpu_fit < 1:
        hint = _floor_to((cpus - overhead) / w, 0.05)
        raise ResourceError(
            f"a trial needs {w} worker(s) x {fmt(cpw)} CPU + {fmt(overhead)} CPU for its Tune trainable = "
            f"{fmt(round(need, 4))} CPU but the Ray cluster has {fmt(cpus)} CPU; use fewer --num-workers"
            + (f", --cpus-per-worker {fmt(hint)}" if hint > 0 else "")
            + ", or a bigger cluster (--address / RAY_ADDRESS)")
    node_cpus, node_gpus = float(largest_node.get("CPU", 0)), float(largest_node.get("GPU", 0))
    if cpw > node_cpus + 1e-9 or gpw > node_gpus + 1e-9:
        raise ResourceError(
            f"one worker needs {fmt(cpw)} CPU / {fmt(gpw)} GPU but the largest Ray node has {fmt(node_cpus)} CPU"
            f" / {fmt(node_gpus)} GPU; lower --cpus-per-worker / --gpus-per-worker")
    conc = max(1, min(wanted, cpu_fit, gpu_fit))
    threads = max(1, int(round(cpw)))
    return ResourcePlan(w, round(cpw, 4), gpw, overhead, conc, threads)


def cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
    """(total resources, largest node's resources) of the connected cluster, counting what an autoscaler
    may still add (Ray's own check does the same)."""
    import ray

    total = dict(ray.cluster_resources())
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}
    try:   # private API, used by Ray Train's own resource check; absent or None without an autoscaler
        from ray._private.state import state as ray_state

        upper = ray_state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 -- best effort only
        upper = {}
    for key, value in upper.items():
        if value and value > total.get(key, 0):
            total[key] = float(value)
            largest[key] = max(largest.get(key, 0.0), float(value))
    return total, largest
