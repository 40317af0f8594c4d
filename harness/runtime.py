"""Where a trial runs: device, distributed group, reporting. The same trial code runs in-process or in a
Ray Train worker; only the RuntimeContext differs."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist


def select_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when a GPU is visible, else CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")
    return torch.device(requested)


def amp_dtype(device: torch.device, requested: str | bool = "auto") -> torch.dtype | None:
    """Mixed precision only on GPU: bf16 where supported, else fp16. `requested` false/none disables it."""
    if device.type != "cuda" or requested in (False, "none", "off", "false", "fp32"):
        return None
    if requested in ("fp16", "float16"):
        return torch.float16
    if requested in ("bf16", "bfloat16") or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all ranks use the same seed: replicas start identical)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class RuntimeContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    amp: torch.dtype | None = None
    checkpoint_dir: str | None = None          # absolute; where per-task checkpoints go
    report: Callable[[dict, str | None], None] | None = None   # (metrics, checkpoint dir) per finished task
    progress: bool = True                      # tqdm bars (rank 0 only)
    log: Callable[[str], None] = print
    fault_at_task: int | None = None           # test-only fault injection (see harness.trial)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate variable-length per-rank tensors along dim 0, in rank order."""
        if not self.distributed:
            return tensor
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        max_len = int(max(s.item() for s in sizes))
        padded = torch.zeros((max_len, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])

    def shard(self, n: int) -> range:
        """Contiguous shard of range(n) for this rank, so gathered results keep the original order."""
        per = (n + self.world_size - 1) // self.world_size
        return range(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)
