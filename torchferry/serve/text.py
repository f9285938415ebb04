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
from typing import Any

import numpy as np

from torchferry.inputs.text import Encoder, check_text_spec
from torchferry.serve.errors import HTTPError
from torchferry.serve.tasks import Render, ServeTask, checked_classes, json_field, top_k_answers, top_k_param


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
    texts = json_field(body, "texts", code="bad_texts", empty="no_text", example='{"texts": ["...", ...]}')
    return check_texts(texts, max_texts, max_chars)


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


class TextServeTask(ServeTask):
    """A text classifier: texts (or token ids INT64 [N, max_length]) in, top-k classes out; the texts encoded by the
    `Encoder` of the file's own `text` spec, built once when the model loads."""

    name = "text"
    input_type = "tensor(int64)"
    v2_datatype = "INT64"

    def read_spec(self, meta: dict[str, Any]) -> dict[str, Any]:
        classes = checked_classes(meta, "text")
        spec = check_text_spec(meta["text"], "metadata")
        # /metadata shows the spec without its vocabulary (its size instead); "_encoder" is the server's own.
        public = {**{k: v for k, v in spec.items() if k != "vocab"}, "vocab_size": len(spec["vocab"])}
        return {"classes": classes, "text": public, "_encoder": Encoder(spec)}

    def classes(self, spec: dict[str, Any]) -> list[str]:
        return spec["classes"]

    def input_shape(self, spec: dict[str, Any]) -> list[int]:
        return [spec["_encoder"].max_length]

    def output_columns(self, spec: dict[str, Any]) -> int:
        return len(spec["classes"])

    def predict_batch(self, info: Any, max_items: int, top_k: int) -> tuple[np.ndarray, Render]:
        from flask import request

        k = top_k_param(top_k, len(info.classes))
        mimetype = request.mimetype or ""
        if mimetype != "application/json":
            raise HTTPError(415, "unsupported_media_type", f"Content-Type {mimetype[:60] or 'missing'!r}: send "
                            'application/json {"texts": ["...", ...]}')
        texts = texts_from_json(request.get_data(cache=False), max_items, _max_chars())
        return info.spec["_encoder"].encode(texts), lambda logits: top_k_answers(logits, info.classes, k)

    def v2_input(self, datatype: Any, inp: dict[str, Any], shape: list[int], raw: bytes | None, info: Any,
                 max_items: int) -> np.ndarray:
        from torchferry.serve.v2_request import bytes_input, int64_input

        encoder = info.spec["_encoder"]
        if datatype == "INT64":
            return int64_input(inp, shape, raw, [encoder.max_length], encoder.vocab_size, max_items)
        if datatype != "BYTES":
            return super().v2_input(datatype, inp, shape, raw, info, max_items)
        name = inp["name"]
        elements = bytes_input(inp, shape, raw, max_items, "texts")
        binary = raw is not None
        texts = texts_from_v2(None if binary else elements, elements if binary else None, name, max_items, _max_chars())
        return encoder.encode(texts)

    def v2_note(self, input_name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"text_input": f"{input_name!r} also takes BYTES [-1] of UTF-8 texts (strings in JSON, raw with "
                "binary_tensor_data)"}


def _max_chars() -> int:
    from torchferry.serve.state import state

    return state().settings.max_text_chars
