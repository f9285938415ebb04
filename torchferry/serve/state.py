"""What the request handlers of one app share: its settings, model repository, auth, metrics and pixel budget.

`create_app` builds one `ServerState` and keeps it in `app.extensions`; the routes (serve/routes.py,
serve/v2.py) read it through `state()`, so nothing about a request lives in a closure or a module global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import current_app, g

from torchferry.serve.auth import BearerAuth
from torchferry.serve.images import PixelBudget, prepare
from torchferry.serve.metrics import Metrics
from torchferry.serve.repository import ModelRepository
from torchferry.serve.settings import ServeSettings

EXTENSION = "torchferry.state"


@dataclass(frozen=True)
class ServerState:
    """One app's shared parts, built once by `create_app`."""

    settings: ServeSettings
    repo: ModelRepository
    auth: BearerAuth
    metrics: Metrics
    budget: PixelBudget  # one image at the pixel cap decodes at a time per process (serve/images.py)

    def prepare(self, data: bytes, spec: dict[str, Any], name: str) -> np.ndarray:
        """An encoded image as the model's float32 [C, H, W], within the pixel limit and budget."""
        return prepare(data, spec, self.settings.max_pixels, name, self.budget)


def state() -> ServerState:
    """The current app's `ServerState`."""
    return current_app.extensions[EXTENSION]


def reason_for_caller(text: str | None = None) -> str:
    """Why the model (or a version, `text`) is not ready: whole for a caller with the token, else without
    file system paths."""
    repo = state().repo
    text = repo.reason if text is None else text
    return text if g.get("authenticated") else repo.public(text)


def versions_for_caller() -> dict[str, dict[str, str]]:
    """Every version's state, its reasons redacted for a caller without the token."""
    repo = state().repo
    return repo.versions if g.get("authenticated") else repo.public_versions()


def count_images(n: int) -> None:
    """`n` images classified by this request: for its access line and the metrics."""
    g.images = n
    state().metrics.observe_batch(n)
