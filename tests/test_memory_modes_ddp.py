"""Both memory placements give the same memory on 1 and 2 workers: two real gloo processes (no Ray) compute the
features of their shards of the data, gather them, and select exactly what one process selects -- the global
memory and the erratum's distributed memory emulated with virtual shards (whose count does not follow the
number of real workers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gloo_ranks import on_two_gloo_ranks
from harness.core.backbones import build_backbone
from harness.data import ArrayData, TaskDataset, build_transform, dataset_info
from harness.core.evaluation import compute_features
from harness.core.memory import RehearsalMemory
from harness.core.runtime import RuntimeContext

MODES = {"global": dict(placement="global"), "distributed": dict(placement="distributed", shards=2),
         "distributed4": dict(placement="distributed", shards=4)}


def _memories(ctx: RuntimeContext) -> dict[str, list[list[list[int]]]]:
    torch.manual_seed(0)
    model = build_backbone("tiny_cnn", 8).eval()
    rng = np.random.default_rng(0)
    data = ArrayData(rng.integers(0, 256, (63, 32, 32, 3), dtype=np.uint8), np.arange(63) % 3, ["a", "b", "c"])
    feats = compute_features(model, model, TaskDataset(data, build_transform(dataset_info("cifar10"), train=False)),
                             ctx, batch=16)
    out = {}
    for name, kwargs in MODES.items():
        memory = RehearsalMemory(memory_size=24, seed=1, **kwargs)
        memory.update(data.x, data.y, feats, num_seen_classes=3)
        out[name] = [memory.shard_indices(c) for c in memory.classes]
    return out


@pytest.mark.slow          # two spawned gloo processes: about a minute on 2 shared cores
def test_one_and_two_workers_hold_the_same_memory_in_both_modes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = _memories(RuntimeContext(progress=False))
    for got in on_two_gloo_ranks(_memories, tmp_path):
        assert got == single
    # global: one list of 8 per class; distributed: 2 shards of 4 (4 shards of 2), all distinct
    assert [[len(s) for s in c] for c in single["global"]] == [[8]] * 3
    assert [[len(s) for s in c] for c in single["distributed"]] == [[4, 4]] * 3
    assert [[len(s) for s in c] for c in single["distributed4"]] == [[2, 2, 2, 2]] * 3
    for c in single["distributed"]:
        assert len(set(c[0]) | set(c[1])) == 8
