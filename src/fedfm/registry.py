"""Name → component registries, filled by decorators, so adding a component edits no central list.

A component may bring its own settings: ``register(name, options=Model)`` with a pydantic model
whose fields all have defaults. Its fields join the config section that names the component
(``[strategy]`` for an aggregator, objective or server optimizer, ``[pipeline]`` for a transform,
``[attack]`` for an attack, ...: the section with the ``Registered(kind)`` field), where they
are validated, documented in the configuration reference and refused with a did-you-mean when
misspelt, like the built-in fields (``fedfm.config.options.add_options``). A component with many
settings may instead bring a section of its own: ``register(name, options=Model,
section="offsite")`` makes ``[offsite]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# called as listener(kind, name, options, section) for every registration that brings options,
# and for those made before the listener subscribed (the configuration subscribes on import)
_LISTENERS: list[Callable[[str, str, Any, str | None], None]] = []
_WITH_OPTIONS: list[tuple[str, str, Any, str | None]] = []


def on_options(listener: Callable[[str, str, Any, str | None], None]) -> None:
    """Call ``listener(kind, name, options, section)`` for every component registered with options
    (``section``: the name of the section they form, or None when they join the naming one)."""
    _LISTENERS.append(listener)
    for entry in list(_WITH_OPTIONS):
        listener(*entry)


class Registry(Generic[T]):
    """A named collection of components of one kind (aggregators, partitioners, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, options: Any = None, section: str | None = None) -> Callable[[T], T]:
        if section is not None and options is None:
            raise TypeError(f"{self.kind} {name!r}: a section of its own needs its options model")

        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if options is not None:
                _check_options(self.kind, name, options)
                for listener in _LISTENERS:  # the configuration takes its fields (or refuses them)
                    listener(self.kind, name, options, section)
                _WITH_OPTIONS.append((self.kind, name, options, section))
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items


def load_plugins(modules) -> None:
    """Import each named module (a plug-in package registers its components on import)."""
    import importlib

    for name in modules:
        name = name.strip()
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"plug-in module {name!r} does not import: {err}") from err


def bind_options(component: Callable, section: Any, **given: Any) -> dict[str, Any]:
    """``given`` plus, for every keyword-only parameter of ``component`` that ``section`` has a
    field of that name for, the field's value: how a function component receives its options."""
    import inspect

    params = inspect.signature(component).parameters
    bound = {
        name: getattr(section, name)
        for name, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in given and hasattr(section, name)
    }
    return {**given, **bound}


def _check_options(kind: str, name: str, options: Any) -> None:
    fields = getattr(options, "model_fields", None)
    if not isinstance(fields, dict):
        raise TypeError(f"{kind} {name!r}: options must be a pydantic model class")
    required = [f for f, info in fields.items() if info.is_required()]
    if required:
        raise TypeError(f"{kind} {name!r}: every option needs a default ({', '.join(required)} has none)")


# Where each kind of pluggable component is registered, looked up by kind name. Each component
# module owns its registry and registers its members with a decorator; this index only says
# which module holds which kind, so adding a component edits no list here.
_KINDS = {
    "aggregator": ("fedfm.algorithms.aggregators", "AGGREGATORS"),
    "server optimizer": ("fedfm.algorithms.server_optimizers", "SERVER_OPTIMIZERS"),
    "objective": ("fedfm.algorithms.objectives", "OBJECTIVES"),
    "partitioner": ("fedfm.data.partition", "PARTITIONERS"),
    "engine": ("fedfm.engines", "ENGINES"),
    "dataset": ("fedfm.data.sources", "DATASETS"),
    "model": ("fedfm.models.resolve", "MODELS"),
    "compression method": ("fedfm.transforms.compression", "CODECS"),
    "attack": ("fedfm.attacks", "ATTACKS"),
    "task": ("fedfm.tasks", "TASKS"),
    "DP mode": ("fedfm.privacy.guarantees", "DP_MODES"),
    "LoRA aggregation mode": ("fedfm.algorithms.lora", "LORA_AGGREGATION"),
    "synthetic mode": ("fedfm.data.synthetic", "SYNTHETIC_MODES"),
    "transform": ("fedfm.transforms", "TRANSFORMS"),
    "protocol": ("fedfm.protocols", "PROTOCOLS"),
    "sharing mode": ("fedfm.sharing", "SHARING_MODES"),
    "personalization method": ("fedfm.algorithms.personal", "PERSONAL_METHODS"),
    "tracker": ("fedfm.reporting.trackers", "TRACKERS"),
}


def load_components() -> None:
    """Import every module that registers a kind of component, so that their options have joined
    the config sections before any config is read (``fedfm.config`` calls this when first imported)."""
    import importlib

    for module, _ in _KINDS.values():
        importlib.import_module(module)


def registry_for(kind: str) -> Registry:
    """The registry of ``kind`` (imported on first use: the index names modules, so the
    configuration asks for registries without importing the component packages itself)."""
    import importlib

    module, attr = _KINDS[kind]
    return getattr(importlib.import_module(module), attr)
