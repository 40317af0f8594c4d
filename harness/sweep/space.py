"""Sweep search spaces (Ray Tune's vocabulary in a YAML file), checked before Ray starts; the validation split
of the tuning protocol; the best-config YAML.

A space file maps option keys (the flat keys of benchmarks/recipes/defaults.yaml and the method's recipe) to
either a fixed value or ONE distribution:

    lr: {loguniform: [1.0e-3, 1.0e-1]}      # uniform, quniform [lo, hi, q], loguniform, qloguniform
    epochs: {randint: [1, 4]}               # randint / lograndint: hi EXCLUDED (Tune's rule); qrandint [lo, hi, q]
    memory_size: {choice: [500, 1000]}      # sampled (random / optuna); enumerated by --search grid
    aux_weight: {grid: [0.5, 1.0]}          # grid_search: every value, in every sample (also `grid_search`)
    weight_decay: {randn: [5.0e-4, 1.0e-4]} # randn [mean, sd], qrandn [mean, sd, q]
    incremental_lr: null                    # a fixed value (null: later tasks use lr)

Nothing here imports Ray: the file is validated (one ConfigError line per mistake) before Ray is started, and
The validation split itself runs inside the trials: harness.data.base.validation_split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError
from harness.tracking.store import plain

# name -> number of arguments (None: a non-empty list of values)
DISTRIBUTIONS: dict[str, int | None] = {
    "grid": None, "choice": None,
    "uniform": 2, "quniform": 3, "loguniform": 2, "qloguniform": 3,
    "randint": 2, "qrandint": 3, "lograndint": 2, "qlograndint": 3,
    "randn": 2, "qrandn": 3,
}
ALIASES = {"grid_search": "grid", "categorical": "choice"}
INTEGER = {"randint", "qrandint", "lograndint", "qlograndint"}
LOG = {"loguniform", "qloguniform", "lograndint", "qlograndint"}
CONTINUOUS = {"uniform", "quniform", "loguniform", "qloguniform", "randn", "qrandn"}
SEARCHES = ("random", "grid", "optuna")

# Keys that define the benchmark or the machine, not the learner: tuning them is a mistake (or a leak: the
# class order and the seed are what a sweep must NOT overfit).
NOT_TUNABLE = {"dataset", "data_path", "download", "initial_increment", "increment", "class_order", "seed",
               "device", "num_workers", "cpus_per_worker", "gpus_per_worker", "loader_workers", "fault_at_task",
               "eval_batch_size", "orders", "seeds", "name", "description", "recipe", "budget", "method", "suite",
               "output_dir", "options_files", "recipe_files"}


@dataclass(frozen=True)
class Param:
    """One key of a space: `kind` is "fixed" or a distribution name; `args` its values or bounds (+ q)."""

    key: str
    kind: str
    args: tuple

    @property
    def swept(self) -> bool:
        return self.kind != "fixed"

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.key}={self.args[0]!r}"
        return f"{self.key}~{self.kind}{list(self.args)}"

    def to_tune(self, search: str) -> Any:
        """The Tune search-space object (Ray imported here, after validation)."""
        from ray import tune

        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "grid" or (self.kind == "choice" and search == "grid"):
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)     # uniform(lo, hi), qrandint(lo, hi, q), randn(mean, sd) ...


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    source: str

    @property
    def swept(self) -> list[str]:
        return [k for k, p in self.params.items() if p.swept]

    def grid_size(self, search: str) -> int:
        """Points of the grid part (Tune multiplies it by num_samples)."""
        size = 1
        for p in self.params.values():
            if p.kind == "grid" or (p.kind == "choice" and search == "grid"):
                size *= len(p.args)
        return size

    def to_tune(self, search: str) -> dict[str, Any]:
        return {k: p.to_tune(search) for k, p in self.params.items()}

    def fixed(self) -> dict[str, Any]:
        return {k: p.args[0] for k, p in self.params.items() if not p.swept}

    def as_yaml_dict(self) -> dict[str, Any]:
        """The space as it was understood (logged with the sweep's parent run)."""
        return {k: (p.args[0] if not p.swept else {p.kind: list(p.args)}) for k, p in self.params.items()}


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_param(key: str, raw: Any, where: str) -> Param:
    if not (isinstance(raw, dict) and len(raw) == 1 and isinstance(next(iter(raw)), str)):
        if isinstance(raw, dict):
            raise ConfigError(f"{where}: {key} must be a fixed value or ONE distribution such as "
                              f"{{loguniform: [1e-3, 1e-1]}}, got {raw!r}"[:300])
        return Param(key, "fixed", (raw,))
    name, args = next(iter(raw.items()))
    kind = ALIASES.get(name, name)
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key}: unknown distribution {name!r}; use one of "
                          f"{', '.join(sorted([*DISTRIBUTIONS, *ALIASES]))}")
    arity = DISTRIBUTIONS[kind]
    if arity is None:
        if not isinstance(args, list):
            raise ConfigError(f"{where}: {key}: {name} takes a list of values, e.g. {{{name}: [500, 1000]}}")
        if not args:
            raise ConfigError(f"{where}: {key}: {name} has no values; give at least one, e.g. {{{name}: [500, 1000]}}")
        return Param(key, kind, tuple(args))
    if not isinstance(args, list) or len(args) != arity or not all(_num(a) for a in args):
        form = "[low, high, q]" if arity == 3 and not kind.endswith("randn") else \
            "[mean, sd, q]" if kind == "qrandn" else "[mean, sd]" if kind == "randn" else "[low, high]"
        raise ConfigError(f"{where}: {key}: {name} takes {arity} numbers {form}, got {args!r}"[:300])
    if kind in ("randn", "qrandn"):
        if args[1] <= 0:
            raise ConfigError(f"{where}: {key}: {name} needs sd > 0, got {args[1]}")
    else:
        low, high = args[0], args[1]
        if low > high:
            raise ConfigError(f"{where}: {key}: {name} low {low} > high {high}; swap them")
        if kind in INTEGER:
            if not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: {key}: {name} takes integers, got {args!r}")
            if kind in ("randint", "lograndint") and low >= high:
                raise ConfigError(f"{where}: {key}: {name} [{low}, {high}] is empty (high is excluded, as in Tune); "
                                  f"use [{low}, {low + 1}] for the single value {low}")
        elif low == high:
            raise ConfigError(f"{where}: {key}: {name} low == high == {low}; give a range or the fixed value "
                              f"`{key}: {low}`")
        if kind in LOG and low <= 0:
            raise ConfigError(f"{where}: {key}: {name} needs low > 0 (a log scale), got {low}")
    if arity == 3 and args[2] <= 0:
        raise ConfigError(f"{where}: {key}: {name} needs q > 0, got {args[2]}")
    return Param(key, kind, tuple(args))


def option_keys(method: str, suite: str, recipe: str | None = None) -> tuple[set[str], dict[str, str | None]]:
    """(option keys the method accepts on this suite, the method's option aliases) -- the rules
    harness.config.resolve_config applies to --options files."""
    from harness.config.compose import defaults, load_suite, suite_recipe
    from harness.config.catalog import get_method

    method_cls = get_method(method)
    suite_cfg = load_suite(suite)
    recipe_cfg, _ = suite_recipe(method, suite_cfg, recipe)
    return set(defaults()) | set(recipe_cfg), dict(method_cls.option_aliases)


def parse_space(data: Any, where: str, known: set[str], aliases: dict[str, str | None] | None = None,
                base: dict | None = None, search: str = "random") -> SearchSpace:
    """Check a space mapping against the method's option keys; ConfigError (one line) on the first mistake.

    `base`: the resolved config the sweep starts from, to catch a continuous distribution on an integer
    option (e.g. `epochs: {uniform: ...}` would hand the loop 2.7 epochs)."""
    aliases = aliases or {}
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where} must be a non-empty mapping of option: distribution, e.g. "
                          "`lr: {loguniform: [1.0e-3, 1.0e-1]}`")
    if search not in SEARCHES:
        raise ConfigError(f"unknown --search {search!r}; use one of {', '.join(SEARCHES)}")
    params: dict[str, Param] = {}
    for raw_key, raw in data.items():
        key = str(raw_key).replace("-", "_")
        if key in aliases:
            if aliases[key] is None:
                raise ConfigError(f"{where}: {key} is accepted for compatibility but has no effect here; remove it")
            key = aliases[key]
        if key in NOT_TUNABLE:
            raise ConfigError(f"{where}: {key} defines the benchmark, not a hyper-parameter; set it in the suite "
                              "or with --options / --set, not in a sweep space")
        if key not in known:
            close = [k for k in sorted(known - NOT_TUNABLE) if k.split("_")[0] == key.split("_")[0]][:5]
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r} for this method{hint}; space keys must be option "
                              "keys of benchmarks/recipes/defaults.yaml or the method's recipe")
        if key in params:
            raise ConfigError(f"{where}: {key} is given twice (an alias and its option?)")
        param = _parse_param(key, raw, where)
        default = (base or {}).get(key)
        if (param.kind in CONTINUOUS and isinstance(default, int) and not isinstance(default, bool)
                and not (param.kind.startswith("q") and all(float(a).is_integer() for a in param.args))):
            raise ConfigError(f"{where}: {key} takes integers (default {default}) but {param.kind} draws real "
                              "numbers; use randint, qrandint, lograndint or choice")
        if search == "grid" and param.kind not in ("fixed", "grid", "choice"):
            raise ConfigError(f"{where}: {key}: --search grid enumerates grid/choice values only, not {param.kind}; "
                              "list the values with {choice: [...]} or use --search random / optuna")
        if search == "optuna" and param.kind == "grid":
            raise ConfigError(f"{where}: {key}: optuna does not take grid values; use {{choice: [...]}} or "
                              "--search random / grid")
        params[key] = param
    space = SearchSpace(params, where)
    if not space.swept:
        raise ConfigError(f"{where} sweeps nothing (every key has a fixed value); give at least one distribution")
    return space


def load_space(path: str | Path, method: str, suite: str, recipe: str | None = None, base: dict | None = None,
               search: str = "random") -> SearchSpace:
    from harness.config.compose import load_yaml

    known, aliases = option_keys(method, suite, recipe)
    return parse_space(load_yaml(path), str(path), known, aliases, base, search)


# ---------------------------------------------------------------------------------------------------------
# The best configuration
# ---------------------------------------------------------------------------------------------------------
def best_config_yaml(values: dict[str, Any], header: list[str]) -> str:
    """A YAML options file: a comment header, then only the space's keys (as `--options best.yaml` takes)."""
    body = yaml.safe_dump(plain(values), sort_keys=True, default_flow_style=False)
    return "".join(f"# {line}\n" for line in header) + body
