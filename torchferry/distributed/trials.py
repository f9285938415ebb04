"""The end of a search: every trial's best checkpoint, the table and the picture of all trials, and the best.

Each trial is a launcher run in runs/<search>/trials/<trial id> (config.json, metrics.csv, checkpoints);
`finish.finish` keeps its best checkpoint there as for any run, and the best of those becomes
runs/<search>/best.pth (the checkpoint contract, so `python -m export.onnx runs/<search>/best.pth` works).
`TrialLog` prints the trials' epochs on the driver as Tune reports them. Ray and torch load with this module,
which only a running search imports.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ray import tune

from torchferry.distributed.checkpoint import copy_checkpoint
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.finish import TrainingFailed, finish
from torchferry.distributed.space import KEYS
from torchferry.files import atomic_write_bytes

_logger = logging.getLogger(__name__)

# finish() reads a run's checkpoints from Ray Train's Result; a trial's are found in its folder instead.
NO_RECORD = SimpleNamespace(best_checkpoints=[], checkpoint=None)


@dataclass
class Trial:
    """One trial as the table shows it: its settings, its metric per epoch, how it ended, its best checkpoint."""

    trial_id: str
    params: dict[str, Any]
    curve: list[float] = field(default_factory=list)  # the task's best metric (val_acc, val_rmse) per epoch
    stopped_early: bool = False
    error: str | None = None
    best: dict[str, Any] | None = None  # finish()'s summary: best (path), epoch, metric and its value

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        return "stopped early" if self.stopped_early else "finished"


class TrialLog(tune.Callback):
    """The driver's console during a search (one line per trial epoch, how each trial ended), and the release of
    a stopped trial's workers."""

    def __init__(self, epochs: int, trials_dir: str, metric: str):
        self.epochs, self.trials_dir, self.metric = epochs, trials_dir, metric

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.metric in result:
            _logger.info("trial %s  epoch %d/%d  %s %.4f  val_loss %.4f", trial.trial_id, int(result.get("epoch", 0)) + 1,
                         self.epochs, self.metric, result[self.metric], result.get("val_loss", float("nan")))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = int((trial.last_result or {}).get("training_iteration", 0))
        ending = "finished" if done >= self.epochs else "stopped early by ASHA"
        _logger.info("trial %s %s after %d epoch(s)", trial.trial_id, ending, done)
        release_workers(os.path.join(self.trials_dir, trial.trial_id))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _logger.warning("trial %s failed; its error is in %s", trial.trial_id, trial.local_path)
        release_workers(os.path.join(self.trials_dir, trial.trial_id))


def release_workers(run_dir: str) -> None:
    """Remove the placement group of a trial's Ray Train workers (cluster.json names it) if it is still there.

    Tune ends a trial it stops by ending the trial's process, and with it the Ray Train controller, before the
    controller can release its workers' placement group; Ray Train's own cleaner for that case asks Ray's
    state API, which needs the dashboard that torchferry leaves off (rayinit.py). Without this the CPUs of
    every stopped trial stay reserved and the next trials wait for them forever.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    try:
        with open(os.path.join(run_dir, "cluster.json"), encoding="utf-8") as f:
            group_id = json.load(f).get("placement_group")
    except (OSError, ValueError):
        return  # the trial ended before its workers started: nothing was reserved for them
    if not group_id:
        return
    group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
    if placement_group_table(group).get("state") not in (None, "REMOVED"):
        remove_placement_group(group)
        _logger.debug("released placement group %s of %s", group_id, run_dir)


def trial_from_result(result: Any, trials_dir: str, epochs: int, metric: str) -> Trial:
    """A Tune Result as a Trial, its best checkpoint kept (trials/<id>/best.pth) by finish()."""
    from torchferry.cli import lead_line

    trial_id = os.path.basename(os.path.normpath(result.path))
    frame = result.metrics_dataframe
    curve = []
    if frame is not None and metric in frame:
        curve = [float(v) for v in frame.sort_values("training_iteration")[metric].dropna()]
    trial = Trial(trial_id, dict((result.config or {}).get("train_loop_config", {})), curve,
                  error=lead_line(result.error) if result.error else None)
    trial.stopped_early = trial.error is None and len(curve) < epochs
    config_path = os.path.join(trials_dir, trial_id, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            cfg = TrainConfig.from_dict(json.load(f))
        trial.params = {key: getattr(cfg, key) for key in KEYS}
        try:
            trial.best = finish(cfg, NO_RECORD)
        except TrainingFailed as exc:
            _logger.warning("trial %s: %s", trial_id, exc)
    return trial


def write_table(trials: list[Trial], path: str, metric: str) -> None:
    """trials.csv: one row per trial (id, status, epochs run, best metric and epoch, its settings), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial_id", "status", "stopped_early", "epochs_run", f"best_{metric}", "best_epoch", *KEYS,
                     "checkpoint", "error"])
    for t in trials:
        best = t.best or {}
        writer.writerow([t.trial_id, t.status, str(t.stopped_early).lower(), len(t.curve),
                         f"{best[metric]:.6f}" if best else "", best["epoch"] + 1 if best else "",
                         *(t.params.get(key, "") for key in KEYS), best.get("best", ""), t.error or ""])
    atomic_write_bytes(path, buffer.getvalue().encode())


def plot_trials(trials: list[Trial], best_id: str | None, path: str, metric: str) -> None:
    """trials.png: the metric per epoch for every trial; the best bold, those ASHA stopped dashed, atomically."""
    from matplotlib.ticker import MaxNLocator

    from torchferry.distributed.report import _save, figure_module

    plt = figure_module()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        if not t.curve:
            continue
        epochs = list(range(1, len(t.curve) + 1))
        best = t.trial_id == best_id
        ax.plot(epochs, t.curve, marker="o", linestyle="--" if t.stopped_early else "-",
                linewidth=2.5 if best else 1.2, zorder=3 if best else 2,
                label=f"{t.trial_id}{' (best)' if best else ''}{' (stopped)' if t.stopped_early else ''}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(trials)} trial(s): {metric} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(trials) <= 20:
        ax.legend(fontsize="small", loc="best")
    _save(fig, path)


def summarize(results: Any, search_dir: str, trials_dir: str, epochs: int, metric: str, mode: str) -> dict[str, Any]:
    """Keep the best trial's best checkpoint as runs/<search>/best.pth; write trials.csv and trials.png.

    The best trial is the one whose best checkpoint has the best `metric` (highest for mode "max", lowest for
    "min"; the earliest trial among equals). Raises TrainingFailed when no trial left a usable checkpoint.
    """
    trials = sorted((trial_from_result(r, trials_dir, epochs, metric) for r in results), key=lambda t: t.trial_id)
    kept = [t for t in trials if t.best]
    sign = 1.0 if mode == "max" else -1.0
    best = max(kept, key=lambda t: (sign * t.best[metric], -trials.index(t))) if kept else None
    write_table(trials, os.path.join(search_dir, "trials.csv"), metric)
    try:
        plot_trials(trials, best.trial_id if best else None, os.path.join(search_dir, "trials.png"), metric)
    except Exception as exc:  # noqa: BLE001 - the picture is a convenience; the table and checkpoint matter
        _logger.warning("could not draw trials.png: %s", exc)
    if best is None:
        raise TrainingFailed(f"no trial finished an epoch with a usable checkpoint; see {search_dir}/trials.csv")
    path = os.path.join(search_dir, "best.pth")
    copy_checkpoint(best.best["best"], path)
    return {"best": path, "trial_id": best.trial_id, "metric": metric, "value": best.best[metric],
            "epoch": best.best["epoch"], "params": ", ".join(f"{k} {v}" for k, v in best.params.items()),
            "trials": len(trials), "stopped": sum(t.stopped_early for t in trials)}
