"""`python -m distributed.tune`: a hyperparameter search over the launcher's own training, on Ray Tune.

Ray Tune's `Tuner` runs the trials, samples the space (`space.py`) and stops the poor ones early with ASHA;
each trial is one `python -m distributed.launch` run: the same TorchTrainer (`launch.build_trainer`), loop
and checkpoints, reporting val_acc every epoch to Tune through Ray Train's `TuneReportCallback` (with Ray
Train V2 a trial function drives the trainer; `Tuner(trainer)` is Train V1's deprecated form). Everything
that can fail on bad input is checked before Ray starts, as the launcher does; `trials.py` then keeps the
best trial's best checkpoint in runs/<search>/best.pth with a table and a picture of all trials.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from torchferry.cli import run_command
from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.finish import TrainingFailed
from torchferry.distributed.space import KEYS, SearchSpace
from torchferry.rayinit import ClusterUnavailable, shutdown_ray

_logger = logging.getLogger(__name__)

TRIAL_MEMORY = 256 << 20  # bytes Ray reserves for each trial's driver process


@dataclass
class SearchConfig:
    """How to search (the training itself is a TrainConfig): the space and Tune's and ASHA's settings."""

    space: str | None = None
    flags: dict[str, str | None] = field(default_factory=dict)
    num_samples: int = 8
    max_concurrent: int | None = None
    grace_period: int = 1
    reduction_factor: float = 4.0


def get_args_parser() -> argparse.ArgumentParser:
    """The launcher's command line and a `search` group; every flag says its default."""
    from torchferry.distributed.flags import get_args_parser as launcher_parser

    d = SearchConfig()
    p = launcher_parser()
    p.prog = "python -m distributed.tune"
    p.description = ("Search hyperparameters with Ray Tune: each trial trains as python -m distributed.launch "
                     "does, ASHA stops poor trials early, and the best trial's best checkpoint is kept in "
                     "runs/<name>/best.pth beside trials.csv and trials.png.")
    p.epilog = ("examples:\n"
                "  python -m distributed.tune --workers 1 --epochs 4 --search-lr 1e-3:0.3 --search-batch-size 32,64\n"
                "  python -m distributed.tune --data ~/flowers --space space.yaml --num-samples 16 --epochs 10")
    g = p.add_argument_group("search")
    g.add_argument("--space", default=None, metavar="FILE", help="search space in YAML or JSON: keys "
                   f"{', '.join(KEYS)}; each a list (choice), {{loguniform: [LO, HI]}}, {{uniform: [LO, HI]}} or "
                   "\"LO:HI\" (default: none; the --search-* flags override its keys)")
    ranges = {"lr": "LO:HI log-uniform", "weight_decay": "LO:HI log-uniform (uniform:LO:HI to include 0)",
              "label_smoothing": "LO:HI uniform"}
    for key in KEYS:
        g.add_argument(f"--search-{key.replace('_', '-')}", dest=f"search_{key}", default=None,
                       help=(f"{ranges[key]}, or a list A,B,C" if key in ranges else "a list A,B,C") +
                       " (default: not searched)")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="trials to sample from the space "
                   f"(default: {d.num_samples})")
    g.add_argument("--max-concurrent", type=int, default=None, help="trials training at once (default: as "
                   "many as the cluster's CPUs, or GPUs, can place)")
    g.add_argument("--grace-period", type=int, default=d.grace_period, help="ASHA: epochs every trial trains "
                   f"before it may be stopped (default: {d.grace_period})")
    g.add_argument("--reduction-factor", type=float, default=d.reduction_factor, help="ASHA: 1/this of the "
                   f"trials go on at each rung (default: {d.reduction_factor:g})")
    return p


def configs_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, SearchConfig]:
    """Parse the command line into the training config shared by all trials and the search config."""
    from torchferry.distributed.flags import config_from_namespace

    parsed = get_args_parser().parse_args(argv)
    ns = vars(parsed)  # the namespace's own dict: what is popped here leaves the launcher's flags alone
    flags = {key: ns.pop(f"search_{key}") for key in KEYS}
    search = SearchConfig(space=ns.pop("space"), flags=flags, num_samples=ns.pop("num_samples"),
                          max_concurrent=ns.pop("max_concurrent"), grace_period=ns.pop("grace_period"),
                          reduction_factor=ns.pop("reduction_factor"))
    return config_from_namespace(parsed), search


def check_search(cfg: TrainConfig, search: SearchConfig) -> SearchSpace:
    """The space, checked with the settings of the search; a TorchferryError on the first mistake."""
    from torchferry.distributed.config import validate_flags
    from torchferry.distributed.space import build_space, check_against

    validate_flags(cfg)
    checks = [
        (not cfg.resume, "--resume continues one training run; a search starts afresh under a new --name"),
        (not (cfg.storage and "://" in cfg.storage), (f"--storage {cfg.storage}: a search keeps its trials' "
                                                      "checkpoints on a local or shared folder (a path), not a URI")),
        (search.num_samples >= 1, f"--num-samples must be at least 1, got {search.num_samples}"),
        (search.max_concurrent is None or search.max_concurrent >= 1,
         f"--max-concurrent must be at least 1, got {search.max_concurrent}"),
        (1 <= search.grace_period <= cfg.epochs,
         f"--grace-period must be from 1 to --epochs ({cfg.epochs}), got {search.grace_period}"),
        (search.reduction_factor > 1, f"--reduction-factor must be above 1, got {search.reduction_factor:g}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TorchferryError(message)
    space = build_space(search.space, search.flags)
    check_against(space, cfg)
    return space


def prepare_models(cfg: TrainConfig, space: SearchSpace) -> tuple[dict[str, TrainConfig], Any]:
    """Each searched model's resolved config, as the launcher prepares a run: data checked, the model built and
    run once on the driver (`preflight.prepare`)."""
    from torchferry.distributed.preflight import prepare

    resolved, split = {}, None
    for model in space.models(cfg.model):
        resolved[model], found = prepare(dataclasses.replace(cfg, model=model))
        split = split or found
    return resolved, split


def claim_search_dir(search_dir: str, record: dict[str, Any]) -> None:
    """Make runs/<search> and write search.json; refuse a folder that already holds a search or a run."""
    from torchferry.files import atomic_write_bytes

    held = [n for n in ("best.pth", "trials.csv", "tune", "trials", "metrics.csv")
            if os.path.exists(os.path.join(search_dir, n))]
    if held:
        raise TorchferryError(f"{search_dir} already holds a search or a run ({held[0]}); choose another --name "
                              "(nothing there was changed)")
    os.makedirs(search_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(search_dir, "search.json"),
                       (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def run_trial(config: dict[str, Any], *, plan: dict[str, Any]) -> None:
    """One trial, on its Tune actor: the launcher's TorchTrainer on the trial's config, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from torchferry.distributed.launch import build_trainer
    from torchferry.distributed.preflight import claim_run_dir
    from torchferry.distributed.space import trial_config

    params = config["train_loop_config"]
    base = TrainConfig.from_dict(plan["bases"][params.get("model", plan["default_model"])])
    cfg = trial_config(base, params, lr_given=plan["lr_given"], finetune_lr_given=plan["finetune_lr_given"],
                       name=ray.tune.get_context().get_trial_id(), output_dir=plan["trials_dir"],
                       storage=plan["trials_storage"])
    claim_run_dir(cfg)
    loop_config = {"cfg": cfg.to_dict(), "split": plan["split"], "events": None}
    build_trainer(cfg, loop_config, callbacks=[TuneReportCallback()], local_ray=plan["local_ray"]).fit()


def trial_dirname(trial: Any) -> str:
    """Tune's folder for a trial: its id, the name of its run folder in runs/<search>/trials too."""
    return str(trial.trial_id)


def concurrency(cfg: TrainConfig, search: SearchConfig) -> int:
    """Trials at once: --max-concurrent, else as many as the cluster's CPUs (or GPUs) can place."""
    import ray

    if search.max_concurrent:
        return search.max_concurrent
    total = ray.cluster_resources()
    if cfg.gpus > 0:
        fit = float(total.get("GPU", 0)) // cfg.gpus
    else:
        fit = float(total.get("CPU", 0)) // (cfg.workers * cfg.cpus_per_worker)
    return max(1, int(fit))


def build_tuner(cfg: TrainConfig, search: SearchConfig, space: SearchSpace, plan: dict[str, Any],
                search_dir: str) -> Any:
    """Ray Tune's Tuner: ASHA on the task's metric per epoch (val_acc), seeded random sampling, trials as Train
    drivers with no CPU."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from torchferry.distributed.tasks import get_task
    from torchferry.distributed.trials import TrialLog

    task = get_task(cfg.task)
    # A trial only drives its Ray Train run, whose workers hold the CPUs or GPUs: it asks for no CPU, only the
    # memory of its own process (Ray refuses a request for nothing at all).
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": 0, "memory": TRIAL_MEMORY})
    return tune.Tuner(
        trainable,
        param_space={"train_loop_config": space.to_param_space()},
        tune_config=tune.TuneConfig(
            metric=task.best_metric, mode=task.best_mode, num_samples=search.num_samples,
            # stop_last_trials=False: Tune does not stop every trial for reaching the last epoch (it ends by
            # itself, its Train run closed in good order); one ASHA cuts at the last rung has trained all its
            # epochs and counts as finished, not as stopped early.
            scheduler=ASHAScheduler(max_t=cfg.epochs, grace_period=search.grace_period,
                                    reduction_factor=search.reduction_factor, stop_last_trials=False),
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency(cfg, search)),
            trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=search_dir, verbose=1 if cfg.verbose else 0,
                                  callbacks=[TrialLog(cfg.epochs, plan["trials_dir"], task.best_metric)]),
    )


def run(cfg: TrainConfig, search: SearchConfig) -> dict[str, Any]:
    """The whole search: check, prepare every model, start or join Ray, run the trials, keep the best."""

    from torchferry.distributed.cluster import check_resources, start_ray
    from torchferry.distributed.tasks import get_task
    from torchferry.distributed.trials import summarize

    space = check_search(cfg, search)
    if not cfg.verbose:
        # Our own lines say how each trial goes (trials.TrialLog); Tune's tables and timing notes stay off.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    cfg = dataclasses.replace(cfg, name=cfg.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}")
    resolved, split = prepare_models(cfg, space)
    base = resolved[space.models(cfg.model)[0]]
    search_dir = base.run_dir
    trials_dir = os.path.join(search_dir, "trials")
    plan = {"bases": {m: c.to_dict() for m, c in resolved.items()}, "default_model": cfg.model,
            "lr_given": cfg.lr is not None, "finetune_lr_given": cfg.finetune_lr is not None,
            "trials_dir": trials_dir, "split": split,
            "trials_storage": os.path.join(base.storage, base.name, "trials") if base.storage else None}
    claim_search_dir(search_dir, {"space": space.to_dict(), "search": dataclasses.asdict(search),
                                  "config": base.to_dict()})
    _logger.info("searching %s: %d trial(s) of %d epoch(s), ASHA grace %d, reduction factor %g",
                 space.describe(), search.num_samples, cfg.epochs, search.grace_period, search.reduction_factor)
    started = start_ray(base)
    plan["local_ray"] = started
    try:
        if base.resource_check:
            check_resources(base)
        results = build_tuner(base, search, space, plan, search_dir).fit()
        task = get_task(base.task)
        return summarize(results, search_dir, trials_dir, base.epochs, task.best_metric, task.best_mode)
    finally:
        if started:
            shutdown_ray()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 0 on success, 2 on bad input, 1 when no trial finished with a checkpoint."""
    from torchferry.distributed.launch import setup_logging

    cfg, search = configs_from_args(argv)
    setup_logging(cfg.verbose)
    try:
        return run_command(lambda: _search(cfg, search), debug=cfg.debug,
                           failures=(TrainingFailed, ClusterUnavailable))
    except KeyboardInterrupt:
        print("interrupted; the trials' checkpoints written so far are kept", file=sys.stderr)
        return 130


def _search(cfg: TrainConfig, search: SearchConfig) -> int:
    summary = run(cfg, search)
    print(f"best {summary['metric']} {summary['value']:.4f}: trial {summary['trial_id']} ({summary['params']}), "
          f"{summary['stopped']} of {summary['trials']} trial(s) stopped early: {summary['best']}")
    return 0


def cli() -> NoReturn:
    """The command, ended as the launcher's is (`launch.exit_process`)."""
    from torchferry.distributed.launch import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
