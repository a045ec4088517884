"""Shared test helpers: where the committed fixtures live, a small JSON-schema check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def variants(subdir: str = "hf") -> list[str]:
    """Fixture variants that have ``subdir`` (``hf``, ``mlx`` or ``mlx_q4``)."""
    if not FIXTURES.is_dir():
        return []
    return sorted(p.name for p in FIXTURES.iterdir() if (p / subdir / "config.json").is_file())


def validate(value: Any, schema: dict[str, Any]) -> None:
    """Assert ``value`` follows ``schema``, for the keywords the grammar tests use.

    jsonschema is not a dependency; this covers enum, object (properties, required,
    additionalProperties false, maxProperties), array (items, maxItems), string (maxLength)
    and integer (minimum, maximum).
    """
    if "enum" in schema:
        assert value in schema["enum"], (value, schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), value
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= value.keys(), value
        if schema.get("additionalProperties") is False:
            assert value.keys() <= props.keys(), value
        assert len(value) <= schema.get("maxProperties", len(value))
        for key, item in value.items():
            if key in props:
                validate(item, props[key])
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
        for item in value:
            validate(item, schema["items"])
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), value
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), value
