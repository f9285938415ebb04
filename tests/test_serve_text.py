"""Serving texts: the request is bounded and checked before anything is encoded (torchferry.serve.text)."""

from __future__ import annotations

import base64
import json

import pytest

from torchferry.serve.errors import HTTPError
from torchferry.serve.text import texts_from_json, texts_from_v2


def _refusal(fn, *args) -> tuple[int, str]:
    with pytest.raises(HTTPError) as info:
        fn(*args)
    assert "\n" not in info.value.message
    return info.value.status, info.value.code


def test_texts_are_read_from_a_json_object() -> None:
    assert texts_from_json('{"texts": ["héllo", ""]}'.encode(), 4, 10) == ["héllo", ""]


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"", 400, "no_text"),
    (b"\xff\xfe{}", 400, "not_utf8"),
    (b'{"texts": [NaN]}', 400, "bad_json"),
    (b'{"texts": ["a"], "x": Infinity}', 400, "bad_json"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "bad_json"),
    (b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "bad_json"),
    (b'{"texts": "one text"}', 400, "bad_texts"),
    (b'{"texts": ["a", 3]}', 400, "bad_texts"),
    (b'{"texts": [["nested"]]}', 400, "bad_texts"),
    (b'["a"]', 400, "bad_texts"),
    (b'{"rows": []}', 400, "bad_texts"),
    (b'{"texts": ["a"], "top_k": 2}', 400, "bad_texts"),
    (b'{"texts": []}', 400, "no_text"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "too_many_texts"),
    (json.dumps({"texts": ["x" * 11]}).encode(), 413, "text_too_long"),
    (json.dumps({"texts": ["x" * 10_000_000]}).encode(), 413, "text_too_long"),
    (b'{"texts": ["a"]', 400, "bad_json"),
])
def test_a_bad_body_is_a_4xx_that_says_why(body: bytes, status: int, code: str) -> None:
    assert _refusal(texts_from_json, body, 4, 10) == (status, code)


def test_v2_bytes_texts_from_json_strings_base64_objects_and_binary() -> None:
    b64 = base64.b64encode("naïve".encode()).decode()
    assert texts_from_v2(["a b", {"b64": b64}], None, "input", 4, 10) == ["a b", "naïve"]
    assert texts_from_v2(None, ["ça".encode(), b""], "input", 4, 10) == ["ça", ""]


@pytest.mark.parametrize(("values", "blobs", "status", "code"), [
    (None, [b"\xc3\x28"], 400, "not_utf8"),
    (None, [b"x" * 41], 413, "text_too_long"),
    (["x" * 11], None, 413, "text_too_long"),
    ([{"b64": "***"}], None, 400, "bad_texts"),
    ([{"b64": base64.b64encode(b"\xff").decode()}], None, 400, "not_utf8"),
    ([1.5], None, 400, "bad_texts"),
    (["a"] * 5, None, 413, "too_many_texts"),
    ([], None, 400, "no_text"),
])
def test_v2_bytes_texts_are_checked(values, blobs, status: int, code: str) -> None:
    assert _refusal(texts_from_v2, values, blobs, "input", 4, 10) == (status, code)
