"""Run a function on two real gloo processes (no Ray) and collect what each rank returns: the harness's
distributed code (shards, gathers) exercised by real ranks, one torch thread each."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.core.runtime import RuntimeContext


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, fn: Callable[[RuntimeContext], Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(fn(RuntimeContext(rank=rank, world_size=2, progress=False)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(fn: Callable[[RuntimeContext], Any], out: Path) -> list[Any]:
    """`fn(ctx)` on ranks 0 and 1 (`fn` a module-level function: it is pickled into the spawned processes);
    returns each rank's result, in rank order (results must load with weights_only=True)."""
    mp.spawn(_rank, args=(free_port(), fn, str(out)), nprocs=2, join=True)
    return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
