"""Whether a checkpoint's resume state (optimizer, schedule, AMP scaler) fits the run that would load it.

A checkpoint is untrusted data, and `load_state_dict` of torch's optimizers and schedules trusts it: a schedule
takes every key of the file as an attribute (`__dict__.update`), an optimizer casts whatever tensors it finds to
its parameters. So the file's state is compared with the state the run's own freshly built objects have, first in
kind (`unlike`: the same keys or fewer, as an older torch may have saved fewer, the same kinds of values, lists of
the same length), then in meaning: an honest checkpoint was made by the same run (its config.json) with the same
settings, so every setting must equal the fresh one's, and only what a run changes as it goes (counters, learning
rates, the best value so far, per-parameter buffers) may differ, within the range a run can reach. What a state may
cost is then what the run's own state costs (a schedule's list a million long is refused, not loaded), and none
makes a worker divide by zero, index past a list or step from a buffer of another parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

RESUME_KEYS = ("optimizer", "scheduler", "scaler", "backbone_frozen")
MAX_STATE_INT = 2**53  # an int of a kind check; a bigger int is not a counter, and huge ones cost to compute with
MAX_COUNT = 2**31  # a counter of epochs or optimizer steps: more than any run makes
# A schedule's progress (torch's LRScheduler, SequentialLR, ReduceLROnPlateau): the keys that change as a run goes
# on. Every other key of a schedule's state is a setting, which must equal the freshly built schedule's.
COUNTERS = frozenset({"last_epoch", "_step_count", "num_bad_epochs", "cooldown_counter"})
FLAGS = frozenset({"_is_initial", "_get_lr_called_within_step"})
# A parameter group's settings that torch's SGD, Adam and AdamW fill in when a state lacks them (`__setstate__`);
# any other lacking key would be looked up by the first step.
FILLED_GROUP_KEYS = frozenset({"nesterov", "maximize", "foreach", "differentiable", "fused", "amsgrad", "capturable",
                               "decoupled_weight_decay"})


def resume_state_problem(restored: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any) -> str | None:
    """What is wrong with `restored`'s resume state (its AMP scaler's too) for this freshly built optimizer and
    schedule, in one line; None when it fits."""
    missing = [k for k in RESUME_KEYS if k not in restored]
    if missing:
        return f"it lacks the resume state {missing}"
    if not isinstance(restored["backbone_frozen"], bool):
        return "backbone_frozen must be true or false"
    for key, problem in (("optimizer", optimizer_problem(optimizer, restored["optimizer"])),
                         ("scheduler", schedule_problem(scheduler.state_dict(), restored["scheduler"])),
                         ("scaler", scaler_problem(restored["scaler"]))):
        if problem:
            return f"its {key} state does not fit this run ({problem})"
    return None


def schedule_problem(fresh: dict[str, Any], state: Any) -> str | None:
    """A schedule's state: of the fresh state's kind (`unlike`), then in meaning (`_schedule_values_problem`)."""
    return unlike(fresh, state, "") or _schedule_values_problem(fresh, state, "")


def _schedule_values_problem(fresh: dict[str, Any], state: dict[str, Any], where: str) -> str | None:
    """A schedule's values (a SequentialLR's schedules' too), its kinds checked: its settings equal to the fresh
    ones, its progress (COUNTERS, FLAGS, `_last_lr`, `best`) within a run's reach."""
    for key, value in state.items():
        here, template = f"{where}.{key}".lstrip("."), fresh[key]
        if key == "_schedulers":
            problem = next((p for i, (t, v) in enumerate(zip(template, value))
                            if (p := _schedule_values_problem(t, v, f"{here}[{i}]"))), None)
        elif key in COUNTERS:
            problem = _count_problem(value, here)
        elif key in FLAGS:
            problem = None  # true or false (unlike): whether a step is under way, which it is not between epochs
        elif key == "_last_lr":
            problem = next((p for i, v in enumerate(value) if (p := _rate_problem(v, f"{here}[{i}]"))), None)
        elif key == "best":  # ReduceLROnPlateau's best metric so far: infinite until its first step
            problem = None if not math.isnan(value) else f"{here} must be a number or infinite, not NaN"
        elif not _same(template, value):
            problem = f"{here} must be {_shown(template)} as this run's schedule has it"
        else:
            problem = None
        if problem:
            return problem
    return None


def scaler_problem(state: Any) -> str | None:
    """A GradScaler's state: empty (saved with AMP's scaling off) or its five numbers: a scale a float32 can hold
    above zero, a growth tracker up to the growth interval, the other three those of a fresh GradScaler."""
    if isinstance(state, dict) and not state:
        return None
    fresh = torch.amp.GradScaler("cpu").state_dict()
    problem = unlike(fresh, state, "", all_keys=True)
    if problem:
        return problem
    float32 = torch.finfo(torch.float32)
    if not float32.tiny <= state["scale"] <= float32.max:  # NaN fails too; 0 or inf would skip every step
        return f"scale must be a number from {float32.tiny:g} to {float32.max:g}, got {state['scale']:g}"
    fixed = [k for k in ("growth_factor", "backoff_factor", "growth_interval") if not _same(fresh[k], state[k])]
    if fixed:
        return f"{fixed[0]} must be {fresh[fixed[0]]!r} as this run's GradScaler has it"
    tracker = state["_growth_tracker"]
    if not (isinstance(tracker, int) and 0 <= tracker <= state["growth_interval"]):
        return f"_growth_tracker must be a count from 0 to {state['growth_interval']}"
    return None


def optimizer_problem(optimizer: torch.optim.Optimizer, state: Any) -> str | None:
    """An optimizer's state: its parameter groups as this optimizer's (the same parameter ids in the same order,
    the same settings, a learning rate of its own), and per parameter nothing yet or all the buffers torch's
    optimizer keeps for it, each a dense tensor shaped as its parameter (Adam's `step` a count)."""
    fresh = optimizer.state_dict()
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        return "not a mapping of 'state' and 'param_groups'"
    problem = unlike(fresh["param_groups"], state["param_groups"], "param_groups") or next(
        (p for i, (t, g) in enumerate(zip(fresh["param_groups"], state["param_groups"]))
         if (p := _group_problem(t, g, f"param_groups[{i}]"))), None)
    if problem:
        return problem
    expected = {}
    for group, ids in zip(optimizer.param_groups, (g["params"] for g in fresh["param_groups"])):
        keys = parameter_state_keys(optimizer, group)
        expected.update({i: (tuple(p.shape), keys) for i, p in zip(ids, group["params"])})
    if not isinstance(state["state"], dict) or len(state["state"]) > len(expected):
        return f"state must map at most {len(expected)} parameters to their tensors"
    return next(_parameter_problems(state["state"], expected), None)


def parameter_state_keys(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> frozenset[str]:
    """What torch's optimizer keeps per parameter of `group` once it has stepped (it reads all of them then)."""
    if isinstance(optimizer, torch.optim.SGD):
        return frozenset({"momentum_buffer"} if group["momentum"] != 0 else ())
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too
        return frozenset({"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group["amsgrad"] else set()))
    raise TypeError(f"no resume check for a {type(optimizer).__name__}'s state")


def _group_problem(fresh: dict[str, Any], group: dict[str, Any], where: str) -> str | None:
    """A parameter group: every setting torch does not fill in, each equal to the fresh group's, the parameter
    ids too (the state of the n-th saved id goes to the n-th parameter), and a learning rate of its own."""
    lacking = [k for k in fresh if k not in group and k not in FILLED_GROUP_KEYS]
    if lacking:
        return f"{where} lacks {lacking[0]!r}"
    for key, value in group.items():
        if key == "lr":
            problem = _rate_problem(value, f"{where}.lr")
        else:
            problem = None if _same(fresh[key], value) else f"{where}.{key} must be {_shown(fresh[key])}"
        if problem:
            return problem
    return None


def _parameter_problems(state: dict[Any, Any], expected: dict[int, tuple[tuple[int, ...], frozenset[str]]]
                        ) -> Iterable[str]:
    for index, values in state.items():
        if index not in expected or isinstance(index, bool):
            yield f"state names parameter {_shown(index)}, which this optimizer does not have"
            return
        shape, keys = expected[index]
        if not isinstance(values, dict) or (values and set(values) != keys):
            yield f"state of parameter {index} must map all of {sorted(keys)} to tensors, or nothing"
            return
        for name, value in values.items():
            problem = _buffer_problem(value, f"state.{index}.{name}", () if name == "step" else shape)
            if problem:
                yield f"{problem}; parameter {index} is {list(shape)}" if name != "step" else problem
                return


def _buffer_problem(value: Any, here: str, shape: tuple[int, ...]) -> str | None:
    """A per-parameter buffer: a dense float tensor of `shape` that owns its storage (a 1-element view of a huge
    one would be saved again every epoch, an expanded one written through); Adam's `step` ((), or a number) a count."""
    if not shape and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _count_problem(value, here)
    if type(value) is not torch.Tensor or not value.is_floating_point() or tuple(value.shape) != shape:
        kind = f"a {value.dtype} tensor of {list(value.shape)}" if isinstance(value, torch.Tensor) else \
            f"a {type(value).__name__}"
        return f"{here} is {kind}" + ("" if shape else ", not a count")
    if (value.layout != torch.strided or value.device.type != "cpu" or value.requires_grad or not _dense(value)
            or value.untyped_storage().nbytes() != value.numel() * value.element_size()):
        return f"{here} must be a dense tensor with a storage of its own"
    return None if shape else _count_problem(value.item(), here)


def _dense(value: torch.Tensor) -> bool:
    """Whether a strided tensor is laid out in one of the memory formats a parameter's buffers take after it
    (`preserve_format`): contiguous, or channels-last for a --channels-last run's convolution weights."""
    return value.is_contiguous() or (value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last))


def _count_problem(value: Any, here: str) -> str | None:
    """A counter (unlike has checked it is a number): a whole number from 0 to MAX_COUNT."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value <= MAX_COUNT and float(value).is_integer()):
        return f"{here} must be a count from 0 to {MAX_COUNT}, got {_shown(value)}"
    return None


def _rate_problem(value: Any, here: str) -> str | None:
    """A learning rate: a finite number, zero or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        return f"{here} must be a finite learning rate of zero or more, got {_shown(value)}"
    return None


def _same(template: Any, value: Any) -> bool:
    """Whether `value` equals `template` as a setting: numbers by value (an int for a whole float), everything
    else of the same type and equal throughout (a Counter's counts, a list's items)."""
    numbers = (int, float)
    if isinstance(template, numbers) and not isinstance(template, bool):
        return isinstance(value, numbers) and not isinstance(value, bool) and value == template
    if type(value) is not type(template):
        return False
    if isinstance(template, dict):
        return template.keys() == value.keys() and all(_same(template[k], value[k]) for k in template)
    if isinstance(template, (list, tuple)):
        return len(value) == len(template) and all(_same(t, v) for t, v in zip(template, value))
    return bool(template == value)


def _shown(value: Any) -> str:
    """A value of the file, shortened (an int of thousands of digits cannot even be written out)."""
    if isinstance(value, int) and abs(value) >= 10**40:
        return "an int of more than 40 digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def unlike(template: Any, value: Any, where: str, *, all_keys: bool = False) -> str | None:
    """How `value` differs from `template` in kind (None when it does not): mappings with keys among the
    template's, lacking none of its lists and mappings (none of its keys with `all_keys`), sequences of the same length, numbers for numbers (ints no bigger
    than MAX_STATE_INT), the same strings, None where the template has None (or a flag or number)."""
    here = where or "the state"
    if isinstance(template, dict):
        if not isinstance(value, dict):
            return f"{here} must be a mapping, got {type(value).__name__}"
        extra = [k for k in value if k not in template]
        lacking = [k for k, t in template.items() if k not in value and (all_keys or isinstance(t, (dict, list, tuple)))]
        if extra or lacking:
            return f"{here} has the keys {_keys(value)}; this run's has {_keys(template)}"
        return next((p for k in value if (p := unlike(template[k], value[k], f"{where}.{k}".lstrip(".")))), None)
    if isinstance(template, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(template):
            size = f"{len(value)} long" if isinstance(value, (list, tuple)) else type(value).__name__
            return f"{here} must be a list of {len(template)}, got {size}"
        return next((p for i, (t, v) in enumerate(zip(template, value)) if (p := unlike(t, v, f"{where}[{i}]"))), None)
    return _scalar_problem(template, value, here)


def _scalar_problem(template: Any, value: Any, here: str) -> str | None:
    if isinstance(template, bool) or (template is None and isinstance(value, bool)):
        return None if isinstance(value, bool) else f"{here} must be true or false, got {type(value).__name__}"
    if isinstance(template, (int, float)) or template is None and value is not None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(value, float) or abs(value) <= MAX_STATE_INT)
        if isinstance(template, int) and not isinstance(template, bool) and isinstance(value, float):
            ok = ok and math.isfinite(value) and value.is_integer()  # a counter saved as a float
        return None if ok else f"{here} must be a number like {template!r}, got {type(value).__name__}"
    if isinstance(template, str):
        return None if value == template else f"{here} must be {template!r}"
    if template is None:
        return None
    return None if type(value) is type(template) else f"{here} must be a {type(template).__name__}"


def _keys(mapping: dict[Any, Any]) -> str:
    keys = [str(k)[:30] for k in list(mapping)[:6]]
    return f"{keys}{' and more' if len(mapping) > 6 else ''}"
