"""Serving the text task: texts from `POST /predict` (`{"texts": [...]}`) and from a `/v2` BYTES input, bounded,
encoded by the same `torchferry.inputs.text.Encoder` that training used, answered with top-k labels.

Every request is untrusted. The body is already within the upload limit; here it must be UTF-8 JSON (no NaN
or Infinity, nesting no deeper than the parser allows), an object whose only field is `texts`, a list of 1 to
`max_texts` strings of at most `max_chars` characters each. Each refusal is an HTTPError: 400 for a malformed
request, 413 for too many or too long texts.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from torchferry.serve.errors import HTTPError


def _reject_constant(name: str) -> float:
    raise HTTPError(400, "bad_json", f"{name} is not a value a request may carry")


def check_texts(texts: Any, max_texts: int, max_chars: int, where: str = "texts") -> list[str]:
    """`texts` when it is a list of 1 to `max_texts` strings of at most `max_chars` characters; else an HTTPError."""
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise HTTPError(400, "bad_texts", f"{where} must be a list of strings")
    if not texts:
        raise HTTPError(400, "no_text", f"{where} is empty: send at least one text")
    if len(texts) > max_texts:
        raise HTTPError(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is {max_texts}")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise HTTPError(413, "text_too_long", f"{where}[{i}] has {len(text)} characters; the limit is "
                            f"{max_chars}")
    return texts


def texts_from_json(body: bytes, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a `{"texts": [...]}` body, checked."""
    if not body.strip():
        raise HTTPError(400, "no_text", 'empty body: send JSON {"texts": ["...", ...]}')
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, "not_utf8", f"the body is not UTF-8 (byte {exc.start}): {exc.reason}") from None
    try:
        obj = json.loads(decoded, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # the HTTPError of _reject_constant passes through
        raise HTTPError(400, "bad_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict) or "texts" not in obj:
        raise HTTPError(400, "bad_texts", 'send a JSON object {"texts": ["...", ...]}')
    extra = sorted(k for k in obj if k != "texts")
    if extra:
        raise HTTPError(400, "bad_texts", f"unknown field(s) {extra[:5]!r}; the request holds 'texts' alone"[:300])
    return check_texts(obj["texts"], max_texts, max_chars)


def _utf8(blob: bytes, where: str) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, "not_utf8", f"{where} is not UTF-8 (byte {exc.start}): {exc.reason}") from None


def texts_from_v2(values: list[Any] | None, blobs: list[bytes] | None, name: str, max_texts: int,
                  max_chars: int) -> list[str]:
    """The texts of a v2 BYTES input: JSON elements are the texts themselves (a `{"b64": ...}` object holds
    base64 UTF-8), binary elements are UTF-8 bytes."""
    if blobs is not None:
        # Bound the characters before decoding: a UTF-8 character is at most 4 bytes.
        for i, blob in enumerate(blobs):
            if len(blob) > 4 * max_chars:
                raise HTTPError(413, "text_too_long", f"{name}[{i}] has {len(blob)} bytes; the limit is "
                                f"{max_chars} characters")
        texts = [_utf8(blob, f"{name}[{i}]") for i, blob in enumerate(blobs)]
    else:
        texts = []
        for i, value in enumerate(values or []):
            if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
                try:
                    value = _utf8(base64.b64decode(value["b64"], validate=True), f"{name}[{i}]")
                except (binascii.Error, ValueError):
                    raise HTTPError(400, "bad_texts", f"{name}[{i}]: 'b64' is not base64") from None
            texts.append(value)
    return check_texts(texts, max_texts, max_chars, name)
