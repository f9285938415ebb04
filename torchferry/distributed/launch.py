"""`python -m distributed.launch`: check the data and the cluster, run Ray Train, keep the best checkpoint.

The driver does everything that can fail on bad input before Ray starts (flags, data, model, pretrained
weights: `preflight.py`), then checks that the cluster has what was asked for (`cluster.py`), so a mistake
costs seconds, not a hang; `finish.py` keeps the best checkpoint when training ends.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
import time
from typing import Any, NoReturn

from torchferry.cli import quiet_libraries, run_command
from torchferry.distributed.cluster import check_resources, start_ray
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.finish import (
    TrainingFailed,
    describe_failure,
    finish,
    latest_checkpoint_note,
    refused_input,
)
from torchferry.distributed.flags import config_from_args
from torchferry.distributed.preflight import claim_run_dir, prepare, refuse_held_run_dir, resume_command
from torchferry.distributed.timeline import mark
from torchferry.rayinit import ClusterUnavailable, shutdown_ray

_logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """Ctrl-C (SIGINT) on the driver; carries the resolved config so the message can say how to resume."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(f"interrupted; the checkpoints written so far are kept. Continue with: {resume_command(cfg)}")


def setup_logging(verbose: bool) -> None:
    """Our messages on stderr as plain lines; Ray's own logging stays at warnings unless --verbose."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # --verbose: our own debug lines, not those of every library (matplotlib and PIL are very chatty).
    for name in ("torchferry.distributed", "torchferry.export"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    quiet_libraries()


# What Ray Train starts for every run and a run on a Ray this command started has no use for. Each is an actor,
# a Python process importing ray.train (about 2 CPU-seconds on 2 cores, and the start-up waits for the first):
# - Ray Data's autoscaling coordinator, which the scaling policy asks for the workers' resources so that an
#   autoscaling cluster adds nodes: a Ray started here is one machine that never grows;
# - the placement-group cleaner, a detached actor that frees the run's placement group if the driver dies: a
#   Ray started here dies with the driver, placement groups and all;
# - the datasets callback's dataset manager, which shards Ray Datasets over the workers: the loop is given none
#   (its data is the split the driver checked).
NOT_ON_A_LOCAL_RAY = ("PlacementGroupCleanerCallback", "DatasetsCallback")


@functools.cache
def local_trainer_class() -> type:
    """TorchTrainer for a Ray this command started and stops: Ray Train's fixed scaling policy without its
    resource requests, and its callbacks less those in NOT_ON_A_LOCAL_RAY."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class LocalScalingPolicy(FixedScalingPolicy):
        """The same decisions; no autoscaling coordinator to ask for resources (`after_controller_start` creates
        it, the other three ask it)."""

        def after_controller_start(self, train_run_context: Any) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [callback for callback in super()._create_default_callbacks()
                    if type(callback).__name__ not in NOT_ON_A_LOCAL_RAY]

        def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
            if type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = LocalScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LocalTorchTrainer


def build_trainer(cfg: TrainConfig, loop_config: dict[str, Any], callbacks: list[Any] | None = None,
                  local_ray: bool = False) -> Any:
    """The TorchTrainer of a run: `train_func` on `cfg`'s workers, checkpoints kept by the task's best metric
    under `cfg.storage_path/cfg.name`; `callbacks` are Ray Train callbacks (a search passes Tune's).
    `local_ray`: Ray was started by this command and stops with it (`local_trainer_class`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from torchferry.distributed.tasks import get_task
    from torchferry.distributed.worker import train_func

    task = get_task(cfg.task)
    use_gpu = cfg.gpus > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer_class = local_trainer_class() if local_ray else TorchTrainer
    return trainer_class(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers_total, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=task.best_metric,
                                                         checkpoint_score_order=task.best_mode),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
            callbacks=callbacks,
        ),
    )


def fit(cfg: TrainConfig, split: Any, local_ray: bool = False) -> Any:
    """Run TorchTrainer on the driver's checked `split` and return its Result; raises TrainingFailed when
    training did not finish. `local_ray` as for `build_trainer`."""
    import ray.train
    from ray.util.queue import Queue

    from torchferry.distributed.events import Console

    events = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, {"cfg": cfg.to_dict(), "split": split, "events": events}, local_ray=local_ray)
    console = Console(events, cfg)
    console.start()
    mark("fit_called")
    try:
        return trainer.fit()
    except SystemExit:
        # Ray Train's own SIGINT handler aborts the run gracefully (checkpoints stay) and then exits.
        raise KeyboardInterrupt from None
    except ray.train.TrainingFailedError as exc:
        refused = refused_input(exc)
        if refused is not None:
            raise refused from None
        raise TrainingFailed(f"training failed: {describe_failure(exc)}; {latest_checkpoint_note(cfg)}") from exc
    finally:
        console.stop()


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole job: prepare, start or join Ray, check resources, train, keep the best checkpoint."""
    cfg, split = prepare(cfg)
    refuse_held_run_dir(cfg)
    mark("ray_init")
    started = start_ray(cfg)
    pictures: list[threading.Thread] = []  # drawn while Ray shuts down: they need neither Ray nor each other
    try:
        if cfg.resource_check:
            check_resources(cfg)
        mark("ray_ready")
        claim_run_dir(cfg)  # the run's folder and config.json once it can start: a refused one leaves nothing
        t0 = time.perf_counter()
        try:
            result = fit(cfg, split, local_ray=started)
        except KeyboardInterrupt:
            raise Interrupted(cfg) from None
        mark("fit_returned")
        summary = finish(cfg, result, split, pictures=pictures)
        summary["seconds"] = time.perf_counter() - t0
        return summary
    finally:
        if started:
            mark("ray_shutdown")
            shutdown_ray()
            mark("ray_shutdown_done")
        for thread in pictures:
            thread.join()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 0 on success, 2 on bad input, 1 when training fails."""
    mark("driver_main")
    cfg = config_from_args(argv)
    setup_logging(cfg.verbose)
    try:
        return run_command(lambda: _train(cfg), debug=cfg.debug, failures=(TrainingFailed, ClusterUnavailable))
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        return 130


def _train(cfg: TrainConfig) -> int:
    summary = run(cfg)
    print(f"best {summary['metric']} {summary['value']:.4f} at epoch {summary['epoch'] + 1}: {summary['best']}")
    return 0


def cli() -> NoReturn:
    """The command: `main()`, then `exit_process`."""
    exit_process(main())


def exit_process(code: int) -> NoReturn:
    """The exit handlers (Ray's, logging's), then the end of the process with `code`.

    The interpreter's own teardown after a run (freeing the modules of torch, torchvision and Ray, their C++
    destructors) takes seconds and does nothing a finished command needs: 3 s for a bare `import torch` on a
    busy 2-core machine (bench.startup), so the process ends with os._exit once the handlers have run.
    """
    atexit._run_exitfuncs()  # what a normal exit runs first; then nothing else is left to do
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
