"""The method registry: `@register_method("name")` on a Method subclass. Lookup by name, which imports every
module of the `methods` package first, lives one layer up (harness.config.catalog)."""
from __future__ import annotations

from typing import Callable

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


def registered_methods() -> dict[str, type]:
    """The methods registered so far (name -> class)."""
    return dict(_METHODS)
