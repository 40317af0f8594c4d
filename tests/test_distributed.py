"""Rehearsal memory selection does not depend on the number of DDP workers: two real gloo processes (no Ray)
compute the features of their shards, gather them in order, and herding picks exactly what one process picks.

Why a separate test: in a full DDP trial the weights of 1 and 2 workers differ by float rounding (the
all-reduce sums gradients in another order), and herding amplifies tiny feature differences into other picks
late in a class. Given the same weights, the selection must be identical; this is what is checked here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gloo_ranks import on_two_gloo_ranks
from harness.core.backbones import build_backbone
from harness.data import ArrayData, TaskDataset, build_transform, dataset_info
from harness.core.evaluation import compute_features
from harness.core.memory import RehearsalMemory
from harness.core.runtime import RuntimeContext


def _data() -> ArrayData:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (75, 32, 32, 3), dtype=np.uint8)      # odd count: uneven shards
    return ArrayData(x, np.arange(75) % 3, ["a", "b", "c"])


def _select(ctx: RuntimeContext) -> dict:
    torch.manual_seed(0)
    model = build_backbone("resnet32").eval()
    data = _data()
    feats = compute_features(model, model, TaskDataset(data, build_transform(dataset_info("cifar10"), train=False)), ctx, batch=16)
    memory = RehearsalMemory(memory_size=30, selection="herding")
    memory.update(data.x, data.y, feats, num_seen_classes=3)
    return {"picks": [memory.selected_indices(c) for c in memory.classes], "features": feats}


def test_two_gloo_ranks_select_the_same_memory_as_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = _select(RuntimeContext(progress=False))
    single_picks, single_feats = single["picks"], single["features"]
    for got in on_two_gloo_ranks(_select, tmp_path):
        assert got["features"].shape == single_feats.shape == (75, 64)
        torch.testing.assert_close(got["features"], single_feats, rtol=1e-5, atol=1e-6)   # gathered in order
        assert got["picks"] == single_picks                         # every rank keeps the same memory
    assert [len(p) for p in single_picks] == [10, 10, 10]
