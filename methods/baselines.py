"""Lower and upper bounds: finetune (no memory), replay (random memory), joint (all data seen so far)."""
from harness.core.registry import register_method
from methods.common import IncrementalNetMethod


@register_method("finetune")
class Finetune(IncrementalNetMethod):
    """Plain fine-tuning on each new task: the catastrophic-forgetting lower bound."""

    uses_memory = False


@register_method("replay")
class Replay(IncrementalNetMethod):
    """Experience replay: the task's data plus a randomly selected memory (budget from the suite)."""

    def memory_selection(self) -> str:
        return self.config.get("memory_selection") or "random"


@register_method("joint")
class Joint(IncrementalNetMethod):
    """Upper bound: at each step, train on all the data of the tasks seen so far."""

    uses_memory = False
    cumulative_data = True
