"""Component options in the config: which sections name which kinds of component, and adding a
registered component's options model to the section that names it (``fedfm.registry``)."""

from __future__ import annotations

import copy
import typing

from pydantic import BaseModel, WithJsonSchema


def field_kind(field) -> tuple[str, bool] | None:
    """(kind, whether a list) of a field that names registered components (``Registered(kind)``
    or ``list[Registered(kind)]``), else None."""
    for marks, many in ((field.metadata, False),) + tuple(
        (getattr(arg, "__metadata__", ()), True) for arg in typing.get_args(field.annotation)
    ):
        for m in marks:
            if (
                isinstance(m, WithJsonSchema)
                and isinstance(m.json_schema, dict)
                and "registry" in m.json_schema
            ):
                return m.json_schema["registry"], many
    return None


def registered_kinds(section: type[BaseModel]) -> list[str]:
    """The component kinds whose names ``section`` holds (its ``Registered(kind)`` fields)."""
    found = (field_kind(field) for field in section.model_fields.values())
    return [named[0] for named in found if named is not None]


def add_options(section: type[BaseModel], kind: str, name: str, options: type[BaseModel]) -> None:
    """Add the fields of component ``name``'s options model to ``section`` and rebuild it (the
    caller rebuilds the models that hold the section). A field the section already has must be
    the same field (two components may share an option, like ``byzantine``); otherwise it is a
    ``TypeError`` and the section is left as it was."""
    fields = section.__pydantic_fields__
    new = {}
    for field_name, info in options.model_fields.items():
        have = fields.get(field_name)
        if have is None:
            new[field_name] = info
            continue
        default = info.get_default(call_default_factory=True)
        if have.annotation != info.annotation or have.get_default(call_default_factory=True) != default:
            raise TypeError(
                f"{kind} {name!r}: option {field_name!r} is already a different field of "
                f"[{_section_name(section)}]; choose another name"
            )
    for field_name, info in new.items():
        added = copy.copy(info)
        extra = dict(added.json_schema_extra or {}) if isinstance(added.json_schema_extra, dict) else {}
        added.json_schema_extra = {**extra, "component": f"{kind} {name!r}", "component_kind": kind}
        fields[field_name] = added
    section.model_rebuild(force=True)


def _section_name(section: type[BaseModel]) -> str:
    return section.__name__.removesuffix("Section").lower()
