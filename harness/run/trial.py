"""One continual run (a trial): plain data in, plain data out.

`run_trial(spec, ctx)` runs in-process, in a Ray Train worker, or on a cluster, unchanged. `spec` is a dict
made by harness.config.identity.expand_trials (config, order, seed, name); the result is a JSON-serialisable dict.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness.data import ArrayData, TaskDataset, build_transform, dataset_info, load_dataset
from harness.data.base import subsample_per_class, validation_split
from harness.data.batched import build_batched_transform, resolve_batched_augment
from harness.errors import CheckpointError
from harness.core.evaluation import compute_features, predict
from harness.core.loop import train_phase
from harness.core.memory import RehearsalMemory
from harness.core.method import Method, TaskInfo
from harness.core.metrics import ContinualMetrics
from harness.config.catalog import get_method
from harness.config.memory import memory_budget
from harness.config.phases import balanced_phase, main_phase
from harness.run.results import move_aside, warn_stderr
from harness.core.runtime import RuntimeContext, machine_record, seed_everything
from harness.core.scenarios import Scenario, resolve_class_order


class InjectedFault(RuntimeError):
    """Raised by the test-only `fault_at_task` option to simulate a worker dying after a checkpoint."""


class TrialTools:
    """What the harness lends a method (harness.core.method.MethodTools): features on any data, the memory's data."""

    def __init__(self, method: Method, ctx: RuntimeContext, test_transform, eval_batch: int,
                 memory: RehearsalMemory | None, class_names: list[str]) -> None:
        self._method, self._ctx, self._tf, self._batch = method, ctx, test_transform, eval_batch
        self._memory, self._class_names = memory, class_names
        self._task_data: ArrayData | None = None

    def features(self, data: ArrayData, flip: bool = False, transform=None) -> torch.Tensor:
        """Eval-mode features of `data` with the TEST transform (the original DyTox herded on augmented
        images, a bug we fix; `herding_transform: train` passes the training one), computed shard-wise across
        workers and gathered."""
        return compute_features(self._method.features, self._method.model, TaskDataset(data, transform or self._tf),
                                self._ctx, self._batch, flip=flip)

    def memory_data(self) -> ArrayData | None:
        """The memory's images and labels; None without a memory or while it is empty."""
        if self._memory is None or len(self._memory) == 0:
            return None
        x, y = self._memory.get()
        return ArrayData(x, y, self._class_names)

    def task_data(self) -> ArrayData:
        """The current task's own training data (set by the trial before `before_task`)."""
        if self._task_data is None:
            raise RuntimeError("task_data() is available from before_task on, while a task trains")
        return self._task_data

    def start_task(self, data: ArrayData) -> None:
        """The trial hands over each task's own training data before `before_task`."""
        self._task_data = data


def _concat(a: ArrayData, b: ArrayData | None) -> ArrayData:
    if b is None or len(b.y) == 0:
        return a
    return ArrayData(np.concatenate([a.x, b.x]), np.concatenate([a.y, b.y]), a.class_names)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)   # atomic: a crash never leaves a half-written checkpoint behind


CHECKPOINT_KEYS = {"task": int, "method": dict, "metrics": dict, "history": list}
_validated: dict[tuple, dict] = {}     # the state latest_checkpoint just loaded, handed to load_checkpoint once


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def _checkpoint_problem(path: Path) -> tuple[dict | None, str | None]:
    """(the state, None) or (None, what is wrong with the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- truncated zip, garbage, disallowed objects: the file is unusable
        return None, f"cannot read checkpoint {path} ({type(exc).__name__})"
    bad = [k for k, kind in CHECKPOINT_KEYS.items() if not (isinstance(state, dict) and isinstance(state.get(k), kind))]
    if bad:
        return None, f"checkpoint {path} is not a trial checkpoint (no valid {', '.join(bad)})"
    return state, None


def latest_checkpoint(directory: str | None, warn: Callable[[str], None] = warn_stderr) -> Path | None:
    """The newest task_XXX.pt that loads and holds a trial's state. A damaged one (truncated, garbage, keys
    missing) is moved aside to `.corrupt` with one warning line, so the trial resumes from the previous
    task's checkpoint, or starts over when none is left."""
    if not directory or not Path(directory).is_dir():
        return None
    for path in sorted(Path(directory).glob("task_*.pt"), reverse=True):
        state, problem = _checkpoint_problem(path)
        if problem is None:
            _validated.clear()
            _validated[_file_identity(path)] = state     # run_trial loads it next: do not read it twice
            return path
        aside = move_aside(path)
        if aside is not None:        # None: another rank moved it first and warned
            warn(f"{problem}; moved it to {aside.name}, the trial resumes from the task before")
    return None


def load_checkpoint(path: Path) -> dict:
    """A trial's state (weights_only: a checkpoint cannot run code); CheckpointError when unusable."""
    try:
        state = _validated.pop(_file_identity(path), None)
    except OSError:
        state = None
    if state is None:
        state, problem = _checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{problem}; delete it to retrain from the previous task, or delete the trial's "
                                  "folder to start over")
    return state


def _task_info(scenario: Scenario, t: int) -> TaskInfo:
    new = tuple(scenario.classes_of_task(t))
    return TaskInfo(task_id=t, num_tasks=scenario.num_tasks, new_classes=new, num_old_classes=min(new),
                    num_total_classes=len(scenario.class_order))


def run_trial(spec: dict, ctx: RuntimeContext) -> dict:
    """Train and evaluate one (method, suite, order, seed) trial; resumes from ctx.checkpoint_dir."""
    config, seed = spec["config"], int(spec["seed"])
    started = time.perf_counter()
    seed_everything(seed)
    info = dataset_info(config["dataset"], config.get("data_path"))
    train = load_dataset(config["dataset"], config.get("data_path"), "train", download=bool(config.get("download")))
    if config.get("train_per_class"):     # reduced CPU budgets: a fixed subsample of every class
        train = subsample_per_class(train, int(config["train_per_class"]))
    validation = spec.get("validation")   # sweep protocol (harness.sweep.driver): the test split is never loaded
    if validation:
        train, test = validation_split(train, validation)
    else:
        test = load_dataset(config["dataset"], config.get("data_path"), "test", download=False)
    order = resolve_class_order(spec["order"], info.num_classes, config["dataset"])
    scenario = Scenario(train, test, config["initial_increment"], config["increment"], order)
    train_tf = build_transform(info, train=True, options=config)
    test_tf = build_transform(info, train=False, options=config)
    # Speed options (docs/PERFORMANCE.md): augmentation of whole uint8 batches on the device, channels-last
    # CNNs, torch.compile of the training forward. Keys absent from a config keep the plain behaviour.
    loop_options = {"loader_workers": config.get("loader_workers", 0),
                    "channels_last": config.get("channels_last", False),
                    "compile_model": bool(config.get("compile", False))}
    if resolve_batched_augment(config.get("batched_augment", False), ctx.device):
        batched = build_batched_transform(info, options=config)
        train_tf, loop_options["batch_transform"] = batched.per_image, batched

    method_cls = get_method(config["method"])
    budget = memory_budget(config, method_cls)
    method: Method = method_cls(config, ctx.device)
    method.build()
    memory = None
    if budget is not None:
        memory = RehearsalMemory(memory_size=budget.size, per_class=budget.per_class,
                                 selection=method.memory_selection(), seed=seed,
                                 placement=config.get("memory_mode") or "global",
                                 shards=config.get("memory_shards") or 2)
    balanced = balanced_phase(config, method.balanced_phase)     # the same after every task
    held_out_phase = balanced_phase(config, method.held_out_phase)
    # `herding_transform: train` replays the original DyTox: exemplar features of augmented images.
    herding_tf = build_transform(info, train=True, options=config) if config.get("herding_transform") == "train" \
        else None
    method.tools = TrialTools(method, ctx, test_tf, config["eval_batch_size"], memory, scenario.class_names)
    metrics = ContinualMetrics()
    history: list[dict] = []
    start_task = 0

    ckpt_path = latest_checkpoint(ctx.checkpoint_dir)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        for t in range(state["task"] + 1):    # regrow the model to the saved shape, then load the weights
            method.before_task(_task_info(scenario, t))
        method.load_state_dict(state["method"])
        if memory is not None and state.get("memory") is not None:
            memory.load_state_dict(state["memory"])
        metrics.load_state_dict(state["metrics"])
        history = list(state["history"])
        start_task = state["task"] + 1
        ctx.log(f"resumed {spec['name']} from {ckpt_path.name}")

    num_tasks = min(scenario.num_tasks, int(validation["tasks"])) if validation else scenario.num_tasks
    for t in range(start_task, num_tasks):
        task = _task_info(scenario, t)
        seed_everything(seed * 1000 + t)   # each task starts from a known RNG state, also after a resume
        new_data = scenario.train_task(t)
        method.tools.start_task(new_data)
        method.before_task(task)
        if method.cumulative_data:
            data = scenario.train_task(0)
            for past in range(1, t + 1):
                data = _concat(data, scenario.train_task(past))
        else:
            data = _concat(new_data, method.tools.memory_data())
        held_out = None
        if held_out_phase is not None:       # e.g. BiC's validation split, for its bias correction
            data, held_out = method.hold_out(data, task)
        stats = train_phase(method, TaskDataset(data, train_tf), main_phase(config, t), task, ctx, seed,
                            **loop_options)

        if memory is not None:
            feats = method.tools.features(new_data, transform=herding_tf) if memory.selection != "random" else None
            memory.update(new_data.x, new_data.y, feats, num_seen_classes=task.num_seen_classes)
        method.after_task(task)

        ft_phase = method.finetune_phase(task, balanced) if balanced is not None else None
        if ft_phase is not None and method.tools.memory_data() is not None:
            train_phase(method, TaskDataset(method.tools.memory_data(), train_tf), ft_phase, task, ctx, seed,
                        **loop_options)
        if held_out is not None:
            train_phase(method, TaskDataset(held_out, train_tf), held_out_phase, task, ctx, seed, **loop_options)

        test_data, task_ids = scenario.test_upto(t)
        outputs = predict(method.predict, method.model, TaskDataset(test_data, test_tf), test_data.y, ctx,
                          config["eval_batch_size"])
        for head, (pred, top5) in outputs.items():
            metrics.add_task(t, pred, test_data.y, task_ids, head=head, top5_correct=top5)
        row = task_row(metrics, t, stats, method)
        if validation:   # what a sweep's scheduler reads (ASHA: time = tasks seen, metric = val accuracy)
            row.update(tasks_seen=t + 1, val_accuracy=row["accuracy"])
        history.append(row)

        if ctx.checkpoint_dir and ctx.is_main:
            Path(ctx.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            _save_checkpoint(Path(ctx.checkpoint_dir) / f"task_{t:03d}.pt", {
                "task": t, "method": method.state_dict(),
                "memory": memory.state_dict() if memory is not None else None,
                "metrics": metrics.state_dict(), "history": history})
        ctx.barrier()
        if ctx.report is not None:
            ctx.report(row, ctx.checkpoint_dir)
        _maybe_inject_fault(ctx, t)

    return {
        "name": spec["name"], "method": config["method"], "suite": config["suite"], "order": spec["order_name"],
        "class_order": [int(c) for c in order], "seed": seed, "status": "finished", "history": history,
        "metrics": metrics.summary(),
        "num_tasks": num_tasks, "parameters": method.parameter_count(), "validation": validation,
        "wall_time_s": time.perf_counter() - started, "world_size": ctx.world_size,
        "resumed_from": ckpt_path.name if ckpt_path is not None else None,
        "machine": machine_record(ctx.device),
    }


def task_row(metrics: ContinualMetrics, t: int, stats: dict, method: Method) -> dict:
    summary = metrics.summary()
    row = {"task": t, "loss": stats["loss"], "epoch_time_s": stats["epoch_time"],
           "images_per_s": stats["images_per_s"], "parameters": method.parameter_count(),
           "head": next(iter(summary), None)}     # the head `accuracy` comes from (nme, cnn)
    for head, values in summary.items():
        prefix = "" if head == next(iter(summary)) else f"{head}_"
        row[f"{prefix}accuracy"] = values["accuracies"][-1]
        row[f"{prefix}avg_inc_accuracy"] = values["average_incremental_accuracy"]
        row[f"{prefix}forgetting"] = values["forgetting"]
        row[f"{prefix}top5"] = values["top5_accuracies"][-1]
        row[f"{prefix}accuracy_per_task"] = values["accuracy_matrix"][-1][: t + 1]
    return row


def _maybe_inject_fault(ctx: RuntimeContext, t: int) -> None:
    """Test-only: die once after task `fault_at_task`'s checkpoint (a marker file makes it fire once)."""
    if ctx.fault_at_task is None or t != ctx.fault_at_task or not ctx.checkpoint_dir:
        return
    marker = Path(ctx.checkpoint_dir) / f"fault_injected_{t}"
    if marker.exists():
        return
    marker.touch()
    raise InjectedFault(f"injected fault after task {t} (fault_at_task option)")
