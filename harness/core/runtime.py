"""Where a trial runs: device, distributed group, reporting. The same trial code runs in-process or in a
Ray Train worker; only the RuntimeContext differs."""
from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else platform.processor())."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_record(device: torch.device) -> dict:
    """What a trial's numbers depend on besides its options: float rounding follows the kernels torch picks for
    this CPU (its instruction set) or GPU, so the same trial can differ by a few points between machines."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all ranks use the same seed: replicas start identical)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def enable_determinism(seed: int, device: torch.device) -> None:
    """Seed everything; on GPU also ask torch for deterministic kernels. The same in every launcher.

    On GPU this mirrors `ray.train.torch.enable_reproducibility` (which the Ray workers call) without importing
    Ray, so a local run and a Ray run of a trial take the same numerical path; `warn_only=True` lets a method
    whose CUDA op has no deterministic kernel warn instead of crash. On CPU the kernels are already
    deterministic for a fixed number of threads, and torch's deterministic mode only slows convolutions down
    (measured: ResNet-32 forward+backward about 2x slower), so it stays off there.
    """
    seed_everything(seed)
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it for deterministic GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    # Filling every torch.empty with NaN only helps to find reads of uninitialised memory; it costs a memset
    # per allocation and changes no correct result.
    torch.utils.deterministic.fill_uninitialized_memory = False


class FirstStepClock:
    """Wall-clock time (time.time(), comparable across processes) of the first forward pass in training mode.

    Used by the launchers to report start-up time to the first training step without touching the loop: a
    global module forward pre-hook that removes itself after firing once.
    """

    def __init__(self) -> None:
        self.started_unix: float | None = None       # when running() was entered (the trial's call)
        self.first_step_unix: float | None = None
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        if module.training and self.first_step_unix is None:
            self.first_step_unix = time.time()
            self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @contextlib.contextmanager
    def running(self) -> Iterator["FirstStepClock"]:
        self.started_unix = time.time()
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            self._remove()


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
    fault_at_task: int | None = None           # test-only fault injection (see harness.run.trial)
    # Progress inside a long task: called by `beat` at most every `heartbeat_s` seconds (Ray: a file the driver
    # reads; local without progress bars: a log line).
    heartbeat: Callable[[dict], None] | None = None
    heartbeat_s: float = 30.0
    _last_beat: float = field(default=0.0, repr=False)

    def beat(self, task: int, phase: str, epoch: int, epochs: int, step: int, steps: int, loss: float,
             images: int, elapsed_s: float) -> None:
        """Report where a training phase is (epoch, loss, img/s, ETA of the phase), rate-limited."""
        if self.heartbeat is None or not self.is_main:
            return
        now = time.monotonic()
        if not self._last_beat:
            self._last_beat = now          # the first beat comes one interval after the trial starts
            return
        if now - self._last_beat < self.heartbeat_s:
            return
        self._last_beat = now
        done, total = epoch * steps + step, epochs * steps
        self.heartbeat({"task": task, "phase": phase, "epoch": epoch + 1, "epochs": epochs, "step": step,
                        "steps": steps, "loss": loss, "images_per_s": images / elapsed_s if elapsed_s > 0 else 0.0,
                        "eta_s": elapsed_s / done * (total - done) if done else None})

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
