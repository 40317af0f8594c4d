"""Rehearsal memory: selectors on hand-checked cases, budgets, reproducibility and checkpoint round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import CheckpointError, ConfigError
from harness.core.memory import RehearsalMemory, closest_to_mean_select, herding_select, random_select

# Five unit vectors in 2-D (exact decimals so the hand computation below is exact enough).
FIVE = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])


def _unit_case(scales: list[float] | None = None) -> torch.Tensor:
    f = torch.tensor(FIVE)
    if scales is not None:   # positive row scales must not matter: herding works on normalised features
        f = f * torch.tensor(scales)[:, None]
    return f


# ---- selectors ----------------------------------------------------------------------------------
def test_herding_hand_case() -> None:
    # All rows are unit vectors, so minimising ||mu - (S + f)/m|| == maximising (m*mu - S) . f.
    # mu = (1.8, 3.2) / 5 = (0.36, 0.64).
    # pick 1: mu.f = .36, .672, .728, .64, .296                      -> 2 (also the closest to the mean)
    # pick 2: 2mu - f2 = (0.12, 0.48); dots f0 .12, f1 .384, f3 .48, f4 .312        -> 3 (NOT the 2nd closest, 1)
    # pick 3: 3mu - f2 - f3 = (0.48, 0.12); dots f0 .48, f1 .456, f4 -.192          -> 0
    # pick 4: 4mu - f2 - f3 - f0 = (-0.16, 0.76); dots f1 .328, f4 .704              -> 4
    # pick 5: the remaining one                                                      -> 1
    assert herding_select(_unit_case(), 5) == [2, 3, 0, 4, 1]
    assert herding_select(_unit_case([3.0, 0.5, 7.0, 1.0, 0.01]), 5) == [2, 3, 0, 4, 1]
    assert herding_select(_unit_case().float(), 3) == [2, 3, 0]
    # Closest to the mean ranks by mu.f alone: .728 (2), .672 (1), .64 (3), .36 (0), .296 (4).
    assert closest_to_mean_select(_unit_case([2.0, 1.0, 0.3, 5.0, 1.0]), 5) == [2, 1, 3, 0, 4]
    assert closest_to_mean_select(_unit_case(), 2) == [2, 1]


def test_herding_ties_go_to_the_lowest_index() -> None:
    # mu = (0.6, 0.6): f2 and f3 tie for pick 1 -> 2; then 2mu - f2 = (0.6, 0.4) -> 3;
    # then 3mu - f2 - f3 = (0.4, 0.4): f0 and f1 tie -> 0; then 1.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    assert herding_select(f, 4) == [2, 3, 0, 1]
    # Duplicated rows: the lower index of a duplicate pair is picked first.
    dup = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    assert herding_select(dup, 4)[0] == 1
    assert closest_to_mean_select(dup, 2) == [1, 2]


def test_herding_properties() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(40, 6, generator=gen)
    picks = herding_select(f, 15)
    assert len(picks) == 15 and len(set(picks)) == 15
    assert all(0 <= i < 40 for i in picks)
    assert herding_select(f, 5) == picks[:5]                   # ordered: a smaller budget is a prefix
    assert sorted(herding_select(f, 100)) == list(range(40))   # k capped at N
    assert herding_select(f, 0) == [] and herding_select(f[:0], 3) == []
    # Permuting the samples permutes the picks (no dependence on the data's order).
    perm = torch.randperm(40, generator=gen)
    assert [int(perm[i]) for i in herding_select(f[perm], 15)] == picks
    # The first pick is the sample closest to the mean.
    assert picks[0] == closest_to_mean_select(f, 1)[0]
    close = closest_to_mean_select(f, 40)
    assert sorted(close) == list(range(40)) and closest_to_mean_select(f, 7) == close[:7]
    with pytest.raises(ValueError):
        herding_select(torch.randn(5), 2)


def _continuum_loop(features: np.ndarray, k: int) -> tuple[list[int], int | None]:
    """Replica of the loop in continuum's herd_closest_to_barycenter (iCaRL's original), with one addition:
    it reports how many distinct picks were made before the first RE-pick of an already picked sample."""
    d = features.T / (np.linalg.norm(features.T, axis=0) + 1e-8)
    mu = d.mean(axis=1)
    w, picks, first_repick, it = mu.copy(), [], None, 0
    while len(picks) < min(k, d.shape[1]) and it < 1000:
        i = int(np.argmax(w @ d))
        it += 1
        if i in picks:
            first_repick = len(picks) if first_repick is None else first_repick
        else:
            picks.append(i)
        w = w + mu - d[:, i]
    return picks, first_repick


def test_herding_matches_continuum_barycenter_up_to_its_repicks() -> None:
    herding = pytest.importorskip("continuum.rehearsal.herding")
    agreed = diverged = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n, k = int(rng.integers(10, 60)), int(rng.integers(2, 25))
        f = rng.normal(size=(n, int(rng.integers(2, 12))))
        ours = herding_select(torch.from_numpy(f), k)
        x = np.arange(n)
        theirs = herding.herd_closest_to_barycenter(x, np.zeros(n, dtype=np.int64), x, f, k)[0].tolist()
        replica, first_repick = _continuum_loop(f, k)
        assert replica == theirs                    # the replica is faithful
        if first_repick is None:
            # Its update w_m = (m+1) mu - S_m makes argmax w.f the same greedy step as ours on unit vectors.
            assert ours == theirs
            agreed += 1
        else:
            # continuum may land on an already picked sample: it wastes the iteration but still moves w, so
            # later picks differ. We never re-pick (and have no 1000-iteration cap). Up to then, identical.
            assert ours[:first_repick] == theirs[:first_repick]
            diverged += 1
    assert agreed >= 5 and diverged >= 1   # both branches were exercised


def test_random_select_without_replacement_and_reproducible() -> None:
    picks = random_select(10, 10, np.random.default_rng(3))
    assert sorted(picks) == list(range(10))                # a permutation: no sample drawn twice
    assert random_select(10, 25, np.random.default_rng(3)) == picks   # k capped
    assert random_select(100, 30, np.random.default_rng(3)) == random_select(100, 30, np.random.default_rng(3))
    assert random_select(100, 30, np.random.default_rng(3)) != random_select(100, 30, np.random.default_rng(4))
    t1 = random_select(50, 20, torch.Generator().manual_seed(7))
    assert t1 == random_select(50, 20, torch.Generator().manual_seed(7)) and len(set(t1)) == 20
    with pytest.raises(TypeError):
        random_select(5, 2, 123)  # type: ignore[arg-type]


# ---- the memory ----------------------------------------------------------------------------------
def _task(labels: list[int], per_class: int, seed: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Images whose pixels all equal their (unique) sample number, labels interleaved, random features."""
    n = len(labels) * per_class
    x = np.broadcast_to((np.arange(n) + offset).astype(np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy()
    y = np.tile(np.asarray(labels, dtype=np.int64), per_class)
    feats = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return x, y, feats


def test_fixed_total_budget_trims_to_first_picks() -> None:
    mem = RehearsalMemory(memory_size=20, selection="herding")
    x, y, f = _task([0, 1], 30, seed=0)
    mem.update(x, y, f, num_seen_classes=2)
    assert mem.quota(2) == 10 and len(mem) == 20 and mem.classes == [0, 1]
    first = {}
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        expected = [int(idx[i]) for i in herding_select(f[torch.as_tensor(idx)], 10)]
        assert mem.selected_indices(c) == expected
        first[c] = expected
    mx, my = mem.get()
    assert my.tolist() == [0] * 10 + [1] * 10
    np.testing.assert_array_equal(mx, x[first[0] + first[1]])

    x2, y2, f2 = _task([2, 3], 30, seed=1, offset=60)
    mem.update(x2, y2, f2, num_seen_classes=4)
    assert mem.quota(4) == 5 and len(mem) == 20 and mem.classes == [0, 1, 2, 3]
    assert mem.selected_indices(0) == first[0][:5] and mem.selected_indices(1) == first[1][:5]
    mx, my = mem.get()
    assert my.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    np.testing.assert_array_equal(mx[:5], x[first[0][:5]])
    np.testing.assert_array_equal(mx[10:15], x2[mem.selected_indices(2)])

    mem.reduce(6)   # 20 // 6 = 3
    assert len(mem) == 12 and mem.selected_indices(2) == mem.selected_indices(2)[:3]


def test_per_class_budget_and_label_order() -> None:
    mem = RehearsalMemory(per_class=3, selection="closest")
    x, y, f = _task([7, 4], 5, seed=2)
    mem.update(x, y, f, num_seen_classes=2)
    x2, y2, f2 = _task([1, 9, 2], 2, seed=3, offset=50)    # fewer samples than the budget: keep them all
    mem.update(x2, y2, f2, num_seen_classes=5)
    assert mem.quota(5) == 3 and mem.quota(100) == 3
    assert mem.classes == [1, 2, 4, 7, 9] and len(mem) == 3 + 3 + 2 + 2 + 2
    _, my = mem.get()
    assert my.tolist() == [1, 1, 2, 2, 4, 4, 4, 7, 7, 7, 9, 9]
    idx = np.flatnonzero(y == 4)
    assert mem.selected_indices(4) == [int(idx[i]) for i in closest_to_mean_select(f[torch.as_tensor(idx)], 3)]


def test_memory_does_not_depend_on_sample_order() -> None:
    x, y, f = _task([0, 1], 25, seed=4)
    perm = np.random.default_rng(0).permutation(len(y))
    a, b = RehearsalMemory(memory_size=16), RehearsalMemory(memory_size=16)
    a.update(x, y, f, num_seen_classes=2)
    b.update(x[perm], y[perm], f[torch.as_tensor(perm)], num_seen_classes=2)
    np.testing.assert_array_equal(a.get()[0], b.get()[0])
    assert b.selected_indices(0) != a.selected_indices(0)   # indices refer to each call's own x


def test_random_memory_reproducible_and_without_replacement() -> None:
    x, y, _ = _task([0, 1, 2], 10, seed=5)
    runs = []
    for seed in (0, 0, 1):
        mem = RehearsalMemory(per_class=10, selection="random", seed=seed)
        mem.update(x, y, None, num_seen_classes=3)            # random needs no features
        runs.append([mem.selected_indices(c) for c in range(3)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for picks, c in zip(runs[0], range(3)):
        assert sorted(picks) == np.flatnonzero(y == c).tolist()   # all 10 samples, each once
    # A class's draw depends on (seed, label) only, not on the classes selected with it.
    solo = RehearsalMemory(per_class=10, selection="random", seed=0)
    keep = y == 1
    solo.update(x[keep], y[keep], None, num_seen_classes=1)
    assert [int(np.flatnonzero(keep)[i]) for i in solo.selected_indices(1)] == runs[0][1]


def test_state_dict_round_trip_images(tmp_path) -> None:
    mem = RehearsalMemory(memory_size=12, selection="herding", seed=3)
    x, y, f = _task([0, 1], 9, seed=6)
    mem.update(x, y, f, num_seen_classes=2)
    path = tmp_path / "mem.pt"
    torch.save(mem.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["x"].dtype == torch.uint8
    back = RehearsalMemory(memory_size=12, selection="herding", seed=3)
    back.load_state_dict(state)
    for a, b in zip(mem.get(), back.get()):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert back.classes == [0, 1] and back.selected_indices(1) == mem.selected_indices(1)
    # The loaded memory keeps working: the next task trims it exactly like the original.
    x2, y2, f2 = _task([2], 9, seed=7)
    for m in (mem, back):
        m.update(x2, y2, f2, num_seen_classes=3)
    np.testing.assert_array_equal(mem.get()[0], back.get()[0])
    assert len(back) == 12
    again = RehearsalMemory.from_state_dict(torch.load(path, weights_only=True))
    assert len(again) == 12 and again.selected_indices(0)[:4] == mem.selected_indices(0)
    assert (again.mode, again.budget, again.selection, again.seed) == ("memory_size", 12, "herding", 3)


@pytest.mark.parametrize("dtype", [str, object])
def test_state_dict_round_trip_paths(tmp_path, dtype) -> None:
    paths = np.array([f"train/c{i % 3}/img_{i:03d}.JPEG" for i in range(30)], dtype=dtype)
    y = np.arange(30) % 3
    mem = RehearsalMemory(per_class=4, selection="random", seed=11)
    mem.update(paths, y, None, num_seen_classes=3)
    torch.save(mem.state_dict(), tmp_path / "m.pt")
    back = RehearsalMemory(per_class=4, selection="random", seed=11)
    back.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    bx, by = back.get()
    mx, my = mem.get()
    assert bx.tolist() == mx.tolist() and by.tolist() == my.tolist() and bx.dtype == mx.dtype
    assert all(p.startswith(f"train/c{label}/") for p, label in zip(bx, by))


def test_zero_budget_and_errors() -> None:
    mem = RehearsalMemory(memory_size=0)
    x, y, f = _task([0, 1], 5, seed=8)
    mem.update(x, y, None, num_seen_classes=2)     # no memory: features are not even needed
    gx, gy = mem.get()
    assert len(mem) == 0 and gx.shape == (0, 4, 4, 3) and gx.dtype == np.uint8 and gy.shape == (0,)

    small = RehearsalMemory(memory_size=3)            # fewer slots than classes: nothing fits
    small.update(x, y, f, num_seen_classes=4)
    assert len(small) == 0

    with pytest.raises(ConfigError, match="memory_selection"):
        RehearsalMemory(memory_size=10, selection="icarl")
    with pytest.raises(ConfigError, match="exactly one"):
        RehearsalMemory(memory_size=10, per_class=2)
    with pytest.raises(ConfigError, match="exactly one"):
        RehearsalMemory()
    with pytest.raises(ConfigError, match="non-negative"):
        RehearsalMemory(per_class=-1)
    with pytest.raises(ValueError, match="features"):
        RehearsalMemory(memory_size=10).update(x, y, None, num_seen_classes=2)
    with pytest.raises(ValueError, match="num_seen_classes"):
        RehearsalMemory(memory_size=10).update(x, y, f, num_seen_classes=1)
    good = RehearsalMemory(memory_size=10)
    good.update(x, y, f, num_seen_classes=2)
    with pytest.raises(CheckpointError, match="same memory options"):
        RehearsalMemory(per_class=10).load_state_dict(good.state_dict())


# ---- distributed placement: the erratum's per-GPU memories, emulated with virtual shards ------------------------
def _two_classes(n: int = 40, dims: int = 5) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = np.arange(2 * n).reshape(-1, 1).repeat(3, axis=1).astype(np.int64)   # row i holds i: picks are visible
    y = np.repeat([0, 1], n)
    return x, y, torch.randn(2 * n, dims, generator=gen, dtype=torch.float64)


def test_distributed_memory_herds_each_shard_from_its_own_share() -> None:
    from harness.core.memory import shard_split

    x, y, f = _two_classes()
    memory = RehearsalMemory(memory_size=40, placement="distributed", shards=2, seed=5)
    memory.update(x, y, f, num_seen_classes=2)
    assert memory.quota(2) == 10                      # (40 // 2 shards) // 2 classes, per shard
    assert len(memory) == 40
    for label in (0, 1):
        shares = shard_split(np.flatnonzero(y == label), 2, 5, label)
        assert sorted(np.concatenate(shares).tolist()) == np.flatnonzero(y == label).tolist()   # a partition
        assert abs(len(shares[0]) - len(shares[1])) <= 1
        for share, picks in zip(shares, memory.shard_indices(label)):
            assert picks == share[herding_select(f[share], 10)].tolist()      # herded on its share alone
        assert len(set(memory.selected_indices(label))) == 20                 # disjoint shares: no duplicates
    # the stored samples are those picks, class by class, shard by shard
    stored, labels = memory.get()
    assert stored[:, 0].tolist() == memory.selected_indices(0) + memory.selected_indices(1)
    assert labels.tolist() == [0] * 20 + [1] * 20
    # a new class: every shard trims its own list to the new quota (20 // 4 = 5), first picks kept
    before = [memory.shard_indices(0), memory.shard_indices(1)]
    x2, y2 = np.arange(80, 120).reshape(-1, 1).repeat(3, axis=1), np.full(40, 2)
    memory.update(x2, y2, torch.randn(40, 5, dtype=torch.float64), num_seen_classes=4)
    for label, shards in zip((0, 1), before):
        assert memory.shard_indices(label) == [s[:5] for s in shards]
    assert len(memory) == 30


def test_distributed_equals_global_with_one_shard_and_round_trips(tmp_path) -> None:
    x, y, f = _two_classes()
    one = RehearsalMemory(memory_size=40, placement="distributed", shards=1)
    glob = RehearsalMemory(memory_size=40)
    for m in (one, glob):
        m.update(x, y, f, num_seen_classes=2)
    assert one.get()[0].tolist() == glob.get()[0].tolist()
    for selection in ("herding", "random"):
        memory = RehearsalMemory(memory_size=24, placement="distributed", shards=3, selection=selection)
        memory.update(x, y, f if selection == "herding" else None, num_seen_classes=2)
        torch.save(memory.state_dict(), tmp_path / "m.pt")
        back = RehearsalMemory.from_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
        assert [back.shard_indices(c) for c in (0, 1)] == [memory.shard_indices(c) for c in (0, 1)]
        assert np.array_equal(back.get()[0], memory.get()[0]) and len(back) == 24
    with pytest.raises(CheckpointError, match="distributed"):
        RehearsalMemory(memory_size=24).load_state_dict(memory.state_dict())
    with pytest.raises(ConfigError, match="memory_mode"):
        RehearsalMemory(memory_size=24, placement="per-gpu")
    with pytest.raises(ConfigError, match="memory_shards"):
        RehearsalMemory(memory_size=24, placement="distributed", shards=0)
