"""What a run tells as it goes: rank 0's events to the driver through a Ray queue, and the driver's console.

On the workers `EventSink` sends epoch rows, progress and notes, never blocking training; on the driver
`Console` prints rank 0's epoch lines (`format_epoch`) and draws the progress bar. `record_placement`
writes which node each worker runs on into runs/<name>/cluster.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

import ray
import torch.distributed as dist

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.epoch import is_main_process
from torchferry.distributed.tasks import get_task
from torchferry.distributed.timeline import mark

_logger = logging.getLogger(__name__)


class EventSink:
    """Rank 0's messages to the driver (epoch rows, progress) through a Ray queue; never blocks training."""

    def __init__(self, queue: Any, progress: bool = False):
        self.queue, self.progress = queue, progress
        self.epoch = self.total = self.done = 0
        self.every = 1
        self.first_step_pending = True

    def send(self, kind: str, **payload: Any) -> None:
        if self.queue is None or not is_main_process():
            return
        try:
            self.queue.put_nowait({"kind": kind, **payload})
        except Exception:  # noqa: BLE001 - a full or gone queue must not stop training
            _logger.debug("dropped %s event for the driver", kind)

    def start_epoch(self, epoch: int, total: int) -> EventSink:
        self.epoch, self.total, self.done = epoch, total, 0
        self.every = max(1, total // 20)
        if self.progress:
            self.send("progress", epoch=epoch, done=0, total=total)
        return self

    def update(self, n: int = 1) -> None:
        if self.first_step_pending:  # for the start-up timeline
            self.first_step_pending = False
            mark("first_step")
        self.done += n
        if self.progress and (self.done % self.every == 0 or self.done == self.total):
            self.send("progress", epoch=self.epoch, done=self.done, total=self.total)


def setup_worker_logging(verbose: bool) -> None:
    """Our log lines on a worker's stdout, which Ray collects (and shows with --verbose)."""
    logger = logging.getLogger("torchferry.distributed")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def format_epoch(row: dict[str, Any], epochs: int, items: str = "images") -> str:
    """The per-epoch console line: the task's figures in the row's order, then lr, speed (in the task's `items`:
    img/s, rows/s, texts/s; metrics.csv's column is images_per_s whatever the task) and time."""
    figures = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "images_per_s", "seconds"))
    unit = "img" if items == "images" else items
    return (f"epoch {row['epoch'] + 1:>3}/{epochs}  {figures}  lr {row['lr']:.3g}"
            f"  {row['images_per_s']:.0f} {unit}/s  {row['seconds']:.1f}s")


def record_placement(cfg: TrainConfig, rank: int, world: int, events: EventSink) -> None:
    """Which node each worker runs on, and the workers' placement group: gathered on rank 0 into
    runs/<name>/cluster.json and told to the driver."""
    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
          "pid": os.getpid()}
    everyone: list[Any] = [None] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(everyone, me)
    else:
        everyone = [me]
    if rank == 0:
        group = ray.util.get_current_placement_group()  # Ray Train's, shared by the run's workers
        record = {"workers": everyone, "placement_group": group.id.hex() if group else None}
        ckpt.atomic_write_bytes(os.path.join(cfg.run_dir, "cluster.json"),
                                (json.dumps(record, indent=2) + "\n").encode())
        nodes = sorted({w["node_id"] for w in everyone})
        events.send("info", message=f"{world} worker(s) on {len(nodes)} node(s): " + ", ".join(
            f"rank {w['rank']}@{w['ip']}/{w['node_id'][:8]}" for w in everyone))


class Console(threading.Thread):
    """Prints rank 0's per-epoch lines on the driver and draws its progress bar (tqdm, terminals only)."""

    def __init__(self, events: Any, cfg: TrainConfig):
        super().__init__(name="torchferry-console", daemon=True)
        self.events, self.cfg = events, cfg
        self.stopping = threading.Event()
        self.bar: Any = None
        self.pictures_warmed = False

    def run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                event = self.events.get(timeout=0.5)
            except Empty:
                if self.stopping.is_set():
                    break
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone: Ray is shutting down
                break
            self.handle(event)
        self._close_bar()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if not self.pictures_warmed:
            # The first event means training has started and the driver idles until it ends: it loads what the
            # pictures need now (on a 2-core machine a one-epoch run ended 2 s later when this waited for an
            # epoch line), not after the last epoch.
            self.pictures_warmed = True
            threading.Thread(target=_warm_up_pictures, name="torchferry-warm-up", daemon=True).start()
        if kind == "progress" and self.cfg.progress == "on":
            if self.bar is None or self.bar.desc != f"epoch {event['epoch'] + 1}/{self.cfg.epochs}":
                self._close_bar()
                from tqdm import tqdm

                self.bar = tqdm(total=event["total"], desc=f"epoch {event['epoch'] + 1}/{self.cfg.epochs}",
                                leave=False, file=sys.stderr, unit="batch")
            self.bar.n = event["done"]
            self.bar.refresh()
        elif kind == "epoch":
            self._close_bar()
            _logger.info(format_epoch(event["row"], self.cfg.epochs, get_task(self.cfg.task).items))
        elif kind == "info":
            _logger.info(event["message"])

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def stop(self) -> None:
        """Drain what is queued, then end."""
        self.stopping.set()
        self.join(timeout=10)


def _warm_up_pictures() -> None:
    """Import what the pictures of a finished run need: matplotlib and torchvision's transforms (about 2 CPU-s)."""
    from torchferry.distributed import presets  # noqa: F401 - the validation images' transforms
    from torchferry.distributed.report import figure_module

    figure_module()
