"""Validate a JSON value against the core of a JSON Schema (no dependencies): the first violation and its path.

Checked keywords: type (one or a list), enum, const, properties, required, additionalProperties (false or a
schema), items (a schema, or a list of schemas for a tuple), prefixItems, anyOf. Other keywords ($ref,
formats, lengths, patterns, ranges, ...) are not checked. response_format json_schema output is validated
with this after generation; generation is not constrained by the schema. Schemas nesting deeper than MAX_DEPTH
are refused (check_schema) before anything recurses into them.
"""
from __future__ import annotations

import json
import re
from typing import Any

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_DEPTH = 100  # JSON nesting of a schema (its objects and arrays)


def nesting_depth(value: Any, limit: int) -> int:
    """How deep value's arrays and objects nest, counted up to limit + 1 (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_schema(schema: Any) -> str | None:
    """None if validate can take schema, else what is wrong with it."""
    if nesting_depth(schema, MAX_DEPTH) > MAX_DEPTH:
        return f"the schema nests deeper than {MAX_DEPTH} levels"
    return None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    actual = _type_name(value)
    if name == "number":
        return actual in ("integer", "number")
    if name == "integer":
        return actual == "integer" or (actual == "number" and float(value).is_integer())
    return actual == name


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENT.match(key) else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def validate(value: Any, schema: Any, path: str = "$", depth: int = 0) -> str | None:
    """None if value satisfies schema (in the keywords above), else "at PATH: what is wrong"."""
    if depth > MAX_DEPTH:
        return f"at {path}: the schema nests deeper than {MAX_DEPTH} levels"
    if schema is True or not isinstance(schema, dict):
        return None if schema is not False else f"at {path}: no value is allowed here (schema false)"
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if names and not any(_is_type(value, t) for t in names if isinstance(t, str)):
            want = names[0] if len(names) == 1 else " or ".join(map(str, names))
            return f"at {path}: expected {want}, got {_type_name(value)}"
    if "enum" in schema and isinstance(schema["enum"], list):
        if not any(_equal(value, e) for e in schema["enum"]):
            return f"at {path}: {_short(value)} is not one of {_short(schema['enum'])}"
    if "const" in schema and not _equal(value, schema["const"]):
        return f"at {path}: expected {_short(schema['const'])}, got {_short(value)}"
    if isinstance(schema.get("anyOf"), list) and schema["anyOf"]:
        errors = [validate(value, s, path, depth + 1) for s in schema["anyOf"]]
        if all(errors):
            return f"{errors[0]} (and no other anyOf branch matches)"
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for name in schema.get("required") or []:
            if isinstance(name, str) and name not in value:
                return f"at {path}: missing required property {name!r}"
        for name, sub in props.items():
            if name in value:
                err = validate(value[name], sub, _key(path, name), depth + 1)
                if err:
                    return err
        extra = schema.get("additionalProperties", True)
        for name in value:
            if name in props:
                continue
            if extra is False:
                return f"at {path}: property {name!r} is not allowed (additionalProperties is false)"
            if isinstance(extra, dict):
                err = validate(value[name], extra, _key(path, name), depth + 1)
                if err:
                    return err
    if isinstance(value, list):
        items, prefix = schema.get("items"), schema.get("prefixItems")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix if isinstance(prefix, list) else []
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else items
            if sub is None:
                continue
            if sub is False:
                return f"at {path}: at most {len(prefix)} items are allowed, got {len(value)}"
            err = validate(item, sub, f"{path}[{i}]", depth + 1)
            if err:
                return err
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
