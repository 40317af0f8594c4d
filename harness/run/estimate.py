"""A rough wall-time estimate of a benchmark before it starts, so the driver can warn before a run of hours.

Work = floating-point operations: every training image costs one training step (forward + backward), plus a
forward pass when a frozen teacher is run on it (iCaRL, DyTox from the second task on); evaluation, herding
features and a phase that trains only a head on a frozen network (the balanced-memory phases, BiC's bias
correction on the split `Method.hold_out` keeps out of the main phase) cost one forward pass per image. Both costs are counted once per benchmark on the `meta` device (shapes
only, no memory, no data) at the first and the last task (DER grows one extractor per task) and interpolated
between. Speed = a conservative effective throughput of the detected device (small models do not
reach a device's peak). Numbers are within a factor of about 2 on the machines measured; the point is to tell
minutes from days.
"""
from __future__ import annotations

import math

import torch

from harness.core.method import TaskInfo

# Training and test images per class of the datasets whose sizes are known (imagefolder: unknown -> no estimate).
TRAIN_PER_CLASS = {"cifar10": 5000, "cifar10-jpeg": 5000, "cifar10-mini": 300, "cifar100": 500,
                   "imagenet100": 1300, "imagenet1000": 1281, "digits": 144}
TEST_PER_CLASS = {"cifar10": 1000, "cifar10-jpeg": 1000, "cifar10-mini": 100, "cifar100": 100,
                  "imagenet100": 50, "imagenet1000": 50, "digits": 36}
# Effective FLOP/s. CPU: per torch thread, from the one-thread cifar10-5x2 comparison (README: about 40 GFLOP/s
# with data loading and evaluation; a second thread on a shared 2-core machine adds far less than that). GPU: a
# fraction of a current data-centre GPU's peak, fp32 and with AMP.
CPU_FLOPS_PER_THREAD = 4.0e10
GPU_FLOPS = {"fp32": 1.0e13, "amp": 3.0e13}
WARN_HOURS = 1.0


def _flops(config: dict, tasks: list[TaskInfo]) -> tuple[tuple[float, float], tuple[float, float], bool]:
    """(forward, training step) FLOPs of one image at the first and at the last task, and whether a teacher runs
    from the second task on. The training step is counted for real (forward + backward on the meta device), so
    frozen parts cost no weight gradients (DER's old extractors, DyTox's old tokens and heads)."""
    from torch.utils.flop_counter import FlopCounterMode

    from harness.data import dataset_info
    from harness.config.catalog import get_method

    info = dataset_info(config["dataset"], config.get("data_path"))
    size = int(config.get("image_size") or info.image_size or 224)
    method = get_method(config["method"])(config, torch.device("meta"))
    x = torch.empty(1, 3, size, size, device="meta")

    def count() -> tuple[float, float]:
        method.model.eval()
        # grad mode on although nothing is backpropagated: under no_grad a model that returns a view of a
        # parameter (PODNet's learned scale) hands the counter's module tracker a tensor it rejects
        with FlopCounterMode(display=False) as forward:
            method.model(x)
        method.model.train()
        with FlopCounterMode(display=False) as step:
            out = method.model(x)
            outs = [o for o in (out.values() if isinstance(out, dict) else [out])
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs:
                sum(o.float().sum() for o in outs).backward()
        return float(forward.get_total_flops()), float(step.get_total_flops())

    with torch.device("meta"):        # every module the method builds or grows: shapes only
        method.build()
        method.before_task(tasks[0])
        first = count()
        teacher = False
        for task in tasks[1:]:
            method.before_task(task)
            teacher = teacher or getattr(method, "teacher", None) is not None
        return first, count() if len(tasks) > 1 else first, teacher


def _held_out_sizes(config: dict, tasks: list[TaskInfo], per_class: int, memory_sizes: list[int]) -> list[int]:
    """How many images the method's `hold_out` keeps out of each task's main phase (BiC's validation split), asked
    of the method itself on labels-only data: the task's new classes at `per_class` images each, plus the memory
    (`memory_sizes[t]` images spread evenly over the old classes)."""
    import numpy as np

    from harness.config.catalog import get_method
    from harness.data.base import ArrayData

    method = get_method(config["method"])(config, torch.device("meta"))
    with torch.device("meta"):
        method.build()
    sizes = []
    for task, memory_now in zip(tasks, memory_sizes):
        old = np.repeat(np.arange(task.num_old_classes), memory_now // max(1, task.num_old_classes))
        labels = np.concatenate([old, np.repeat(np.arange(task.num_old_classes, task.num_seen_classes), per_class)])
        _, held_out = method.hold_out(ArrayData(np.zeros((len(labels), 1), np.uint8), labels, []), task)
        sizes.append(0 if held_out is None else len(held_out))
    return sizes


def estimate_hours(config: dict, device: torch.device | str | None = None) -> float:
    """Estimated wall-clock hours of all the trials of `config` on `device` (default: the one the run would
    pick), run one after another; nan when the data's size is unknown or the model cannot be counted."""
    from harness.config.catalog import get_method
    from harness.config.memory import memory_budget
    from harness.config.phases import balanced_phase, main_phase
    from harness.core.runtime import amp_dtype, select_device
    from harness.core.scenarios import make_increments

    dataset = config.get("dataset")
    if dataset not in TRAIN_PER_CLASS:
        return math.nan
    device = select_device(str(device or config.get("device") or "auto")) if not isinstance(device, torch.device) \
        else device
    from harness.data import dataset_info

    num_classes = dataset_info(dataset).num_classes
    increments = make_increments(num_classes, config.get("initial_increment"), config["increment"])
    tasks, seen = [], 0
    for t, inc in enumerate(increments):
        tasks.append(TaskInfo(t, len(increments), tuple(range(seen, seen + inc)), seen, num_classes))
        seen += inc
    try:
        first, last, teacher = _flops(config, tasks)
    except Exception:  # noqa: BLE001 -- an estimate must never stop a run
        return math.nan

    per_class = min(TRAIN_PER_CLASS[dataset], int(config.get("train_per_class") or TRAIN_PER_CLASS[dataset]))
    method_cls = get_method(config["method"])
    budget = memory_budget(config, method_cls)
    balanced = balanced_phase(config, method_cls.balanced_phase)
    held_out_phase = balanced_phase(config, method_cls.held_out_phase)
    memory_sizes = [0 if budget is None else min(budget.capacity(task.num_old_classes),
                                                 task.num_old_classes * per_class) for task in tasks]
    held_out = [0] * len(tasks)
    if held_out_phase is not None:
        try:
            held_out = _held_out_sizes(config, tasks, per_class, memory_sizes)
        except Exception:  # noqa: BLE001 -- an estimate must never stop a run
            return math.nan
    flops = 0.0
    for t, task in enumerate(tasks):
        share = t / max(1, len(tasks) - 1)
        forward, step = (a + (b - a) * share for a, b in zip(first, last))
        new = task.num_new_classes * per_class
        if method_cls.cumulative_data:            # joint: all the data seen so far
            new = task.num_seen_classes * per_class
        epochs = main_phase(config, t).epochs
        per_image = step + (forward if teacher and t > 0 else 0.0)
        flops += epochs * (new + memory_sizes[t] - held_out[t]) * per_image
        if held_out[t]:           # BiC's bias correction: only 2 parameters train, a step costs a forward pass
            flops += held_out_phase.epochs * held_out[t] * forward
        if t > 0 and balanced is not None and budget is not None:
            # the balanced-memory phase (DyTox's finetuning, DER's classifier re-training): the encoder is
            # frozen there, so a step costs about a forward pass
            memory_after = min(budget.capacity(task.num_seen_classes), task.num_seen_classes * per_class)
            flops += balanced.epochs * memory_after * forward
        flops += task.num_seen_classes * TEST_PER_CLASS[dataset] * forward     # evaluation
        if budget is not None and config.get("memory_selection") != "random":
            flops += new * forward                                              # herding features
    trials = len(config.get("orders") or [1]) * len(config.get("seeds") or [1])
    if device.type == "cuda":
        workers = max(1, min(int(config.get("num_workers") or 1), torch.cuda.device_count()))
        speed = workers * GPU_FLOPS["amp" if amp_dtype(device, config.get("amp", "auto")) else "fp32"]
    else:
        speed = torch.get_num_threads() * CPU_FLOPS_PER_THREAD      # DDP workers on one CPU share its cores
    return trials * flops / speed / 3600


def long_run_warning(config: dict, device: torch.device | str | None = None) -> str | None:
    """One `warning:` line when the benchmark is estimated to take more than WARN_HOURS, else None."""
    hours = estimate_hours(config, device)
    if math.isnan(hours) or hours <= WARN_HOURS:
        return None
    where = device_name(device, config)
    shown = f"{hours:,.0f} hours" if hours >= 10 else f"{hours:.1f} hours"
    return (f"warning: this benchmark is estimated to take about {shown} on {where} (a rough estimate); "
            "a suite with a `budget` (cifar10-5x2, cifar10-mini, digits-5x2), --epochs or fewer --orders/--seeds "
            "make it shorter; Ctrl-C stops it and the same command resumes it")


def device_name(device: torch.device | str | None, config: dict) -> str:
    from harness.core.runtime import select_device

    dev = device if isinstance(device, torch.device) else select_device(str(device or config.get("device") or "auto"))
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"this CPU ({torch.get_num_threads()} threads)"
