"""Whether a run has a rehearsal memory, and its budget: decided here once, for the config checks, the trial and
the run-time estimate."""
from __future__ import annotations

from dataclasses import dataclass

from harness.config.phases import BALANCED_KEYS, balanced_phase
from harness.errors import ConfigError


@dataclass(frozen=True)
class MemoryBudget:
    """Exactly one of `size` (a fixed TOTAL budget) and `per_class` (a fixed budget per class) is set."""

    size: int | None = None
    per_class: int | None = None

    def capacity(self, num_classes: int) -> int:
        """Samples the memory may hold once `num_classes` classes are in it."""
        return self.size if self.size is not None else self.per_class * num_classes


def memory_budget(config: dict, method_cls: type) -> MemoryBudget | None:
    """The memory of a run of `method_cls` (a Method subclass) with `config`, or None when it has none.
    ConfigError when both budgets are set, or when the method needs a memory (`requires_memory`, or its
    balanced-memory phase is on) and the config gives none."""
    size, per_class = config.get("memory_size"), config.get("memory_per_class")
    if size and per_class:
        raise ConfigError("set memory_size (fixed total budget) or memory_per_class (fixed per class), not both")
    budget = MemoryBudget(size=int(size)) if size else MemoryBudget(per_class=int(per_class)) if per_class else None
    if not method_cls.uses_memory:
        return None
    if budget is None:
        name = config.get("method", method_cls.name)
        if method_cls.requires_memory:
            raise ConfigError(f"{name} needs a rehearsal memory: set memory_size or memory_per_class")
        kind = method_cls.balanced_phase
        if balanced_phase(config, kind) is not None:
            prefix = BALANCED_KEYS[kind].prefix
            raise ConfigError(f"{name}'s {kind} phase trains on the rehearsal memory: set memory_size or "
                              f"memory_per_class, or {prefix}_epochs: 0")
    return budget
