"""Ray for a command: join `--address`/$RAY_ADDRESS, or start a local Ray that listens on loopback only.

Torch-free, so training (torchferry.distributed) and batch prediction (torchferry.batch) start Ray the same way.
Ray loads only when a function here runs (`--help` imports this module).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess

from torchferry.cli import lead_line


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
    - No preemption watcher (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`): it polls the cluster for nodes being
      drained (spot instances), and no one drains this one-machine Ray; it is one Python process less.
    - No Ray Train metrics (`RAY_TRAIN_METRICS_ENABLED`): they go to Ray's metrics agent for a Prometheus that
      a Ray started here, without its dashboard, has no one to scrape it for; the run's own metrics are in
      metrics.csv and TensorBoard.
    - No metrics recorded by Ray's own processes (`RAY_enable_metrics_collection`): every core worker and the
      raylet would record them for a metrics agent this install does not run ("Metrics agent not available"
      in the GCS log); on a 2-core machine that is CPU taken from training.

    Ray's processes inherit the driver's environment when `ray.init` starts them.
    """
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_HEALTH_CHECK_INTERVAL_S)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")


# Ray's token authentication is on by default, which is what we want; its notice saying so on every start is not
# news (training, search and batch prediction alike leave it out unless --verbose).
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def join_or_start_ray(address: str | None, verbose: bool, num_gpus: int = 0) -> bool:
    """Join `address` (else $RAY_ADDRESS), or start a local Ray on 127.0.0.1 with no dashboard; True if started
    here (the caller shuts it down). ClusterUnavailable, saying what to try, when neither works."""
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = logging.INFO if verbose else logging.WARNING
    if not verbose:
        logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
    if address:
        import ray

        try:
            ray.init(address=address, logging_level=quiet, log_to_driver=verbose)
        except Exception as exc:  # Ray raises plain Exception, ConnectionError, RuntimeError ...
            raise ClusterUnavailable(f"cannot join the Ray cluster at {address}: {lead_line(exc)}; check that it "
                                     f"runs and is reachable (ray status --address {address}), or leave out "
                                     "--address and $RAY_ADDRESS to start a local Ray") from exc
        return False
    keep_ray_on_loopback()
    local_ray_settings()
    import ray

    # Loopback only, no dashboard and so no job API: Ray's job API runs any command for whoever reaches it
    # (CVE-2023-48022). Worker output stays in Ray's log files unless --verbose.
    # address="local": always a fresh local instance, never a cluster some other program left running here.
    try:
        ray.init(address="local", include_dashboard=False, logging_level=quiet, log_to_driver=verbose,
                 num_gpus=max(0, num_gpus))
    except Exception as exc:  # e.g. "The current node timed out during startup" is a bare Exception
        raise ClusterUnavailable(f"the local Ray did not start: {lead_line(exc)}; try again when the machine is "
                                 "less busy, check free memory and space in Ray's temp dir ($RAY_TMPDIR, default "
                                 "/tmp/ray), or run with --verbose to see Ray's own log") from exc
    return True


def shutdown_ray() -> None:
    """`ray.shutdown()` for a Ray started here, without waiting a second for its autoscaler monitor, and with no
    worker process left behind.

    Ray stops its processes one by one, each with SIGTERM and up to a second's grace; the autoscaler monitor
    (which a one-machine Ray has no use for) takes that whole second every time, a third of the time from a
    run's last epoch to the command's exit. It holds no state, so it is killed outright first.

    Ray's worker processes (the raylet's children) end on their own once the raylet is gone, but one can hang in
    its exit: a serve.batch actor stayed, 279 MB, its C++ exit handler waiting on a lock it held itself (Ray
    2.60's CoreWorkerProcess::HandleAtExit). Those still there when `ray.shutdown()` returns are killed, as
    `ray stop --force` would: by then the run's results are written and nothing of theirs is needed.
    """
    import ray

    try:
        processes = ray._private.worker._global_node.all_processes
    except AttributeError:  # no local node, or Ray's internals moved: the plain shutdown below still runs
        processes = {}
    for process in (info.process for info in processes.get("monitor", [])):
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # Ray's own shutdown reaps it at worst
                process.wait(timeout=10)
    workers = _workers([info.process.pid for info in processes.get("raylet", [])])
    ray.shutdown()
    for worker in workers:
        with contextlib.suppress(Exception):  # gone meanwhile (psutil checks it is still the same process)
            worker.kill()


def _workers(raylets: list[int]) -> list:
    """The processes the raylets started (psutil, which Ray brings with it); none when psutil cannot say."""
    try:
        import psutil

        return [child for pid in raylets for child in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - no psutil, or a raylet already gone: Ray's own shutdown alone
        return []
