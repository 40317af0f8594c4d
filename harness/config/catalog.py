"""The catalogue of methods: imports every module of the `methods` package (running its @register_method) and
looks methods up by name for the CLI, the config layer and the trial."""
from __future__ import annotations

import importlib
import pkgutil

import methods
from harness.core.registry import registered_methods
from harness.errors import ConfigError


def _import_methods() -> None:
    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"methods.{info.name}")


def list_methods() -> list[str]:
    _import_methods()
    return sorted(registered_methods())


def get_method(name: str) -> type:
    _import_methods()
    found = registered_methods()
    if name not in found:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(found))} (see --list-methods)")
    return found[name]
