"""Launchers: run a benchmark's trials. `local` runs them one after another in this process; the Ray
launcher (harness.ray_launch) runs the same `run_trial` as Ray Train jobs under Ray Tune."""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.results import read_result, result_path, write_json
from harness.runtime import RuntimeContext, amp_dtype, select_device
from harness.trial import run_trial


def task_line(spec: dict, row: dict) -> str:
    """One progress line per finished task: method, order, seed, task, accuracy."""
    cfg = spec["config"]
    return (f"[{cfg['method']} {cfg['suite']} order={spec['order_name']} seed={spec['seed']}] task {row['task'] + 1}"
            f" acc={row['accuracy']:.2f} avg={row['avg_inc_accuracy']:.2f} loss={row['loss']:.3f}")


def run_local(specs: list[dict], output_dir: str | Path, log: Callable[[str], None] = print,
              progress: bool = True) -> list[dict]:
    """Run every trial in this process; finished trials (result.json present) are skipped, unfinished
    ones resume from their last per-task checkpoint."""
    output_dir = Path(output_dir).resolve()
    results = []
    for spec in specs:
        done = read_result(output_dir, spec["name"])
        if done is not None and done.get("status") == "finished":
            log(f"[skip] {spec['name']} already finished")
            results.append(done)
            continue
        cfg = spec["config"]
        device = select_device(cfg.get("device", "auto"))
        ctx = RuntimeContext(
            device=device, amp=amp_dtype(device, cfg.get("amp", "auto")),
            checkpoint_dir=str(output_dir / "trials" / spec["name"] / "checkpoints"),
            report=lambda row, _ckpt, spec=spec: log(task_line(spec, row)),
            progress=progress, log=log, fault_at_task=cfg.get("fault_at_task"))
        try:
            result = run_trial(spec, ctx)
        except HarnessError:
            raise                       # the user's input is wrong: stop the whole benchmark
        except KeyboardInterrupt:
            raise
        except Exception as exc:        # noqa: BLE001 -- a crashed trial is recorded, the others go on
            log(f"[failed] {spec['name']}: {type(exc).__name__}: {exc}")
            result = {"name": spec["name"], "method": cfg["method"], "suite": cfg["suite"],
                      "order": spec["order_name"], "seed": spec["seed"], "status": "failed",
                      "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["config"] = cfg
        write_json(result_path(output_dir, spec["name"]), result)
        results.append(result)
    return results
