"""The harness's one training loop: epochs, global-batch sampling, DDP, AMP, optimizer and scheduler.

Methods only return a loss from `training_step`; everything else lives here, once.
"""
from __future__ import annotations

import math
import time
import zlib
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from harness.core.method import ClosureOptimizer, Method, PhaseConfig, TaskInfo
from harness.core.runtime import RuntimeContext, seed_everything


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each GLOBAL batch.

    One permutation per (seed, epoch) -- the same whatever the number of workers -- is cut into global
    batches; rank r takes items r, r+W, ... of each. So W workers with batch B/W each see exactly the
    batches one worker with batch B sees (the fix for DyTox's GPU-count-dependent results), and
    `set_epoch` must be called every epoch in every mode (the original never reshuffled on one GPU).
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, repeats: int = 1) -> None:
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.repeats = max(1, int(repeats))
        self.global_batch = max(world_size, min(global_batch, n))
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.repeats > 1:
            # Repeated augmentation (DeiT/DyTox): each image `repeats` times in a row -- the copies land on
            # different ranks and get different augmentations -- truncated to n samples per epoch.
            order = order.repeat_interleave(self.repeats)[: self.n]
        batches = list(order.split(self.global_batch))
        last = batches[-1] if batches else None
        # A short last batch is dropped (drop_last, when other batches exist) or when some rank would get
        # nothing: DDP needs every rank to take the same number of steps.
        if last is not None and len(last) < self.global_batch and (
                len(last) < self.world or (self.drop_last and len(batches) > 1)):
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            yield batch[self.rank::self.world].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())


def make_loader(dataset: Dataset, batch: int, ctx: RuntimeContext, seed: int, shuffle: bool,
                loader_workers: int = 0, repeats: int = 1) -> DataLoader:
    sampler = GlobalBatchSampler(len(dataset), batch, ctx.rank, ctx.world_size, seed, shuffle, repeats=repeats)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=loader_workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=False)


# `sgd` is PyTorch's SGD with classical momentum (iCaRL, DER and PyCIL), NOT timm's `sgd`, which is Nesterov;
# `nesterov` asks for Nesterov. Every other name goes to timm's factory (adamw, ...).
SGD_NAMES = {"sgd": False, "momentum": False, "nesterov": True}


def weight_decay_groups(params, weight_decay: float, decay_1d: bool = True) -> list[dict]:
    """Parameter groups with their weight decay. decay_1d False: biases, norm weights and every other 1-D
    parameter (DyTox's GPSA gates) get none -- what timm's optimizer factory did for the original DyTox
    (`filter_bias_and_bn`; DyTox defines no `no_weight_decay()`, so position embedding and task tokens, which are
    not 1-D, are decayed). decay_1d True: one group, everything decayed (torch.optim on `model.parameters()`,
    as iCaRL, PyCIL and DER)."""
    params = list(params)
    if decay_1d or not weight_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(params, phase: PhaseConfig, decay_1d: bool = True) -> torch.optim.Optimizer:
    """The phase's optimizer over `params` (see SGD_NAMES and weight_decay_groups)."""
    groups = weight_decay_groups(params, phase.weight_decay, decay_1d)
    name = phase.opt.lower()
    if name in SGD_NAMES:
        return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum, nesterov=SGD_NAMES[name],
                               weight_decay=phase.weight_decay)
    return create_optimizer_v2(groups, opt=name, lr=phase.lr, weight_decay=phase.weight_decay)


def lr_at_epoch(phase: PhaseConfig, epoch: int) -> float:
    """The learning rate of (0-based) `epoch` of a phase: the epoch-to-lr map of the code each recipe comes from.

    multistep -- PyTorch's MultiStepLR stepped after every epoch (iCaRL, PyCIL, DER): milestone m lowers the lr
        from epoch m on, lr * gamma ** #(milestones <= epoch); during `warmup_epochs` epochs before that, a linear
        ramp from `warmup_lr` (timm's warm-up formula).
    cosine -- timm's CosineLRScheduler (t_initial = epochs, cycle limit 1) stepped as DyTox's main.py steps it:
        `step(epoch)` AFTER epoch `epoch`, so epoch 0 runs at f(0) and epoch e >= 1 at f(e - 1) (epochs 0 and 1
        both at the warm-up lr), with f(t) = warmup_lr + t (lr - warmup_lr) / warmup_epochs for t < warmup_epochs,
        else min_lr + (lr - min_lr) (1 + cos(pi t / epochs)) / 2.
    constant -- lr.
    """
    lr, warmup = phase.lr, phase.warmup_epochs
    if phase.sched == "constant":
        return lr
    if phase.sched == "multistep":
        if epoch < warmup:
            return phase.warmup_lr + epoch * (lr - phase.warmup_lr) / warmup
        return lr * phase.gamma ** sum(1 for m in phase.milestones if m <= epoch)
    if phase.sched == "cosine":
        t = max(epoch - 1, 0)
        if t < warmup:
            return phase.warmup_lr + t * (lr - phase.warmup_lr) / warmup
        if t >= phase.epochs:
            return phase.min_lr
        return phase.min_lr + 0.5 * (lr - phase.min_lr) * (1 + math.cos(math.pi * t / phase.epochs))
    from harness.errors import ConfigError

    raise ConfigError(f"unknown sched {phase.sched!r}: use multistep, cosine or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _wrap_ddp(model: nn.Module, ctx: RuntimeContext) -> nn.Module:
    if not ctx.distributed:
        return model
    # Wrapped anew every phase: DDP fixes its parameter set (requires_grad) at construction time.
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def resolve_channels_last(option, model: nn.Module) -> bool:
    """`channels_last`: auto (on for convolution-dominated models: the CNN backbones) | true | false."""
    if isinstance(option, str):
        if option.lower() == "auto":
            from harness.core.backbones import prefers_channels_last

            return prefers_channels_last(model)
        if option.lower() in ("true", "false"):
            return option.lower() == "true"
        from harness.errors import ConfigError

        raise ConfigError(f"channels_last must be auto, true or false, got {option!r}")
    return bool(option)


def train_phase(method: Method, dataset: Dataset, phase: PhaseConfig, task: TaskInfo,
                ctx: RuntimeContext, seed: int, loader_workers: int = 0,
                batch_transform: Callable[..., torch.Tensor] | None = None,
                channels_last: bool | str = False, compile_model: bool = False) -> dict:
    """Run `phase.epochs` epochs of `method.training_step` over `dataset`. Returns phase statistics.

    Speed options (benchmarks/recipes/defaults.yaml, docs/PERFORMANCE.md): `batch_transform(x, generator=)`
    augments each uint8 batch after it is on the device (harness.data.batched; the dataset then returns raw
    images; random choices come from a per-rank CPU generator);
    `channels_last` (bool or "auto") converts the model and inputs to NHWC; `compile_model` wraps the training
    forward in torch.compile (evaluation stays eager)."""
    method.before_phase(phase, task)
    stats = {"loss": math.nan, "epoch_time": 0.0, "images_per_s": 0.0, "steps": 0}
    if phase.epochs <= 0 or len(dataset) == 0:
        method.after_phase(phase, task)
        return stats
    use_cl = resolve_channels_last(channels_last, method.model)
    if use_cl:   # every phase: modules added since the last one (DER's extractors) are converted too
        method.model.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters_to_optimize(phase) if p.requires_grad]
    decay_1d = bool(method.config.get("weight_decay_1d", True))
    optimizer = method.wrap_optimizer(build_optimizer(params, phase, decay_1d), phase, task)
    lr_at_epoch(phase, 0)                   # an unknown schedule fails before any work
    scaler = torch.amp.GradScaler("cuda") if ctx.amp == torch.float16 else None
    loader_seed = seed + 7919 * task.task_id + zlib.crc32(phase.kind.value.encode()) % 997
    # `finetuning_shuffle: false` replays the original DyTox's `ft_no_sampling`: a phase on the memory iterates
    # it in its stored (class-sorted) order, unshuffled.
    shuffle = not phase.kind.on_memory or method.config.get("finetuning_shuffle", True) is not False
    loader = make_loader(dataset, phase.batch_size, ctx, loader_seed,
                         shuffle=shuffle, loader_workers=loader_workers, repeats=phase.repeated_aug)
    if ctx.world_size > 1:
        # Every rank starts the task from the same seed, so per-image augmentation (torch; numpy and Python for
        # timm's RandAugment) would draw alike on every rank and the copies of an image that repeated augmentation
        # sends to different ranks would be augmented identically. Per-rank streams (the original's seed + rank).
        seed_everything(loader_seed * 1_000_003 + 7 + ctx.rank)
    # Batched augmentation draws from its own generator, distinct per rank: every rank's global RNG is seeded
    # alike, and repeated augmentation puts an image's copies on different ranks, which must augment differently.
    aug_generator = torch.Generator().manual_seed(loader_seed * 1_000_003 + ctx.rank)
    # Compiled inside DDP (DDP sees one autograd node per forward): no reliance on dynamo's DDP optimizer.
    method.net = _wrap_ddp(torch.compile(method.model) if compile_model else method.model, ctx)
    method.model.train()
    epoch_times, images, losses = [], 0, []
    phase_start = time.perf_counter()
    bar = tqdm(total=phase.epochs * len(loader), desc=f"task {task.task_id} {phase.kind}",
               disable=not (ctx.progress and ctx.is_main), leave=False, dynamic_ncols=True)
    for epoch in range(phase.epochs):
        loader.batch_sampler.set_epoch(epoch)
        set_lr(optimizer, lr_at_epoch(phase, epoch))   # SAM's param_groups are its base optimizer's
        start, running, count = time.perf_counter(), 0.0, 0
        for x, y in loader:
            x = x.to(ctx.device, non_blocking=True)
            y = y.to(ctx.device, non_blocking=True)
            if batch_transform is not None:
                x = batch_transform(x, generator=aug_generator)   # uint8 -> augmented, normalised float32
            if use_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = _step(method, optimizer, scaler, (x, y), task, phase, ctx)
            running += loss
            count += 1
            images += x.shape[0] * ctx.world_size
            bar.update(1)
            ctx.beat(task.task_id, phase.kind.value, epoch, phase.epochs, count, len(loader), running / count,
                     images, time.perf_counter() - phase_start)
        epoch_times.append(time.perf_counter() - start)
        losses.append(running / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    method.net = method.model
    method.after_phase(phase, task)
    total_time = sum(epoch_times)
    stats.update(loss=losses[-1], epoch_time=total_time / len(epoch_times),
                 images_per_s=images / total_time if total_time > 0 else 0.0, steps=phase.epochs * len(loader))
    return stats


def _step(method: Method, optimizer: torch.optim.Optimizer | ClosureOptimizer, scaler, batch, task: TaskInfo,
          phase: PhaseConfig, ctx: RuntimeContext) -> float:
    optimizer.zero_grad(set_to_none=True)

    def closure() -> torch.Tensor:
        with ctx.autocast():
            loss = method.training_step(batch, task, phase)
        loss.backward()
        return loss

    if isinstance(optimizer, ClosureOptimizer):   # SAM/ASAM: two forward-backward passes
        loss = optimizer.step(closure)
        return float(loss.detach())
    with ctx.autocast():
        loss = method.training_step(batch, task, phase)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at task {task.task_id} ({phase.kind}); "
                                 "lower the learning rate or disable AMP")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())
