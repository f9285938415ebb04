"""The checkpoint contract (DESIGN.md): one self-describing file, written atomically, loaded weights-only.

Every reader and writer of `.pth` files in torchferry goes through this module, so the schema, the
format check and the integrity check live in one place.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
import torchvision
from torch import nn

import distributed
from distributed import TorchferryError

FORMAT = "torchferry.checkpoint/1"
FORMAT_MAJOR = FORMAT.rsplit("/", 1)[1].split(".")[0]
REQUIRED_KEYS = ("format", "arch", "num_classes", "classes", "preprocess", "state_dict", "epoch", "metrics", "config")
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds")
CHECKPOINT_FILE = "checkpoint.pth"


class CheckpointError(TorchferryError):
    """A checkpoint that is missing, damaged, of an unknown format, or not loadable weights-only."""


def versions() -> dict[str, str]:
    """Versions of the libraries that write a checkpoint."""
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "torchferry": distributed.__version__}


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


def default_file_mode() -> int:
    """0o666 less the umask: what `open()` would give, not mkstemp's owner-only 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem (e.g. some network mounts) supports fsync on a directory
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(checkpoint: dict[str, Any], path: str, sidecar: bool = False) -> str:
    """Write a checkpoint atomically (temp, fsync, rename); with `sidecar`, also `<path>.sha256`. Returns the hash."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    if sidecar:
        atomic_write_bytes(path + ".sha256", f"{digest}  {os.path.basename(path)}\n".encode())
    return digest


def copy_checkpoint(src: str, dst: str) -> str:
    """Copy a checkpoint file atomically, with a sha256 sidecar; returns the hash."""
    with open(src, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(dst, data)
    atomic_write_bytes(dst + ".sha256", f"{digest}  {os.path.basename(dst)}\n".encode())
    return digest


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load and check a checkpoint: sha256 sidecar when present, `weights_only=True`, known format."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    sidecar = path + ".sha256"
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            parts = f.read().split()
        expected = parts[0] if parts else ""
        actual = sha256_file(path)
        if expected and actual != expected:
            raise CheckpointError(f"checkpoint {path!r} does not match its sha256 sidecar (expected {expected[:12]}…, "
                                  f"got {actual[:12]}…): the file is truncated or altered")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path!r} as a weights-only checkpoint: {load_error_reason(exc)}") from None
    check_checkpoint(obj, path)
    return obj


def load_error_reason(exc: BaseException) -> str:
    """The one line of a `torch.load` failure that says why: a refused pickled object, truncation, ..."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"unsupported (global|operand)|GLOBAL \S+|blocked", ln, re.IGNORECASE):
            return ("it holds a pickled Python object that weights_only refuses to run ("
                    + ln.split("error:", 1)[-1].strip()[:200] + ")")
    if lines and lines[0].startswith("Weights only load failed") and len(lines) > 1:
        return lines[-2][:300] if len(lines) > 2 else lines[-1][:300]
    return lines[0][:300] if lines else type(exc).__name__


def check_checkpoint(obj: Any, where: str) -> None:
    """Raise CheckpointError unless `obj` follows the checkpoint contract."""
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{where!r} is not a torchferry checkpoint (no 'format' key)")
    fmt = str(obj["format"])
    name, _, version = fmt.partition("/")
    if name != "torchferry.checkpoint" or version.split(".")[0] != FORMAT_MAJOR:
        raise CheckpointError(f"{where!r} has checkpoint format {fmt!r}; this torchferry reads {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{where!r} lacks {missing}")


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode, CPU)."""
    from distributed.models import build_model

    model = build_model(checkpoint["arch"], int(checkpoint["num_classes"]),
                        channels=int(checkpoint["preprocess"]["channels"]),
                        arch_kwargs=checkpoint.get("arch_kwargs") or {})
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def write_metrics_csv(path: str, history: Iterable[dict[str, Any]]) -> None:
    """metrics.csv, one row per epoch in epoch order, rewritten atomically from the run's history."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(history, key=lambda r: r["epoch"]):
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRIC_COLUMNS})
    atomic_write_bytes(path, buffer.getvalue().encode())
