"""Which model this process serves, and swapping it for a newer one without dropping a request.

Two sources: one file (`--model model.onnx`, served as version 1), or a folder in Triton's repository layout
(`--model-dir DIR`: `DIR/<name>/<version>/model.onnx`, versions are positive integers). From a folder the
highest version that passes its start-up proof (sha256 sidecar when present, golden outputs reproduced) is
served. `refresh()` looks again: a new version is loaded, warmed and proven while the current one keeps
answering, and only then swapped in (one attribute assignment, atomic for the threads that read it); a
version that fails is logged as one JSON line with its reason, reported, and never served; removing the
served version's folder falls back to the highest good one left. Request handlers read `active` once and
use that `Served` to the end, so a request never mixes two models.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torchferry.contract import sidecar_path
from torchferry.serve.batcher import MicroBatcher
from torchferry.serve.device import DeviceRefused
from torchferry.serve.predictor import ModelRefused, Predictor
from torchferry.serve.settings import ServeSettings

_logger = logging.getLogger("torchferry.serve")

MODEL_FILE = "model.onnx"
# A version folder's name: a positive integer written plainly, at most 18 digits (fits Triton's int64). Not
# str.isdigit(), which accepts "²" (int() then raises, and every re-check failed) and "٣"; not "03", which
# would be a second folder for version 3; not 5000 digits, past int()'s limit. Other names are not versions.
VERSION_NAME = re.compile(r"[1-9][0-9]{0,17}")


# An absolute path in a message: a slash-led run of non-space, non-quote characters, not inside a word or URL.
_ABS_PATH = re.compile(r"(?<![\w.:/>])/[^\s'\"]+")


def redact_paths(text: str, roots: dict[str, str | None]) -> str:
    """`text` without the server's file system layout: each configured root (path → placeholder) replaced,
    then any other absolute path cut to its last component. For callers without the token; the log keeps all."""
    for path, placeholder in sorted(((p, n) for p, n in roots.items() if p), key=lambda kv: -len(kv[0])):
        text = text.replace(path, placeholder)
    return _ABS_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/.,;:)")) + m.group(0)[
        len(m.group(0).rstrip("/.,;:)")):], text)


def fingerprint(path: str) -> tuple:
    """What changes when the model file or its sidecar is replaced or rewritten: (inode, size, mtime) of both."""
    out = []
    for p in (path, sidecar_path(path)):
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class Served:
    """One proven model version, as requests see it."""

    name: str
    version: str
    predictor: Predictor
    batcher: MicroBatcher | None
    proof: dict[str, Any]
    fingerprint: tuple = field(repr=False)
    # Inputs (images, texts, rows) one request may carry: TORCHFERRY_MAX_IMAGES, fewer for a model whose inputs are
    # large (Predictor.items_per_request), worked out once at load rather than on every request.
    max_items: int = 1
    # What every /predict answer says of the model that gave it, built once at load too.
    answer_model: dict[str, Any] = field(default_factory=dict, repr=False)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits, through the micro-batcher when enabled."""
        if self.batcher is not None:
            return self.batcher.submit(batch)
        return self.predictor.run(batch)

    def retire(self) -> None:
        """Stop the batcher thread; requests that still hold this model are answered directly."""
        if self.batcher is not None:
            self.batcher.close()


def find_versions(model_dir: str, name: str | None) -> tuple[str, dict[int, str]]:
    """(model name, {version: path of its model.onnx}) in a Triton-layout folder; ModelRefused when none fits."""
    if not os.path.isdir(model_dir):
        raise ModelRefused(f"model folder {model_dir!r} does not exist")
    if name is None:
        names = sorted(
            d for d in os.listdir(model_dir) if not d.startswith(".") and os.path.isdir(os.path.join(model_dir, d))
        )
        if not names:
            raise ModelRefused(f"no model in {model_dir}: expected {model_dir}/<name>/<version>/{MODEL_FILE}")
        if len(names) > 1:
            raise ModelRefused(
                f"{model_dir} holds several models ({', '.join(names)}); choose one with --name "
                "or TORCHFERRY_MODEL_NAME"
            )
        name = names[0]
    folder = os.path.join(model_dir, name)
    if not os.path.isdir(folder):
        raise ModelRefused(f"no model {name!r} in {model_dir}: expected {folder}/<version>/{MODEL_FILE}")
    versions = {
        int(d): os.path.join(folder, d, MODEL_FILE)
        for d in os.listdir(folder)
        if VERSION_NAME.fullmatch(d) and os.path.isdir(os.path.join(folder, d))
    }
    if not versions:
        raise ModelRefused(
            f"model {name!r} has no version folders: expected {folder}/<version>/{MODEL_FILE} with "
            "a positive integer version"
        )
    return name, versions


class ModelRepository:
    """The served model of this process, its versions' states, and the background re-check that swaps it."""

    def __init__(self, settings: ServeSettings):
        self.model_file: str | None = settings.model or None
        self.model_dir: str | None = settings.model_dir or None
        self.name_override: str | None = settings.model_name or None
        self.threads = settings.ort_threads or 0
        self.memory_cap = settings.ort_memory_bytes
        self.device, self.device_id = settings.device, settings.device_id
        self.device_problem: str | None = None  # why the device refused the last model it was given, if it did
        self.batch_window_ms = settings.batch_window()
        self.max_batch, self.max_images, self.max_input_bytes = (settings.max_batch, settings.max_images,
                                                                 settings.max_input_bytes)
        self.poll_seconds = settings.poll_seconds
        self.active: Served | None = None
        self.reason = "loading the model"
        self.name: str | None = self.name_override
        self.versions: dict[str, dict[str, str]] = {}  # version -> {"state": ..., "reason": ...} for reports
        self._refused: dict[int, tuple[tuple, str]] = {}  # version -> (fingerprint, reason): not retried unchanged
        self._scan_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._watcher: threading.Thread | None = None

    def public(self, text: str) -> str:
        """`text` (a reason) with paths redacted (redact_paths): the model folder shows as <model-dir>."""
        roots: dict[str, str | None] = {}
        if self.model_dir:
            roots[os.path.abspath(self.model_dir)] = "<model-dir>"
            roots[self.model_dir.rstrip("/") or self.model_dir] = "<model-dir>"
        if self.model_file:
            base = os.path.basename(self.model_file)
            roots[os.path.abspath(self.model_file)] = base
            roots[self.model_file] = base
        return redact_paths(text, roots)

    def public_versions(self) -> dict[str, dict[str, str]]:
        """The versions' states with their reasons redacted (`public`)."""
        return {v: {**state, "reason": self.public(state.get("reason", ""))} for v, state in self.versions.items()}

    @property
    def ready(self) -> bool:
        """True once a proven model answers."""
        return self.active is not None

    def request_reload(self) -> None:
        """Ask the watcher thread to look for new versions now (safe from a signal handler: it only sets a flag)."""
        self._wake.set()

    def start(self, initial_load: bool = True) -> None:
        """Start the watcher thread: the first load (unless done already), then a re-check per request or poll."""
        self._watcher = threading.Thread(
            target=self._watch, args=(initial_load,), name="torchferry-models", daemon=True
        )
        self._watcher.start()

    def stop(self) -> None:
        """End the watcher thread (tests; a server process simply exits)."""
        self._stop = True
        self._wake.set()

    def _watch(self, initial_load: bool) -> None:
        if initial_load:
            self.refresh()
        while not self._stop:
            self._wake.wait(timeout=self.poll_seconds if self.poll_seconds > 0 else None)
            self._wake.clear()
            if not self._stop:
                self.refresh()

    def refresh(self) -> None:
        """Look at the model source once; swap in a newer proven version, or the best one left. Never raises."""
        with self._scan_lock:
            try:
                self._refresh()
            except Exception as exc:  # the watcher survives anything; the old model keeps serving
                _logger.exception("model re-check failed")
                if self.active is None:
                    self.reason = f"cannot load the model: {type(exc).__name__}: {exc}"

    def _candidates(self) -> tuple[str | None, dict[int, str]]:
        if self.model_file and self.model_dir:
            raise ModelRefused(
                "set either a model file (--model, TORCHFERRY_MODEL) or a model folder (--model-dir, "
                "TORCHFERRY_MODEL_DIR), not both"
            )
        if self.model_dir:
            return find_versions(self.model_dir, self.name_override)
        if self.model_file:
            return self.name_override, {1: self.model_file}
        raise ModelRefused(
            "no model configured: set TORCHFERRY_MODEL or pass --model (one file), or "
            "TORCHFERRY_MODEL_DIR / --model-dir (versioned folder)"
        )

    def _refresh(self) -> None:
        try:
            name, found = self._candidates()
        except ModelRefused as exc:
            self._no_source(str(exc))
            return
        active = self.active
        chosen, states = self._choose(name, found, active)
        self._publish(self._settle_states(found, states, chosen), chosen, active, name)
        if chosen is not None and chosen is not active:
            self._swap(chosen, active)

    def _no_source(self, reason: str) -> None:
        """No model source to look at (nothing configured, a folder without versions): no versions to report."""
        self._log_refused(self.name_override, None, reason)
        if self.active is None:
            self.reason = reason
        self.versions = {}

    def _choose(self, name: str | None, found: dict[int, str],
                active: Served | None) -> tuple[Served | None, dict[str, dict[str, str]]]:
        """The highest version that proves itself (the active one when unchanged; one refused before and
        unchanged since is not retried), and the states of those above it."""
        states: dict[str, dict[str, str]] = {}
        for version in sorted(found, reverse=True):
            path, fp = found[version], fingerprint(found[version])
            if active is not None and active.version == str(version) and active.fingerprint == fp:
                return active, states
            prior = self._refused.get(version)
            if prior is not None and prior[0] == fp:
                states[str(version)] = {"state": "refused", "reason": prior[1]}
                continue
            try:
                return self._load(name, version, path, fp), states
            except (ModelRefused, DeviceRefused) as exc:
                reason = str(exc)
                self.device_problem = reason if isinstance(exc, DeviceRefused) else self.device_problem
            except Exception as exc:  # noqa: BLE001 - any failure to load refuses this version only
                reason = f"cannot load {path}: {type(exc).__name__}: {exc}"
            self._refused[version] = (fp, reason)
            states[str(version)] = {"state": "refused", "reason": reason}
            self._log_refused(name, version, reason, path)
        return None, states

    def _settle_states(self, found: dict[int, str], states: dict[str, dict[str, str]],
                       chosen: Served | None) -> dict[str, dict[str, str]]:
        """Every version found with its state: refused (unchanged since), available, or serving."""
        for version, path in found.items():
            prior = self._refused.get(version)
            if prior is not None and prior[0] == fingerprint(path):
                states.setdefault(str(version), {"state": "refused", "reason": prior[1]})
            states.setdefault(str(version), {"state": "available", "reason": "a higher version is served"})
        self._refused = {v: r for v, r in self._refused.items() if v in found}
        if chosen is not None:
            states[chosen.version] = {"state": "serving", "reason": "proven at load"}
        return states

    def _publish(self, states: dict[str, dict[str, str]], chosen: Served | None, active: Served | None,
                 name: str | None) -> None:
        """The versions' report, and why nothing answers when no version proves itself."""
        def by_version(s: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
            return dict(sorted(s.items(), key=lambda kv: -int(kv[0])))

        reasons = "; ".join(f"version {v}: {s['reason']}" for v, s in by_version(states).items())
        if chosen is None and active is not None:  # nothing on disk proves itself: keep the one in memory
            kept = "kept in memory: no version on disk passes its proof"
            states = {**states, active.version: {"state": "serving", "reason": kept}}
        # Published whole, never changed after: request threads serialise this dict while we work.
        self.versions = by_version(states)
        if chosen is not None:
            self.name = chosen.name
        elif active is None:
            self.reason = reasons if self.model_dir else next(iter(self.versions.values()))["reason"]
        else:
            _logger.error(json.dumps({"event": "no_servable_version", "model": name, "serving": active.version,
                                      "reason": reasons}))

    def _swap(self, chosen: Served, active: Served | None) -> None:
        """`chosen` answers from now on; requests that already hold `active` finish on it."""
        self.active = chosen
        self.reason = "ready"
        _logger.info(json.dumps({"event": "model_swapped" if active else "model_ready", "model": chosen.name,
                                 "version": chosen.version, "from_version": active.version if active else None,
                                 "path": chosen.predictor.info.path, "sha256": chosen.predictor.info.sha256,
                                 **chosen.proof}))
        if active is not None:
            active.retire()

    def _load(self, name: str | None, version: int, path: str, fp: tuple) -> Served:
        t0 = time.perf_counter()
        predictor = Predictor(path, self.threads, self.device, self.device_id, memory_cap=self.memory_cap)
        self.device_problem = None  # the device took this model's session
        diff = predictor.prove(self.max_input_bytes)  # also the warm-up inference, on the device that serves
        proof = {"golden_max_abs_diff": diff, "load_seconds": round(time.perf_counter() - t0, 3),
                 "device": self.device, "providers": predictor.providers}
        meta = predictor.info.metadata
        name = name or str(meta.get("name") or meta.get("arch") or "model")
        per_request = predictor.items_per_request(self.max_images, self.max_input_bytes)
        if per_request < self.max_images:
            _logger.warning(json.dumps({"event": "fewer_items_per_request", "model": name, "version": str(version),
                                        "input_bytes": predictor.input_bytes(), "items_per_request": per_request,
                                        "max_input_bytes": self.max_input_bytes}))
        max_batch = predictor.items_per_request(self.max_batch, self.max_input_bytes)  # a micro-batch: as a request
        batcher = MicroBatcher(predictor.run, self.batch_window_ms, max_batch) if self.batch_window_ms > 0 else None
        info = predictor.info
        answer_model = {"name": name, "version": str(version), "sha256": info.sha256, "arch": meta.get("arch"),
                        "task": info.task, **({"classes": len(info.classes)} if predictor.task.classifier
                                              else {"target": info.spec.get("target")})}
        return Served(name=name, version=str(version), predictor=predictor, batcher=batcher, proof=proof,
                      fingerprint=fp, max_items=per_request, answer_model=answer_model)

    @staticmethod
    def _log_refused(name: str | None, version: int | None, reason: str, path: str | None = None) -> None:
        _logger.error(
            json.dumps(
                {
                    "event": "model_refused",
                    "model": name,
                    "version": None if version is None else str(version),
                    "path": path,
                    "reason": reason,
                }
            )
        )
