"""Options: harness defaults < suite < method recipe < --options files (in order) < CLI flags.

Everything resolves to ONE flat dict (DyTox-style keys, so DyTox's own option files load unchanged).
Unlike DyTox's main.py, command-line flags override the files, never the reverse.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SUITES_DIR = BENCHMARKS / "suites"
RECIPES_DIR = BENCHMARKS / "recipes"

# Keys a suite file may hold besides ordinary options.
SUITE_KEYS = {"name", "description", "orders", "seeds", "recipe", "recipe_fallback", "budget"}


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with yaml.safe_load; one clear error line for every way it can go wrong."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"options file {path} {what}: give the path of a .yaml file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"cannot read options file {path} ({reason}); give a readable YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of option: value, got {type(data).__name__}")
    return data


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name: str) -> dict:
    path = SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        path = Path(name)
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            raise ConfigError(f"unknown suite {name!r}; available: {', '.join(list_suites())} (see --list-suites)")
    suite = load_yaml(path)
    suite.setdefault("name", path.stem)
    return suite


def defaults() -> dict:
    return load_yaml(RECIPES_DIR / "defaults.yaml")


def method_recipe(method: str, recipe: str | None, explicit: bool,
                  suite: str | None = None) -> tuple[dict, list[str]]:
    """The method's default.yaml, then the named recipe (from --recipe or the suite). A recipe the method lacks
    is an error unless `explicit` is False (the suite allows the fallback: `recipe_fallback: default`)."""
    out, used = {}, []
    base = RECIPES_DIR / method / "default.yaml"
    if base.is_file():
        out.update(load_yaml(base))
        used.append(str(base.relative_to(ROOT)))
    if recipe and recipe != "default":
        path = RECIPES_DIR / method / f"{recipe}.yaml"
        if path.is_file():
            out.update(load_yaml(path))
            used.append(str(path.relative_to(ROOT)))
        elif explicit and suite is not None:
            # a suite's recipe carries its budget (e.g. `cpu`): a method without it would silently get its
            # full paper recipe instead
            raise ConfigError(f"{method} cannot run on suite {suite}: it has no {recipe!r} recipe "
                              f"(benchmarks/recipes/{method}/{recipe}.yaml); add one, or run another method")
        elif explicit:
            available = sorted(p.stem for p in (RECIPES_DIR / method).glob("*.yaml"))
            raise ConfigError(f"no recipe {recipe!r} for method {method!r}; available: {', '.join(available)}")
    return out, used


def suite_recipe(method: str, suite_cfg: dict, recipe: str | None = None) -> tuple[dict, list[str]]:
    """The recipe `method` runs on a suite: --recipe when given, else the suite's `recipe`. Either must exist for
    the method, except where the suite says `recipe_fallback: default` (the CIFAR-100 suites: a method's
    default.yaml is its paper's CIFAR-100 recipe)."""
    if recipe is not None:
        return method_recipe(method, recipe, explicit=True)
    fallback = suite_cfg.get("recipe_fallback")
    if fallback not in (None, "default"):
        raise ConfigError(f"suite {suite_cfg['name']}: recipe_fallback must be `default` or absent, got {fallback!r}")
    return method_recipe(method, suite_cfg.get("recipe"), explicit=fallback is None, suite=suite_cfg["name"])


def _apply(config: dict, updates: dict, known: set[str], method_cls: type, source: str,
           origins: dict[str, str] | None = None) -> None:
    aliases, value_maps = method_cls.option_aliases, method_cls.option_value_maps
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ConfigError(f"option names must be strings, got {key!r} in {source}")
        key = key.replace("-", "_")
        if key in value_maps:
            # A method's original-code value -> ours (DyTox `data_set: CIFAR` -> cifar100), keyed by the key as
            # written, before aliasing; it raises ConfigError for values the method does not implement.
            try:
                value = value_maps[key](value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        if key in aliases:
            target = aliases[key]
            if target is None:          # an original-code option with no meaning here: accepted, ignored
                continue
            key = target
        if key not in known:
            close = [k for k in sorted(known) if k.split("_")[0] == key.split("_")[0]][:5]
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown option {key!r} in {source}{hint}; options are the harness's "
                              f"(benchmarks/recipes/defaults.yaml) and the method's own: declare one in "
                              f"benchmarks/recipes/{method_cls.name}/default.yaml")
        config[key] = value
        if origins is not None:
            origins[key] = source


def resolve_config(method: str, suite: str, options: Iterable[str] = (), overrides: dict | None = None,
                   recipe: str | None = None) -> dict:
    """Compose the flat config of a benchmark (before the order x seed grid is expanded)."""
    config, _ = compose_config(method, suite, options, overrides, recipe)
    validate(config)
    return config


def compose_config(method: str, suite: str, options: Iterable[str] = (), overrides: dict | None = None,
                   recipe: str | None = None) -> tuple[dict, dict[str, str]]:
    """The composed config, unchecked, and where each option was last set (for error lines; the pre-flight
    in harness.run.preflight checks both)."""
    from harness.config.catalog import get_method

    method_cls = get_method(method)
    config = defaults()
    origins = {key: "benchmarks/recipes/defaults.yaml" for key in config}
    suite_cfg = load_suite(suite)
    recipe_cfg, recipe_files = suite_recipe(method, suite_cfg, recipe)
    known = set(config) | set(recipe_cfg) | SUITE_KEYS
    _apply(config, {k: v for k, v in suite_cfg.items() if k not in SUITE_KEYS}, known, method_cls,
           f"suite {suite}", origins)
    _apply(config, recipe_cfg, known, method_cls, f"recipe {', '.join(recipe_files) or method}", origins)
    # A suite's `budget` (e.g. a few epochs for a CPU suite) overrides every method's recipe alike.
    budget = suite_cfg.get("budget") or {}
    if not isinstance(budget, dict):
        raise ConfigError(f"suite {suite}: `budget` must be a mapping of option: value, got {budget!r}")
    _apply(config, budget, known, method_cls, f"suite {suite} budget", origins)
    for path in options:
        _apply(config, load_yaml(path), known, method_cls, str(path), origins)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None and k not in ("orders", "seeds")}
    _apply(config, flags, known, method_cls, "command line", origins)
    config.update(method=method, suite=suite_cfg["name"], recipe_files=recipe_files,
                  options_files=[str(Path(p).resolve()) for p in options])
    overrides = overrides or {}
    # An explicit class_order (DyTox's order yaml files, or --set) replaces the suite's list of orders.
    explicit = config.get("class_order")
    if overrides.get("orders"):
        config["orders"] = list(overrides["orders"])
    elif explicit is not None:
        nested = isinstance(explicit, list) and explicit and isinstance(explicit[0], list)
        config["orders"] = explicit if nested else [explicit]
    else:
        orders = config.get("orders") or suite_cfg.get("orders", ["natural"])
        if not isinstance(orders, list):
            raise ConfigError(f"orders must be a list of class orders (names or lists of class ids), got {orders!r} "
                              f"in {origins.get('orders', f'suite {suite}')}")
        config["orders"] = list(orders)
    seeds = overrides.get("seeds") or config.get("seeds") or suite_cfg.get("seeds", [0])
    if not (isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        where = origins.get("seeds", "the command line" if overrides.get("seeds") else f"suite {suite}")
        raise ConfigError(f"seeds must be a list of integers, e.g. [0, 1, 2], got {seeds!r} in {where}")
    config["seeds"] = [int(s) for s in seeds]
    return config, origins


def check_required(config: dict) -> None:
    """The scenario keys every suite must give."""
    for key in ("dataset", "initial_increment", "increment"):
        if config.get(key) in (None, ""):
            raise ConfigError(f"option {key!r} is not set: the suite or an --options file must give it")


def validate(config: dict) -> None:
    """Checks that need several keys at once."""
    from harness.config.catalog import get_method
    from harness.config.memory import memory_budget

    check_required(config)
    for key in ("epochs", "batch_size"):
        if not isinstance(config.get(key), int) or config[key] < 0 or (key == "batch_size" and config[key] == 0):
            raise ConfigError(f"option {key!r} must be a {'positive' if key == 'batch_size' else 'non-negative'} "
                              f"integer, got {config.get(key)!r}")
    memory_budget(config, get_method(config["method"]))
    if not isinstance(config.get("num_workers"), int) or config["num_workers"] < 1:
        raise ConfigError(f"num_workers must be an integer >= 1, got {config.get('num_workers')!r}")
    if config["batch_size"] % config["num_workers"]:
        raise ConfigError(f"batch_size {config['batch_size']} is the GLOBAL batch and must be divisible by "
                          f"num_workers {config['num_workers']}")


def parse_value(text: str) -> Any:
    """`--set key=value` values are YAML scalars/lists: 3, 0.1, true, [1, 2], cosine."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"cannot parse value {text!r} in --set (use YAML syntax, e.g. 0.1, true, [60, 120])")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (every CLI's) -> {key: parsed value}; a later item wins over an earlier one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        if not key.strip():
            raise ConfigError(f"--set {item!r} has no option name; use KEY=VALUE, e.g. --set lr=0.05")
        out[key.strip()] = parse_value(value)
    return out


def config_hash(config: dict, exclude: Iterable[str] = ()) -> str:
    """Short stable hash of the options that change results (trial names use it to resume safely)."""
    skip = set(exclude)
    payload = json.dumps({k: v for k, v in sorted(config.items()) if k not in skip}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:8]
