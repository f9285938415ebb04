"""The GPU path, on a real CUDA device: NCCL through Ray, bf16/fp16 autocast, channels_last, torch.compile.

Every test here skips without CUDA (CI has none); they run wherever a GPU is present.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torchferry.distributed.checkpoint import load_checkpoint
from torchferry.distributed.epoch import evaluate, train_one_epoch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _launch(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHFERRY_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "distributed.launch", "--gpus", "1", "--num-workers", "2",
                           "--output-dir", str(tmp_path / "runs"), *flags], check=False, capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)


def test_launch_one_gpu_with_amp_trains_and_keeps_an_fp32_checkpoint(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--amp", "--epochs", "5", "--name", "amp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device cuda" in proc.stderr, proc.stderr[-2000:]
    match = re.search(r"best val_acc (\d\.\d+) at epoch \d+: (\S+best\.pth)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) >= 0.6  # chance is 0.1; 5 epochs of the default recipe reach ~0.8
    checkpoint = load_checkpoint(match.group(2))
    assert checkpoint["config"]["amp"] is True and checkpoint["config"]["channels_last"] is True
    assert all(t.dtype == torch.float32 for t in checkpoint["state_dict"].values() if t.is_floating_point())
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
    with open(tmp_path / "runs" / "amp" / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2, 3, 4]


def test_launch_one_gpu_with_compile(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--amp", "--compile", "--epochs", "1", "--name", "compiled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = load_checkpoint(str(tmp_path / "runs" / "compiled" / "best.pth"))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["state_dict"])


def _toy() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2)).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 16, 16)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    x[y == 1, 0] += 1.0
    batches = [(x[i:i + 16].pin_memory(), y[i:i + 16].pin_memory()) for i in range(0, 64, 16)]
    return model, batches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_train_one_epoch_under_autocast_learns(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16, and fp16 with a GradScaler (what a GPU without bf16 gets): the loss falls, the weights stay fp32."""
    from torchferry.distributed import epoch

    monkeypatch.setattr(epoch, "amp_dtype", lambda device: dtype)
    model, batches = _toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    device = torch.device("cuda")
    criterion = nn.CrossEntropyLoss()
    first = evaluate(model, batches, criterion, device, amp=True, channels_last=True)
    for _ in range(15):
        stats = train_one_epoch(model, batches, criterion, optimizer, device, amp=True, scaler=scaler,
                                channels_last=True)
    last = evaluate(model, batches, criterion, device, amp=True, channels_last=True)
    assert stats.images == 64 and last.loss < first.loss and last.accuracy >= 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if dtype == torch.float16:
        assert scaler.get_scale() > 0

