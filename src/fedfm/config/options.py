"""Component options in the config: which sections name which kinds of component, and adding a
registered component's options model to the section that names it (``fedfm.registry``)."""

from __future__ import annotations

import copy
import typing

from pydantic import BaseModel, WithJsonSchema


def registered_kinds(section: type[BaseModel]) -> list[str]:
    """The component kinds whose names ``section`` holds (its ``Registered(kind)`` fields)."""
    kinds = []
    for field in section.model_fields.values():
        marks = list(field.metadata)
        for arg in typing.get_args(field.annotation):
            marks.extend(getattr(arg, "__metadata__", ()))
        kinds.extend(
            m.json_schema["registry"]
            for m in marks
            if isinstance(m, WithJsonSchema)
            and isinstance(m.json_schema, dict)
            and "registry" in m.json_schema
        )
    return kinds


def add_options(section: type[BaseModel], kind: str, name: str, options: type[BaseModel]) -> None:
    """Add the fields of component ``name``'s options model to ``section`` (then rebuild every
    model that holds the section). A field the section already has must be the same field (two
    components may share an option, like ``byzantine``); otherwise it is a ``TypeError``."""
    fields = section.__pydantic_fields__
    for field_name, info in options.model_fields.items():
        have = fields.get(field_name)
        if have is not None:
            same = have.annotation == info.annotation and have.get_default(call_default_factory=True) == (
                info.get_default(call_default_factory=True)
            )
            if not same:
                raise TypeError(
                    f"{kind} {name!r}: option {field_name!r} is already a different field of "
                    f"[{_section_name(section)}]; choose another name"
                )
            continue
        added = copy.copy(info)
        extra = dict(added.json_schema_extra or {}) if isinstance(added.json_schema_extra, dict) else {}
        added.json_schema_extra = {**extra, "component": f"{kind} {name!r}", "component_kind": kind}
        fields[field_name] = added
    section.model_rebuild(force=True)


def _section_name(section: type[BaseModel]) -> str:
    return section.__name__.removesuffix("Section").lower()
