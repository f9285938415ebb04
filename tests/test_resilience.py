"""Training that survives: SIGINT then --resume, a SIGKILLed worker, damaged checkpoints, --init-from."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import FAST_FLAGS

from torchferry.distributed import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 300
# The built-in digits at 16 px: epochs of a second or two (a quarter of the default 32 px's compute), long enough
# to interrupt or kill a worker mid-run; 4 epochs reach val_acc 0.96.
DIGITS = ["--gpus", "0", "--workers", "2", "--num-workers", "0", "--image-size", "16"]


def epochs_in(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def launch(args: list[str], tmp: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "distributed.launch", *args], cwd=tmp, env=env,
                            stdout=open(tmp / f"{log}.out", "w"), stderr=open(tmp / f"{log}.err", "w"))


def wait_for_epochs(run_dir: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(epochs_in(run_dir)) < n:
        assert proc.poll() is None, f"run ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def best_val_acc(run_dir: Path) -> float:
    return ckpt.load_checkpoint(str(run_dir / "best.pth"))["metrics"]["val_acc"]


def train_workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline() or [p.name()])]


def usable_epochs(run_storage: Path, known: dict[Path, int] | None = None) -> list[int]:
    """Epochs (0-based) of the run's checkpoint folders that load and match their sidecar (`known`: a cache)."""
    known = {} if known is None else known
    for path in run_storage.glob("checkpoint_*/checkpoint.pth"):
        if path not in known and path.with_name("checkpoint.pth.sha256").is_file():
            try:
                known[path] = int(ckpt.load_checkpoint(str(path))["epoch"])
            except ckpt.CheckpointError:
                pass  # still being written
    return sorted(known.values())


WHOLE = [*DIGITS, "--epochs", "4", "--keep-checkpoints", "4"]
WHOLE_VAL_ACC = 0.964  # best val_acc of the same run uninterrupted (at its fourth epoch)


@pytest.mark.slow
def test_interrupted_runs_resume_from_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    """SIGINT right after the second epoch's checkpoint is written, while Ray's record of the checkpoints lags the
    folders: exit 130 naming the command that continues; --resume takes the newest checkpoint that loads, every
    epoch is in metrics.csv exactly once, and the run ends as the uninterrupted one does.

    Then its newest checkpoint is damaged: --resume says so, falls back to the one before and trains that epoch
    again."""
    proc = launch([*WHOLE, "--output-dir", str(tmp_path), "--name", "cut"], tmp_path, "cut")
    deadline, seen = time.monotonic() + WAIT_S, {}
    while 1 not in usable_epochs(tmp_path / "cut", seen):  # the second epoch's checkpoint is written: stop at once
        assert proc.poll() is None, f"run ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "no checkpoint of epoch 2 appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WAIT_S) == 130, (tmp_path / "cut.err").read_text()
    assert "--resume --name cut" in (tmp_path / "cut.err").read_text()
    assert 1 <= len(epochs_in(tmp_path / "cut")) < 4
    newest = max(usable_epochs(tmp_path / "cut"))
    assert 1 <= newest < 3
    resumed = launch(["--resume", "--name", "cut", "--output-dir", str(tmp_path)], tmp_path, "resumed")
    assert resumed.wait(timeout=WAIT_S) == 0, (tmp_path / "resumed.err").read_text()
    err = (tmp_path / "resumed.err").read_text()
    assert re.findall(r"resuming after epoch (\d+)", err) == [str(newest + 1)], err
    assert epochs_in(tmp_path / "cut") == list(range(4))  # every epoch exactly once
    assert abs(best_val_acc(tmp_path / "cut") - WHOLE_VAL_ACC) <= 0.05

    run_dir = tmp_path / "cut"
    latest = max(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    data = (latest / "checkpoint.pth").read_bytes()
    (latest / "checkpoint.pth").write_bytes(data[: len(data) // 3])
    again = launch(["--resume", "--name", "cut", "--output-dir", str(tmp_path)], tmp_path, "again")
    assert again.wait(timeout=WAIT_S) == 0, (tmp_path / "again.err").read_text()
    err = (tmp_path / "again.err").read_text()
    assert f"checkpoint {latest} is unusable" in err and "resuming after epoch 3" in err, err
    assert epochs_in(run_dir) == [0, 1, 2, 3]


@pytest.mark.slow
def test_killed_worker_is_replaced_and_the_run_finishes(tmp_path: Path) -> None:
    proc = launch([*DIGITS, "--epochs", "5", "--max-failures", "2", "--output-dir", str(tmp_path), "--name", "kill"],
                  tmp_path, "kill")
    wait_for_epochs(tmp_path / "kill", 2, proc)
    victims = train_workers(proc.pid)
    assert len(victims) == 2, victims
    victims[-1].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=WAIT_S) == 0, (tmp_path / "kill.err").read_text()
    err = (tmp_path / "kill.err").read_text()
    resumed_after = int(err.split("resuming after epoch ", 1)[1].split()[0])
    assert resumed_after >= 1  # restored from the last registered checkpoint, not from epoch 0
    assert epochs_in(tmp_path / "kill") == list(range(5))
    ckpt.load_checkpoint(str(tmp_path / "kill" / "best.pth"))


@pytest.mark.slow
def test_killed_worker_without_retries_fails_with_one_clear_error(tmp_path: Path) -> None:
    proc = launch([*DIGITS, "--epochs", "5", "--max-failures", "0", "--output-dir", str(tmp_path), "--name", "dead"],
                  tmp_path, "dead")
    wait_for_epochs(tmp_path / "dead", 2, proc)
    train_workers(proc.pid)[-1].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=WAIT_S) == 1
    errors = [ln for ln in (tmp_path / "dead.err").read_text().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.search(r"worker rank \d: its process died", errors[0]), errors[0]
    assert f"last checkpoint is {tmp_path / 'dead'}" in errors[0] and "--resume --name dead" in errors[0]
    kept = sorted((tmp_path / "dead").glob("checkpoint_*/checkpoint.pth"))
    assert kept and all(ckpt.load_checkpoint(str(p)) for p in kept)  # intact


def test_resume_of_an_unknown_run_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "distributed.launch", "--resume", "--name", "ghost",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "no run 'ghost' to continue" in proc.stderr


@pytest.mark.slow
def test_two_node_cluster_runs_one_worker_per_node(ray_two_nodes: dict, trained_run: dict, tmp_path: Path) -> None:
    """--address joins a running cluster of two nodes; STRICT_SPREAD places one worker on each; both node
    ids show up among the workers; checkpoints go to a shared --storage."""
    import json

    shared = tmp_path / "shared"
    env = {**ray_two_nodes["env"], "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "distributed.launch", *FAST_FLAGS, "--epochs", "2",
                           "--data", str(trained_run["data"]), "--address", ray_two_nodes["address"],
                           "--placement-strategy", "STRICT_SPREAD", "--storage", str(shared),
                           "--output-dir", str(tmp_path / "runs"), "--name", "two"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = json.loads((tmp_path / "runs" / "two" / "cluster.json").read_text())["workers"]
    assert len({w["node_id"] for w in workers}) == 2 and {w["ip"] for w in workers} == {"127.0.0.2", "127.0.0.3"}
    assert "2 worker(s) on 2 node(s)" in proc.stderr
    assert f"joining the Ray cluster at {ray_two_nodes['address']} and starting 2 CPU worker(s) there" in proc.stderr
    assert list((shared / "two").glob("checkpoint_*/checkpoint.pth"))  # Ray's checkpoints on the shared storage
    assert epochs_in(tmp_path / "runs" / "two") == [0, 1]
    ckpt.load_checkpoint(str(tmp_path / "runs" / "two" / "best.pth"))
