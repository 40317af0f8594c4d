"""A task's phases, built from the flat options alike for every method (benchmarks/recipes/defaults.yaml).

- the main phase: DyTox's naming, `base_epochs` / `lr` / ... for the first task, `epochs` / `incremental_lr` / ...
  for the others;
- the balanced-memory phase a method declares (`Method.balanced_phase`), from its own group of recipe keys
  (BALANCED_KEYS). The method's `finetune_phase(task, phase)` then says whether it runs after a given task;
- likewise the phase on held-out data a method declares (`Method.held_out_phase`: BiC's bias correction, on a
  class-balanced split that `Method.hold_out` kept out of the main phase).

Each scales the lr linearly by `batch / lr_reference_batch` when that is set (the batch is GLOBAL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.core.method import PhaseConfig, PhaseKind


def _pick(config: dict, key: str, incremental_key: str | None, first_task: bool) -> Any:
    # DyTox naming: `base_epochs` / `lr` apply to the first task, `epochs` / `incremental_lr` to the rest.
    if incremental_key is not None and not first_task and config.get(incremental_key) is not None:
        return config[incremental_key]
    return config[key]


def main_phase(config: dict, task_id: int) -> PhaseConfig:
    """The main training phase of task `task_id` (on the task's data and the memory)."""
    first = task_id == 0
    epochs = config["base_epochs"] if first and config.get("base_epochs") is not None else config["epochs"]
    milestones = (config["base_milestones"] if first and config.get("base_milestones") is not None
                  else config["milestones"])
    batch = _pick(config, "batch_size", "incremental_batch_size", first)
    lr = _pick(config, "lr", "incremental_lr", first)
    if config.get("lr_reference_batch"):
        lr = lr * batch / config["lr_reference_batch"]
    return PhaseConfig(
        kind=PhaseKind.TRAIN, epochs=int(epochs), batch_size=int(batch), lr=float(lr), opt=config["opt"],
        momentum=float(config["momentum"]),
        weight_decay=float(_pick(config, "weight_decay", "incremental_weight_decay", first)),
        sched=config["sched"], milestones=tuple(int(m) for m in milestones or ()),
        gamma=float(config["gamma"]), warmup_epochs=int(config["warmup_epochs"]),
        warmup_lr=float(config["warmup_lr"]), min_lr=float(config["min_lr"]),
        repeated_aug=int(config.get("repeated_aug") or 1),
    )


@dataclass(frozen=True)
class BalancedKeys:
    """The recipe keys of a balanced-memory phase: `<prefix>_epochs` (0: no phase), `<prefix>_lr`,
    `<prefix>_batch_size` (null: batch_size), `<prefix>_milestones`, and where the recipe has them
    `<prefix>_weight_decay`, `<prefix>_gamma` (null: weight_decay, gamma), `<prefix>_opt`, `<prefix>_sched`."""

    prefix: str
    opt: str | None = None        # fixed by the stage's reference code; None: `<prefix>_opt`, else `opt`
    sched: str | None = None      # fixed likewise; None: `<prefix>_sched`, else constant
    switch: str | None = None     # an option whose value `none` turns the phase off


BALANCED_KEYS: dict[PhaseKind, BalancedKeys] = {
    PhaseKind.FINETUNE: BalancedKeys("finetuning", switch="finetuning"),          # DyTox's main.py
    PhaseKind.DECOUPLE: BalancedKeys("decouple", opt="sgd", sched="multistep"),   # DER's official code
    PhaseKind.BIAS_CORRECTION: BalancedKeys("bias_correction", opt="sgd", sched="multistep"),   # BiC (PyCIL)
}


def balanced_phase(config: dict, kind: PhaseKind | None) -> PhaseConfig | None:
    """The phase of kind `kind` (a method's `balanced_phase` or `held_out_phase`), or None when the method has
    none or the options turn it off."""
    if kind is None:
        return None
    keys = BALANCED_KEYS[kind]
    if keys.switch is not None and config.get(keys.switch) == "none":
        return None
    p = keys.prefix
    epochs = int(config.get(f"{p}_epochs") or 0)
    if epochs <= 0:
        return None
    batch = config.get(f"{p}_batch_size") or config["batch_size"]
    lr = float(config[f"{p}_lr"])
    if config.get("lr_reference_batch"):
        lr = lr * batch / config["lr_reference_batch"]
    weight_decay, gamma = config.get(f"{p}_weight_decay"), config.get(f"{p}_gamma")
    return PhaseConfig(
        kind=kind, epochs=epochs, batch_size=int(batch), lr=lr,
        opt=keys.opt or config.get(f"{p}_opt") or config["opt"], momentum=float(config["momentum"]),
        weight_decay=float(config["weight_decay"] if weight_decay is None else weight_decay),
        sched=keys.sched or config.get(f"{p}_sched", "constant"),
        milestones=tuple(int(m) for m in config.get(f"{p}_milestones") or ()),
        gamma=float(config["gamma"] if gamma is None else gamma),
    )
