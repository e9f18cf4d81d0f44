"""The message contract: the schema, its golden files, one invalid file per rule.

The schema is only worth what its examples prove. So: every golden file validates;
every invalid file fails for exactly the one rule its name says (see
``tests/contract/invalid_examples.py`` for the naming); every rule of the schema has
such a file; and deleting any one keyword from the schema makes one of those checks
fail (``test_deleting_any_rule_of_the_schema_is_caught`` tries every deletion).

Patterns are ECMA-262 regular expressions, as JSON Schema says: ``$`` is the end of
the string. Python's ``re`` lets ``$`` match before a final newline, and the
``jsonschema`` package uses ``re.search`` as is, so these tests validate with
``ECMAValidator``: the same validator with ``$`` read as ``\\Z`` and ``\\d`` as
``[0-9]`` (ASCII), which is what Go's regexp and JavaScript do.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jsonschema.exceptions import ValidationError

from hello import publisher as hello
from messaging import envelope
from tests.contract import invalid_examples
from tests.contract.invalid_examples import ARITY, CONTRACTS, Rule, rule_of

SCHEMA = json.loads((CONTRACTS / "envelope.schema.json").read_text())
GOLDEN = sorted(CONTRACTS.glob("examples/*.json"))
INVALID = sorted(CONTRACTS.glob("examples/invalid/*.json"))
ANNOTATIONS = {"$schema", "$id", "title", "description", "default", "$comment", "examples"}


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


@functools.cache
def ecma_regex(pattern: str) -> re.Pattern[str]:
    """Compile an ECMA-262 pattern for Python: an unescaped ``$`` outside a character
    class becomes ``\\Z`` (end of string only), and classes are ASCII."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "$" and not in_class:
            char = r"\Z"
        out.append(char)
        i += 1
    return re.compile("".join(out), re.ASCII)


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


ECMAValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern}
)


SHARED = ("#/$defs/money", "#/$defs/currency", "#/$defs/orderId")
"""The shared definitions; each property's $ref to one of them is a rule."""

ENUM_VALUES = {
    "/properties/type/enum": [],  # each type's own golden file uses its value
    "/properties/priority/enum": ["order_placed_express.json", "priority"],
    "/$defs/OrderPlacedV1/properties/priority/enum": [
        "order_placed_express.json",
        "data",
        "priority",
    ],
    "/$defs/CustomerNotifiedV1/properties/step/enum": ["customer_notified.json", "data", "step"],
}
"""Where a golden file holds each enum's value, so that every allowed value is shown
accepted (removing one from the schema must fail a test)."""


def _node(schema: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = schema
    for key in path:
        node = node[key]
    return node


def _chain(schema: dict[str, Any], error: ValidationError) -> list[tuple[int, str]]:
    """The (schema object, keyword) steps from the root to an error's keyword.

    jsonschema leaves ``$ref`` out of ``schema_path``; a step that is not in the
    current object follows that object's (local) ``$ref`` first."""
    node: Any = schema
    steps = []
    for key in error.absolute_schema_path:
        if isinstance(node, dict) and key not in node and "$ref" in node:
            steps.append((id(node), "$ref"))
            node = _node(schema, tuple(node["$ref"].removeprefix("#/").split("/")))
        steps.append((id(node), str(key)))
        node = node[key]
    return steps


def _is_rule(error: ValidationError, rule: Rule, schema: dict[str, Any]) -> bool:
    """Whether a (leaf) error comes from exactly this rule: the rule's keyword is the
    error's (or, for a $ref rule, on the way to it)."""
    step = (id(_node(schema, rule.parent)), rule.keyword)
    chain = _chain(schema, error)
    if rule.keyword == "$ref":
        return step in chain
    if chain[-1] != step:
        return False
    if rule.keyword == "required":
        return error.message == f"{rule.args[0]!r} is a required property"
    if rule.keyword == "dependentRequired":
        return error.message == f"{rule.args[1]!r} is a dependency of {rule.args[0]!r}"
    return True


@functools.cache
def _example(path: Path) -> Any:
    return _load(path)


@functools.cache
def _pointer_of(path: Path) -> str:
    """The pointer of the rule an invalid example names, in the schema as written."""
    try:
        return rule_of(path.stem, SCHEMA).pointer
    except ValueError:
        return ""


def _enum_variants() -> Iterator[tuple[str, Any]]:
    """Golden examples with each allowed value of ENUM_VALUES's enums."""
    for pointer, (golden, *where) in ((p, w) for p, w in ENUM_VALUES.items() if w):
        for value in _node(SCHEMA, tuple(pointer[1:].split("/"))):
            example = copy.deepcopy(_example(CONTRACTS / "examples" / golden))
            _node(example, tuple(where[:-1]))[where[-1]] = value
            yield f"{golden} with {where[-1]}={value!r}", example


def problems(schema: dict[str, Any], first: bool = False, near: str = "") -> list[str]:
    """What is wrong with the contract for this schema (empty: all holds).

    Args:
        schema: the schema to check the examples against.
        first: stop at the first problem.
        near: a JSON pointer; the invalid examples of rules under it are tried first
            (with first, that makes the mutation test quick).
    """
    found: list[str] = []
    invalid = sorted(INVALID, key=lambda p: not _pointer_of(p).startswith(near))
    try:
        validator = ECMAValidator(schema)
        valid = [(p.name, _example(p)) for p in GOLDEN] + list(_enum_variants())
        for name, example in valid:
            for error in validator.iter_errors(example):
                found.append(f"golden {name}: {error.message}")
                if first:
                    return found
        for path in invalid:
            try:
                rule = rule_of(path.stem, schema)
            except ValueError as e:
                found.append(str(e))
            else:
                errors = list(validator.iter_errors(_example(path)))
                if len(errors) != 1 or not _is_rule(errors[0], rule, schema):
                    got = [
                        f"{'/'.join(map(str, e.absolute_schema_path))}: {e.message}" for e in errors
                    ]
                    found.append(
                        f"{path.name}: want only {rule.pointer} {list(rule.args)}, got {got}"
                    )
            if first and found:
                return found
    except jsonschema.exceptions.SchemaError as e:
        found.append(f"schema: {e.message}")
    except Exception as e:  # an unresolvable $ref after a deletion, for one
        found.append(f"schema: {type(e).__name__}: {e}")
    return found


def test_schema_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_examples_validate(path: Path) -> None:
    ECMAValidator(SCHEMA).validate(_load(path))


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_fails_for_exactly_the_rule_its_name_says(path: Path) -> None:
    rule = rule_of(path.stem, SCHEMA)
    errors = list(ECMAValidator(SCHEMA).iter_errors(_load(path)))
    assert [e.message for e in errors if not _is_rule(e, rule, SCHEMA)] == []
    assert len(errors) == 1, f"{path.name} breaks {len(errors)} rules"


def test_there_are_examples_at_all() -> None:
    # An empty glob would make the parametrized tests above vanish, not fail.
    assert len(GOLDEN) >= 8
    assert len(INVALID) >= 100


def _rules(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[Rule]:
    """Every rule in a schema: each keyword of ARITY, each entry of required and
    dependentRequired. The conditions under ``if`` select a branch; they are not rules."""
    for key, value in node.items():
        if key == "required":
            yield from (Rule(path, key, (name,)) for name in value)
        elif key == "dependentRequired":
            yield from (Rule(path, key, (p, n)) for p, needed in value.items() for n in needed)
        elif key in ARITY or (key == "$ref" and value in SHARED and path[-2] == "properties"):
            yield Rule(path, key, ())
        if key in ("properties", "$defs"):
            for name, sub in value.items():
                yield from _rules(sub, (*path, key, name))
        elif key in ("items", "then"):
            yield from _rules(value, (*path, key))
        elif key == "allOf":
            for i, sub in enumerate(value):
                yield from _rules(sub, (*path, key, str(i)))


def test_every_rule_of_the_schema_has_an_invalid_example() -> None:
    named = {rule_of(path.stem, SCHEMA) for path in INVALID}
    rules = set(_rules(SCHEMA))
    assert len(rules) > 90
    assert sorted(r.pointer + str(list(r.args)) for r in rules - named) == []


def test_every_pattern_rejects_a_trailing_newline() -> None:
    patterns = {r.pointer for r in _rules(SCHEMA) if r.keyword == "pattern"}
    newline = {
        rule_of(p.stem, SCHEMA).pointer for p in INVALID if p.stem.endswith("--trailing_newline")
    }
    assert patterns == newline
    for pattern in patterns:
        assert _node(SCHEMA, tuple(pattern[1:].split("/")))[0] == "^"


def test_python_re_alone_would_accept_a_trailing_newline() -> None:
    # Why ECMAValidator exists: jsonschema's own `pattern` uses re.search as is.
    example = _load(CONTRACTS / "examples/invalid/id.pattern--trailing_newline.json")
    jsonschema.Draft202012Validator(SCHEMA).validate(example)
    assert list(ECMAValidator(SCHEMA).iter_errors(example))


def test_the_contract_holds() -> None:
    assert problems(SCHEMA) == []


def _deletions(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The path of every key and list entry of the schema that is not an annotation."""
    items = enumerate(node) if isinstance(node, list) else node.items()
    for key, value in items:
        if key in ANNOTATIONS:
            continue
        if isinstance(value, dict) and value and set(value) <= ANNOTATIONS:
            continue  # a property that is only documented: nothing to delete
        yield (*path, key)
        if isinstance(value, (dict, list)):
            yield from _deletions(value, (*path, key))


def test_deleting_any_rule_of_the_schema_is_caught() -> None:
    survivors = []
    deletions = list(_deletions(SCHEMA))
    assert len(deletions) > 200
    for path in deletions:
        mutated = copy.deepcopy(SCHEMA)
        parent = _node(mutated, path[:-1])  # type: ignore[arg-type]
        del parent[path[-1]]
        pointer = "/" + "/".join(map(str, path))
        if not problems(mutated, first=True, near=pointer):
            survivors.append(pointer)
    assert survivors == [], "deleting these changes no test outcome"


def test_files_on_disk_are_the_table() -> None:
    on_disk = {p.name: p.read_text() for p in INVALID}
    table = {f"{c.name}.json": invalid_examples.render(c) for c in invalid_examples.CASES}
    assert on_disk == table, "run: .venv/bin/python -m tests.contract.invalid_examples"


def test_every_enum_has_its_values_shown_accepted() -> None:
    enums = {r.pointer for r in _rules(SCHEMA) if r.keyword == "enum"}
    assert enums == set(ENUM_VALUES)
    assert len(list(_enum_variants())) == 7


def test_each_type_has_its_golden_file_and_definition() -> None:
    for event_type in SCHEMA["properties"]["type"]["enum"]:
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", event_type).lower()
        golden = _load(CONTRACTS / "examples" / f"{snake}.json")
        assert golden["type"] == event_type
        assert f"{event_type}V1" in SCHEMA["$defs"]
        assert SCHEMA["$defs"][event_type]["properties"]["version"] == {"const": 1}


def _shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


def test_hello_message_has_the_golden_shape() -> None:
    built = hello.create_message(7)
    ECMAValidator(SCHEMA).validate(built)
    assert _shape(built) == _shape(_load(CONTRACTS / "examples" / "hello.json"))


def test_envelope_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        envelope.envelope("OrderShipped", {}, message="m", sender="s", count=1)
