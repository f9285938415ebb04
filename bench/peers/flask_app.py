"""The overhead floor: the smallest Flask app a user would write around the same work, under gunicorn.

    PEER_MODEL=model.onnx gunicorn -w 2 -k gthread --threads 4 -b 127.0.0.1:8000 "bench.peers.flask_app:create_app()"

No limits, no model proof, no auth, no metrics, no access log: what torchferry's server costs beyond this is
what those cost. Run by `python -m bench.peers` in its own venv (bench/peers/requirements-flask.txt).
"""

from __future__ import annotations

import os

from flask import Flask, request

from bench.peers.classify import Classifier, ort_threads


def create_app() -> Flask:
    """POST /predict: an image body → its top-5 classes as JSON."""
    app = Flask(__name__)
    classifier = Classifier(os.environ["PEER_MODEL"], ort_threads(int(os.environ.get("PEER_WORKERS", "2"))))

    @app.post("/predict")
    def predict():
        return classifier.classify(request.get_data())

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app
