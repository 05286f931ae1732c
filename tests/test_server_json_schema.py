"""The response_format json_schema validator: core keywords, the first violation, and its path."""
from __future__ import annotations

import pytest

from moepage.server.json_schema import validate

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "home": {"type": "object", "properties": {"zip code": {"type": ["string", "null"]}},
                 "additionalProperties": False},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "kind": {"const": "person"},
    },
    "required": ["name", "age"],
    "additionalProperties": {"type": "boolean"},
}


def test_valid_values_pass():
    assert validate({"name": "x", "age": 3, "tags": ["a"], "home": {"zip code": None}, "score": 1.5,
                     "kind": "person", "flag": True}, SCHEMA) is None
    assert validate({"name": "x", "age": 3.0}, SCHEMA) is None  # 3.0 is an integer in JSON Schema
    assert validate([1, "x"], {"prefixItems": [{"type": "integer"}, {"type": "string"}]}) is None
    assert validate("anything", {}) is None and validate(None, True) is None


@pytest.mark.parametrize("value, problem", [
    ([], "at $: expected object, got array"),
    ({"age": 3}, "at $: missing required property 'name'"),
    ({"name": "x", "age": "3"}, "at $.age: expected integer, got string"),
    ({"name": "x", "age": True}, "at $.age: expected integer, got boolean"),
    ({"name": "x", "age": 2.5}, "at $.age: expected integer, got number"),
    ({"name": "x", "age": 1, "tags": ["a", 7]}, "at $.tags[1]: expected string, got integer"),
    ({"name": "x", "age": 1, "tags": ["a", "c"]}, 'at $.tags[1]: "c" is not one of ["a", "b"]'),
    ({"name": "x", "age": 1, "home": {"zip code": 5}}, 'at $.home["zip code"]: expected string or null, got integer'),
    ({"name": "x", "age": 1, "home": {"city": "y"}}, "at $.home: property 'city' is not allowed"),
    ({"name": "x", "age": 1, "flag": "yes"}, "at $.flag: expected boolean, got string"),
    ({"name": "x", "age": 1, "score": "high"}, "at $.score: expected number, got string (and no other anyOf"),
    ({"name": "x", "age": 1, "kind": "robot"}, 'at $.kind: expected "person", got "robot"'),
])
def test_first_violation_and_its_path(value, problem):
    assert problem in validate(value, SCHEMA)


def test_enum_uses_json_equality():
    assert validate(1, {"enum": [True]}) is not None
    assert validate(1.0, {"enum": [1]}) is None
    assert validate([1, 2], {"items": [{"type": "integer"}], "additionalItems": False}) == \
        "at $: at most 1 items are allowed, got 2"
