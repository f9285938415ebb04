"""Ray for a run: join `--address`, or start a local Ray on loopback; then check it can place every worker.

Torch and Ray load only when a run starts (`--help` imports this module).
"""

from __future__ import annotations

import logging
import os

from torchferry.cli import lead_line
from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig


class ClusterUnavailable(Exception):
    """Ray could not be started or joined; the message says what to try."""


def keep_ray_on_loopback() -> None:
    """Make a locally started Ray take 127.0.0.1 as its node address, so its servers bind to loopback only.

    `ray.init` swaps a loopback `_node_ip_address` for the machine's routable address; Ray's own switch for
    single-machine clusters (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS and Windows) makes
    it use loopback instead. The environment variable reaches the raylet and workers Ray spawns; the
    constant covers a driver process that imported Ray before.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


# Ray Train's controller looks at its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): that is
# also how long, 1 s on average, a finished run or a dead worker goes unnoticed. On a local Ray the look is a
# local actor call, so a run started here looks four times as often.
LOCAL_HEALTH_CHECK_INTERVAL_S = "0.5"


def local_ray_settings() -> None:
    """Settings for a Ray started here, each unless the operator's environment sets it already.

    - Worker processes at niceness 0, as torchrun's (`RAY_worker_niceness`): Ray starts them at 15 by default,
      so the training workers and the DataLoader processes they fork would yield the CPU to every other
      process on the machine (Ray's own GCS and raylet included).
    - The controller's health check every 0.5 s (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`), so the end of training
      reaches the driver sooner.

    Ray's processes inherit the driver's environment when `ray.init` starts them.
    """
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_HEALTH_CHECK_INTERVAL_S)


def start_ray(cfg: TrainConfig) -> bool:
    """Join `--address`/$RAY_ADDRESS, or start a local Ray on 127.0.0.1 with no dashboard; True if started here."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    quiet = logging.INFO if cfg.verbose else logging.WARNING
    if address:
        import ray

        try:
            ray.init(address=address, logging_level=quiet, log_to_driver=cfg.verbose)
        except Exception as exc:  # Ray raises plain Exception, ConnectionError, RuntimeError ...
            raise ClusterUnavailable(f"cannot join the Ray cluster at {address}: {lead_line(exc)}; check that it "
                                     f"runs and is reachable (ray status --address {address}), or leave out "
                                     "--address and $RAY_ADDRESS to start a local Ray") from exc
        return False
    if cfg.gpus > 0:
        import torch

        have = torch.cuda.device_count()
        if have < cfg.gpus:
            raise TorchferryError(f"--gpus {cfg.gpus} asks for {cfg.gpus} GPU worker(s) but this machine has {have} "
                                  "GPU(s); use --gpus 0 --workers N to train on CPU workers, or --address to join "
                                  "a cluster with GPUs")
    keep_ray_on_loopback()
    local_ray_settings()
    import ray

    # Loopback only, no dashboard and so no job API: Ray's job API runs any command for whoever reaches it
    # (CVE-2023-48022). Worker output stays in Ray's log files unless --verbose: the driver prints rank 0's
    # epoch lines itself.
    # address="local": always a fresh local instance, never a cluster some other program left running here.
    try:
        ray.init(address="local", include_dashboard=False, logging_level=quiet, log_to_driver=cfg.verbose,
                 num_gpus=max(0, cfg.gpus))
    except Exception as exc:  # e.g. "The current node timed out during startup" is a bare Exception
        raise ClusterUnavailable(f"the local Ray did not start: {lead_line(exc)}; try again when the machine is "
                                 "less busy, check free memory and space in Ray's temp dir ($RAY_TMPDIR, default "
                                 "/tmp/ray), or run with --verbose to see Ray's own log") from exc
    return True


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
