"""The message contract: golden files, the schema, and what the code builds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hello import publisher as hello
from messaging import envelope

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
SCHEMA = json.loads((CONTRACTS / "envelope.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_schema_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", sorted(CONTRACTS.glob("examples/*.json")), ids=lambda p: p.name)
def test_golden_examples_validate(path: Path) -> None:
    VALIDATOR.validate(_load(path))


@pytest.mark.parametrize(
    "path", sorted(CONTRACTS.glob("examples/invalid/*.json")), ids=lambda p: p.name
)
def test_invalid_examples_are_rejected(path: Path) -> None:
    assert list(VALIDATOR.iter_errors(_load(path)))


def _shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


def test_hello_message_has_the_golden_shape() -> None:
    built = hello.create_message(7)
    VALIDATOR.validate(built)
    assert _shape(built) == _shape(_load(CONTRACTS / "examples" / "hello.json"))


def test_envelope_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        envelope.envelope("OrderShipped", {}, message="m", sender="s", count=1)
