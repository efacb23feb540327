"""`encode_json`: what jsonb can store gets through, everything else gets a clear error."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.exceptions import InvalidInputError
from domain.payload import DEFAULT_MAX_INPUT_BYTES, decode_json, encode_json


def test_encodes_compact_json_keeping_unicode() -> None:
    assert encode_json({"a": [1, 2.5, None, True], "é": "ü"}, what="input") == (
        '{"a":[1,2.5,null,true],"é":"ü"}'
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, {"x": [1, math.nan]}])
def test_nan_and_infinity_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidInputError, match=r"^input is not valid JSON: Out of range float"):
        encode_json(value, what="input")


@pytest.mark.parametrize(
    ("value", "type_name"),
    [({1, 2}, "set"), (b"bytes", "bytes"), (Decimal("1.5"), "Decimal"), (object(), "object")],
    ids=["set", "bytes", "decimal", "object"],
)
def test_values_json_cannot_represent_are_rejected(value: Any, type_name: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^output is not JSON-serialisable: .*{type_name}"):
        encode_json({"nested": [value]}, what="output")


def test_non_string_keys_that_json_cannot_convert_are_rejected() -> None:
    with pytest.raises(InvalidInputError, match="not JSON-serialisable"):
        encode_json({(1, 2): "tuple key"}, what="input")


def test_a_circular_structure_is_rejected() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(InvalidInputError, match="Circular reference"):
        encode_json(loop, what="input")


def test_deep_nesting_is_rejected_not_a_recursion_error() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidInputError, match=r"^input is nested too deeply"):
        encode_json(deep, what="input")
    # ... and the interpreter is fine afterwards.
    assert encode_json([[[1]]], what="input") == "[[[1]]]"


@pytest.mark.parametrize("value", ["\ud800", {"k": "ok \udfff"}, {"\ud83d": 1}])
def test_lone_surrogates_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        encode_json(value, what="input")


def test_a_proper_surrogate_pair_character_is_fine() -> None:
    assert encode_json("😀", what="input") == '"😀"'


@pytest.mark.parametrize(
    "value",
    ["\x00", "a\x00b", {"\x00": 1}, ["x", {"y": "\\\x00"}], "\\\\\x00"],
    ids=["alone", "inside", "key", "nested", "after-backslashes"],
)
def test_nul_characters_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidInputError, match=r"NUL character \(\\u0000\), which jsonb rejects"):
        encode_json(value, what="metadata")


@pytest.mark.parametrize(
    "value",
    ["\\u0000", "\\\\\\u0000", {"\\u0000": "key"}, "u0000", "\\x00"],
    ids=["escaped", "three-backslashes", "key", "no-backslash", "hex-text"],
)
def test_the_literal_text_backslash_u0000_is_allowed(value: Any) -> None:
    text = encode_json(value, what="input")
    assert json.loads(text) == value


def test_size_limit_counts_utf8_bytes() -> None:
    value = "é" * 10  # '"' + 20 bytes + '"'
    assert len(encode_json(value, what="input").encode()) == 22
    assert encode_json(value, what="input", max_bytes=22)
    with pytest.raises(InvalidInputError, match=r"^input is 22 bytes, over the limit of 21 bytes$"):
        encode_json(value, what="input", max_bytes=21)


def test_default_limit_is_256_kib_and_only_applies_when_asked() -> None:
    assert DEFAULT_MAX_INPUT_BYTES == 256 * 1024
    big = "x" * DEFAULT_MAX_INPUT_BYTES
    assert len(encode_json(big, what="input")) == DEFAULT_MAX_INPUT_BYTES + 2
    with pytest.raises(InvalidInputError, match="over the limit"):
        encode_json(big, what="input", max_bytes=DEFAULT_MAX_INPUT_BYTES)


def test_decode_json() -> None:
    assert decode_json(None) is None
    assert decode_json('{"a":[1]}') == {"a": [1]}


# -- properties ---------------------------------------------------------------------------------

# Strings jsonb can hold: no lone surrogates, no NUL. Keys are strings (JSON has no other kind).
_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
_ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)))
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
)


def _json(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        _SCALARS | text,
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5)
        ),
        max_leaves=25,
    )


@settings(max_examples=300, deadline=None)
@given(value=_json(_TEXT))
def test_any_json_value_that_round_trips_is_accepted(value: Any) -> None:
    text = encode_json(value, what="input")
    assert json.loads(text) == value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


@settings(max_examples=300, deadline=None)
@given(value=_json(st.one_of(_ANY_TEXT, st.sampled_from(["\\", "\\u0000", "\x00", "\\\x00"]))))
def test_rejected_exactly_when_a_string_holds_a_nul(value: Any) -> None:
    if _has_nul(value):
        with pytest.raises(InvalidInputError, match="NUL character"):
            encode_json(value, what="input")
    else:
        assert json.loads(encode_json(value, what="input")) == value
