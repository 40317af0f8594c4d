"""The global-batch sampler (world-size invariance) and the training loop on real data."""
import torch

from harness.loop import GlobalBatchSampler


def _global_batches(n, batch, world, epoch=0, repeats=1):
    samplers = [GlobalBatchSampler(n, batch, r, world, seed=3, repeats=repeats) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1, "every rank must take the same number of steps"
    return [sorted(sum((p[i] for p in per_rank), [])) for i in range(len(per_rank[0]))]


def test_two_workers_see_the_same_global_batches_as_one():
    one = _global_batches(103, 16, 1)
    two = _global_batches(103, 16, 2)
    four = _global_batches(103, 16, 4)
    assert one == two == four
    assert len(one) == 103 // 16           # the short last batch is dropped


def test_every_epoch_reshuffles():
    # DyTox's single-GPU sampler never called set_epoch and replayed the same permutation forever.
    assert _global_batches(64, 8, 1, epoch=0) != _global_batches(64, 8, 1, epoch=1)


def test_repeated_augmentation_repeats_each_image():
    s = GlobalBatchSampler(30, 30, seed=1, repeats=3)
    (batch,) = list(s)
    counts = torch.bincount(torch.tensor(batch), minlength=30)
    assert len(batch) == 30 and set(counts.tolist()) <= {0, 3}
    assert (counts == 3).sum() == 10


def test_small_dataset_still_gives_one_batch_per_rank():
    per_rank = [list(GlobalBatchSampler(5, 128, r, 2)) for r in range(2)]
    assert [len(p) for p in per_rank] == [1, 1]
    assert sorted(per_rank[0][0] + per_rank[1][0]) == [0, 1, 2, 3, 4]
