"""The method contract: a small class with hooks; the harness owns the loop (harness.core.loop).

A method never sees Ray, MLflow, samplers or optimizers' bookkeeping. It builds `self.model`, grows it in
`before_task`, returns a loss from `training_step`, and answers `predict` / `features`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class TaskInfo:
    """What a method knows about the current task (labels are already remapped to the class order)."""

    task_id: int
    num_tasks: int
    new_classes: tuple[int, ...]      # labels introduced by this task
    num_old_classes: int              # labels 0..num_old_classes-1 are old
    num_total_classes: int            # in the whole scenario

    @property
    def num_new_classes(self) -> int:
        return len(self.new_classes)

    @property
    def num_seen_classes(self) -> int:
        return self.num_old_classes + self.num_new_classes


@dataclass(frozen=True)
class PhaseConfig:
    """One optimisation phase (main training or finetuning) of one task. Batch size and lr are GLOBAL."""

    name: str = "train"               # "train" | "finetune" | a method's own stage name
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    sched: str = "multistep"          # multistep | cosine | constant
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    data: str = "task"                # "task" (task data + memory) | "memory" (balanced, memory only)
    repeated_aug: int = 1             # DeiT repeated augmentation factor
    extra: dict = field(default_factory=dict)

    def with_(self, **changes: Any) -> "PhaseConfig":
        return replace(self, **changes)


def _pick(config: dict, key: str, incremental_key: str | None, first_task: bool) -> Any:
    # DyTox naming: `base_epochs` / `lr` apply to the first task, `epochs` / `incremental_lr` to the rest.
    if incremental_key is not None and not first_task and config.get(incremental_key) is not None:
        return config[incremental_key]
    return config[key]


def phase_from_config(config: dict, task_id: int) -> PhaseConfig:
    """The main training phase of task `task_id`, from the flat config (see benchmarks/recipes/defaults.yaml)."""
    first = task_id == 0
    epochs = config["base_epochs"] if first and config.get("base_epochs") is not None else config["epochs"]
    milestones = (config["base_milestones"] if first and config.get("base_milestones") is not None
                  else config["milestones"])
    batch = _pick(config, "batch_size", "incremental_batch_size", first)
    lr = _pick(config, "lr", "incremental_lr", first)
    if config.get("lr_reference_batch"):
        lr = lr * batch / config["lr_reference_batch"]   # linear scaling on the GLOBAL batch
    return PhaseConfig(
        name="train", epochs=int(epochs), batch_size=int(batch), lr=float(lr), opt=config["opt"],
        momentum=float(config["momentum"]),
        weight_decay=float(_pick(config, "weight_decay", "incremental_weight_decay", first)),
        sched=config["sched"], milestones=tuple(int(m) for m in milestones or ()),
        gamma=float(config["gamma"]), warmup_epochs=int(config["warmup_epochs"]),
        warmup_lr=float(config["warmup_lr"]), min_lr=float(config["min_lr"]),
        repeated_aug=int(config.get("repeated_aug") or 1),
    )


def finetuning_phase_from_config(config: dict) -> PhaseConfig | None:
    """The balanced finetuning phase on the memory (DyTox, DER's decouple stage), or None when disabled."""
    epochs = int(config.get("finetuning_epochs") or 0)
    if epochs <= 0:
        return None
    batch = config.get("finetuning_batch_size") or config["batch_size"]
    lr = float(config["finetuning_lr"])
    if config.get("lr_reference_batch"):
        lr = lr * batch / config["lr_reference_batch"]
    return PhaseConfig(
        name="finetune", epochs=epochs, batch_size=int(batch), lr=lr,
        opt=config.get("finetuning_opt") or config["opt"], momentum=float(config["momentum"]),
        weight_decay=float(config["weight_decay"]), sched=config.get("finetuning_sched", "constant"),
        milestones=tuple(config.get("finetuning_milestones") or ()), gamma=float(config["gamma"]),
        data="memory",
    )


class Method:
    """Base class. Subclasses override the hooks they need and register with @register_method."""

    name: str = "base"
    uses_memory: bool = True          # finetune sets False: no rehearsal
    cumulative_data: bool = False     # joint: each task trains on all data seen so far

    def __init__(self, config: dict, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model: nn.Module | None = None
        self.net: nn.Module | None = None   # self.model, or its DDP wrapper during a phase (set by the loop)
        self.seen_classes = 0

    # ---- construction and growth -------------------------------------------------------------
    def build(self) -> None:
        """Create self.model (on self.device). Called once before the first task."""
        raise NotImplementedError

    def before_task(self, task: TaskInfo) -> None:
        """Grow the model for the task's new classes; set freezing. Must only depend on `task`
        (it is replayed when a trial resumes from a checkpoint, before loading the saved weights)."""

    def after_task(self, task: TaskInfo) -> None:
        """After the main phase and the memory update (teacher copy, weight aligning, class means)."""

    def before_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        """Called by the loop before the optimizer is built (set freezing for finetuning, ...)."""

    def after_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        """Called by the loop at the end of a phase."""

    def finetune_phase(self, task: TaskInfo) -> PhaseConfig | None:
        """A second phase on balanced memory data after the main phase (None: no such phase)."""
        return None

    # ---- training ----------------------------------------------------------------------------
    def main_phase(self, task: TaskInfo) -> PhaseConfig:
        return phase_from_config(self.config, task.task_id)

    def parameters_to_optimize(self, phase: PhaseConfig) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, phase: PhaseConfig, task: TaskInfo):
        """Return another optimizer (e.g. SAM, which needs a closure: set `requires_closure = True`)."""
        return optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], task: TaskInfo,
                      phase: PhaseConfig) -> torch.Tensor:
        raise NotImplementedError

    # ---- inference ---------------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores over all seen classes, per head. The first key is the method's main head."""
        return {"cnn": self.model(x)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings used for herding (and NME)."""
        raise NotImplementedError

    def memory_selection(self) -> str:
        return self.config.get("memory_selection", "herding")

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume after `before_task` has been replayed. Tensors and plain data only."""
        return {"model": self.model.state_dict(), "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
