"""The global-batch sampler (world-size invariance), optimizer construction, the loop's per-epoch schedule and
the batches it draws for each phase kind. (The epoch -> lr maps of every recipe: tests/test_schedules.py.)"""
import zlib

import numpy as np
import pytest
import torch

from harness.data import ArrayData, TaskDataset
from harness.core.loop import GlobalBatchSampler, build_optimizer, train_phase, weight_decay_groups
from harness.core.method import ClosureOptimizer, Method, PhaseConfig, PhaseKind, TaskInfo
from harness.core.runtime import RuntimeContext


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


# ---- optimizer construction -----------------------------------------------------------------------------------


def _sgd_steps(opt_name: str, grads: list[float]) -> list[float]:
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer([w], PhaseConfig(opt=opt_name, lr=0.1, momentum=0.9, weight_decay=0.0))
    out = []
    for g in grads:
        w.grad = torch.tensor([g])
        opt.step()
        out.append(round(float(w.detach()), 6))
    return out


def test_sgd_is_classical_momentum_and_nesterov_is_asked_for() -> None:
    # classical: v1 = 1, w = 1 - 0.1 = 0.9; v2 = 0.9 * 1 + 1 = 1.9, w = 0.9 - 0.19 = 0.71
    assert _sgd_steps("sgd", [1.0, 1.0]) == [0.9, 0.71]
    # Nesterov (timm's `sgd`): step with g + 0.9 v: 1.9 then 1 + 0.9 * 1.9 = 2.71 -> 0.81, 0.539
    assert _sgd_steps("nesterov", [1.0, 1.0]) == [0.81, 0.539]
    assert build_optimizer([torch.nn.Parameter(torch.zeros(1))], PhaseConfig(opt="sgd")).defaults["nesterov"] is False


def test_weight_decay_skips_1d_parameters_only_when_asked() -> None:
    from methods.dytox.model import DyTox, DyToxConfig

    model = DyTox(DyToxConfig(embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1))
    model.add_task(3)
    params = list(model.parameters())
    everything = weight_decay_groups(params, 1e-6, decay_1d=True)
    assert len(everything) == 1 and everything[0]["weight_decay"] == 1e-6
    decay, no_decay = weight_decay_groups(params, 1e-6, decay_1d=False)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(decay["params"]) + len(no_decay["params"]) == len(params)
    named = {id(p): n for n, p in model.named_parameters()}
    skipped = {named[id(p)] for p in no_decay["params"]}
    assert any(n.endswith(".bias") for n in skipped) and any("gating" in n for n in skipped)
    assert any("norm" in n and n.endswith("weight") for n in skipped)
    kept = {named[id(p)] for p in decay["params"]}
    assert any("pos_embed" in n for n in kept) and any("task_tokens" in n for n in kept)   # not 1-D: decayed
    # AdamW with a zero gradient moves a parameter by its decoupled decay only: w (1 - lr wd) or not at all
    w2, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([w2, b], PhaseConfig(opt="adamw", lr=0.5, weight_decay=0.1), decay_1d=False)
    w2.grad, b.grad = torch.zeros(2, 2), torch.zeros(2)
    opt.step()
    assert torch.allclose(w2, torch.full((2, 2), 0.95)) and torch.equal(b, torch.ones(2))


# ---- the loop applies the schedule, per epoch ------------------------------------------------------------------
class _RecordingMethod(Method):
    """A linear model that records the lr of every step and the labels of every batch."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__(config or {}, torch.device("cpu"))
        self.model = torch.nn.Linear(4, 3)
        self.lrs, self.labels = [], []

    def wrap_optimizer(self, optimizer, phase, task):
        self.optimizer = optimizer
        return optimizer

    def training_step(self, batch, task, phase):
        x, y = batch
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.labels.append(y.tolist())
        return torch.nn.functional.cross_entropy(self.net(x.float().flatten(1)[:, :4]), y)


def _data(n: int = 12) -> ArrayData:
    x = np.random.default_rng(0).integers(0, 256, (n, 2, 2, 1), dtype=np.uint8)
    return ArrayData(x, np.arange(n) // (n // 3), ["a", "b", "c"])


def _identity(image):
    return image


def test_train_phase_applies_the_lr_of_each_epoch() -> None:
    method = _RecordingMethod()
    phase = PhaseConfig(epochs=5, batch_size=12, lr=0.1, sched="multistep", milestones=(4,))
    train_phase(method, TaskDataset(_data(), _identity), phase, TaskInfo(0, 1, (0, 1, 2), 0, 3),
                RuntimeContext(progress=False), seed=0)
    assert method.lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("kind", [PhaseKind.FINETUNE, PhaseKind.DECOUPLE])
def test_finetuning_shuffle_false_iterates_the_memory_in_class_order(shuffle: bool, kind: PhaseKind) -> None:
    method = _RecordingMethod({"finetuning_shuffle": shuffle})
    phase = PhaseConfig(kind=kind, epochs=2, batch_size=4, lr=0.1, sched="constant")
    train_phase(method, TaskDataset(_data(), _identity), phase, TaskInfo(1, 2, (2,), 2, 3),
                RuntimeContext(progress=False), seed=0)
    flat = [label for batch in method.labels for label in batch]
    in_order = flat == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2] * 2
    assert in_order is not shuffle



def test_the_main_phase_always_shuffles() -> None:
    method = _RecordingMethod({"finetuning_shuffle": False})       # a memory-phase option only
    train_phase(method, TaskDataset(_data(), _identity), PhaseConfig(epochs=1, batch_size=4, sched="constant"),
                TaskInfo(0, 1, (0, 1, 2), 0, 3), RuntimeContext(progress=False), seed=0)
    assert [label for batch in method.labels for label in batch] != [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


# ---- the loader seed hashes the phase kind's string: the kinds keep the strings phases were named by --------------
def test_phase_kinds_hash_like_the_strings_they_replace() -> None:
    old_names = {PhaseKind.TRAIN: "train", PhaseKind.FINETUNE: "finetune", PhaseKind.DECOUPLE: "decouple"}
    assert set(old_names) <= set(PhaseKind)         # kinds added since (BIAS_CORRECTION) have new strings
    for kind, old in old_names.items():
        assert zlib.crc32(kind.value.encode()) == zlib.crc32(old.encode())
        assert f"{kind}" == old                     # progress bars and heartbeats print the same name


# The labels (= item indices) the loop drew, seed 5, task 1, 12 items, batch 4, 2 epochs, recorded with the loop
# before phases had kinds (they were named "train", "finetune", "decouple"): any change of a loader seed shows.
DRAWN_BEFORE_KINDS = {
    PhaseKind.TRAIN: [[2, 0, 10, 5], [3, 4, 11, 8], [1, 9, 6, 7], [3, 1, 9, 4], [10, 7, 8, 6], [5, 11, 2, 0]],
    PhaseKind.FINETUNE: [[2, 1, 11, 8], [5, 3, 4, 10], [9, 7, 0, 6], [9, 6, 1, 2], [10, 3, 0, 5], [4, 8, 7, 11]],
    PhaseKind.DECOUPLE: [[2, 3, 11, 4], [6, 5, 9, 1], [7, 10, 8, 0], [6, 1, 9, 4], [5, 7, 10, 3], [0, 11, 2, 8]],
}


@pytest.mark.parametrize("kind", list(DRAWN_BEFORE_KINDS))
def test_each_phase_kind_draws_the_batches_it_drew_before(kind: PhaseKind) -> None:
    method = _RecordingMethod()
    method.model = torch.nn.Linear(4, 12)
    data = ArrayData(_data().x, np.arange(12), [str(i) for i in range(12)])
    phase = PhaseConfig(kind=kind, epochs=2, batch_size=4, lr=0.1, sched="constant")
    train_phase(method, TaskDataset(data, _identity), phase, TaskInfo(1, 2, (6, 7, 8, 9, 10, 11), 6, 12),
                RuntimeContext(progress=False), seed=5)
    assert method.labels == DRAWN_BEFORE_KINDS[kind]


# ---- optimizer wrappers that need a closure ---------------------------------------------------------------------
class _CountingClosureOptimizer:
    """A ClosureOptimizer that calls the closure twice per step, as SAM does."""

    requires_closure = True

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base, self.closures = base, 0

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure):
        loss = closure()
        closure()
        self.closures += 2
        self.base.step()
        return loss


def test_the_loop_steps_a_closure_optimizer_with_a_closure() -> None:
    class Wrapped(_RecordingMethod):
        def wrap_optimizer(self, optimizer, phase, task):
            self.optimizer = _CountingClosureOptimizer(optimizer)
            return self.optimizer

    method = Wrapped()
    train_phase(method, TaskDataset(_data(), _identity), PhaseConfig(epochs=1, batch_size=4, sched="constant"),
                TaskInfo(0, 1, (0, 1, 2), 0, 3), RuntimeContext(progress=False), seed=0)
    assert isinstance(method.optimizer, ClosureOptimizer)
    assert method.optimizer.closures == 6 and len(method.labels) == 6       # 3 steps, two passes each
    from timm.optim import create_optimizer_v2

    params = [torch.nn.Parameter(torch.zeros(1))]
    assert not isinstance(torch.optim.SGD(params, lr=0.1), ClosureOptimizer)
    # timm's Lookahead wraps a `base_optimizer` too, but steps without a closure
    assert not isinstance(create_optimizer_v2(params, opt="lookahead_adamw", lr=0.1), ClosureOptimizer)
