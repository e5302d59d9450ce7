"""One registry: (kind, name) -> implementation and its hooks, used by recipes and the CLI.

A method brings what the pipeline needs to run it as hooks (all optional), so that the
pipeline names no method: `section` and `config` (its recipe section and the options dataclass
that section is validated against; `recipe.section(section, config)` reads it), `options(recipe)
-> dict` (keyword options bound to the call, e.g. from its section), `check(recipe)` (raises
QuantkitError before anything is loaded), `prepare(model, recipe)` (changes the model before
calibration: RSQ's rotation), `prepare_block(recipe)` (when that change touches each block
alone: a function (model, block, index, first) doing it to one block, which a streamed run
applies to the block's weights each time it reads them, first=True the first time; None
otherwise) and `token_weights(recipe)` (per-block calibration token weights
for the Hessians, or None).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from quantkit.errors import QuantkitError

_REGISTRY: dict[str, dict[str, Any]] = {}
_HOOKS: dict[tuple[str, str], "Hooks"] = {}


@dataclass(frozen=True)
class Hooks:
    section: str | None = None
    config: type | None = None
    options: Callable[[Any], dict] | None = None
    check: Callable[[Any], None] | None = None
    prepare: Callable[[Any, Any], None] | None = None
    prepare_block: Callable[[Any], Callable[[Any, Any, int, bool], None] | None] | None = None
    token_weights: Callable[[Any], Any] | None = None


def register(kind: str, name: str, **hooks: Any) -> Callable[[Any], Any]:
    """Decorator: make `obj` available as `name` among the `kind`s (compressor, allocator...),
    with its Hooks."""
    def deco(obj: Any) -> Any:
        _REGISTRY.setdefault(kind, {})[name] = obj
        _HOOKS[(kind, name)] = Hooks(**hooks)
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


def hooks(kind: str, name: str) -> Hooks:
    """The hooks `name` registered with (checked to exist, like get)."""
    get(kind, name)
    return _HOOKS[(kind, name)]


def sections() -> dict[str, type]:
    """Every recipe section a registered method declares, with its options dataclass."""
    return {h.section: h.config for h in _HOOKS.values() if h.section is not None}
