"""The Ray launcher: every trial is a Ray Train DDP job (`TorchTrainer`), the trials of a benchmark run as a
Ray Tune grid of function trainables (the Train V2 pattern: each Tune trial builds a TorchTrainer and calls
`fit()`). The trial itself is the same `harness.trial.run_trial` the local launcher runs.

Where things go under <output_dir> (absolute; on a multi-node cluster it must be shared storage):
    trials/<name>/result.json              the trial's result (skip marker on reruns), as with --launcher local
    trials/<name>/checkpoints/task_XXX.pt  per-task checkpoints written by run_trial (either launcher resumes)
    ray/<name>/task_XXX/                   the checkpoints reported to Ray Train (restart source on failures)
    ray/_tune/<experiment>/                Ray Tune's experiment state
Names carry no timestamps: rerunning the same command finds the same trials, Train runs and checkpoints.

Progress goes through Ray Tune: the Train workers report each task's row (`ray.train.report`), Ray's
`TuneReportCallback` forwards it to Tune, and a Tune callback in the driver prints one line per task and per
trial (harness.launch.TrialEvents, which is also where per-trial tracking hooks in).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import harness.errors as errors
from harness.errors import HarnessError, ResourceError
from harness.launch import (LaunchOptions, TrialEvents, checkpoint_dir, failed_result, finish_result,
                            split_finished, trial_dir)
from harness.results import read_result, result_path, write_json

ROOT = Path(__file__).resolve().parents[1]

TRAINABLE_CPUS = 0.01   # the Tune function trainable only waits on fit(); the Train controller takes 0 CPU
MIN_AUTO_CPUS = 0.25    # the least CPU the automatic sizing gives a worker before it reports "too many workers"
HARNESS_ERROR_MARKER = "harness_error.txt"


# ---------------------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------------------
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
        gpu = f", {_fmt(self.gpus_per_worker)} GPU" if self.use_gpu else ""
        return (f"{self.num_workers} worker(s) x ({_fmt(self.cpus_per_worker)} CPU{gpu}, "
                f"{self.threads_per_worker} thread(s)) per trial, {self.concurrency} trial(s) at once")


def _fmt(x: float) -> str:
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
    and the CPUs are shared among their workers in 0.05 steps next to the trainables' 0.01 (2 workers on
    2 CPUs: 0.95 CPU each; 1 worker alone on 2 CPUs: 1.95 CPU and 2 torch threads).
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    largest_node = largest_node or cluster
    w = int(num_workers)
    if w < 1:
        raise ResourceError(f"num_workers must be >= 1, got {num_workers}")
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 and device != "cpu" else 0.0
    if device == "cuda" and gpus_per_worker <= 0:
        raise ResourceError(f"device cuda was asked for but the Ray cluster has {_fmt(gpus)} GPU; use --device cpu "
                            "or join a cluster with GPUs (--address / RAY_ADDRESS)")
    gpw = float(gpus_per_worker)
    wanted = max(1, min(num_trials, max_concurrent or num_trials))
    gpu_fit = math.floor(gpus / (w * gpw) + 1e-9) if gpw > 0 else wanted
    if gpw > 0 and gpu_fit < 1:
        raise ResourceError(
            f"a trial needs {w} worker(s) x {_fmt(gpw)} GPU = {_fmt(w * gpw)} GPU but the Ray cluster has "
            f"{_fmt(gpus)} GPU; use fewer --num-workers, --gpus-per-worker {_fmt(gpus / w) if gpus else 0}, "
            "or a bigger cluster (--address / RAY_ADDRESS)")

    if cpus_per_worker is None:
        # About one CPU per worker decides how many trials run at once; the fractions only make room for the
        # trainables (and for trials with more workers than CPUs).
        conc = max(1, min(wanted, gpu_fit, math.floor(cpus / w + 1e-9)))
        share = (cpus - TRAINABLE_CPUS * conc) / (w * conc)
        cpw = _floor_to(share, 0.05)
        if cpw < MIN_AUTO_CPUS:
            least = w * MIN_AUTO_CPUS + TRAINABLE_CPUS
            squeeze = max(0.01, _floor_to((cpus - TRAINABLE_CPUS) / w, 0.01))
            raise ResourceError(
                f"a trial of {w} worker(s) needs at least {w} x {_fmt(MIN_AUTO_CPUS)} CPU + {_fmt(TRAINABLE_CPUS)} "
                f"= {_fmt(least)} CPU but the Ray cluster has {_fmt(cpus)} CPU; use fewer --num-workers, "
                f"set --cpus-per-worker explicitly (e.g. {_fmt(squeeze)}), or a bigger cluster (--address / RAY_ADDRESS)")
    else:
        cpw = float(cpus_per_worker)
        if cpw <= 0:
            raise ResourceError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    need = w * cpw + TRAINABLE_CPUS
    cpu_fit = math.floor(cpus / need + 1e-9)
    if cpu_fit < 1:
        hint = _floor_to((cpus - TRAINABLE_CPUS) / w, 0.05)
        raise ResourceError(
            f"a trial needs {w} worker(s) x {_fmt(cpw)} CPU + {_fmt(TRAINABLE_CPUS)} CPU for its Tune trainable = "
            f"{_fmt(round(need, 4))} CPU but the Ray cluster has {_fmt(cpus)} CPU; use fewer --num-workers"
            + (f", --cpus-per-worker {_fmt(hint)}" if hint > 0 else "")
            + ", or a bigger cluster (--address / RAY_ADDRESS)")
    node_cpus, node_gpus = float(largest_node.get("CPU", 0)), float(largest_node.get("GPU", 0))
    if cpw > node_cpus + 1e-9 or gpw > node_gpus + 1e-9:
        raise ResourceError(
            f"one worker needs {_fmt(cpw)} CPU / {_fmt(gpw)} GPU but the largest Ray node has {_fmt(node_cpus)} CPU"
            f" / {_fmt(node_gpus)} GPU; lower --cpus-per-worker / --gpus-per-worker")
    conc = max(1, min(wanted, cpu_fit, gpu_fit))
    threads = max(1, int(round(cpw)))
    return ResourcePlan(w, round(cpw, 4), gpw, TRAINABLE_CPUS, conc, threads)


def _cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
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


# ---------------------------------------------------------------------------------------------------------
# Ray session
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
        # One machine, no autoscaler and no dashboard: preemption watching and Prometheus metrics only cost
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
    """Join `address` (else RAY_ADDRESS), or start an embedded single-machine Ray. True when Ray was started
    here (the caller shuts it down). An already initialised Ray session is reused as is."""
    import ray

    _quiet_driver(verbose)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    level = logging.INFO if verbose else logging.WARNING
    if address:
        # Joining a cluster: resources are the cluster's (passing num_cpus here raises).
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
        return True
    # Embedded: workers must import harness/ and methods/ whatever the driver's cwd is.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    # The dashboard (bound to 127.0.0.1; needs ray[default]) serves Ray's state API, which Ray Train's
    # PlacementGroupCleaner needs to see that a trial's controller is gone: without it, a trial that Tune stops
    # early (ASHA) keeps its workers' CPUs reserved forever and later trials wait for ever (measured: a sweep on
    # 2 CPUs hung after its second early stop).
    ray.init(num_cpus=os.cpu_count(), log_to_driver=verbose, logging_level=level, include_dashboard=True,
             dashboard_host="127.0.0.1")
    return True


# ---------------------------------------------------------------------------------------------------------
# Inside Ray: the Train worker and the Tune trainable
# ---------------------------------------------------------------------------------------------------------
def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _restore_from_ray(ckpt_dir: Path, local_rank: int) -> str | None:
    """On a restart, put the latest checkpoint Ray Train holds for this run into the trial's checkpoint folder
    (one copy per node), so run_trial resumes from it. Returns the restored file's name."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or local_rank != 0:
        return None
    restored = None
    with checkpoint.as_directory() as folder:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(folder).glob("task_*.pt")):
            dst = ckpt_dir / src.name
            if not dst.exists():
                _copy_atomic(src, dst)
            restored = src.name
    return restored


def _make_reporter(name: str, rank: int, staging_root: Path) -> Callable[[dict, str | None], None]:
    """ctx.report for Ray: every rank calls ray.train.report (a barrier in Train V2); rank 0 attaches the
    task's checkpoint, which Ray copies to <output_dir>/ray/<name>/task_XXX."""
    import ray.train

    def report(row: dict, ckpt_dir: str | None) -> None:
        task_name = f"task_{int(row['task']):03d}"
        metrics = {**row, "trial": name, "_row_keys": list(row)}
        source = Path(ckpt_dir) / f"{task_name}.pt" if ckpt_dir else None
        if rank != 0 or source is None or not source.is_file():
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=task_name)
            return
        # Stage only this task's file (a hard link when possible): Ray uploads the whole folder it is given.
        staging_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging_root, prefix=".report-") as staging:
            target = Path(staging) / source.name
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging),
                             checkpoint_dir_name=task_name)

    return report


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker of one trial: a RuntimeContext around the DDP process group, then run_trial."""
    entered = time.time()      # start-up measurement: the imports below are paid in every new worker process
    import torch
    import torch.distributed as dist
    import ray.train
    import ray.train.torch

    from harness.runtime import FirstStepClock, RuntimeContext, amp_dtype
    from harness.trial import run_trial

    spec, output_dir = loop_config["spec"], Path(loop_config["output_dir"])
    cfg, name = spec["config"], spec["name"]
    context = ray.train.get_context()
    rank, world, local_rank = context.get_world_rank(), context.get_world_size(), context.get_local_rank()
    torch.set_num_threads(int(loop_config["threads"]))
    marker = trial_dir(output_dir, name) / HARNESS_ERROR_MARKER
    if marker.is_file():   # a restart after a user error (bad option, missing data): fail again at once
        kind, _, message = marker.read_text().strip().partition(": ")
        raise _error_class(kind)(message)
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    if cfg.get("deterministic", True) and device.type == "cuda":
        # Ray Train's helper: seeds, cudnn.benchmark off, deterministic kernels (see runtime.enable_determinism
        # for why CPU skips it). warn_only: a CUDA op without a deterministic kernel warns instead of crashing.
        ray.train.torch.enable_reproducibility(int(spec["seed"]))
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    ckpt_dir = checkpoint_dir(output_dir, name)
    restored = _restore_from_ray(ckpt_dir, local_rank)
    if world > 1 and dist.is_initialized():
        dist.barrier()     # every rank sees the restored checkpoint before run_trial looks for it
    verbose = bool(loop_config.get("verbose"))

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)   # a worker's stdout reaches the driver only with --verbose

    if restored:
        log(f"restored {name} from Ray checkpoint {restored}")
    ctx = RuntimeContext(
        device=device, rank=rank, world_size=world, amp=amp_dtype(device, cfg.get("amp", "auto")),
        checkpoint_dir=str(ckpt_dir), report=_make_reporter(name, rank, trial_dir(output_dir, name)),
        progress=verbose, log=log, fault_at_task=cfg.get("fault_at_task"),
        extras={"launcher": "ray", "local_rank": local_rank})
    if ctx.world_size > 1 and not ctx.distributed:
        raise RuntimeError("Ray Train did not initialise torch.distributed; DDP cannot run")
    clock = FirstStepClock()
    # From the trainable's fit() to our function running (Ray Train's controller and worker processes), then
    # our imports; not measured on a restart (the time would include the failed attempt).
    startup = None if restored else {"ray_train_start_s": entered - loop_config["launched_unix"],
                                     "worker_imports_s": time.time() - entered}
    try:
        with clock.running():
            result = run_trial(spec, ctx)
    except HarnessError as exc:
        if rank == 0:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{type(exc).__name__}: {exc}\n")
        raise
    if rank == 0:
        finish_result(spec, result, "ray", clock, startup)
        result.update(resources=loop_config.get("plan"), restored_from=restored, distributed=ctx.distributed,
                      backend=dist.get_backend() if dist.is_initialized() else None)
        write_json(result_path(output_dir, name), result)


def _error_class(kind: str) -> type[HarnessError]:
    cls = getattr(errors, kind, None)
    return cls if isinstance(cls, type) and issubclass(cls, HarnessError) else HarnessError


def _harness_error_in(exc: BaseException) -> HarnessError | None:
    """The user error (ConfigError, DataError, ...) behind a Ray Train failure, if any."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, HarnessError):
            return cause      # the worker's own exception, not Ray's wrapper (whose text is a traceback)
        if isinstance(e, HarnessError):
            return e
        stack.extend([getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)])
        stack.extend((getattr(e, "worker_failures", None) or {}).values())
    return None


def _first_line_error(exc: BaseException) -> str:
    """`Type: message` of the root worker error, for result.json's one-line `error`."""
    failures = list((getattr(exc, "worker_failures", None) or {}).values())
    root = failures[0] if failures else exc
    root = getattr(root, "cause", None) or root
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[-1] if text else ''}"


def trial_trainable(config: dict, specs: dict[str, dict], setup: dict) -> None:
    """The Tune function trainable of one trial: builds its TorchTrainer and calls fit()."""
    os.environ.update(setup["env"])    # read by TorchTrainer here, propagated to its controller and workers
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = specs[config["name"]]
    name, output_dir, plan = spec["name"], Path(setup["output_dir"]), ResourcePlan(**setup["plan"])
    (trial_dir(output_dir, name) / HARNESS_ERROR_MARKER).unlink(missing_ok=True)   # a fresh command retries
    resources = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = plan.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec, "output_dir": str(output_dir), "threads": plan.threads_per_worker,
                           "use_gpu": plan.use_gpu, "verbose": setup["verbose"], "plan": setup["plan"],
                           "launched_unix": time.time()},
        scaling_config=ray.train.ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(output_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=setup["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="INFO" if setup["verbose"] else "WARNING")))
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 -- recorded in result.json like the local launcher does
        user_error = _harness_error_in(exc)
        if user_error is not None:
            tune.report({"harness_error": str(user_error), "harness_error_type": type(user_error).__name__})
            return
        done = read_result(output_dir, name)
        # A sweep trial stopped by its scheduler (ASHA) also lands here, possibly after the driver has moved
        # on: sweeps record outcomes in the driver (harness.sweep) and never get a "failed" result.json here.
        if setup.get("record_failures", True) and (done is None or done.get("status") != "finished"):
            result = failed_result(spec, _first_line_error(exc), "".join(traceback.format_exception(exc)))
            write_json(result_path(output_dir, name), finish_result(spec, result, "ray"))


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
def _driver_callbacks(specs: dict[str, dict], output_dir: Path, events: TrialEvents):
    from ray import tune

    class Progress(tune.Callback):
        """Turns the task rows Tune receives from the Train workers into progress lines (and tracking)."""

        def __init__(self) -> None:
            self.user_error: tuple[str, str] | None = None

        def __getstate__(self) -> dict:
            return {"user_error": self.user_error}   # never the driver's log function

        def __setstate__(self, state: dict) -> None:
            self.user_error = state.get("user_error")

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            spec = specs.get(trial.config.get("name"))
            if spec is None:
                return
            if "harness_error" in result:
                self.user_error = (result["harness_error_type"], result["harness_error"])
            elif result.get("_row_keys"):
                events.task_finished(spec, {k: result.get(k) for k in result["_row_keys"]})

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            spec = specs.get(trial.config.get("name"))
            done = read_result(output_dir, spec["name"]) if spec else None
            if done is not None:
                events.trial_finished(spec, done)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            events.log(f"[failed] {trial.config.get('name')}: Ray Tune trial error (see --verbose)")

    class StopOnUserError(tune.Stopper):
        """A user error (bad option, missing data) stops the whole benchmark, as with the local launcher."""

        def __init__(self, progress: Progress) -> None:
            self.progress = progress

        def __getstate__(self) -> dict:
            return {}     # Tune saves its experiment state with the stopper; ours is driver-only

        def __setstate__(self, state: dict) -> None:
            self.progress = Progress()

        def __call__(self, trial_id: str, result: dict) -> bool:
            return "harness_error" in result

        def stop_all(self) -> bool:
            return self.progress.user_error is not None

    progress = Progress()
    return progress, StopOnUserError(progress)


def experiment_name(specs: list[dict]) -> str:
    """Deterministic Tune experiment name (all the command's trials, finished or not): a rerun of the same
    command reuses the same folder."""
    cfg = specs[0]["config"]
    digest = hashlib.sha1("\n".join(sorted(s["name"] for s in specs)).encode()).hexdigest()[:8]
    return f"{cfg['method']}_{cfg['suite']}_{digest}"


def run_ray(specs: list[dict], output_dir: str | Path, options: LaunchOptions | None = None,
            log: Callable[[str], None] = print, events: TrialEvents | None = None) -> list[dict]:
    """Run the trials as a Ray Tune grid of Ray Train jobs; returns one result per spec, in order.

    Finished trials are skipped, unfinished ones resume (from trials/<name>/checkpoints and Ray Train's own
    checkpoints). Raises ResourceError before launching anything when one trial cannot fit the cluster,
    the user's HarnessError when a trial hits one, KeyboardInterrupt when the run was interrupted.
    """
    options = options or LaunchOptions()
    events = events or TrialEvents(log)
    output_dir = Path(output_dir).resolve()
    done, todo = split_finished(specs, output_dir, events)
    if not todo:
        return [done[s["name"]] for s in specs]

    started_here = init_ray(options.address, options.verbose)
    try:
        results = _run_grid(todo, experiment_name(specs), output_dir, options, events)
    finally:
        if started_here:
            import ray

            ray.shutdown()
    done.update(results)
    return [done[s["name"]] for s in specs]


def _run_grid(todo: list[dict], experiment: str, output_dir: Path, options: LaunchOptions,
              events: TrialEvents) -> dict[str, dict]:
    from ray import tune

    cfg = todo[0]["config"]
    total, largest = _cluster_resources()
    plan = plan_resources(total, max(int(s["config"]["num_workers"]) for s in todo), len(todo),
                          cpus_per_worker=cfg.get("cpus_per_worker"), gpus_per_worker=cfg.get("gpus_per_worker"),
                          max_concurrent=options.max_concurrent_trials, device=str(cfg.get("device", "auto")),
                          largest_node=largest)
    embedded = not (options.address or os.environ.get("RAY_ADDRESS"))
    events.log(f"ray: {len(todo)} trial(s) on {_fmt(total.get('CPU', 0))} CPU / {_fmt(total.get('GPU', 0))} GPU: "
               f"{plan.describe()}")
    specs = {s["name"]: s for s in todo}
    setup = {"output_dir": str(output_dir), "plan": asdict(plan), "max_failures": int(options.max_failures),
             "verbose": bool(options.verbose), "env": ray_env(embedded)}
    trainable = tune.with_resources(tune.with_parameters(trial_trainable, specs=specs, setup=setup),
                                    {"CPU": plan.trainable_cpus})
    progress, stopper = _driver_callbacks(specs, output_dir, events)
    tuner = tune.Tuner(
        trainable,
        param_space={"name": tune.grid_search(list(specs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrency,
                                    trial_name_creator=lambda t: t.config["name"],
                                    trial_dirname_creator=lambda t: t.config["name"],
                                    reuse_actors=True),   # one trainable process serves trial after trial
        run_config=tune.RunConfig(name=experiment, storage_path=str(output_dir / "ray" / "_tune"),
                                  verbose=2 if options.verbose else 0, callbacks=[progress], stop=stopper,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()

    if progress.user_error is not None:
        kind, message = progress.user_error
        raise _error_class(kind)(message)
    tune_errors = {r.config.get("name"): r.error for r in grid if r.config and r.error is not None}
    results, interrupted = {}, []
    for spec in todo:
        result = read_result(output_dir, spec["name"])
        if result is None and spec["name"] in tune_errors:
            err = tune_errors[spec["name"]]
            result = finish_result(spec, failed_result(spec, _first_line_error(err)), "ray")
            write_json(result_path(output_dir, spec["name"]), result)
            events.trial_finished(spec, result)
        if result is None:
            interrupted.append(spec["name"])
        else:
            results[spec["name"]] = result
    if interrupted:
        raise KeyboardInterrupt(f"{len(interrupted)} trial(s) did not finish: {', '.join(interrupted)}")
    return results
