"""Rehearsal memory: exemplar selection (herding / closest-to-mean / random) and a class-balanced store.

Selection is done ONCE, in one process, on the whole data of a class, so results do not depend on the number of
workers: the original DyTox let every GPU herd its own memory on its own augmentations, which multiplied the
effective memory by the number of GPUs (its erratum). Every selector is a pure function of (features, budget)
-- plus the seed for `random` -- and returns the ordered picks (first pick first), so shrinking a class to its
first k picks is exactly what a k-budget selection would have chosen for herding and random.

Two placements (`memory_mode`):
- `global` (default): one memory, each class's exemplars selected from all of its data;
- `distributed`: the DyTox erratum's per-GPU memories emulated with `memory_shards` VIRTUAL shards, whatever the
  real number of workers: each class's data is split into that many fixed, seeded shares, and each share has
  its own memory of `memory_size // memory_shards` (per-class quota from that), herded from that share only.
  The memory is the union of the shards. Everything stays a pure function of (data, features, seed), so 1 and N
  workers hold the same memory in both modes. docs/METHODS.md says exactly what the original did and how this
  differs from it.

The memory stores the raw samples (uint8 image rows or path strings) and the labels, not indices into a task
dataset, so it survives any reshuffling of the data it came from and can be checkpointed on its own.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.errors import CheckpointError, ConfigError

SELECTIONS = ("herding", "closest", "random")
MEMORY_MODES = ("global", "distributed")

# Distances within this of the minimum count as a tie (float rounding must not decide a pick): lowest index wins.
_TIE_ATOL = 1e-12


def _normalised(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in float64 on the CPU: the same picks whatever device or precision made the features."""
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (samples, dims), got shape {tuple(features.shape)}")
    f = features.detach().to("cpu", torch.float64)
    return torch.nn.functional.normalize(f, p=2, dim=1)


def herding_select(features: torch.Tensor, k: int) -> list[int]:
    """iCaRL herding (barycenter matching) on L2-normalised features; the ordered picks, first pick first.

    Step m (1-based) picks the not-yet-picked sample i minimising || mu - (sum_picked + f_i) / m || where mu is
    the mean of the normalised features: the running mean of the picks follows the class mean as closely as
    possible. Ties go to the lowest index. k is capped at the number of samples.

    Differs from continuum's `herd_closest_to_barycenter` / the original iCaRL code only in that a sample can
    never be picked twice: those iterate w <- w + mu - f_pick and may land on an already picked sample, which
    wastes an iteration but still moves w (so later picks can differ); they also stop after 1000 iterations.
    """
    f = _normalised(features)
    n = f.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return []
    mu = f.mean(dim=0)
    sq_norms = (f * f).sum(dim=1)
    picked = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros_like(mu)
    order: list[int] = []
    for m in range(1, k + 1):
        # ||a - f_i/m||^2 with a = mu - running/m, expanded so each step is one mat-vec over all candidates.
        a = mu - running / m
        dist = (a @ a) - (2.0 / m) * (f @ a) + sq_norms / (m * m)
        dist[picked] = float("inf")
        best = dist.min()
        i = int(torch.nonzero(dist <= best + _TIE_ATOL)[0, 0])
        order.append(i)
        picked[i] = True
        running += f[i]
    return order


def closest_to_mean_select(features: torch.Tensor, k: int) -> list[int]:
    """The k samples whose L2-normalised features are closest to the normalised class mean, closest first.

    (With unit-norm features this ranks by cosine similarity to the mean, so normalising the mean or not gives
    the same order.) Ties go to the lowest index.
    """
    f = _normalised(features)
    n = f.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return []
    mu = torch.nn.functional.normalize(f.mean(dim=0), p=2, dim=0)
    dist = ((f - mu) ** 2).sum(dim=1)
    # Round so that float noise cannot reorder equal distances; the stable sort then keeps index order.
    dist = torch.round(dist, decimals=12)
    return torch.sort(dist, stable=True).indices[:k].tolist()


def random_select(n: int, k: int, generator: torch.Generator | np.random.Generator) -> list[int]:
    """k distinct indices out of range(n), in draw order (the original DyTox drew WITH replacement: fixed here)."""
    k = max(0, min(int(k), int(n)))
    if isinstance(generator, torch.Generator):
        perm = torch.randperm(int(n), generator=generator).tolist()
    elif isinstance(generator, np.random.Generator):
        perm = generator.permutation(int(n)).tolist()
    else:
        raise TypeError(f"generator must be a torch.Generator or numpy Generator, got {type(generator).__name__}")
    return [int(i) for i in perm[:k]]


def shard_split(indices: np.ndarray, shards: int, seed: int, label: int) -> list[np.ndarray]:
    """A class's sample indices cut into `shards` fixed shares: a permutation seeded by (seed, label), cut into
    near-equal contiguous parts, each part back in data order (so ties still go to the lowest index)."""
    if shards == 1:
        return [np.asarray(indices)]
    perm = np.random.default_rng([int(seed), int(label), 7_919]).permutation(len(indices))
    return [np.sort(np.asarray(indices)[part]) for part in np.array_split(perm, shards)]


class RehearsalMemory:
    """Class-balanced exemplar memory.

    Exactly one budget: `memory_size` (fixed TOTAL budget, `memory_size // seen classes` per class, old classes
    trimmed to their first picks as classes arrive; iCaRL / DyTox) or `per_class` (fixed per-class budget).
    A budget of 0 means no memory. `selection` is one of herding | closest | random; random draws with a
    generator seeded by (seed, label), so a class's picks do not depend on which other classes came before.
    `placement` global | distributed and `shards`: see the module docstring (global = one shard of all the data).
    """

    def __init__(self, memory_size: int | None = None, per_class: int | None = None, selection: str = "herding",
                 seed: int = 0, placement: str = "global", shards: int = 2) -> None:
        if (memory_size is None) == (per_class is None):
            raise ConfigError("set exactly one of memory_size (total budget) or memory_per_class (per class budget)")
        budget = memory_size if memory_size is not None else per_class
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            name = "memory_size" if memory_size is not None else "memory_per_class"
            raise ConfigError(f"{name} must be a non-negative integer, got {budget!r}")
        if selection not in SELECTIONS:
            raise ConfigError(f"unknown memory_selection {selection!r}: use one of {', '.join(SELECTIONS)}")
        if placement not in MEMORY_MODES:
            raise ConfigError(f"unknown memory_mode {placement!r}: use one of {', '.join(MEMORY_MODES)}")
        if placement == "distributed" and (isinstance(shards, bool) or not isinstance(shards, (int, np.integer))
                                           or shards < 1):
            raise ConfigError(f"memory_shards must be an integer >= 1, got {shards!r}")
        self.mode = "memory_size" if memory_size is not None else "per_class"
        self.budget = int(budget)
        self.selection = selection
        self.seed = int(seed)
        self.placement = placement
        self.shards = int(shards) if placement == "distributed" else 1
        self.num_seen_classes = 0
        self._x: dict[int, list[np.ndarray]] = {}        # label -> per shard, the stored samples in pick order
        self._indices: dict[int, list[list[int]]] = {}   # label -> per shard, the picks' indices in update()'s x
        self._template: np.ndarray | None = None         # an empty array with the samples' dtype and shape

    # ---- budget ------------------------------------------------------------------------------
    @property
    def memory_size(self) -> int | None:
        return self.budget if self.mode == "memory_size" else None

    @property
    def per_class(self) -> int | None:
        return self.budget if self.mode == "per_class" else None

    def quota(self, num_seen_classes: int) -> int:
        """Samples kept per class AND per shard once `num_seen_classes` classes have been seen (a class holds
        `shards` times this; global: one shard)."""
        budget = self.budget // self.shards
        if self.mode == "per_class":
            return budget
        return budget // max(1, int(num_seen_classes))

    # ---- selection ---------------------------------------------------------------------------
    def _select(self, label: int, shard: int, features: torch.Tensor | None, n: int, k: int) -> list[int]:
        if self.selection == "random":
            key = [self.seed, int(label)] if self.shards == 1 else [self.seed, int(label), shard]
            return random_select(n, k, np.random.default_rng(key))
        assert features is not None
        if self.selection == "herding":
            return herding_select(features, k)
        return closest_to_mean_select(features, k)

    def update(self, x: np.ndarray, y: np.ndarray, features: torch.Tensor | None, num_seen_classes: int) -> None:
        """Trim old classes to the new quota, then select exemplars for every class present in `y`.

        `x`, `y` (and `features`, row-aligned; None only for random selection) are the WHOLE data of the new
        classes, gathered in one process. A class already in memory is selected again from scratch.
        """
        x = np.asarray(x)
        y = np.asarray(y)
        if len(x) != len(y) or (features is not None and len(features) != len(y)):
            raise ValueError(f"x, y and features must have the same length, got {len(x)}, {len(y)}, "
                             f"{None if features is None else len(features)}")
        labels = [int(c) for c in np.unique(y)]
        stored = set(self._x) | set(labels)
        if num_seen_classes < len(stored):
            raise ValueError(f"num_seen_classes={num_seen_classes} but {len(stored)} classes would be in memory")
        self._template = x[:0].copy()
        self.reduce(num_seen_classes)
        k = self.quota(num_seen_classes)
        if k == 0:
            for label in labels:
                self._drop(label)
            return
        if self.selection != "random" and features is None:
            raise ValueError(f"{self.selection} selection needs features; only random selection works without")
        for label in labels:
            xs, picked = [], []
            for shard, idx in enumerate(shard_split(np.flatnonzero(y == label), self.shards, self.seed, label)):
                feats = None if features is None else features[torch.as_tensor(idx, device=features.device)]
                picks = idx[np.asarray(self._select(label, shard, feats, len(idx), k), dtype=np.int64)]
                xs.append(x[picks])                      # fancy indexing copies: the task data can be freed
                picked.append([int(i) for i in picks])
            self._x[label], self._indices[label] = xs, picked

    def reduce(self, num_seen_classes: int) -> None:
        """Keep each class's (each shard's) first `quota(num_seen_classes)` picks."""
        self.num_seen_classes = max(self.num_seen_classes, int(num_seen_classes))
        k = self.quota(num_seen_classes)
        for label in list(self._x):
            if k == 0:
                self._drop(label)
            else:
                self._x[label] = [part[:k] for part in self._x[label]]
                self._indices[label] = [part[:k] for part in self._indices[label]]

    def _drop(self, label: int) -> None:
        self._x.pop(label, None)
        self._indices.pop(label, None)

    # ---- access ------------------------------------------------------------------------------
    def get(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of every stored sample, classes in label order, each class shard by shard in pick order."""
        labels = self.classes
        if not labels:
            x = self._template if self._template is not None else np.zeros((0,), dtype=np.uint8)
            return x.copy(), np.zeros((0,), dtype=np.int64)
        parts = [part for c in labels for part in self._x[c]]
        x = np.concatenate(parts)
        y = np.concatenate([np.full(self._count(c), c, dtype=np.int64) for c in labels])
        return x, y

    def _count(self, label: int) -> int:
        return sum(len(part) for part in self._x[label])

    @property
    def classes(self) -> list[int]:
        return sorted(self._x)

    def selected_indices(self, label: int) -> list[int]:
        """The picks of `label`, shard by shard in pick order, as indices into the `x` given to `update`."""
        return [i for part in self._indices.get(int(label), []) for i in part]

    def shard_indices(self, label: int) -> list[list[int]]:
        """The picks of `label` per shard (one list in global mode)."""
        return [list(part) for part in self._indices.get(int(label), [])]

    def __len__(self) -> int:
        return sum(self._count(c) for c in self._x)

    def __repr__(self) -> str:
        where = "" if self.shards == 1 else f", distributed over {self.shards} shards"
        return (f"RehearsalMemory({self.mode}={self.budget}, selection={self.selection!r}{where}, "
                f"classes={len(self._x)}, samples={len(self)})")

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors, ints, strings and lists only, so `torch.load(weights_only=True)` reads it back."""
        labels = self.classes
        x, _ = self.get()
        x_state: torch.Tensor | list[str]
        if x.dtype.kind in "OUS":                        # path strings
            x_kind, x_state = ("object" if x.dtype.kind == "O" else "str"), [str(v) for v in x]
        else:
            x_kind, x_state = "array", torch.from_numpy(np.ascontiguousarray(x)).clone()
        return {
            "version": 2, "mode": self.mode, "budget": self.budget, "selection": self.selection,
            "placement": self.placement, "shards": self.shards,
            "seed": self.seed, "num_seen_classes": self.num_seen_classes,
            "classes": labels, "counts": [self._count(c) for c in labels],
            "indices": [self.selected_indices(c) for c in labels],
            "shard_counts": [[len(part) for part in self._x[c]] for c in labels],
            "x_kind": x_kind, "x": x_state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the contents; the budget, selection and placement must match this memory's."""
        mine = (self.mode, self.budget, self.selection, self.placement, self.shards)
        theirs = (state["mode"], int(state["budget"]), state["selection"], state.get("placement", "global"),
                  int(state.get("shards", 1)))
        if mine != theirs:
            raise CheckpointError(f"checkpoint memory is {theirs[0]}={theirs[1]} ({theirs[2]}, {theirs[3]} memory"
                                  f"{'' if theirs[4] == 1 else f' over {theirs[4]} shards'}) but the config says "
                                  f"{mine[0]}={mine[1]} ({mine[2]}, {mine[3]}"
                                  f"{'' if mine[4] == 1 else f' over {mine[4]} shards'}); resume with the same "
                                  "memory options")
        self.seed = int(state["seed"])
        self.num_seen_classes = int(state["num_seen_classes"])
        if state["x_kind"] == "array":
            x = state["x"].numpy()
        else:
            x = np.array(state["x"], dtype=object if state["x_kind"] == "object" else str)
        self._template = x[:0].copy()
        self._x, self._indices = {}, {}
        shard_counts = state.get("shard_counts") or [[int(c)] for c in state["counts"]]   # version 1: one shard
        start = 0
        for label, counts, picks in zip(state["classes"], shard_counts, state["indices"]):
            xs, idx, offset = [], [], 0
            for count in counts:
                xs.append(x[start:start + int(count)])
                idx.append([int(i) for i in picks[offset:offset + int(count)]])
                start, offset = start + int(count), offset + int(count)
            self._x[int(label)], self._indices[int(label)] = xs, idx

    @classmethod
    def from_state_dict(cls, state: dict) -> "RehearsalMemory":
        budget = int(state["budget"])
        memory = cls(memory_size=budget if state["mode"] == "memory_size" else None,
                     per_class=budget if state["mode"] == "per_class" else None,
                     selection=state["selection"], seed=int(state["seed"]),
                     placement=state.get("placement", "global"), shards=int(state.get("shards", 1)))
        memory.load_state_dict(state)
        return memory
