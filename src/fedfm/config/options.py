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
    new, shared = {}, []
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
        shared.append(field_name)
    for field_name, info in new.items():
        added = copy.copy(info)
        extra = dict(added.json_schema_extra or {}) if isinstance(added.json_schema_extra, dict) else {}
        added.json_schema_extra = {**extra, **_marks(kind, [name])}
        fields[field_name] = added
    for field_name in shared:  # the same option of several components: each is named
        extra = fields[field_name].json_schema_extra
        if (
            isinstance(extra, dict)
            and extra.get("component_kind") == kind
            and name not in extra["components"]
        ):
            extra.update(_marks(kind, [*extra["components"], name]))
    section.model_rebuild(force=True)


def _marks(kind: str, names: list[str]) -> dict:
    """What the configuration reference says of an option: whose it is."""
    owners = f"{kind} {names[0]!r}" if len(names) == 1 else f"{kind}s " + ", ".join(map(repr, names))
    return {"component": owners, "components": names, "component_kind": kind}


def add_section(root: type[BaseModel], name: str, model: type[BaseModel], kind: str, owner: str) -> None:
    """Add ``[name]``, holding ``model``, to ``root`` (a component's section of its own) and
    rebuild it; a name the config already has is a ``TypeError``."""
    from pydantic import Field
    from pydantic.fields import FieldInfo

    if name in root.model_fields:
        raise TypeError(f"{kind} {owner!r}: the config already has a section [{name}]; choose another name")
    doc = " ".join((model.__doc__ or "").split())
    info = FieldInfo.from_annotated_attribute(
        model, Field(default_factory=model, description=doc, json_schema_extra=_marks(kind, [owner]))
    )
    root.__pydantic_fields__[name] = info
    root.model_rebuild(force=True)


def _section_name(section: type[BaseModel]) -> str:
    return section.__name__.removesuffix("Section").lower()
