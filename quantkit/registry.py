"""One registry: (kind, name) -> implementation, used by recipes and the CLI."""
from __future__ import annotations

from typing import Any, Callable

from quantkit.errors import QuantkitError

_REGISTRY: dict[str, dict[str, Any]] = {}


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: make `obj` available as `name` among the `kind`s (compressor, allocator...)."""
    def deco(obj: Any) -> Any:
        _REGISTRY.setdefault(kind, {})[name] = obj
        return obj
    return deco


def names(kind: str) -> list[str]:
    """Registered names of a kind, sorted."""
    return sorted(_REGISTRY.get(kind, {}))


def get(kind: str, name: str) -> Any:
    """The implementation registered as `name`, or a clear error listing the choices."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise QuantkitError(f"unknown {kind} {name!r}; choose one of: {', '.join(names(kind))}") from None
