"""`python -m distributed.launch`: check the data and the cluster, run Ray Train, keep the best checkpoint.

The driver does everything that can fail on bad input before Ray starts (flags, data, model, pretrained
weights), then checks that the cluster has what was asked for, so a mistake costs seconds, not a hang.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, absolute_paths, fit_to_images, resolve_defaults, validate_flags
from torchferry.distributed.flags import config_from_args
from torchferry.distributed.timeline import mark

_logger = logging.getLogger(__name__)


class TrainingFailed(Exception):
    """Training started but did not finish; the message says what happened and where checkpoints are."""


class ClusterUnavailable(Exception):
    """Ray could not be started or joined; the message says what to try."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) on the driver; carries the resolved config so the message can say how to resume."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(f"interrupted; the checkpoints written so far are kept. Continue with: "
                         f"python -m distributed.launch --resume --name {cfg.name} --output-dir {cfg.output_dir}")


def setup_logging(verbose: bool) -> None:
    """Our messages on stderr as plain lines; Ray's own logging stays at warnings unless --verbose."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # --verbose: our own debug lines, not those of every library (matplotlib and PIL are very chatty).
    for name in ("torchferry.distributed", "torchferry.export"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Ray's token auth is on by default, which is what we want; its notice about it is not news.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, Any]:
    """Validate flags, find and check the data, resolve defaults, build the model and run it once; all before Ray."""
    from torchferry.distributed.data import discover
    from torchferry.distributed.models import check_arch, is_custom, weights_preprocess

    validate_flags(cfg)
    if cfg.resume:
        cfg = resumed_config(cfg)
    check_arch(cfg.model)
    if cfg.lr_scheduler == "plateau" and cfg.lr_warmup_epochs:
        raise TorchferryError("--lr-warmup-epochs does not combine with --lr-scheduler plateau")
    cfg = absolute_paths(cfg)
    weights = weights_preprocess(cfg.model, cfg.pretrained)
    split = discover(cfg)
    _logger.info("data: %s", split.describe())
    mark("data_checked")
    cfg = fit_model_to_input(cfg, weights, split)
    mark("model_checked")
    if cfg.progress == "auto":
        cfg.progress = "on" if sys.stderr.isatty() else "off"
    if cfg.init_from:
        from torchferry.distributed.checkpoint import load_checkpoint

        source = load_checkpoint(cfg.init_from)  # refused here, before Ray, if missing or damaged
        if is_custom(source["arch"]) and source["arch"] != cfg.model:
            raise TorchferryError(f"--init-from {cfg.init_from}: its model is the factory {source['arch']!r}, which "
                                  f"a checkpoint cannot choose to run; train it with --model {source['arch']}")
    return cfg, split


def fit_model_to_input(cfg: TrainConfig, weights: dict[str, Any] | None, split: Any) -> TrainConfig:
    """Resolve the defaults and prove the model takes them: one forward pass of a batch of 2 on the driver.

    Defaults chosen from the images (`fit_to_images`) are tried first; when the model cannot take them
    (a 3-channel model of your own on grayscale images, vit_b_16 and its fixed 224 px), the next candidate
    is tried: 3 channels, then the plain defaults. What the user asked for explicitly is never changed: a
    mismatch then ends the command with one line naming the flag to change.
    """
    fitted, note = fit_to_images(cfg, split.profile, weights)
    candidates = [resolve_defaults(cfg, weights, split.profile)]
    if cfg.channels is None and fitted.channels == 1:
        candidates.append(resolve_defaults(dataclasses.replace(cfg, channels=3), weights, split.profile))
    candidates.append(resolve_defaults(cfg, weights))
    native = native_image_size(cfg.model)
    if cfg.image_size is None and native and native != candidates[-1].image_size:
        candidates.append(resolve_defaults(dataclasses.replace(cfg, image_size=native), weights))  # inception: 299
    models: dict[int, Any] = {}
    first_error = None
    for i, candidate in enumerate(candidates):
        if i and candidate.to_dict() == candidates[i - 1].to_dict():
            continue
        channels = int(candidate.channels or 3)
        if channels not in models:
            models[channels] = build_checked_model(candidate, len(split.classes))
        problem = forward_problem(models[channels], candidate, len(split.classes))
        if problem is None:
            if i == 0 and note:
                _logger.info(note)
            elif i:
                _logger.info("not the defaults the images suggest (%s); training with --channels %d --image-size %d",
                             first_error, channels, candidate.image_size)
            return candidate
        first_error = first_error or problem
    raise TorchferryError(first_error)


def native_image_size(arch: str) -> int | None:
    """The input size a torchvision model's default weights were trained at (299 for inception_v3), else None."""
    from torchferry.distributed.models import is_custom

    if arch == "smallcnn" or is_custom(arch):
        return None
    from torchvision.models import get_model_weights

    try:
        return int(get_model_weights(arch).DEFAULT.transforms().crop_size[0])
    except (ValueError, KeyError, AttributeError, IndexError):  # a model without published weights
        return None


def build_checked_model(cfg: TrainConfig, num_classes: int) -> Any:
    """build_model on the driver, so that unknown names, factories and weights fail here."""
    from torchferry.distributed.models import build_model

    return build_model(cfg.model, num_classes, cfg.pretrained, int(cfg.channels or 3))


def forward_problem(model: Any, cfg: TrainConfig, num_classes: int) -> str | None:
    """None when `model` turns a batch of 2 inputs as configured into [2, num_classes] logits; else one line
    that names the flag to change."""
    import re

    import torch

    channels, size = int(cfg.channels or 3), int(cfg.image_size or 224)
    shape = f"[2, {channels}, {size}, {size}]"
    model.train()  # the mode the first training step runs in (inception's auxiliary heads included)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, channels, size, size))
    except Exception as exc:  # noqa: BLE001 - any failure here is the model refusing this input
        text = str(exc)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)[:200]
        wants = re.search(r"to have (\d+) channels", text)
        if wants and int(wants.group(1)) != channels:
            fix = f"pass --channels {wants.group(1)}"
        elif (m := re.search(r"[Ee]xpected (\d+) but got (\d+)", text)) and int(m.group(2)) == size:
            fix = f"pass --image-size {m.group(1)}"
        elif (native := native_image_size(cfg.model)) and native != size:
            fix = f"pass --image-size {native} (the size its pretrained weights use)"
        else:
            fix = f"change --image-size (now {size}) or --channels (now {channels})"
        return f"--model {cfg.model} does not take a batch of {shape} inputs ({first}); {fix}"
    logits = out if isinstance(out, torch.Tensor) else out[0]
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        return (f"--model {cfg.model} returns {got} for a batch of {shape} inputs; a classifier must return "
                f"[batch, {num_classes}] logits, one per class")
    return None


RESUME_OVERRIDES = ("address", "max_failures", "progress", "verbose", "debug", "resource_check", "output_dir")


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """--resume: the run's saved configuration, with this command's cluster and console flags."""
    from torchferry.distributed.models import is_custom, require_trusted_arch

    path = os.path.join(os.path.abspath(cfg.output_dir), str(cfg.name), "config.json")
    if not os.path.isfile(path):
        raise TorchferryError(f"--resume: {path} does not exist, so there is no run {cfg.name!r} to continue")
    try:
        with open(path, encoding="utf-8") as f:
            saved = TrainConfig.from_dict(json.load(f))
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or not a mapping of config keys
        raise TorchferryError(f"--resume: {path} is not a torchferry run config: {str(exc)[:200]}") from None
    # config.json is a file: it names a package.module:factory model only when the command line names it again.
    if is_custom(saved.model) or is_custom(cfg.model):
        require_trusted_arch(saved.model, cfg.model if is_custom(cfg.model) else None, flag="--model",
                             source=f"run {cfg.name!r}")
    for key in RESUME_OVERRIDES:
        setattr(saved, key, getattr(cfg, key))
    saved.resume = True
    return saved


def _claim_run_dir(cfg: TrainConfig) -> None:
    from torchferry.distributed import checkpoint as ckpt

    run_dir = cfg.run_dir
    if cfg.resume:
        return
    ray_state = os.path.join(storage_path(cfg), str(cfg.name), "checkpoint_manager_snapshot.json")
    if any(os.path.exists(p) for p in (os.path.join(run_dir, "best.pth"), os.path.join(run_dir, "metrics.csv"),
                                       ray_state)):
        raise TorchferryError(f"run directory {run_dir} already holds a run; continue it with --resume --name "
                              f"{cfg.name}, or choose another --name (nothing there was changed)")
    os.makedirs(run_dir, exist_ok=True)
    ckpt.atomic_write_bytes(os.path.join(run_dir, "config.json"),
                            (json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n").encode())


def _keep_ray_on_loopback() -> None:
    """Make a locally started Ray take 127.0.0.1 as its node address, so its servers bind to loopback only.

    `ray.init` swaps a loopback `_node_ip_address` for the machine's routable address; Ray's own switch for
    single-machine clusters (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS and Windows) makes
    it use loopback instead. The environment variable reaches the raylet and workers Ray spawns; the
    constant covers a driver process that imported Ray before.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_ray(cfg: TrainConfig) -> bool:
    """Join `--address`/$RAY_ADDRESS, or start a local Ray on 127.0.0.1 with no dashboard; True if started here."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    quiet = logging.INFO if cfg.verbose else logging.WARNING
    if address:
        import ray

        try:
            ray.init(address=address, logging_level=quiet, log_to_driver=cfg.verbose)
        except Exception as exc:  # Ray raises plain Exception, ConnectionError, RuntimeError ...
            raise ClusterUnavailable(f"cannot join the Ray cluster at {address}: {_lead_line(exc)}; check that it "
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
    _keep_ray_on_loopback()
    import ray

    # Loopback only, no dashboard and so no job API: Ray's job API runs any command for whoever reaches it
    # (CVE-2023-48022). Worker output stays in Ray's log files unless --verbose: the driver prints rank 0's
    # epoch lines itself.
    # address="local": always a fresh local instance, never a cluster some other program left running here.
    try:
        ray.init(address="local", include_dashboard=False, logging_level=quiet, log_to_driver=cfg.verbose,
                 num_gpus=max(0, cfg.gpus))
    except Exception as exc:  # e.g. "The current node timed out during startup" is a bare Exception
        raise ClusterUnavailable(f"the local Ray did not start: {_lead_line(exc)}; try again when the machine is "
                                 "less busy, check free memory and space in Ray's temp dir ($RAY_TMPDIR, default "
                                 "/tmp/ray), or run with --verbose to see Ray's own log") from exc
    return True


def _lead_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


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


def fit(cfg: TrainConfig, bad_images: list[tuple[str, str]]) -> Any:
    """Run TorchTrainer and return its Result; raises TrainingFailed when training did not finish."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from torchferry.distributed.loop import train_func

    events = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    use_gpu = cfg.gpus > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.to_dict(), "bad_images": bad_images, "events": events},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers_total, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute="val_acc",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
        ),
    )
    console = Console(events, cfg)
    console.start()
    mark("fit_called")
    try:
        return trainer.fit()
    except SystemExit:
        # Ray Train's own SIGINT handler aborts the run gracefully (checkpoints stay) and then exits.
        raise KeyboardInterrupt from None
    except ray.train.TrainingFailedError as exc:
        raise TrainingFailed(f"training failed: {describe_failure(exc)}; {latest_checkpoint_note(cfg)}") from exc
    finally:
        console.stop()


class Console(threading.Thread):
    """Prints rank 0's per-epoch lines on the driver and draws its progress bar (tqdm, terminals only)."""

    def __init__(self, events: Any, cfg: TrainConfig):
        super().__init__(name="torchferry-console", daemon=True)
        self.events, self.cfg = events, cfg
        self.stopping = threading.Event()
        self.bar: Any = None

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
        from torchferry.distributed.loop import format_epoch

        kind = event.get("kind")
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
            _logger.info(format_epoch(event["row"], self.cfg.epochs))
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


def describe_failure(exc: BaseException) -> str:
    """Which worker failed and how, in one line (Ray's WorkerGroupError maps ranks to their errors).

    When a worker process died, the others fail next in a collective that lost its peer; the dead ranks
    are what the user needs to know, so they are named and the rest summarised.
    """
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return _first_line(exc)
    died = sorted(rank for rank, error in failures.items()
                  if "process has died" in str(error) or "actor is dead" in str(error).lower())
    if died:
        others = sorted(set(failures) - set(died))
        return (", ".join(f"worker rank {r}" for r in died) + ": its process died (killed, out of memory or "
                "crashed)" + (f"; rank(s) {', '.join(map(str, others))} then failed with it" if others else ""))
    return "; ".join(f"worker rank {rank}: {_first_line(error)}" for rank, error in sorted(failures.items()))


def latest_checkpoint_note(cfg: TrainConfig) -> str:
    """Where the newest checkpoint of the run is, and how to continue from it."""
    run_storage = os.path.join(storage_path(cfg), str(cfg.name))
    latest = None
    if os.path.isdir(run_storage):
        dirs = sorted(d for d in os.listdir(run_storage)
                      if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_storage, d)))
        latest = os.path.join(run_storage, dirs[-1]) if dirs else None
    if latest is None:
        return f"no checkpoint was written (storage: {run_storage})"
    return (f"the last checkpoint is {latest}; continue with --resume --name {cfg.name} "
            f"(--max-failures N retries automatically)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def storage_path(cfg: TrainConfig) -> str:
    """Where Ray keeps checkpoints (TrainConfig.storage_path)."""
    return cfg.storage_path


RESUME_ONLY_KEYS = ("optimizer", "scheduler", "scaler")


def finish(cfg: TrainConfig, result: Any, split: Any = None) -> dict[str, Any]:
    """Write the best usable checkpoint, less its resume state, to runs/<name>/best.pth (atomic, sha256 sidecar);
    rewrite metrics.csv.

    Ray's kept checkpoints are checked as they are read (sidecar, weights-only): a damaged one is passed
    over with a warning, so best.pth is always a checkpoint that loads.
    """
    import ray.train

    from torchferry.distributed import checkpoint as ckpt

    kept = [c for c, _ in (result.best_checkpoints or [])]
    if not kept and result.checkpoint is not None:
        kept = [result.checkpoint]
    usable = []
    for checkpoint in kept:
        with checkpoint.as_directory() as d:
            loaded = _load_or_warn(os.path.join(d, ckpt.CHECKPOINT_FILE))
            if loaded is not None:
                usable.append((loaded["metrics"]["val_acc"], loaded["epoch"], checkpoint, loaded))
    # Ray's record can lag the folders (a run stopped right after a checkpoint was written, then resumed):
    # the run's other checkpoint folders on local or shared storage count too.
    from torchferry.distributed.loop import checkpoint_dirs

    recorded = {os.path.abspath(c.path) for c in kept}
    for d in checkpoint_dirs(os.path.join(storage_path(cfg), str(cfg.name))):
        if os.path.abspath(d) not in recorded:
            loaded = _load_or_warn(os.path.join(d, ckpt.CHECKPOINT_FILE))
            if loaded is not None:
                usable.append((loaded["metrics"]["val_acc"], loaded["epoch"], ray.train.Checkpoint(d), loaded))
    if not usable:
        raise TrainingFailed(f"training finished without a usable checkpoint; {latest_checkpoint_note(cfg)}")
    best = max(usable, key=lambda u: (u[0], -u[1]))  # highest val_acc, the earliest epoch among equals
    latest = max(usable, key=lambda u: u[1])
    best_path = os.path.join(cfg.run_dir, "best.pth")
    # best.pth is for inference and fine-tuning: the optimizer, schedule and scaler state (as large as the
    # weights again with momentum) stays in the per-epoch checkpoints that --resume reads.
    ckpt.save_checkpoint({k: v for k, v in best[3].items() if k not in RESUME_ONLY_KEYS}, best_path, sidecar=True)
    ckpt.load_checkpoint(best_path)
    # Rank 0 wrote metrics.csv as it went; on several nodes it wrote it on its own node, so write it here too.
    history = latest[3].get("history", [])
    ckpt.write_metrics_csv(os.path.join(cfg.run_dir, "metrics.csv"), history)
    mark("best_written")
    if split is not None:
        _pictures(cfg, best[3], history, split)
        mark("pictures_done")
    return {"best": best_path, "epoch": best[3]["epoch"], "val_acc": best[3]["metrics"]["val_acc"]}


def _load_or_warn(path: str) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None with a warning when it is damaged."""
    from torchferry.distributed import checkpoint as ckpt

    try:
        return ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as exc:
        _logger.warning("passing over a damaged checkpoint: %s", exc)
        return None


def _pictures(cfg: TrainConfig, best: dict[str, Any], history: list[dict[str, Any]], split: Any) -> None:
    """curves.png and val_predictions.png; a failure here is reported but never fails a finished run."""
    from torchferry.distributed.data import build_datasets
    from torchferry.distributed.presets import build_eval_transform
    from torchferry.distributed.report import run_pictures

    try:
        _, val = build_datasets(split, int(best["preprocess"]["channels"]), None,
                                build_eval_transform(best["preprocess"]))
        run_pictures(cfg.run_dir, best, history, val, factory=cfg.model)
    except Exception as exc:  # noqa: BLE001 - pictures are a convenience; the checkpoint is what matters
        _logger.warning("could not draw curves.png / val_predictions.png: %s", exc)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole job: prepare, start or join Ray, check resources, train, keep the best checkpoint."""
    import ray

    cfg, split = prepare(cfg)
    _claim_run_dir(cfg)
    mark("ray_init")
    started = start_ray(cfg)
    try:
        if cfg.resource_check:
            check_resources(cfg)
        mark("ray_ready")
        t0 = time.perf_counter()
        try:
            result = fit(cfg, split.bad_images)
        except KeyboardInterrupt:
            raise Interrupted(cfg) from None
        mark("fit_returned")
        summary = finish(cfg, result, split)
        summary["seconds"] = time.perf_counter() - t0
        return summary
    finally:
        if started:
            mark("ray_shutdown")
            ray.shutdown()
            mark("ray_shutdown_done")


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 0 on success, 2 on bad input, 1 when training fails."""
    mark("driver_main")
    cfg = config_from_args(argv)
    setup_logging(cfg.verbose)
    try:
        summary = run(cfg)
    except TorchferryError as exc:
        if cfg.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingFailed, ClusterUnavailable) as exc:
        if cfg.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    print(f"best val_acc {summary['val_acc']:.4f} at epoch {summary['epoch'] + 1}: {summary['best']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
