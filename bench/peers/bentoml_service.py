"""The same work as a BentoML service with 2 workers (BentoML's processes).

    PEER_MODEL=model.onnx bentoml serve bench.peers.bentoml_service:Classify --host 127.0.0.1 --port 8000

`predict` takes its one argument positional-only (BentoML's root input), so the raw image body is handed to it
as bytes. Run by `python -m bench.peers` in its own venv (bench/peers/requirements-bentoml.txt).
"""

import os
from typing import Any

import bentoml

from bench.peers.classify import Classifier, ort_threads

WORKERS = int(os.environ.get("PEER_WORKERS", "2"))


@bentoml.service(workers=WORKERS)
class Classify:
    """POST /predict: an image body → its top-5 classes as JSON."""

    def __init__(self) -> None:
        self.classifier = Classifier(os.environ["PEER_MODEL"], ort_threads(WORKERS))

    @bentoml.api
    def predict(self, image: bytes, /) -> dict[str, Any]:
        return self.classifier.classify(image)
