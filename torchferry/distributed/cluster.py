"""Ray for a run: join `--address`, or start a local Ray on loopback (torchferry/rayinit.py); then check it can
place every worker.

Torch and Ray load only when a run starts (`--help` imports this module).
"""

from __future__ import annotations

import logging
import os

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig
from torchferry.rayinit import join_or_start_ray

_logger = logging.getLogger(__name__)


def start_ray(cfg: TrainConfig) -> bool:
    """Join `--address`/$RAY_ADDRESS, or start a local Ray on 127.0.0.1 with no dashboard; True if started here.
    Says so in one line first (`starting_line`): the seconds until the workers' first line go there."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if cfg.gpus > 0 and not address:
        import torch

        have = torch.cuda.device_count()
        if have < cfg.gpus:
            raise TorchferryError(f"--gpus {cfg.gpus} asks for {cfg.gpus} GPU worker(s) but this machine has {have} "
                                  "GPU(s); use --gpus 0 --workers N to train on CPU workers, or --address to join "
                                  "a cluster with GPUs")
    _logger.info(starting_line(cfg, address))
    return join_or_start_ray(cfg.address, cfg.verbose, num_gpus=cfg.gpus)


def starting_line(cfg: TrainConfig, address: str | None) -> str:
    workers = f"{cfg.num_workers_total} {'GPU' if cfg.gpus > 0 else 'CPU'} worker(s)"
    if address:
        return f"joining the Ray cluster at {address} and starting {workers} there..."
    return f"starting a local Ray (127.0.0.1 only) and {workers}..."


def check_resources(cfg: TrainConfig) -> None:
    """Fail at once, naming what is missing, when the cluster cannot place every worker."""
    import ray

    workers = cfg.num_workers_total
    need = {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.gpus > 0 else {})}
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    problems = []
    for kind, per_worker in need.items():
        have = float(total.get(kind, 0.0))
        if have < per_worker * workers:
            problems.append(f"{per_worker * workers:g} {kind} ({workers} worker(s) × {per_worker:g}) but the Ray "
                            f"cluster has {have:g} {kind}")
    if not problems and nodes:
        per_node = [min(int(n.get(k, 0.0) // v) for k, v in need.items()) for n in nodes]
        slots = (sum(1 for p in per_node if p > 0) if cfg.placement_strategy == "STRICT_SPREAD"
                 else max(per_node) if cfg.placement_strategy == "STRICT_PACK" else sum(per_node))
        if slots < workers:
            problems.append(f"{workers} worker(s) of {need} each, but the {len(nodes)} node(s) can place only {slots}")
    if problems:
        hint = ("use --gpus 0 --workers N for CPU training" if cfg.gpus > 0 else "lower --workers or --cpus-per-worker")
        raise TorchferryError(f"not enough resources: needs {'; '.join(problems)}; {hint} "
                              "(or --no-resource-check on an autoscaling cluster)")
