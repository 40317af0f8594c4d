"""Rehearsal memory: exemplar selection (herding / closest-to-mean / random) and a class-balanced store.

Selection is done ONCE, in one process, on the whole data of a class, so results do not depend on the number of
workers: the original DyTox let every GPU herd its own memory on its own augmentations, which multiplied the
effective memory by the number of GPUs (its erratum). Every selector is a pure function of (features, budget)
-- plus the seed for `random` -- and returns the ordered picks (first pick first), so shrinking a class to its
first k picks is exactly what a k-budget selection would have chosen for herding and random.

The memory stores the raw samples (uint8 image rows or path strings) and the labels, not indices into a task
dataset, so it survives any reshuffling of the data it came from and can be checkpointed on its own.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.errors import CheckpointError, ConfigError

SELECTIONS = ("herding", "closest", "random")

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


class RehearsalMemory:
    """Class-balanced exemplar memory.

    Exactly one budget: `memory_size` (fixed TOTAL budget, `memory_size // seen classes` per class, old classes
    trimmed to their first picks as classes arrive; iCaRL / DyTox) or `per_class` (fixed per-class budget).
    A budget of 0 means no memory. `selection` is one of herding | closest | random; random draws with a
    generator seeded by (seed, label), so a class's picks do not depend on which other classes came before.
    """

    def __init__(self, memory_size: int | None = None, per_class: int | None = None, selection: str = "herding",
                 seed: int = 0) -> None:
        if (memory_size is None) == (per_class is None):
            raise ConfigError("set exactly one of memory_size (total budget) or memory_per_class (per class budget)")
        budget = memory_size if memory_size is not None else per_class
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            name = "memory_size" if memory_size is not None else "memory_per_class"
            raise ConfigError(f"{name} must be a non-negative integer, got {budget!r}")
        if selection not in SELECTIONS:
            raise ConfigError(f"unknown memory_selection {selection!r}: use one of {', '.join(SELECTIONS)}")
        self.mode = "memory_size" if memory_size is not None else "per_class"
        self.budget = int(budget)
        self.selection = selection
        self.seed = int(seed)
        self.num_seen_classes = 0
        self._x: dict[int, np.ndarray] = {}         # label -> stored samples, ordered picks
        self._indices: dict[int, list[int]] = {}    # label -> the picks' indices in the x given to update()
        self._template: np.ndarray | None = None    # an empty array with the samples' dtype and shape

    # ---- budget ------------------------------------------------------------------------------
    @property
    def memory_size(self) -> int | None:
        return self.budget if self.mode == "memory_size" else None

    @property
    def per_class(self) -> int | None:
        return self.budget if self.mode == "per_class" else None

    def quota(self, num_seen_classes: int) -> int:
        """Samples kept per class once `num_seen_classes` classes have been seen."""
        if self.mode == "per_class":
            return self.budget
        return self.budget // max(1, int(num_seen_classes))

    # ---- selection ---------------------------------------------------------------------------
    def _select(self, label: int, features: torch.Tensor | None, n: int, k: int) -> list[int]:
        if self.selection == "random":
            return random_select(n, k, np.random.default_rng([self.seed, int(label)]))
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
            idx = np.flatnonzero(y == label)
            feats = None if features is None else features[torch.as_tensor(idx, device=features.device)]
            picks = idx[np.asarray(self._select(label, feats, len(idx), k), dtype=np.int64)]
            self._x[label] = x[picks]                   # fancy indexing copies: the task data can be freed
            self._indices[label] = [int(i) for i in picks]

    def reduce(self, num_seen_classes: int) -> None:
        """Keep each class's first `quota(num_seen_classes)` picks."""
        self.num_seen_classes = max(self.num_seen_classes, int(num_seen_classes))
        k = self.quota(num_seen_classes)
        for label in list(self._x):
            if k == 0:
                self._drop(label)
            else:
                self._x[label] = self._x[label][:k]
                self._indices[label] = self._indices[label][:k]

    def _drop(self, label: int) -> None:
        self._x.pop(label, None)
        self._indices.pop(label, None)

    # ---- access ------------------------------------------------------------------------------
    def get(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of every stored sample, classes in label order, each class in pick order."""
        labels = self.classes
        if not labels:
            x = self._template if self._template is not None else np.zeros((0,), dtype=np.uint8)
            return x.copy(), np.zeros((0,), dtype=np.int64)
        x = np.concatenate([self._x[c] for c in labels])
        y = np.concatenate([np.full(len(self._x[c]), c, dtype=np.int64) for c in labels])
        return x, y

    @property
    def classes(self) -> list[int]:
        return sorted(self._x)

    def selected_indices(self, label: int) -> list[int]:
        """The picks of `label`, in pick order, as indices into the `x` that was given to `update`."""
        return list(self._indices.get(int(label), []))

    def __len__(self) -> int:
        return sum(len(v) for v in self._x.values())

    def __repr__(self) -> str:
        return (f"RehearsalMemory({self.mode}={self.budget}, selection={self.selection!r}, "
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
            "version": 1, "mode": self.mode, "budget": self.budget, "selection": self.selection,
            "seed": self.seed, "num_seen_classes": self.num_seen_classes,
            "classes": labels, "counts": [len(self._x[c]) for c in labels],
            "indices": [list(self._indices[c]) for c in labels],
            "x_kind": x_kind, "x": x_state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the contents; the budget and selection must match the ones this memory was built with."""
        mine = (self.mode, self.budget, self.selection)
        theirs = (state["mode"], int(state["budget"]), state["selection"])
        if mine != theirs:
            raise CheckpointError(f"checkpoint memory is {theirs[0]}={theirs[1]} ({theirs[2]}) but the config says "
                                  f"{mine[0]}={mine[1]} ({mine[2]}); resume with the same memory options")
        self.seed = int(state["seed"])
        self.num_seen_classes = int(state["num_seen_classes"])
        if state["x_kind"] == "array":
            x = state["x"].numpy()
        else:
            x = np.array(state["x"], dtype=object if state["x_kind"] == "object" else str)
        self._template = x[:0].copy()
        self._x, self._indices = {}, {}
        start = 0
        for label, count, picks in zip(state["classes"], state["counts"], state["indices"]):
            self._x[int(label)] = x[start:start + int(count)]
            self._indices[int(label)] = [int(i) for i in picks]
            start += int(count)

    @classmethod
    def from_state_dict(cls, state: dict) -> "RehearsalMemory":
        budget = int(state["budget"])
        memory = cls(memory_size=budget if state["mode"] == "memory_size" else None,
                     per_class=budget if state["mode"] == "per_class" else None,
                     selection=state["selection"], seed=int(state["seed"]))
        memory.load_state_dict(state)
        return memory
