"""Micro-batching: concurrent requests in one process gathered into one ONNX Runtime call.

Off by default (`--batch-window-ms 0`). With a window, the first request to arrive waits at most that
long for others, up to `max_batch` images, then one ORT call answers all of them; each caller gets its
own rows back. A closed batcher (its model was swapped out) answers later callers directly, so a
request that picked the old model just before the swap still gets its answer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np


class MicroBatcher:
    """Gathers [n_i, C, H, W] arrays from many threads into one call of `run`."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], window_ms: float, max_batch: int):
        self.run_fn, self.window, self.max_batch = run, window_ms / 1000.0, max_batch
        self.requests: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._closed = False
        self._close_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="torchferry-batcher", daemon=True)
        self.thread.start()

    def submit(self, batch: np.ndarray) -> np.ndarray:
        """Logits for `batch`, computed together with whatever else arrives within the window."""
        future: Future = Future()
        with self._close_lock:  # nothing is queued behind the stop marker, where no one would answer it
            if self._closed:
                return self.run_fn(batch)
            self.requests.put((batch, future))
        return future.result()

    def close(self) -> None:
        """Stop the worker thread after the requests already queued; later callers are answered directly."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self.requests.put(None)
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        import time

        while True:
            first = self.requests.get()
            if first is None:
                return
            pending = [first]
            size = first[0].shape[0]
            deadline = time.monotonic() + self.window
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self.requests.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    self.requests.put(None)
                    break
                pending.append(item)
                size += item[0].shape[0]
            self._answer(pending)

    def _answer(self, pending: list[tuple[np.ndarray, Future]]) -> None:
        try:
            logits = self.run_fn(np.concatenate([b for b, _ in pending]))
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
            for _, future in pending:
                future.set_exception(exc)
            return
        start = 0
        for batch, future in pending:
            future.set_result(logits[start:start + batch.shape[0]])
            start += batch.shape[0]
