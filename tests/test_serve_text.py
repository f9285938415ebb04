"""Serving texts: the request is bounded and checked before anything is encoded (torchferry.serve.text)."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import write_text_onnx

from torchferry import contract
from torchferry.inputs.text import Encoder, build_vocab, text_spec
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
    ('{"texts": ["a"]}'.encode("utf-16"), 400, "not_utf8"),
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


# ------------------------------------------------------------------------------------------------
# a text model served in this process (a small ONNX graph written directly, its metadata the export's)

VOCAB = ["<pad>", "<unk>", "goal", "team", "pasta", "sauce", "rain", "snow"]
CLASSES = ["food", "sports", "weather"]


@pytest.fixture
def text_model(tmp_path: Path) -> Path:
    """A small text model file with the export's metadata (classes, `text` spec, int64 golden outputs)."""
    return write_text_onnx(tmp_path / "model.onnx", VOCAB, CLASSES)


@pytest.fixture
def text_client(text_model: Path):
    """Flask's test client on `text_model`: at most 4 texts of 50 characters per request."""
    from torchferry.serve.app import create_app

    return create_app({"MODEL": str(text_model), "LOAD_SYNC": True, "MAX_IMAGES": 4, "MAX_TEXT_CHARS": 50}).test_client()


def _onnx_logits(model: Path, texts: list[str]) -> np.ndarray:
    ids = Encoder(text_spec(VOCAB, 8)).encode(texts)
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": ids})[0]


def test_predict_answers_what_the_model_answers_for_the_encoded_texts(text_client, text_model: Path) -> None:
    texts = ["Goal! The TEAM", "pasta sauce, rain", ""]
    r = text_client.post("/predict?top_k=2", json={"texts": texts})
    assert r.status_code == 200, r.get_json()
    logits = _onnx_logits(text_model, texts)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    got = r.get_json()["predictions"]
    assert [p["label"] for p in got] == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert [len(p["top_k"]) for p in got] == [2, 2, 2]
    np.testing.assert_allclose([p["score"] for p in got], probs.max(axis=1), atol=1e-6)
    meta = text_client.get("/metadata").get_json()
    assert meta["task"] == "text" and meta["input_shape"] == ["N", 8] and meta["text"]["vocab_size"] == len(VOCAB)
    assert "vocab" not in meta["text"] and meta["classes"] == CLASSES


@pytest.mark.parametrize(("body", "content_type", "status", "code"), [
    (b'{"texts": ["a", "b", "c", "d", "e"]}', "application/json", 413, "too_many_texts"),
    (json.dumps({"texts": ["x" * 51]}).encode(), "application/json", 413, "text_too_long"),
    (b'{"texts": ["\xff"]}', "application/json", 400, "not_utf8"),
    (b'{"texts": [NaN]}', "application/json", 400, "bad_json"),
    (b"[" * 50_000, "application/json", 400, "bad_json"),
    (b'{"texts": ["goal"]}', "text/plain", 415, "unsupported_media_type"),
    (b'{"texts": ["goal"]}', "multipart/form-data", 415, "unsupported_media_type"),
])
def test_a_bad_request_to_a_text_model_is_a_json_4xx(text_client, body: bytes, content_type: str, status: int,
                                                       code: str) -> None:
    r = text_client.post("/predict", data=body, headers={"Content-Type": content_type})
    assert (r.status_code, r.get_json()["error"]["code"]) == (status, code)


def _infer(client, inp: dict, binary: bytes = b""):
    body = json.dumps({"inputs": [{"name": "input", **inp}]}).encode()
    headers = {"Content-Type": "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(body))
    return client.post("/v2/models/handmade/infer", data=body + binary, headers=headers)


def test_v2_takes_bytes_texts_and_int64_ids(text_client, text_model: Path) -> None:
    texts = ["goal team", "snow"]
    want = _onnx_logits(text_model, texts)
    r = _infer(text_client, {"datatype": "BYTES", "shape": [2], "data": texts})
    assert r.status_code == 200, r.get_json()
    np.testing.assert_allclose(np.array(r.get_json()["outputs"][0]["data"]).reshape(2, 3), want, atol=1e-6)
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    r = _infer(text_client, {"datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}, raw)
    np.testing.assert_allclose(np.array(r.get_json()["outputs"][0]["data"]).reshape(2, 3), want, atol=1e-6)
    ids = Encoder(text_spec(VOCAB, 8)).encode(texts)
    r = _infer(text_client, {"datatype": "INT64", "shape": [2, 8], "data": ids.tolist()})
    np.testing.assert_allclose(np.array(r.get_json()["outputs"][0]["data"]).reshape(2, 3), want, atol=1e-6)
    meta = text_client.get("/v2/models/handmade").get_json()
    assert meta["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1, 8]}]


@pytest.mark.parametrize(("inp", "binary", "status"), [
    ({"datatype": "INT64", "shape": [1, 8], "data": [99] * 8}, b"", 400),
    ({"datatype": "INT64", "shape": [1, 8], "data": [-1] * 8}, b"", 400),
    ({"datatype": "INT64", "shape": [1, 7], "data": [2] * 7}, b"", 400),
    ({"datatype": "INT64", "shape": [1, 8], "parameters": {"binary_data_size": 64}}, struct.pack("<8q", *[9] * 8), 400),
    ({"datatype": "BYTES", "shape": [5], "data": ["a"] * 5}, b"", 413),
    ({"datatype": "BYTES", "shape": [1], "data": ["x" * 51]}, b"", 413),
    ({"datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}, b"\x01\x00\x00\x00\xff", 400),
    ({"datatype": "BYTES", "shape": [2], "data": ["a"]}, b"", 400),
    ({"datatype": "FP32", "shape": [1, 8], "data": [0.0] * 8}, b"", 400),
])
def test_v2_refuses_bad_text_inputs(text_client, inp: dict, binary: bytes, status: int) -> None:
    r = _infer(text_client, inp, binary)
    assert r.status_code == status and isinstance(r.get_json()["error"], str), r.get_json()


@pytest.mark.parametrize(("inp", "status", "message"), [
    ({"datatype": "BYTES", "shape": [0], "data": []}, 400,
     "the batch is empty: the first dimension must be at least 1"),
    ({"datatype": "BYTES", "shape": [2, 2], "data": ["a"] * 4}, 400,
     "input 'input': BYTES texts take shape [N] or [N, 1], got [2, 2]"),
    ({"datatype": "BYTES", "shape": [5], "data": ["a"] * 5}, 413, "5 texts in one request; the limit is 4"),
    ({"datatype": "INT64", "shape": [5, 8], "data": [2] * 40}, 413, "5 texts in one request; the limit is 4"),
])
def test_v2_text_refusals_say_what_the_image_ones_say(text_client, inp: dict, status: int, message: str) -> None:
    r = _infer(text_client, inp)
    assert (r.status_code, r.get_json()["error"]) == (status, message)


@pytest.mark.parametrize(("change", "reason"), [
    ({"text": {**text_spec(VOCAB, 8), "tokenizer": "regex:(a+)+$"}}, "text.tokenizer"),
    ({"text": {**text_spec(VOCAB, 8), "vocab": VOCAB[:2] + ["t"] * 300_000}}, "text.vocab"),
    ({"text": {**text_spec(VOCAB, 8), "max_length": 9}}, "shape"),
    ({"classes": ["only"]}, "classes"),
    ({"text": "not a spec"}, "text must be a mapping"),
])
def test_a_text_model_with_bad_metadata_is_never_ready(tmp_path: Path, change: dict, reason: str) -> None:
    from torchferry.serve.app import create_app

    model = write_text_onnx(tmp_path / "model.onnx", VOCAB, CLASSES, changes=change)
    r = create_app({"MODEL": str(model), "LOAD_SYNC": True}).test_client().get("/readyz")
    assert r.status_code == 503 and reason in r.get_json()["reason"], r.get_json()


def test_int64_golden_inputs_are_proven_and_their_range_checked(text_model: Path, tmp_path: Path) -> None:
    from torchferry.serve.predictor import ModelRefused, Predictor

    assert Predictor(str(text_model)).prove() < 1e-5
    golden = Predictor(str(text_model)).info.metadata["golden"]
    for bad in ({"range": [0.5, 8]}, {"range": [0, 2**40]}, {"dtype": "int8"}):
        model = write_text_onnx(tmp_path / "bad.onnx", VOCAB, CLASSES, changes={"golden": {**golden, **bad}})
        with pytest.raises(ModelRefused, match="golden"):
            Predictor(str(model)).prove()


def test_the_server_encodes_as_training_did_and_the_spec_round_trips_through_metadata(tmp_path: Path) -> None:
    from torchferry.distributed.tasks import get_task
    from torchferry.distributed.text_data import encoded_dataset
    from torchferry.serve.tasks import serve_task

    rows = [("Goal, by the team!", 1), ("Pasta; sauce & garlic", 0), ("", 2), ("snow " * 30, 2)]
    spec = text_spec(build_vocab(t for t, _ in rows[:2]), 8)
    checkpoint = {"classes": CLASSES, "num_classes": 3, "text": spec, "metrics": {"val_acc": 1.0}}
    props = contract.encode_metadata(get_task("text").onnx_metadata(checkpoint))
    served = serve_task("text").read_spec(contract.decode_metadata(props))
    assert served["text"]["vocab_size"] == len(spec["vocab"]) and served["classes"] == CLASSES
    trained = encoded_dataset(rows, spec).tensors[0].numpy()
    assert np.array_equal(served["_encoder"].encode([t for t, _ in rows]), trained)
