"""Launchers: run a benchmark's trials. `local` runs them one after another in this process; `ray`
(harness.ray_launch) runs the same `run_trial` as Ray Train DDP jobs under a Ray Tune grid.

Both launchers share what happens around a trial, defined once here:
- finished trials (result.json with status finished) are skipped, unfinished ones resume from their last
  per-task checkpoint under <output_dir>/trials/<name>/checkpoints;
- `TrialEvents` is the ONE place where per-trial side effects happen in the driver process: the progress line
  per task and per trial now, the MLflow tracker (harness.tracking) later.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from harness.errors import ConfigError, HarnessError
from harness.results import read_result, result_path, write_json

# harness.trial and harness.runtime (torch, timm, data) are imported where they are used: the Ray launcher
# imports this module in processes that never run a trial (the Tune trainable, the driver).

LAUNCHERS = ("ray", "local")


def task_line(spec: dict, row: dict) -> str:
    """One progress line per finished task: method, order, seed, task, accuracy."""
    cfg = spec["config"]
    head = f" ({row['head']} head)" if row.get("head") else ""      # iCaRL's main head is NME, others CNN
    return (f"[{cfg['method']} {cfg['suite']} order={spec['order_name']} seed={spec['seed']}] task {row['task'] + 1}"
            f" acc={row['accuracy']:.2f} avg={row['avg_inc_accuracy']:.2f}{head} loss={row['loss']:.3f}")


def trial_line(spec: dict, result: dict) -> str:
    """One line per finished (or failed) trial."""
    cfg = spec["config"]
    head = f"[{cfg['method']} {cfg['suite']} order={spec['order_name']} seed={spec['seed']}]"
    if result.get("status") != "finished":
        return f"{head} FAILED: {result.get('error', 'unknown error')}"
    main_head, main = next(iter((result.get("metrics") or {}).items()), (None, {}))
    avg, last = main.get("average_incremental_accuracy"), main.get("last_accuracy")
    nums = (f" avg_inc_acc={avg:.2f} last_acc={last:.2f} ({main_head} head)" if avg is not None and last is not None
            else "")
    return f"{head} finished{nums} ({result.get('wall_time_s', 0.0):.1f} s)"


def progress_line(spec: dict, info: dict) -> str:
    """A heartbeat inside a long task: `[...] task 3 main epoch 12/500 step 40/97 loss=1.234 310 img/s, phase
    ETA 41m` (harness.runtime.RuntimeContext.beat)."""
    eta = info.get("eta_s")
    eta_text = "?" if eta is None else (f"{eta / 60:.0f}m" if eta >= 90 else f"{eta:.0f}s")
    cfg = spec["config"]
    return (f"[{cfg['method']} {cfg['suite']} order={spec['order_name']} seed={spec['seed']}] task "
            f"{int(info.get('task', 0)) + 1} {info.get('phase', '')} epoch {info.get('epoch')}/{info.get('epochs')} "
            f"step {info.get('step')}/{info.get('steps')} loss={float(info.get('loss', float('nan'))):.3f} "
            f"{float(info.get('images_per_s', 0.0)):.0f} img/s, phase ETA {eta_text}")


class TrialLogger(Protocol):
    """What a per-trial tracker implements (harness.tracking's MLflow logger, later)."""

    def log_task(self, spec: dict, row: dict) -> None: ...

    def log_trial(self, spec: dict, result: dict) -> None: ...


class TrialEvents:
    """Driver-side per-trial side effects, called by both launchers as tasks and trials finish.

    This is the single place to hook a per-trial logger (MLflow): pass `tracker=` or subclass. Everything here
    runs in the driver process (never in a Ray worker), once per task row and once per trial.
    """

    def __init__(self, log: Callable[[str], None] = print, tracker: TrialLogger | None = None) -> None:
        self.log = log
        self.tracker = tracker
        self._seen: set[tuple[str, int]] = set()

    def task_finished(self, spec: dict, row: dict) -> None:
        key = (spec["name"], int(row["task"]))
        if key in self._seen:     # a restarted Ray trial may report a task again; print and log it once
            return
        self._seen.add(key)
        self.log(task_line(spec, row))
        if self.tracker is not None:
            self.tracker.log_task(spec, row)          # <- per-task tracking hook

    def trial_finished(self, spec: dict, result: dict) -> None:
        self.log(trial_line(spec, result))
        if self.tracker is not None:
            self.tracker.log_trial(spec, result)      # <- end-of-trial tracking hook

    def trial_skipped(self, spec: dict, result: dict) -> None:
        self.log(f"[skip] {spec['name']} already finished")


def trial_dir(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "trials" / name


def checkpoint_dir(output_dir: str | Path, name: str) -> Path:
    """Per-task checkpoints of a trial; the same place for every launcher, so either can resume the other."""
    return trial_dir(output_dir, name) / "checkpoints"


def split_finished(specs: list[dict], output_dir: Path, events: TrialEvents) -> tuple[dict[str, dict], list[dict]]:
    """(results of trials already finished, by name; specs still to run). Failed trials are run again."""
    done, todo = {}, []
    for spec in specs:
        result = read_result(output_dir, spec["name"])
        if result is not None and result.get("status") == "finished":
            events.trial_skipped(spec, result)
            done[spec["name"]] = result
        else:
            todo.append(spec)
    return done, todo


def failed_result(spec: dict, error: str, tb: str | None = None) -> dict:
    cfg = spec["config"]
    return {"name": spec["name"], "method": cfg["method"], "suite": cfg["suite"], "order": spec["order_name"],
            "seed": spec["seed"], "status": "failed", "error": error, "traceback": tb}


def finish_result(spec: dict, result: dict, launcher: str, clock=None, startup: dict | None = None) -> dict:
    """What every launcher adds to run_trial's result before writing result.json.

    Start-up measurements (benchmarks/perf/harness_overhead.py): `first_step_unix`, and `startup_s`, the seconds
    from the launcher's start of this trial to its first training step, by stage: the stages a launcher passes
    in `startup` (Ray: `ray_train_start_s` from fit() to the worker running our function, `worker_imports_s`),
    then `trial_setup_s` from run_trial's call (data, model) to the first training forward.
    """
    result["config"] = spec["config"]
    result["launcher"] = launcher
    result["finished_unix"] = time.time()
    if clock is not None and clock.started_unix is not None:
        result["started_unix"] = clock.started_unix        # run_trial's call: gaps between trials are launcher cost
    if clock is not None and clock.first_step_unix is not None:
        result["first_step_unix"] = clock.first_step_unix
        if clock.started_unix is not None:
            result["startup_s"] = {**(startup or {}), "trial_setup_s": clock.first_step_unix - clock.started_unix}
    return result


def run_local(specs: list[dict], output_dir: str | Path, log: Callable[[str], None] = print,
              progress: bool = True, events: TrialEvents | None = None) -> list[dict]:
    """Run every trial in this process; finished trials (result.json present) are skipped, unfinished
    ones resume from their last per-task checkpoint."""
    from harness.runtime import FirstStepClock, RuntimeContext, amp_dtype, enable_determinism, select_device
    from harness.trial import run_trial

    import torch

    output_dir = Path(output_dir).resolve()
    events = events or TrialEvents(log)
    done, todo = split_finished(specs, output_dir, events)
    for spec in todo:
        cfg = spec["config"]
        if cfg.get("threads_per_worker"):      # part of the trial's identity: the numbers depend on it
            torch.set_num_threads(int(cfg["threads_per_worker"]))
        device = select_device(cfg.get("device", "auto"))
        if cfg.get("deterministic", True):
            enable_determinism(int(spec["seed"]), device)
        ctx = RuntimeContext(
            device=device, amp=amp_dtype(device, cfg.get("amp", "auto")),
            checkpoint_dir=str(checkpoint_dir(output_dir, spec["name"])),
            report=lambda row, _ckpt, spec=spec: events.task_finished(spec, row),
            progress=progress, log=log, fault_at_task=cfg.get("fault_at_task"),
            # without progress bars (a log file, --quiet) a long task still says how it is going
            heartbeat=None if progress else (lambda info, spec=spec: log(progress_line(spec, info))),
            heartbeat_s=float(cfg.get("progress_interval_s") or 30.0))
        clock = FirstStepClock()
        try:
            with clock.running():
                result = run_trial(spec, ctx)
        except HarnessError:
            raise                       # the user's input is wrong: stop the whole benchmark
        except KeyboardInterrupt:
            raise
        except Exception as exc:        # noqa: BLE001 -- a crashed trial is recorded, the others go on
            result = failed_result(spec, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        finish_result(spec, result, "local", clock)
        write_json(result_path(output_dir, spec["name"]), result)
        events.trial_finished(spec, result)
        done[spec["name"]] = result
    return [done[s["name"]] for s in specs]


def resolve_threads(config: dict, options: "LaunchOptions", num_trials: int) -> int:
    """Torch intra-op threads per worker that the command's trials will use. They change CPU float rounding,
    hence the numbers, so they are part of every trial's identity (harness.trials): `threads_per_worker` when
    set, else the local process's default, else what the Ray resource plan gives each worker."""
    if config.get("threads_per_worker"):
        return int(config["threads_per_worker"])
    if options.launcher == "local":
        import torch

        return torch.get_num_threads()
    from harness.ray_launch import preview_plan

    return preview_plan(config, options, num_trials).threads_per_worker


@dataclass
class LaunchOptions:
    """How to run the trials; only `launcher` matters to the local launcher."""

    launcher: str = "ray"
    address: str | None = None               # Ray cluster to join (else RAY_ADDRESS, else an embedded Ray)
    max_concurrent_trials: int | None = None  # None: as many as the cluster holds
    max_failures: int = 2                    # Ray Train restarts of a failed trial, from its last checkpoint
    verbose: bool = False                    # show Ray's own logs and progress output


def launch(specs: list[dict], output_dir: str | Path, options: LaunchOptions | None = None,
           log: Callable[[str], None] = print, progress: bool = True,
           events: TrialEvents | None = None) -> list[dict]:
    """Run `specs` with the chosen launcher; returns one result per spec, in order."""
    options = options or LaunchOptions()
    events = events or TrialEvents(log)
    if options.launcher == "local":
        return run_local(specs, output_dir, log=log, progress=progress, events=events)
    if options.launcher == "ray":
        from harness.ray_launch import run_ray   # imported lazily: the local launcher never needs Ray

        return run_ray(specs, output_dir, options, log=log, events=events)
    raise ConfigError(f"unknown launcher {options.launcher!r}; use one of: {', '.join(LAUNCHERS)}")
