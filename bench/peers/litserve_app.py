"""The same work as a LitServe API, 2 inference workers (LitServe's processes), its own HTTP servers in front.

    PEER_MODEL=model.onnx PEER_PORT=8000 python -m bench.peers.litserve_app     # POST /predict, raw image body

The request's `Body()` annotation hands decode_request the raw image bytes (LitServe reads JSON otherwise).
Run by `python -m bench.peers` in its own venv (bench/peers/requirements-litserve.txt).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation as an object.

import os
from typing import Annotated, Any

import litserve as ls
from fastapi import Body

from bench.peers.classify import Classifier, ort_threads

WORKERS = int(os.environ.get("PEER_WORKERS", "2"))


class ClassifyAPI(ls.LitAPI):
    """decode: the body's bytes; predict: decode, preprocess, ORT, top-5."""

    def setup(self, device: str) -> None:
        self.classifier = Classifier(os.environ["PEER_MODEL"], ort_threads(WORKERS))

    def decode_request(self, request: Annotated[bytes, Body(media_type="image/jpeg")]) -> bytes:
        return request

    def predict(self, data: bytes) -> dict[str, Any]:
        return self.classifier.classify(data)

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    server = ls.LitServer(ClassifyAPI(), accelerator="cpu", workers_per_device=WORKERS)
    server.run(host="127.0.0.1", port=int(os.environ["PEER_PORT"]), generate_client_file=False)


if __name__ == "__main__":
    main()
