"""What runs inside Ray for one trial: the Ray Tune function trainable, and the Ray Train workers of a
multi-worker trial. The trial itself is the same `harness.trial.run_trial` the local launcher runs.

- One worker (the common case): the trial runs inside its Tune trainable actor, which Tune reuses from trial to
  trial. Tune creates and removes the trial's placement group itself, so a trial that finishes, fails or is
  stopped (ASHA, Ctrl-C) frees its CPUs/GPU at once, and the process (imports, CUDA context) is paid once.
- W > 1 workers: the trainable builds a Ray Train `TorchTrainer` (gloo on CPU, nccl on GPU) and calls fit().
  Ray Train's workers live in a placement group created by Train's controller; if Tune kills the trainable
  (a stopped trial), the driver removes that placement group itself (harness.run.ray_cleanup), and workers that
  cannot be placed within `placement_timeout_s` fail the trial with one line.

Per-task rows reach the driver through Tune (`tune.report`); a heartbeat file (trials/<name>/progress.json)
tells the driver how a long task is going between rows.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import harness.errors as errors
from harness.errors import HarnessError
from harness.run.events import checkpoint_dir, failed_result, finish_result, trial_dir
from harness.run.ray_resources import ResourcePlan
from harness.run.results import read_result, result_path, write_json

HARNESS_ERROR_MARKER = "harness_error.txt"
PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------------------------------------
# Shared by both paths
# ---------------------------------------------------------------------------------------------------------
def error_class(kind: str) -> type[HarnessError]:
    """The HarnessError subclass named `kind` (a user error travels between processes by name)."""
    cls = getattr(errors, kind, None)
    return cls if isinstance(cls, type) and issubclass(cls, HarnessError) else HarnessError


def progress_path(output_dir: str | Path, name: str) -> Path:
    return trial_dir(output_dir, name) / PROGRESS_FILE


def progress_writer(output_dir: str | Path, name: str) -> Callable[[dict], None]:
    """RuntimeContext.heartbeat for Ray trials: the latest progress, written atomically where the driver reads
    it (the output dir is shared storage on a cluster)."""
    path = progress_path(output_dir, name)

    def write(info: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**info, "time": time.time()}))
        os.replace(tmp, path)

    return write


def _task_reporter(name: str) -> Callable[[dict, str | None], None]:
    """ctx.report for a trial inside its Tune trainable: one Tune result per finished task."""
    from ray import tune

    def report(row: dict, _ckpt_dir: str | None) -> None:
        tune.report({**row, "trial": name, "_row_keys": list(row)})

    return report


def _report_user_error(exc: HarnessError) -> None:
    from ray import tune

    tune.report({"harness_error": str(exc), "harness_error_type": type(exc).__name__})


def trainable_resources(plan: ResourcePlan) -> dict[str, float]:
    """What Tune reserves for a trial's trainable: the whole worker when it runs the trial itself (one worker),
    a sliver when it only waits on a TorchTrainer whose workers reserve their own resources."""
    if plan.num_workers > 1:
        return {"CPU": plan.trainable_cpus}
    resources = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = plan.gpus_per_worker
    return resources


def trial_trainable(config: dict, specs: dict[str, dict], setup: dict) -> None:
    """The Tune function trainable of one trial (`config["name"]` picks the spec)."""
    spec = specs[config["name"]]
    plan = ResourcePlan(**setup["plan"])
    if plan.num_workers == 1:
        _run_in_trainable(spec, setup, plan)
    else:
        _run_torch_trainer(spec, setup, plan)


# ---------------------------------------------------------------------------------------------------------
# One worker: the trial runs in the trainable actor
# ---------------------------------------------------------------------------------------------------------
_TRIALS_RUN_HERE = 0       # trials this actor process ran before: tells a fresh actor from a reused one


def _run_in_trainable(spec: dict, setup: dict, plan: ResourcePlan) -> None:
    """Run the trial in this (reused) Tune actor. A user error is reported to the driver, any other error is
    raised: Tune restarts the trial (up to --max-failures) and it resumes from its last task checkpoint."""
    global _TRIALS_RUN_HERE
    import torch

    from harness.core.runtime import FirstStepClock, RuntimeContext, amp_dtype, enable_determinism, select_device
    from harness.run.trial import run_trial

    name, output_dir, cfg = spec["name"], Path(setup["output_dir"]), spec["config"]
    torch.set_num_threads(int(plan.threads_per_worker))
    device = select_device("cuda" if plan.use_gpu else "cpu")    # Ray sets CUDA_VISIBLE_DEVICES for the actor
    if cfg.get("deterministic", True):
        enable_determinism(int(spec["seed"]), device)
    ckpt_dir = checkpoint_dir(output_dir, name)
    ctx = RuntimeContext(
        device=device, amp=amp_dtype(device, cfg.get("amp", "auto")), checkpoint_dir=str(ckpt_dir),
        report=_task_reporter(name), progress=bool(setup.get("verbose")), log=lambda message: None,
        fault_at_task=cfg.get("fault_at_task"), heartbeat=progress_writer(output_dir, name),
        heartbeat_s=float(cfg.get("progress_interval_s") or 30.0))
    clock = FirstStepClock()
    reused, _TRIALS_RUN_HERE = _TRIALS_RUN_HERE > 0, _TRIALS_RUN_HERE + 1
    try:
        with clock.running():
            result = run_trial(spec, ctx)
    except HarnessError as exc:
        _report_user_error(exc)
        return
    finish_result(spec, result, "ray", clock)
    result.update(resources=setup["plan"], distributed=False, backend=None, actor_reused=reused,
                  threads=torch.get_num_threads())
    write_json(result_path(output_dir, name), result)


# ---------------------------------------------------------------------------------------------------------
# W > 1 workers: a Ray Train TorchTrainer
# ---------------------------------------------------------------------------------------------------------
def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _restore_from_ray(ckpt_dir: Path, local_rank: int) -> str | None:
    """On a Ray Train restart, put the latest checkpoint Ray Train holds for this run into the trial's checkpoint
    folder (one copy per node), so run_trial resumes from it. Returns the restored file's name."""
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


def _train_reporter(name: str, rank: int, staging_root: Path) -> Callable[[dict, str | None], None]:
    """ctx.report for Ray Train: every rank calls ray.train.report (a barrier in Train V2); rank 0 attaches the
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
    """One Ray Train worker of a multi-worker trial: a RuntimeContext around the DDP process group."""
    entered = time.time()      # start-up measurement: the imports below are paid in every new worker process
    import torch
    import torch.distributed as dist
    import ray
    import ray.train
    import ray.train.torch

    from harness.core.runtime import FirstStepClock, RuntimeContext, amp_dtype
    from harness.run.trial import run_trial

    spec, output_dir = loop_config["spec"], Path(loop_config["output_dir"])
    cfg, name = spec["config"], spec["name"]
    context = ray.train.get_context()
    rank, world, local_rank = context.get_world_rank(), context.get_world_size(), context.get_local_rank()
    torch.set_num_threads(int(loop_config["threads"]))
    marker = trial_dir(output_dir, name) / HARNESS_ERROR_MARKER
    if marker.is_file():   # a restart after a user error (bad option, missing data): fail again at once
        kind, _, message = marker.read_text().strip().partition(": ")
        raise error_class(kind)(message)
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

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)   # a worker's stdout reaches the driver only with --verbose

    if restored:
        log(f"restored {name} from Ray checkpoint {restored}")
    ctx = RuntimeContext(
        device=device, rank=rank, world_size=world, amp=amp_dtype(device, cfg.get("amp", "auto")),
        checkpoint_dir=str(ckpt_dir), report=_train_reporter(name, rank, trial_dir(output_dir, name)),
        progress=bool(loop_config.get("verbose")), log=log, fault_at_task=cfg.get("fault_at_task"),
        heartbeat=progress_writer(output_dir, name) if rank == 0 else None,
        heartbeat_s=float(cfg.get("progress_interval_s") or 30.0))
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
    nodes = [None] * world          # where the workers ran (a multi-node cluster spreads them)
    if ctx.distributed:
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        finish_result(spec, result, "ray", clock, startup)
        result.update(resources=loop_config.get("plan"), ray_checkpoint=restored, distributed=ctx.distributed,
                      backend=dist.get_backend() if dist.is_initialized() else None,
                      threads=torch.get_num_threads(), worker_nodes=nodes)
        write_json(result_path(output_dir, name), result)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it in a Ray Train failure: causes, the controller's failure, each worker's
    failure (Ray wraps a worker's own exception as `.cause`)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)])
        stack.extend((getattr(e, "worker_failures", None) or {}).values())


def _harness_error_in(exc: BaseException) -> HarnessError | None:
    """The user error (ConfigError, DataError, ...) behind a Ray Train failure, if any: the worker's own
    exception, not Ray's wrapper (whose text is a traceback)."""
    found = [e for e in _causes(exc) if isinstance(e, HarnessError)]
    # Ray's wrapper of a worker's exception subclasses the exception's type and holds it as `.cause`
    own = [e for e in found if not isinstance(getattr(e, "cause", None), BaseException)]
    return (own or found or [None])[0]


def _startup_timeout_in(exc: BaseException) -> bool:
    """Whether a Ray Train failure is its worker group not being placed in time."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return any(isinstance(e, WorkerGroupStartupTimeoutError) for e in _causes(exc))


def first_line_error(exc: BaseException) -> str:
    """`Type: message` of the root worker error, for result.json's one-line `error`."""
    failures = list((getattr(exc, "worker_failures", None) or {}).values())
    root = failures[0] if failures else exc
    root = getattr(root, "cause", None) or root
    text = [line for line in str(root).strip().splitlines() if line.strip()]
    return f"{type(root).__name__}: {text[-1] if text else ''}"


def _run_torch_trainer(spec: dict, setup: dict, plan: ResourcePlan) -> None:
    """A W-worker DDP trial as a Ray Train job; its outcome is recorded in result.json like the local
    launcher's (a user error goes to the driver instead)."""
    os.environ.update(setup["env"])    # read by TorchTrainer here, propagated to its controller and workers
    timeout = float(spec["config"].get("placement_timeout_s") or 120.0)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(timeout)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    name, output_dir = spec["name"], Path(setup["output_dir"])
    (trial_dir(output_dir, name) / HARNESS_ERROR_MARKER).unlink(missing_ok=True)   # a fresh command retries
    resources = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = plan.gpus_per_worker
    retries = int(setup["max_failures"])
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec, "output_dir": str(output_dir), "threads": plan.threads_per_worker,
                           "use_gpu": plan.use_gpu, "verbose": setup["verbose"], "plan": setup["plan"],
                           "launched_unix": time.time()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=resources,
            placement_strategy=str(spec["config"].get("placement_strategy") or "PACK")),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(output_dir / "ray"),
            # Bounded everywhere: Ray Train's defaults retry a worker group that cannot be placed forever.
            failure_config=ray.train.FailureConfig(max_failures=retries, controller_failure_limit=0,
                                                   max_preemption_failures=retries),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="INFO" if setup["verbose"] else "WARNING")))
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 -- recorded in result.json like the local launcher does
        user_error = _harness_error_in(exc)
        if user_error is not None:
            _report_user_error(user_error)
            return
        done = read_result(output_dir, name)
        # A sweep trial stopped by its scheduler (ASHA) may land here after the driver has moved on: sweeps
        # record outcomes in the driver and never get a "failed" result.json here.
        if setup["record_failures"] and (done is None or done.get("status") != "finished"):
            if _startup_timeout_in(exc):
                message = (f"WorkerGroupStartupTimeoutError: the trial's {plan.num_workers} workers "
                           f"({resources} each) could not be placed within {timeout:g} s; free the cluster, "
                           "lower --num-workers / --cpus-per-worker, or raise --set placement_timeout_s=...")
            else:
                message = first_line_error(exc)
            result = failed_result(spec, message, "".join(traceback.format_exception(exc)))
            write_json(result_path(output_dir, name), finish_result(spec, result, "ray"))
