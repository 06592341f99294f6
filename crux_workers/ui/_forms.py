"""The signal form generated from a JSON Schema: which fields, and a payload from them.

The schema is the one recorded with the wait (``FlowState.waiting_schema``): pydantic's
JSON Schema of the suspend's model. Plain fields (text, numbers, yes/no, a choice)
get their own input; anything nested gets a small JSON box of its own. Turning the
submitted form into a payload only converts types: validating it is the flow's
schema's job, at send (``InvalidSignal.errors``), shown next to the field it names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FIELD_PREFIX = "field."


@dataclass(frozen=True)
class Field:
    """One input of the form."""

    name: str
    title: str
    kind: str  # "text", "integer", "number", "boolean", "choice", "json"
    required: bool
    description: str | None = None
    choices: tuple[str, ...] = ()
    default: Any = None

    @property
    def input_name(self) -> str:
        """The form field's name."""
        return FIELD_PREFIX + self.name


def _resolve(schema: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        found = schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"))
        if isinstance(found, Mapping):
            return found
    return node


def _kind(schema: Mapping[str, Any], node: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    node = _resolve(schema, node)
    options = node.get("anyOf")
    if isinstance(options, list):
        # Optional[X] is anyOf [X, null]: the field is X, left empty for null.
        real = [o for o in options if isinstance(o, Mapping) and o.get("type") != "null"]
        if len(real) == 1:
            return _kind(schema, real[0])
        return "json", ()
    if isinstance(node.get("enum"), list) and all(isinstance(v, str) for v in node["enum"]):
        return "choice", tuple(node["enum"])
    kind = node.get("type")
    if kind == "string":
        return "text", ()
    if kind in ("integer", "number", "boolean"):
        return str(kind), ()
    return "json", ()


def fields_of(schema: Mapping[str, Any] | None) -> list[Field] | None:
    """The form's fields for an object schema; None when the schema is not one (use JSON)."""
    if not isinstance(schema, Mapping) or schema.get("type") != "object":
        return None
    props = schema.get("properties")
    if not isinstance(props, Mapping) or not props:
        return None
    required = set(schema.get("required") or ())
    out = []
    for name, node in props.items():
        if not isinstance(node, Mapping):
            return None
        kind, choices = _kind(schema, node)
        title = node.get("title") if isinstance(node.get("title"), str) else name
        description = node.get("description")
        out.append(
            Field(
                name=str(name),
                title=str(title),
                kind=kind,
                required=name in required,
                description=description if isinstance(description, str) else None,
                choices=choices,
                default=node.get("default"),
            )
        )
    return out


def payload_of(
    fields: list[Field], form: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The payload the submitted form stands for, and a message per field it could not read.

    An empty optional field is left out (the model's default applies); an empty
    required one is sent as missing, so the schema's own message names it.
    """
    payload: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in fields:
        raw = form.get(f.input_name)
        if f.kind == "boolean":
            payload[f.name] = raw in ("on", "true", "1")
            continue
        if raw is None or raw.strip() == "":
            continue
        try:
            if f.kind == "integer":
                payload[f.name] = int(raw.strip())
            elif f.kind == "number":
                payload[f.name] = float(raw.strip())
            elif f.kind == "json":
                payload[f.name] = json.loads(raw)
            else:
                payload[f.name] = raw
        except ValueError:
            errors[f.name] = {
                "integer": "must be a whole number",
                "number": "must be a number",
            }.get(f.kind, "must be valid JSON")
    return payload, errors


def errors_by_field(errors: list[Mapping[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Validation errors (``{"loc", "msg"}``) by top-level field, and those naming none."""
    by_field: dict[str, str] = {}
    general: list[str] = []
    for e in errors:
        loc = e.get("loc") or ()
        msg = str(e.get("msg", "invalid"))
        if isinstance(loc, list | tuple) and loc:
            key = str(loc[0])
            rest = ".".join(str(p) for p in loc[1:])
            text = f"{rest}: {msg}" if rest else msg
            by_field[key] = f"{by_field[key]}; {text}" if key in by_field else text
        else:
            general.append(msg)
    return by_field, general
