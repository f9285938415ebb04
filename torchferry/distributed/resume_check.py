"""Whether a checkpoint's resume state (optimizer, schedule, AMP scaler) fits the run that would load it.

A checkpoint is untrusted data, and `load_state_dict` of torch's optimizers and schedules trusts it: a schedule
takes every key of the file as an attribute (`__dict__.update`), an optimizer casts whatever tensors it finds to
its parameters. So the file's state is compared with the state the run's own freshly built objects have: the
same keys or fewer (an older torch may have saved fewer), the same kinds of values, lists of the same length,
tensors shaped as the parameters they belong to. What a state may cost is then what the run's own state costs,
whatever the file holds (a schedule's list a million long is refused, not loaded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

RESUME_KEYS = ("optimizer", "scheduler", "scaler", "backbone_frozen")
# What torch's SGD, Adam and AdamW keep per parameter (amsgrad's maximum included).
PARAMETER_STATE_KEYS = frozenset({"momentum_buffer", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
MAX_STATE_INT = 2**53  # an epoch or step counter; a bigger int is not a counter, and huge ones cost to compute with


def resume_state_problem(restored: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any) -> str | None:
    """What is wrong with `restored`'s resume state (its AMP scaler's too) for this freshly built optimizer and
    schedule, in one line; None when it fits."""
    missing = [k for k in RESUME_KEYS if k not in restored]
    if missing:
        return f"it lacks the resume state {missing}"
    if not isinstance(restored["backbone_frozen"], bool):
        return "backbone_frozen must be true or false"
    for key, problem in (("optimizer", optimizer_problem(optimizer, restored["optimizer"])),
                         ("scheduler", unlike(scheduler.state_dict(), restored["scheduler"], "")),
                         ("scaler", scaler_problem(restored["scaler"]))):
        if problem:
            return f"its {key} state does not fit this run ({problem})"
    return None


def scaler_problem(state: Any) -> str | None:
    """A GradScaler's state: empty (saved with AMP's scaling off) or its own five numbers."""
    if isinstance(state, dict) and not state:
        return None
    return unlike(torch.amp.GradScaler("cpu").state_dict(), state, "", all_keys=True)


def optimizer_problem(optimizer: torch.optim.Optimizer, state: Any) -> str | None:
    """An optimizer's state: its parameter groups as this optimizer's, and per parameter the tensors torch's
    optimizers keep, each a number or shaped as its parameter."""
    fresh = optimizer.state_dict()
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        return "not a mapping of 'state' and 'param_groups'"
    problem = unlike(fresh["param_groups"], state["param_groups"], "param_groups")
    if problem:
        return problem
    ids = [i for group in fresh["param_groups"] for i in group["params"]]
    shapes = {i: tuple(p.shape) for i, p in zip(ids, (p for g in optimizer.param_groups for p in g["params"]))}
    if not isinstance(state["state"], dict) or len(state["state"]) > len(shapes):
        return f"state must map at most {len(shapes)} parameters to their tensors"
    return next(_parameter_problems(state["state"], shapes), None)


def _parameter_problems(state: dict[Any, Any], shapes: dict[int, tuple[int, ...]]) -> Iterable[str]:
    for index, values in state.items():
        if index not in shapes or isinstance(index, bool):
            yield f"state names parameter {str(index)[:40]}, which this optimizer does not have"
            return
        if not isinstance(values, dict) or not set(values) <= PARAMETER_STATE_KEYS:
            yield f"state of parameter {index} must map some of {sorted(PARAMETER_STATE_KEYS)} to tensors"
            return
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                if not value.is_floating_point() or tuple(value.shape) not in (shapes[index], ()):
                    yield (f"state.{index}.{name} is a {value.dtype} tensor of {list(value.shape)}; parameter {index} "
                           f"is {list(shapes[index])}")
                    return
            elif not (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and abs(value) <= MAX_STATE_INT):
                yield f"state.{index}.{name} must be a tensor or a number, got {type(value).__name__}"
                return


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
