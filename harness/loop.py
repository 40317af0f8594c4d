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
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

from harness.method import Method, PhaseConfig, TaskInfo
from harness.runtime import RuntimeContext


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


def build_optimizer(params, phase: PhaseConfig) -> torch.optim.Optimizer:
    # filter_bias_and_bn only applies to modules; we pass parameter lists, so weight decay is uniform
    # (as in DyTox, which defines no no_weight_decay()).
    kwargs = {"momentum": phase.momentum} if phase.opt in ("sgd", "momentum", "nesterov") else {}
    return create_optimizer_v2(list(params), opt=phase.opt, lr=phase.lr, weight_decay=phase.weight_decay,
                               **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, phase: PhaseConfig):
    """timm schedulers stepped per epoch; `constant` means no scheduler."""
    if phase.sched == "constant" or phase.epochs <= 0:
        return None
    sched, _ = create_scheduler_v2(
        optimizer, sched={"multistep": "multistep", "cosine": "cosine"}[phase.sched],
        num_epochs=phase.epochs, decay_milestones=list(phase.milestones) or [phase.epochs + 1],
        decay_rate=phase.gamma, min_lr=phase.min_lr, warmup_lr=phase.warmup_lr,
        warmup_epochs=phase.warmup_epochs)
    return sched


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
            from harness.backbones import prefers_channels_last

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
    optimizer = method.wrap_optimizer(build_optimizer(params, phase), phase, task)
    scheduler = build_scheduler(getattr(optimizer, "base_optimizer", optimizer), phase)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp == torch.float16 else None
    loader_seed = seed + 7919 * task.task_id + zlib.crc32(phase.name.encode()) % 997
    loader = make_loader(dataset, phase.batch_size, ctx, loader_seed,
                         shuffle=True, loader_workers=loader_workers, repeats=phase.repeated_aug)
    # Batched augmentation draws from its own generator, distinct per rank: every rank's global RNG is seeded
    # alike, and repeated augmentation puts an image's copies on different ranks, which must augment differently.
    aug_generator = torch.Generator().manual_seed(loader_seed * 1_000_003 + ctx.rank)
    # Compiled inside DDP (DDP sees one autograd node per forward): no reliance on dynamo's DDP optimizer.
    method.net = _wrap_ddp(torch.compile(method.model) if compile_model else method.model, ctx)
    method.model.train()
    epoch_times, images, losses = [], 0, []
    bar = tqdm(total=phase.epochs * len(loader), desc=f"task {task.task_id} {phase.name}",
               disable=not (ctx.progress and ctx.is_main), leave=False, dynamic_ncols=True)
    for epoch in range(phase.epochs):
        loader.batch_sampler.set_epoch(epoch)
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
        if scheduler is not None:
            scheduler.step(epoch + 1)
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


def _step(method: Method, optimizer, scaler, batch, task: TaskInfo, phase: PhaseConfig,
          ctx: RuntimeContext) -> float:
    optimizer.zero_grad(set_to_none=True)

    def closure() -> torch.Tensor:
        with ctx.autocast():
            loss = method.training_step(batch, task, phase)
        loss.backward()
        return loss

    if getattr(optimizer, "requires_closure", False):   # SAM/ASAM: two forward-backward passes
        loss = optimizer.step(closure)
        return float(loss.detach())
    with ctx.autocast():
        loss = method.training_step(batch, task, phase)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at task {task.task_id} ({phase.name}); "
                                 "lower the learning rate or disable AMP")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())
