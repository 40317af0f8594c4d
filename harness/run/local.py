"""The local launcher: a benchmark's trials one after another in this process (no Ray)."""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Callable

import torch

from harness.core.runtime import FirstStepClock, RuntimeContext, amp_dtype, enable_determinism, select_device
from harness.errors import HarnessError
from harness.run.events import TrialEvents, checkpoint_dir, failed_result, finish_result, progress_line, split_finished
from harness.run.results import result_path, write_json
from harness.run.trial import run_trial

def run_local(specs: list[dict], output_dir: str | Path, log: Callable[[str], None] = print,
              progress: bool = True, events: TrialEvents | None = None) -> list[dict]:
    """Run every trial in this process; finished trials (result.json present) are skipped, unfinished
    ones resume from their last per-task checkpoint."""
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


