"""Launchers: run a benchmark's trials. `local` (harness.run.local) runs them one after another in this process;
`ray` (harness.run.ray_grid) runs the same `run_trial` under a Ray Tune grid (one-worker trials in their Tune actor,
W-worker trials as Ray Train DDP jobs). What happens around a trial is shared: harness.run.events.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from harness.errors import ConfigError
from harness.run.events import LAUNCHERS, LaunchOptions, TrialEvents
from harness.run.local import run_local


def resolve_threads(config: dict, options: "LaunchOptions", num_trials: int) -> int:
    """Torch intra-op threads per worker that the command's trials will use. They change CPU float rounding,
    hence the numbers, so they are part of every trial's identity (harness.config.identity): `threads_per_worker` when
    set, else the local process's default, else what the Ray resource plan gives each worker."""
    if config.get("threads_per_worker"):
        return int(config["threads_per_worker"])
    if options.launcher == "local":
        return torch.get_num_threads()
    from harness.run.ray_grid import preview_plan   # Ray is imported only when the Ray launcher is used

    return preview_plan(config, options, num_trials).threads_per_worker


def launch(specs: list[dict], output_dir: str | Path, options: LaunchOptions | None = None,
           log: Callable[[str], None] = print, progress: bool = True,
           events: TrialEvents | None = None) -> list[dict]:
    """Run `specs` with the chosen launcher; returns one result per spec, in order."""
    options = options or LaunchOptions()
    events = events or TrialEvents(log)
    if options.launcher == "local":
        return run_local(specs, output_dir, log=log, progress=progress, events=events)
    if options.launcher == "ray":
        from harness.run.ray_grid import run_ray   # imported lazily: the local launcher never needs Ray

        return run_ray(specs, output_dir, options, log=log, events=events)
    raise ConfigError(f"unknown launcher {options.launcher!r}; use one of: {', '.join(LAUNCHERS)}")
