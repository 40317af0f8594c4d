"""Rehearsal memory selection does not depend on the number of DDP workers: two real gloo processes (no Ray)
compute the features of their shards, gather them in order, and herding picks exactly what one process picks.

Why a separate test: in a full DDP trial the weights of 1 and 2 workers differ by float rounding (the
all-reduce sums gradients in another order), and herding amplifies tiny feature differences into other picks
late in a class. Given the same weights, the selection must be identical; this is what is checked here."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.backbones import build_backbone
from harness.data import ArrayData, TaskDataset, build_transform, dataset_info
from harness.evaluation import compute_features
from harness.memory import RehearsalMemory
from harness.runtime import RuntimeContext


def _data() -> ArrayData:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (75, 32, 32, 3), dtype=np.uint8)      # odd count: uneven shards
    return ArrayData(x, np.arange(75) % 3, ["a", "b", "c"])


def _select(ctx: RuntimeContext) -> tuple[list[list[int]], torch.Tensor]:
    torch.manual_seed(0)
    model = build_backbone("resnet32").eval()
    data = _data()
    feats = compute_features(model, model, TaskDataset(data, build_transform(dataset_info("cifar10"), train=False)), ctx, batch=16)
    memory = RehearsalMemory(memory_size=30, selection="herding")
    memory.update(data.x, data.y, feats, num_seen_classes=3)
    return [memory.selected_indices(c) for c in memory.classes], feats


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        picks, feats = _select(RuntimeContext(rank=rank, world_size=2, progress=False))
        torch.save({"picks": picks, "features": feats}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_select_the_same_memory_as_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single_picks, single_feats = _select(RuntimeContext(progress=False))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["features"].shape == single_feats.shape == (75, 64)
        torch.testing.assert_close(got["features"], single_feats, rtol=1e-5, atol=1e-6)   # gathered in order
        assert got["picks"] == single_picks                         # every rank keeps the same memory
    assert [len(p) for p in single_picks] == [10, 10, 10]
