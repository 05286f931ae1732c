"""Tool-call argument values written as text (Qwen3-Coder XML parameters) converted to JSON by the tool's schema."""
from __future__ import annotations

import json


MAX_DEPTH = 8  # anyOf/oneOf nesting looked into (schemas come with requests)


def _schema_types(schema, depth: int = 0) -> set[str]:
    """The JSON types a parameter's schema allows: `type` (a name or a list) and those of anyOf/oneOf branches."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return set()
    t = schema.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key) or []:
            types |= _schema_types(branch, depth + 1)
    if not types and "enum" in schema and all(isinstance(v, str) for v in schema["enum"] or []):
        types.add("string")
    return types


def param_types(tools: list[dict] | None) -> dict[str, dict[str, set[str]]]:
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool)
        props = ((fn.get("parameters") or {}).get("properties") or {}) if isinstance(fn, dict) else {}
        out[fn.get("name")] = {k: _schema_types(v) for k, v in props.items()}
    return out


_LITERALS = {"True": True, "False": False, "None": None}  # Python spellings models write


def xml_value(raw: str, types: set[str] | None) -> str:
    """A Qwen3-Coder parameter value (raw text) as JSON, by the types its schema allows: strings stay text (also
    when they look like JSON), other types are parsed; an undeclared parameter is parsed where it is JSON."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    types = types or set()
    if "null" in types and value.strip() in ("null", "None"):
        return "null"
    if "string" in types:
        return json.dumps(value, ensure_ascii=False)
    text = value.strip()
    if types & {"boolean"} and text in _LITERALS:
        return json.dumps(_LITERALS[text])
    try:
        parsed = json.loads(text)
    except ValueError:
        return json.dumps(value, ensure_ascii=False)
    if types and not _fits(parsed, types):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(parsed, ensure_ascii=False)


def _fits(value, types: set[str]) -> bool:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
             type(None): "null"}
    kind = kinds.get(type(value))
    return kind in types or (kind == "integer" and "number" in types) or (
        kind == "number" and "integer" in types and float(value).is_integer())
