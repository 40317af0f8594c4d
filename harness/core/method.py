"""The method contract: everything a method may use or provide is declared here; the harness owns the loop
(harness.core.loop) and builds the phases from the options (harness.config.phases).

A method never sees Ray, MLflow, samplers or optimizers' bookkeeping. It builds `self.model`, grows it in
`before_task`, returns a loss from `training_step`, and answers `predict` / `features`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from harness.data.base import ArrayData


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


class PhaseKind(StrEnum):
    """What a phase trains on. The loop hashes the value into the loader seed: renaming one changes results."""

    TRAIN = "train"            # the task's data, plus the rehearsal memory when there is one
    FINETUNE = "finetune"      # the balanced memory only (DyTox's finetuning)
    DECOUPLE = "decouple"      # the balanced memory only, classifier re-training (DER's decouple stage)
    BIAS_CORRECTION = "bias_correction"   # what `Method.hold_out` kept out of the main phase (BiC's second stage)

    @property
    def on_memory(self) -> bool:
        return self not in (PhaseKind.TRAIN, PhaseKind.BIAS_CORRECTION)


@dataclass(frozen=True)
class PhaseConfig:
    """One optimisation phase of one task, as the loop runs it. Batch size and lr are GLOBAL."""

    kind: PhaseKind = PhaseKind.TRAIN
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
    repeated_aug: int = 1             # DeiT repeated augmentation factor

    def with_(self, **changes: Any) -> "PhaseConfig":
        """A copy with some fields changed (e.g. in `Method.finetune_phase`)."""
        return replace(self, **changes)


class MethodTools(Protocol):
    """What the harness lends a method (harness.run.trial.TrialTools), as `method.tools`."""

    def features(self, data: ArrayData, flip: bool = False,
                 transform: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Eval-mode `method.features` of `data` (the test transform unless `transform` is given; `flip`: the
        mean of each image's and its mirror's L2-normalised features), gathered across workers."""
        ...

    def memory_data(self) -> ArrayData | None:
        """The rehearsal memory's images and labels; None when there is no memory or it is empty."""
        ...

    def task_data(self) -> ArrayData:
        """The current task's own training data (the memory's not included), from `before_task` on: e.g. to
        initialise new classes' weights from their features (UCIR's imprinting)."""
        ...


@runtime_checkable
class ClosureOptimizer(Protocol):
    """An optimizer wrapper whose step recomputes the loss (SAM/ASAM: two forward-backward passes). The loop
    calls `zero_grad()`, then `step(closure)`, where the closure runs the forward pass, the loss and backward;
    it sets the lr through `param_groups`. `requires_closure` marks the protocol (its value is not read)."""

    requires_closure: bool
    param_groups: list[dict]

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor: ...


class Method:
    """Base class. Subclasses override the hooks they need and register with @register_method("name").

    Options: a method reads them from `self.config`, one flat dict. A key is accepted only if it is a harness
    option (benchmarks/recipes/defaults.yaml) or the method declares it, with its default, in
    benchmarks/recipes/<name>/default.yaml; any other key stops the run with "unknown option" (a typo never
    passes silently). docs/ADDING_A_METHOD.md walks through a complete method.

    Set by the harness: `config` and `device` (constructor), `net` (during each phase: `model` or its DDP
    wrapper; the training forward goes through it), `tools` (after `build()`, before the first task).
    """

    name: ClassVar[str] = "base"                      # set by @register_method
    uses_memory: ClassVar[bool] = True                # False: no rehearsal memory, whatever the suite's budget
    requires_memory: ClassVar[bool] = False           # True: a config without a memory budget is an error
    cumulative_data: ClassVar[bool] = False           # joint: each task trains on all data seen so far
    # A phase on the balanced memory after the main phase (its options: harness.config.phases); a method that
    # declares one needs a memory while the phase is on.
    balanced_phase: ClassVar[PhaseKind | None] = None
    # A phase on the data `hold_out` keeps out of the main phase, run after it (its options: harness.config.phases);
    # `hold_out` is only called when the method declares one and its options turn it on.
    held_out_phase: ClassVar[PhaseKind | None] = None
    # Options of the method's original code: key -> harness key (None: accepted and ignored), and key -> a
    # function mapping its value to ours (raises ConfigError for values not implemented). Read while composing.
    option_aliases: ClassVar[Mapping[str, str | None]] = {}
    option_value_maps: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}

    tools: MethodTools

    def __init__(self, config: dict, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model: nn.Module | None = None
        self.net: nn.Module | None = None

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

    def finetune_phase(self, task: TaskInfo, phase: PhaseConfig) -> PhaseConfig | None:
        """The balanced-memory phase to run after `task`'s main phase: `phase` as the options define it, a changed
        copy, or None to skip it. Default: skipped after the first task, whose memory holds one task's classes."""
        return None if task.task_id == 0 else phase

    def hold_out(self, data: ArrayData, task: TaskInfo) -> tuple[ArrayData, ArrayData | None]:
        """(what the main phase trains on, what it must not see) out of `data`, the main phase's data (the
        task's plus the memory's), before the main phase; the second part (None: nothing this task) is what the
        `held_out_phase` trains on after the main phase. Never the test split. Must only depend on `data`, `task`
        and the options (the trial's seed is `config["seed"]`): a resumed trial recomputes it. Default: nothing
        held out."""
        return data, None

    # ---- training ----------------------------------------------------------------------------
    def parameters_to_optimize(self, phase: PhaseConfig) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, phase: PhaseConfig,
                       task: TaskInfo) -> torch.optim.Optimizer | ClosureOptimizer:
        """Return another optimizer, e.g. a ClosureOptimizer (SAM)."""
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
