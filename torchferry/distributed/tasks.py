"""What a learning task is to training and export: the seam every task (image, tabular, text) plugs into.

The shared machinery (the per-worker loop, one epoch, the checkpoint, keeping the best one, the export and its
parity proof) knows no task: it asks the run's `Task` for the data, the model, the loss, the figures of an
epoch, the checkpoint's task fields and the export's example input. `get_task(cfg.task)` finds it; the modules
are imported when asked for, so `--help` stays light. A task's torch-free half (its input spec and how raw
inputs become the model's array) is in `torchferry/inputs/`, its serving half in `torchferry/serve/tasks.py`;
docs/design.md lists what each task provides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torchferry.contract import TASKS, TorchferryError, registered

# name → "module:class" of its Task; each module imports torch, so they load only when a task is asked for.
TASK_CLASSES = {
    "image": "torchferry.distributed.image_task:ImageTask",
    "tabular": "torchferry.distributed.tabular:TabularTask",
    "text": "torchferry.distributed.text:TextTask",
}


class Task:
    """The interface: every method raises until a task defines it (an unfinished task fails loudly)."""

    name = ""
    best_metric = ""        # the validation figure that picks the best checkpoint (Ray's score attribute too)
    best_mode = "max"       # "max" (accuracy) or "min" (an error)
    metric_columns: tuple[str, ...] = ()  # metrics.csv and each history row, in order
    checkpoint_metrics: tuple[str, ...] = ()  # the figures a checkpoint's `metrics` must carry
    required_keys: tuple[str, ...] = ()  # the checkpoint's task fields
    output_name = "logits"  # the ONNX output
    classifier = False      # one logit per class: `python -m distributed.evaluate` reports on it
    items = "samples"       # what one input is, in reports ("validation images")

    # training -------------------------------------------------------------------------------------
    def prepare(self, cfg: Any) -> tuple[Any, Any]:
        """Driver, before Ray: find and check the data, resolve the defaults, prove the model takes the input.
        The split it returns is what every worker trains on (it travels in the loop config)."""
        raise NotImplementedError

    def datasets(self, split: Any, cfg: Any, use_cuda: bool) -> tuple[Any, Any]:
        """Training and validation datasets of (input, target) pairs."""
        raise NotImplementedError

    def build_model(self, cfg: Any, split: Any) -> Any:
        """The model to train, fresh or from --pretrained weights."""
        raise NotImplementedError

    def criteria(self, cfg: Any, split: Any) -> tuple[Callable, Callable]:
        """The training loss and the validation loss (a module or callable of (output, target))."""
        raise NotImplementedError

    sums_length = 1  # how many numbers batch_sums gives

    def batch_sums(self, output: Any, target: Any) -> Any:
        """Per-batch sums (a 1-d float64 tensor of `sums_length`) that `phase_metrics` turns into figures;
        summed over every worker."""
        raise NotImplementedError

    def phase_metrics(self, prefix: str, stats: Any) -> dict[str, float]:
        """The figures of one phase ("train" or "val") from its PhaseStats, keys starting with `prefix`_."""
        raise NotImplementedError

    def device_transform(self, cfg: Any, device: Any) -> Callable | None:
        """A step run on the device before the model (images normalised on a GPU), or None."""
        return None

    def outputs_match(self, source: dict[str, Any], split: Any) -> bool:
        """--init-from: whether a checkpoint's output layer fits this run's outputs (else a fresh head)."""
        raise NotImplementedError

    def pictures(self, cfg: Any, best: dict[str, Any], history: list[dict[str, Any]], split: Any) -> None:
        """The pictures of a finished run in runs/<name>/."""
        raise NotImplementedError

    # the checkpoint -------------------------------------------------------------------------------
    def checkpoint_fields(self, split: Any, cfg: Any) -> dict[str, Any]:
        """The task's own checkpoint keys (plain data): what the model maps from and to."""
        raise NotImplementedError

    def field_problems(self, obj: dict[str, Any]) -> Iterator[str]:
        """What is wrong with a loaded checkpoint's task fields and metrics (the file is untrusted)."""
        raise NotImplementedError

    def model_builder(self, checkpoint: dict[str, Any], factory: str | None) -> Callable[[], Any]:
        """A function that builds the checkpoint's bare model (weights not loaded), its arguments checked; a
        `package.module:factory` model only when `factory` (the command line's --model) names it."""
        raise NotImplementedError

    # export ---------------------------------------------------------------------------------------
    def input_shape(self, checkpoint: dict[str, Any]) -> list[int]:
        """One input's shape, without the batch: what the ONNX graph takes."""
        raise NotImplementedError

    def onnx_metadata(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The task's metadata_props (the server's input spec among them)."""
        raise NotImplementedError

    def metadata_keys(self) -> tuple[str, ...]:
        """The metadata keys export.verify holds equal to the checkpoint's."""
        raise NotImplementedError

    def golden_kind(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """How the golden inputs are drawn (`contract.golden_inputs`' dtype, low, high): floats by default."""
        return {}

    def random_input(self, checkpoint: dict[str, Any], batch: int, generator: Any) -> Any:
        """A random batch the parity proof runs (float32 tensor)."""
        raise NotImplementedError

    def validation_set(self, checkpoint: dict[str, Any], data: str | None, val_data: str | None = None,
                       image_root: str | None = None) -> tuple[Any, str]:
        """A classifier's validation dataset of (input, class index), rebuilt from `data` (and `val_data`,
        `image_root`: the command line's) as the checkpoint's run split it, and what it is."""
        raise NotImplementedError

    def real_batches(self, checkpoint: dict[str, Any], data: str | None, limit: int) -> tuple[Iterator, str]:
        """Batches of (inputs, targets) of the checkpoint's validation data, and what they are."""
        raise NotImplementedError

    def agreement(self, onnx_out: Any, torch_out: Any) -> dict[str, float]:
        """Figures beyond the tolerance (top-1 agreement for classifiers)."""
        return {}


def get_task(name: str) -> Task:
    """The Task called `name` (a fresh instance: tasks hold no state); a TorchferryError naming the choices."""
    if name not in TASKS or name not in TASK_CLASSES:
        raise TorchferryError(f"unknown task {str(name)[:40]!r}; choose one of {', '.join(TASK_CLASSES)}")
    cls = registered(TASK_CLASSES[name])
    if cls is None:
        raise TorchferryError(f"the {name} task is not part of this torchferry")
    return cls()


def task_for(obj: dict[str, Any]) -> Task:
    """The Task of a checkpoint (its `task`; an image classifier when it records none)."""
    from torchferry.contract import task_of

    return get_task(task_of(obj))
