"""Inference over a dataset, sharded across DDP workers and gathered in the original order."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from harness.core.runtime import RuntimeContext


@torch.no_grad()
def _run(fn: Callable[[torch.Tensor], object], dataset, ctx: RuntimeContext, batch: int) -> list:
    shard = ctx.shard(len(dataset))
    loader = DataLoader(Subset(dataset, list(shard)), batch_size=batch, shuffle=False)
    out = []
    for x, _ in loader:
        with ctx.autocast():
            out.append(fn(x.to(ctx.device, non_blocking=True)))
    return out


def _was_training(model: torch.nn.Module) -> bool:
    mode = model.training
    model.eval()
    return mode


@torch.no_grad()
def compute_features(features_fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, dataset,
                     ctx: RuntimeContext, batch: int = 256, flip: bool = False) -> torch.Tensor:
    """Features of every sample of `dataset` (eval mode, deterministic transform), on every rank.

    flip=True averages the features of the image and its horizontal flip (iCaRL's class means)."""
    mode = _was_training(model)

    def fn(x: torch.Tensor) -> torch.Tensor:
        f = features_fn(x).float()
        if flip:
            f = (f + features_fn(torch.flip(x, dims=[3])).float()) / 2
        return f

    parts = _run(fn, dataset, ctx, batch)
    model.train(mode)
    local = torch.cat(parts) if parts else torch.zeros(0, device=ctx.device)
    return ctx.all_gather_cat(local).cpu()


@torch.no_grad()
def predict(predict_fn: Callable[[torch.Tensor], dict], model: torch.nn.Module, dataset, labels: np.ndarray,
            ctx: RuntimeContext, batch: int = 256, k: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head: (top-1 predictions, top-k hit) for every sample, gathered in order."""
    mode = _was_training(model)

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for head, scores in predict_fn(x).items():
            scores = scores.float()
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices
            pad = torch.full((top.shape[0], k - top.shape[1]), -1, dtype=top.dtype, device=top.device)
            out[head] = torch.cat([scores.argmax(1, keepdim=True), top, pad], dim=1)
        return out

    parts = _run(fn, dataset, ctx, batch)
    model.train(mode)
    heads = list(parts[0]) if parts else list(predict_fn(dataset[0][0][None].to(ctx.device)))
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    result = {}
    for head in heads:
        local = torch.cat([p[head] for p in parts]) if parts else torch.zeros((0, 1 + k), dtype=torch.long,
                                                                              device=ctx.device)
        gathered = ctx.all_gather_cat(local).cpu()
        top1 = gathered[:, 0]
        topk_hit = (gathered[:, 1:] == labels[:, None]).any(1)
        result[head] = (top1.numpy(), topk_hit.numpy())
    return result
