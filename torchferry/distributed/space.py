"""The search space of `python -m distributed.tune`: which training settings a search varies, and how.

A space comes from `--space FILE` (YAML or JSON) and the `--search-*` flags (a flag overrides the file's
key). Each key is one TrainConfig field with one distribution:

    lr:              {loguniform: [1e-3, 0.3]}     or "1e-3:0.3"  (a range is log-uniform for lr)
    batch_size:      [32, 64, 128]                 or "32,64,128" (a list is a choice)
    weight_decay:    {loguniform: [1e-5, 1e-3]}    or "1e-5:1e-3", "uniform:0:1e-3"
    label_smoothing: {uniform: [0.0, 0.2]}         or "0:0.2"     (a range is uniform for label smoothing)
    model:           [smallcnn, resnet18]          or "smallcnn,resnet18"

Everything is checked on the driver before Ray starts; a mistake is one `TorchferryError` line naming the
key and how to fix it. `SearchSpace.to_param_space` turns it into Ray Tune's own sampling domains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, default_lr

# key: (value type, the distribution a LO:HI range gets)
KEYS: dict[str, tuple[type, str | None]] = {
    "lr": (float, "loguniform"),
    "batch_size": (int, None),
    "weight_decay": (float, "loguniform"),
    "label_smoothing": (float, "uniform"),
    "model": (str, None),
}
KINDS = ("loguniform", "uniform", "choice")
MAX_CHOICES = 256


@dataclass(frozen=True)
class Dimension:
    """One searched key: `kind` is loguniform or uniform over (lo, hi), or a choice among `values`."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {{{', '.join(map(str, self.values))}}}"
        return f"{self.key} {self.kind} [{self.values[0]:g}, {self.values[1]:g}]"


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys, in a fixed order (that of KEYS), each checked."""

    dimensions: tuple[Dimension, ...]

    def get(self, key: str) -> Dimension | None:
        return next((d for d in self.dimensions if d.key == key), None)

    def models(self, default: str) -> list[str]:
        """The models trials train: the searched list, else the command line's --model."""
        dim = self.get("model")
        return list(dim.values) if dim else [default]

    def to_param_space(self) -> dict[str, Any]:
        """Ray Tune's sampling domains, one per key (`tune.loguniform`, `tune.uniform`, `tune.choice`)."""
        from ray import tune

        domains = {"loguniform": tune.loguniform, "uniform": tune.uniform}
        return {d.key: tune.choice(list(d.values)) if d.kind == "choice" else domains[d.kind](*d.values)
                for d in self.dimensions}

    def describe(self) -> str:
        return "; ".join(d.describe() for d in self.dimensions)

    def to_dict(self) -> dict[str, Any]:
        """The space in the file format (what search.json records)."""
        return {d.key: list(d.values) if d.kind == "choice" else {d.kind: list(d.values)} for d in self.dimensions}


def read_space_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML or JSON space file; a missing, unreadable or malformed file is a TorchferryError."""
    import yaml

    where = f"--space {path}"
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise TorchferryError(f"{where}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    try:
        data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TorchferryError(f"{where}: not valid {'JSON' if path.lower().endswith('.json') else 'YAML'} "
                              f"({first[:200]})") from None
    if not isinstance(data, dict):
        raise TorchferryError(f"{where}: must map keys ({', '.join(KEYS)}) to distributions, "
                              f"got {type(data).__name__}")
    return data


def parse_flag(key: str, text: str) -> Any:
    """A `--search-*` value as the file would hold it: "LO:HI", "loguniform:LO:HI", "uniform:LO:HI" or "A,B,C"."""
    flag = f"--search-{key.replace('_', '-')}"
    if key in KEYS and KEYS[key][1] is None:  # a list only (a model may be package.module:factory)
        return [v.strip() for v in text.split(",") if v.strip()]
    parts = text.split(":")
    if len(parts) == 3 and parts[0] in ("loguniform", "log", "uniform"):
        return {"loguniform" if parts[0] == "log" else parts[0]: [_number(p, flag) for p in parts[1:]]}
    if len(parts) == 2:
        return f"{parts[0]}:{parts[1]}"
    if len(parts) == 1:
        return [v.strip() for v in text.split(",") if v.strip()]
    raise TorchferryError(f"{flag} {text!r}: give LO:HI, loguniform:LO:HI, uniform:LO:HI or a list A,B,C")


def _number(text: Any, where: str) -> float:
    if isinstance(text, bool):
        raise TorchferryError(f"{where}: expected a number, got {text!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise TorchferryError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise TorchferryError(f"{where}: expected a finite number, got {text!r}")
    return value


def dimension(key: str, spec: Any) -> Dimension:
    """One key's distribution from its file or flag form, checked: known key, lo < hi, values in range."""
    if key not in KEYS:
        raise TorchferryError(f"unknown search key {key!r}; the space may vary {', '.join(KEYS)}")
    kind_of_range = KEYS[key][1]
    if isinstance(spec, str) and ":" in spec and kind_of_range:
        spec = {kind_of_range: spec.split(":")}
    elif isinstance(spec, (str, int, float)) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise TorchferryError(f"search key {key!r}: expected one of {{loguniform: [LO, HI]}}, "
                                  f"{{uniform: [LO, HI]}}, {{choice: [...]}} or a list, got {_short(spec)}")
        kind, values = next(iter(spec.items()))
    elif isinstance(spec, list):
        kind, values = "choice", spec
    else:
        raise TorchferryError(f"search key {key!r}: expected a range or a list, got {_short(spec)}")
    if not isinstance(values, list):
        raise TorchferryError(f"search key {key!r}: {kind} takes a list, got {_short(values)}")
    dim = _choice(key, values) if kind == "choice" else _range(key, kind, values)
    _check_values(dim)
    return dim


def _choice(key: str, values: list[Any]) -> Dimension:
    kind = KEYS[key][0]
    if not values or len(values) > MAX_CHOICES:
        raise TorchferryError(f"search key {key!r}: a choice needs 1 to {MAX_CHOICES} values, got {len(values)}")
    if kind is str:
        if not all(isinstance(v, str) and v for v in values):
            raise TorchferryError(f"search key {key!r}: expected names, got {_short(values)}")
        return Dimension(key, "choice", tuple(dict.fromkeys(values)))
    out = []
    for v in values:
        number = _number(v, f"search key {key!r}")
        if kind is int and number != int(number):
            raise TorchferryError(f"search key {key!r}: expected whole numbers, got {v!r}")
        out.append(int(number) if kind is int else number)
    return Dimension(key, "choice", tuple(dict.fromkeys(out)))


def _range(key: str, kind: str, values: list[Any]) -> Dimension:
    if KEYS[key][1] is None:
        raise TorchferryError(f"search key {key!r} takes a list of values (a choice), not a {kind} range")
    if len(values) != 2:
        raise TorchferryError(f"search key {key!r}: {kind} takes [LO, HI], got {_short(values)}")
    lo, hi = (_number(v, f"search key {key!r}") for v in values)
    if lo >= hi:
        raise TorchferryError(f"search key {key!r}: LO {lo:g} must be below HI {hi:g} (for one value give a list)")
    if kind == "loguniform" and lo <= 0:
        raise TorchferryError(f"search key {key!r}: a log-uniform range needs LO > 0, got {lo:g} "
                              "(use uniform:LO:HI or {uniform: [LO, HI]} to include 0)")
    return Dimension(key, kind, (lo, hi))


def _check_values(dim: Dimension) -> None:
    """The bounds each key has in TrainConfig (validate_flags says the same for one run)."""
    numbers = [v for v in dim.values if not isinstance(v, str)]
    if dim.key == "lr" and min(numbers) <= 0:
        raise TorchferryError(f"search key 'lr': learning rates must be positive, got {min(numbers):g}")
    if dim.key == "weight_decay" and min(numbers) < 0:
        raise TorchferryError(f"search key 'weight_decay': must be 0 or more, got {min(numbers):g}")
    if dim.key == "label_smoothing" and not (0 <= min(numbers) and max(numbers) < 1):
        raise TorchferryError(f"search key 'label_smoothing': must be in [0, 1), got {dim.describe()}")
    if dim.key == "batch_size" and min(numbers) < 1:
        raise TorchferryError(f"search key 'batch_size': sizes must be at least 1, got {min(numbers):g}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_space(file: str | None, flags: dict[str, str | None]) -> SearchSpace:
    """The space of `--space FILE` with each given `--search-*` flag (key -> text) overriding its key."""
    specs: dict[str, Any] = dict(read_space_file(file)) if file else {}
    for key, text in flags.items():
        if text is not None:
            specs[key] = parse_flag(key, text)
    unknown = sorted(set(specs) - set(KEYS))
    if unknown:
        raise TorchferryError(f"unknown search key {unknown[0]!r}; the space may vary {', '.join(KEYS)}")
    if not specs:
        raise TorchferryError("nothing to search: give --space FILE or at least one --search-* flag "
                              "(e.g. --search-lr 1e-3:0.3)")
    return SearchSpace(tuple(dimension(key, specs[key]) for key in KEYS if key in specs))


def check_against(space: SearchSpace, cfg: TrainConfig) -> None:
    """Refuse a space that no trial of this command line could train (an unknown model, a batch smaller than the
    workers, label smoothing for a task without it)."""
    models = space.get("model")
    if models and cfg.task == "image":  # a task's own model names are checked as it prepares each (tune.py)
        from torchferry.distributed.models import check_arch

        for name in models.values:
            check_arch(name)
    if space.get("label_smoothing") and cfg.task != "image":
        raise TorchferryError(f"search key 'label_smoothing' smooths the image classifier's labels; the {cfg.task} "
                              "task has none to smooth")
    sizes = space.get("batch_size")
    if sizes and min(sizes.values) < cfg.num_workers_total:
        raise TorchferryError(f"search key 'batch_size': {min(sizes.values)} is a global batch; every size must be "
                              f"at least the number of workers ({cfg.num_workers_total})")


def trial_config(base: TrainConfig, params: dict[str, Any], *, lr_given: bool, finetune_lr_given: bool,
                 name: str, output_dir: str, storage: str | None) -> TrainConfig:
    """One trial's config: the resolved config of its model with the sampled `params`, in runs/<search>/trials.

    A learning rate the command line left to its default follows a sampled batch size (the linear scaling
    rule), as it would in `python -m distributed.launch --batch-size N`; so does --finetune-lr (lr / 10).
    """
    cfg = dataclasses.replace(base, **{k: v for k, v in params.items() if k in KEYS}, name=name,
                              output_dir=output_dir, storage=storage, resume=False, progress="off")
    if "lr" not in params and not lr_given:
        cfg.lr = default_lr(cfg.opt, cfg.batch_size)
    if cfg.unfreeze_at_epoch is not None and not finetune_lr_given:
        cfg.finetune_lr = float(cfg.lr or 0) / 10
    return TrainConfig.from_dict(cfg.to_dict())
