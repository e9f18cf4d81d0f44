"""The Python event catalogue and the JSON Schema name the same event types, both ways.

``messaging/envelope.py`` (``ROUTES``, hence ``EVENT_TYPES``) is what Python emits and
routes; ``contracts/envelope.schema.json`` is what every reader (the Go subscriber
included) accepts. A type added on one side only would be either refused by the schema
(Python emits what no reader knows) or accepted by readers that nothing ever sends it,
with no golden file to show its shape. So: the catalogue, the schema's ``type`` enum,
its per-type ``if``/``then`` branches and ``$defs``, and the golden files all list the
same types. The Go side checks its own list against the schema in
``go-subscriber/contract_test.go`` (``TestContractEventDataParses``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from messaging import envelope
from tests.contract.invalid_examples import CONTRACTS

SCHEMA: dict[str, Any] = json.loads((CONTRACTS / "envelope.schema.json").read_text())
CATALOGUE = set(envelope.EVENT_TYPES)


def _golden_name(event_type: str) -> str:
    """``OrderPlaced`` -> ``order_placed.json`` (the README's naming of golden files)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", event_type).lower() + ".json"


def test_the_schema_enum_lists_each_type_once() -> None:
    enum = SCHEMA["properties"]["type"]["enum"]
    assert [t for t, n in Counter(enum).items() if n > 1] == []


def test_every_catalogue_type_is_in_the_schema() -> None:
    missing = CATALOGUE - set(SCHEMA["properties"]["type"]["enum"])
    assert missing == set(), f"messaging/envelope.py emits types the schema refuses: {missing}"


def test_every_schema_type_is_in_the_catalogue() -> None:
    extra = set(SCHEMA["properties"]["type"]["enum"]) - CATALOGUE
    assert extra == set(), f"the schema accepts types messaging/envelope.py never routes: {extra}"


def test_each_type_has_its_schema_branch_and_definitions() -> None:
    branches = {
        branch["if"]["properties"]["type"]["const"]: branch["then"]["$ref"]
        for branch in SCHEMA["allOf"]
        if "type" in branch.get("if", {}).get("properties", {})
    }
    assert branches == {t: f"#/$defs/{t}" for t in CATALOGUE}
    for event_type in CATALOGUE:
        assert SCHEMA["$defs"][event_type]["properties"]["version"] == {"const": envelope.VERSION}
        assert f"{event_type}V{envelope.VERSION}" in SCHEMA["$defs"]


def test_each_type_has_its_golden_file() -> None:
    for event_type in CATALOGUE:
        path = CONTRACTS / "examples" / _golden_name(event_type)
        assert path.is_file(), f"no golden example of {event_type}: add {path.name}"
        assert json.loads(path.read_text())["type"] == event_type, path.name


def test_every_golden_file_shows_a_catalogue_type() -> None:
    shown = {
        path.name: json.loads(path.read_text()).get("type")
        for path in sorted(CONTRACTS.glob("examples/*.json"))
    }
    # hello.json is the original Hello message: the envelope without a type.
    assert {name for name, t in shown.items() if t is None} == {"hello.json"}
    assert {t for t in shown.values() if t is not None} == CATALOGUE
