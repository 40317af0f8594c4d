"""Method registry: `@register_method("name")` on a Method subclass, looked up by the CLI and the trial."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from harness.errors import ConfigError

_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator that makes a Method available as `--method name`."""

    def decorator(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice ({_METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _import_methods() -> None:
    # Importing the `methods` package runs every module's @register_method.
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"methods.{info.name}")


def list_methods() -> list[str]:
    _import_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    _import_methods()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))} (see --list-methods)")
    return _METHODS[name]
