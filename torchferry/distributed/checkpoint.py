"""The checkpoint contract (docs/design.md): one self-describing file, written atomically, loaded weights-only.

Every reader and writer of `.pth` files in torchferry goes through this module, so the schema, the
format check and the integrity check live in one place; the parts the ONNX model and the server share
(format version, preprocessing spec, sha256 sidecar) come from `torchferry.contract`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import torchferry
from torchferry.contract import (
    CHECKPOINT_FORMAT,
    TORCH_SAVE_MAGIC,
    ContractError,
    TorchferryError,
    error_line,
    folder_not_file,
    format_problem,
    is_int,
    is_number,
    recorded_sha256,
    sha256_file,
    short,
    sidecar_path,
    sidecar_text,
)
from torchferry.files import atomic_write_bytes, default_file_mode  # noqa: F401 - export/ imports them here

if TYPE_CHECKING:
    from torchferry.distributed.config import TrainConfig

FORMAT = CHECKPOINT_FORMAT
# Every task's checkpoint has these; the task adds its own (Task.required_keys: an image's classes and preprocess).
COMMON_KEYS = ("format", "arch", "state_dict", "epoch", "metrics", "config")
# The image task's, which every checkpoint before issue 19 is.
METRICS = ("val_acc", "val_loss", "train_loss", "train_acc")
REQUIRED_KEYS = ("format", "arch", "num_classes", "classes", "preprocess", "state_dict", "epoch", "metrics", "config")
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds")
CHECKPOINT_FILE = "checkpoint.pth"


class CheckpointError(ContractError):
    """A checkpoint that is missing, damaged, of an unknown format, or not loadable weights-only."""


def versions() -> dict[str, str]:
    """Versions of the libraries that write a checkpoint."""
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "torchferry": torchferry.__version__}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the weights, without DDP's `module.` or torch.compile's `_orig_mod.` prefixes."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def build_checkpoint(model: nn.Module, cfg: TrainConfig, classes: Sequence[str] = (), *, epoch: int,
                     metrics: Mapping[str, float], resume: Mapping[str, Any] | None = None,
                     fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of docs/design.md (plain data and tensors only): `model`'s weights, the resolved `cfg` it was
    trained with, its task and the task's `fields` (an image classifier's: its `classes` and eval preprocessing),
    `epoch` and the task's metrics of `metrics`. `resume` adds what --resume reads (history, best_<metric>,
    backbone_frozen, optimizer, scheduler, scaler); best.pth goes without."""
    from torchferry.distributed.image_task import image_fields
    from torchferry.distributed.tasks import get_task

    task = get_task(cfg.task)
    own = dict(fields) if fields is not None else image_fields(list(classes), cfg)
    return {
        "format": FORMAT, "task": task.name, "arch": cfg.model, "arch_kwargs": {}, **own,
        "state_dict": clean_state_dict(model), "epoch": int(epoch),
        "metrics": {k: float(metrics[k]) for k in task.checkpoint_metrics}, **(resume or {}), "config": cfg.to_dict(),
        "versions": versions(),
    }


def write_sidecar(path: str, digest: str) -> None:
    """`<path>.sha256`, atomically: the hash a reader checks `path` against."""
    atomic_write_bytes(sidecar_path(path), sidecar_text(path, digest))


def save_checkpoint(checkpoint: dict[str, Any], path: str, sidecar: bool = False) -> str:
    """Write a checkpoint atomically (temp, fsync, rename); with `sidecar`, also `<path>.sha256`. Returns the hash."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    if sidecar:
        write_sidecar(path, digest)
    return digest


def copy_checkpoint(src: str, dst: str) -> str:
    """Copy a checkpoint file atomically, with a sha256 sidecar; returns the hash."""
    with open(src, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(dst, data)
    write_sidecar(dst, digest)
    return digest


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load and check a checkpoint: sha256 sidecar when present, `weights_only=True`, known format."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} {folder_not_file(path, 'best.pth')}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    expected = recorded_sha256(path)
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"checkpoint {path!r} does not match its sha256 sidecar (expected {expected[:12]}…, "
                                  f"got {actual[:12]}…): the file is truncated or altered")
    not_torch = _not_torch_save(path)
    if not_torch:
        raise CheckpointError(f"cannot load {path!r}: {not_torch}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or hostile file makes torch.load raise is bad input
        raise CheckpointError(f"cannot load {path!r} as a weights-only checkpoint: {load_error_reason(exc)}") from None
    check_checkpoint(obj, path)
    return obj


def _not_torch_save(path: str) -> str | None:
    """Why `path` cannot be a file torch.save wrote (an ONNX model, an image, text ...), judged by its first bytes;
    None when it may be one. torch.load would call such a file a refused pickle ('Unsupported operand 8')."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(TORCH_SAVE_MAGIC):
        return None
    if not head:
        return "it is empty"
    what = ("an ONNX model, not a checkpoint: pass the best.pth it was exported from" if path.lower().endswith(".onnx")
            else "not a PyTorch checkpoint (not a file torch.save wrote): pass a run's best.pth")
    return f"it is {what}"


def load_error_reason(exc: BaseException) -> str:
    """The one line of a `torch.load` failure that says why: a refused pickled object, truncation, ..."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"unsupported (global|operand)|GLOBAL \S+|blocked", ln, re.IGNORECASE):
            return ("it holds a pickled Python object that weights_only refuses to run ("
                    + ln.split("error:", 1)[-1].strip()[:200] + ")")
    if lines and lines[0].startswith("Weights only load failed") and len(lines) > 1:
        return lines[-2][:300] if len(lines) > 2 else lines[-1][:300]
    return error_line(exc)


def check_checkpoint(obj: Any, where: str) -> None:
    """Raise CheckpointError unless `obj` follows the checkpoint contract, every field typed and bounded.

    A checkpoint is untrusted data: this is the one place that checks each field a loader reads, so that a
    malformed file ends in one line (exit 2) before anything is built, allocated or written.
    """
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{where!r} is not a torchferry checkpoint (no 'format' key)")
    problem = format_problem(obj["format"])
    if problem:
        raise CheckpointError(f"{where!r} {problem}")
    from torchferry.distributed.tasks import task_for

    try:
        task = task_for(obj)
    except TorchferryError as exc:
        raise CheckpointError(f"{where!r} is malformed: {exc}") from None
    missing = [k for k in (*COMMON_KEYS, *task.required_keys) if k not in obj]
    if missing:
        raise CheckpointError(f"{where!r} lacks {missing}")
    for problem in _field_problems(obj, task):
        raise CheckpointError(f"{where!r} is malformed: {problem}")


MAX_EPOCH = 1_000_000


def _field_problems(obj: dict[str, Any], task: Any) -> Iterable[str]:
    """What is wrong with the checkpoint's fields, first problem first (empty when nothing is): the task's own
    fields (`Task.field_problems`), then those every checkpoint has."""
    from torchferry.distributed.config import TrainConfig
    from torchferry.distributed.models import check_plain_kwargs

    yield from task.field_problems(obj)
    try:
        check_plain_kwargs(obj.get("arch_kwargs"))
    except TorchferryError as exc:
        yield str(exc)
    state = obj["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        yield "state_dict must map parameter names to tensors"
    if not is_int(obj["epoch"], 0, MAX_EPOCH):
        yield f"epoch must be an integer from 0 to {MAX_EPOCH}, got {short(obj['epoch'])}"
    metrics = obj["metrics"]
    if not (isinstance(metrics, dict) and all(isinstance(k, str) and is_number(v) for k, v in metrics.items())):
        yield "metrics must map names to numbers"
    config = obj["config"]
    if not isinstance(config, dict):
        yield f"config must be a mapping, got {type(config).__name__}"
    else:
        try:
            if TrainConfig.from_dict(dict(config)).task != task.name:
                yield f"config.task is not the checkpoint's task {task.name!r}"
        except (TorchferryError, TypeError) as exc:
            yield f"config: {exc}"
    yield from _optional_problems(obj)


def _optional_problems(obj: dict[str, Any]) -> Iterable[str]:
    """Fields only some checkpoints carry (resume state, history, versions): typed when present."""
    versions = obj.get("versions", {})
    if not (isinstance(versions, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) <= 200
                                               for k, v in versions.items())):
        yield "versions must map library names to version strings"
    history = obj.get("history", [])
    if not (isinstance(history, list) and all(
            isinstance(row, dict) and is_int(row.get("epoch"), 0, MAX_EPOCH)
            and all(isinstance(k, str) and is_number(v) for k, v in row.items()) for row in history)):
        yield "history must be a list of per-epoch rows of numbers"
    for key in (k for k in obj if isinstance(k, str) and k.startswith("best_val_")):
        if not is_number(obj[key]):
            yield f"{key} must be a number, got {short(obj[key])}"
    if "backbone_frozen" in obj and not isinstance(obj["backbone_frozen"], bool):
        yield f"backbone_frozen must be true or false, got {short(obj['backbone_frozen'])}"
    for key in ("optimizer", "scheduler", "scaler"):
        if key in obj and not isinstance(obj[key], dict):
            yield f"{key} must be a mapping, got {type(obj[key]).__name__}"


def model_from_checkpoint(checkpoint: dict[str, Any], *, factory: str | None) -> nn.Module:
    """Rebuild the model a checked checkpoint describes and load its weights (eval mode, CPU).

    The file rebuilds its task's built-in models by name (smallcnn, a torchvision classifier, the MLP); a
    `package.module:factory` model only when `factory`, the command line's --model, names that same factory
    (None: the command named none). The architecture is first built on the meta device and its parameter
    shapes compared with the checkpoint's tensors, so `arch_kwargs` cannot make it allocate more than the file
    itself holds.
    """
    from torchferry.distributed.tasks import task_for

    arch = checkpoint["arch"]
    build = task_for(checkpoint).model_builder(checkpoint, factory)
    state = checkpoint["state_dict"]
    try:
        with torch.device("meta"):
            probe = build()
    except TorchferryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a builder refusing the file's arguments is bad input
        if factory is None:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot build {arch} with arch_kwargs {short(checkpoint.get('arch_kwargs'))}: "
                                  f"{reason}") from None
        probe = build()  # your factory, off meta
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {[k[:60] for k in unexpected[:3]]}"
                  if unexpected else f"{wrong[0]} is {list(got[wrong[0]])}, the model has {list(expected[wrong[0]])}")
        raise CheckpointError(f"the checkpoint's weights do not fit its {arch} model ({detail})")
    del probe
    model = build()
    model.load_state_dict(state)
    return model.eval()


def write_metrics_csv(path: str, history: Iterable[dict[str, Any]],
                      columns: Sequence[str] = METRIC_COLUMNS) -> None:
    """metrics.csv, one row per epoch in epoch order (the task's `columns`), rewritten atomically from the run's
    history."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(history, key=lambda r: r["epoch"]):
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in columns})
    atomic_write_bytes(path, buffer.getvalue().encode())
