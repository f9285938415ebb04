"""The model zoo: torchvision's classification models by name, `smallcnn`, and your own factory.

`build_model` returns a module with a `num_classes` head whatever the head is called (`fc`,
`classifier[-1]`, `heads.head`, squeezenet's final conv ...), optionally starting from pretrained
weights: a torchvision weights enum (read from torch.hub's cache, downloaded only when missing) or a
local state dict. Weights are always loaded with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import os
import re
import sys
from typing import Any

import torch
from torch import nn

from torchferry.distributed import TorchferryError

_logger = logging.getLogger(__name__)

# Constructor arguments that torchvision's builders set themselves when they load these weights.
_PRETRAINED_KWARGS: dict[str, dict[str, Any]] = {
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
}


class SmallCNN(nn.Module):
    """A compact VGG-style CNN for small images (digits, MNIST, CIFAR): 5 conv layers, global pooling."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.2):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def torchvision_models() -> list[str]:
    """Names of torchvision's image classification models (torchvision loads on the first call: a smallcnn
    or factory run's driver never needs it before training)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def is_custom(arch: str) -> bool:
    """`package.module:factory` names a user's own model factory."""
    return ":" in arch


FACTORY_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
SMALLCNN_KWARGS = {"width": int, "dropout": float}
MAX_KWARG_INT = 1 << 16
MAX_KWARGS = 32


def is_builtin(arch: str) -> bool:
    """smallcnn or a torchvision classifier: the only models a file may rebuild by naming them."""
    return arch == "smallcnn" or arch in torchvision_models()


def require_trusted_arch(arch: str, factory: str | None, flag: str = "--model", source: str = "the checkpoint") -> None:
    """Refuse to rebuild `arch`, read from a file, unless it is built in or the command line names it (`factory`).

    A checkpoint or a saved config is data: importing and calling a `package.module:factory` it names would
    let the file choose the code that runs, so such a model is rebuilt only when the operator names the
    same factory again with `flag`.
    """
    if factory is not None and factory != arch:
        raise TorchferryError(f"{flag} {factory!r} is not the model of {source} ({arch[:80]!r})")
    if factory is None and not is_builtin(arch):
        if not (is_custom(arch) and FACTORY_PATTERN.fullmatch(arch)):
            raise TorchferryError(f"the model of {source}, {arch[:80]!r}, is neither smallcnn, a torchvision "
                                  "classifier nor a package.module:factory name")
        raise TorchferryError(f"the model of {source} is the factory {arch!r}, code that a file cannot choose to "
                              f"run; if you trust it, name it on the command line: {flag} {arch}")


def check_arch_kwargs(arch: str, kwargs: Any) -> dict[str, Any]:
    """`arch_kwargs` read from a file: plain scalars, and only names the builder of `arch` takes.

    smallcnn takes `width` and `dropout`; a torchvision classifier the scalar arguments of its model class
    (e.g. resnet's `groups`), which `torchvision.models.get_model` passes on; a factory named on the command
    line the arguments of its signature. `num_classes` and the input channels come from the checkpoint itself.
    """
    check_plain_kwargs(kwargs)
    if not kwargs:
        return {}
    accepted = _builder_kwargs(arch)
    if arch == "smallcnn":
        for key, value in kwargs.items():
            kind = SMALLCNN_KWARGS.get(key)
            if kind is int and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024):
                raise TorchferryError(f"arch_kwargs width must be an integer from 1 to 1024, got {value!r}")
            if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0.0 <= value < 1.0):
                raise TorchferryError(f"arch_kwargs dropout must be in [0, 1), got {value!r}")
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise TorchferryError(f"arch_kwargs {[k[:40] for k in unknown]} are not arguments of {arch}'s builder; "
                              f"it takes {sorted(accepted) if accepted else 'none'}")
    return dict(kwargs)


def check_plain_kwargs(kwargs: Any) -> None:
    """Raise unless `kwargs` (None or a mapping) holds at most MAX_KWARGS names of plain, bounded scalars."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict) or len(kwargs) > MAX_KWARGS:
        raise TorchferryError(f"arch_kwargs must be a mapping of at most {MAX_KWARGS} names to plain values")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _plain_scalar(value):
            raise TorchferryError(f"arch_kwargs[{str(key)[:40]!r}] must be a plain number (at most "
                                  f"{MAX_KWARG_INT}), string, bool or None, got {type(value).__name__}")


def _plain_scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_KWARG_INT
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= MAX_KWARG_INT
    return isinstance(value, str) and len(value) <= 200


def _builder_kwargs(arch: str) -> set[str] | None:
    """Keyword arguments the builder of `arch` takes besides num_classes (None: any, a factory with **kwargs)."""
    if arch == "smallcnn":
        return set(SMALLCNN_KWARGS)
    if is_custom(arch):
        signature = inspect.signature(_import_factory(arch))
    else:
        import torchvision

        with torch.device("meta"):  # a probe of the model class, allocating nothing
            probe = torchvision.models.get_model(arch, weights=None, num_classes=2)
        signature = inspect.signature(type(probe).__init__)
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) and is_custom(arch):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)} - {"self", "num_classes"}


def check_arch(arch: str) -> None:
    """Raise a TorchferryError that lists the choices when `arch` is unknown."""
    if arch == "smallcnn" or is_custom(arch) or arch in torchvision_models():
        return
    raise TorchferryError(f"unknown --model {arch!r}; choose smallcnn, package.module:factory, or one of "
                          f"{', '.join(torchvision_models())}")


def resolve_weights(arch: str, pretrained: str | None) -> Any:
    """The torchvision weights enum member for `--pretrained NAME` (None for none or a local path)."""
    if not pretrained or _is_path(pretrained):
        return None
    if arch == "smallcnn" or is_custom(arch):
        raise TorchferryError(f"--pretrained {pretrained!r}: {arch} has no torchvision weights; give a local .pth")
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum[pretrained] if pretrained != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise TorchferryError(f"--pretrained {pretrained!r} is not a weights name of {arch}; choose DEFAULT or one "
                              f"of {', '.join(w.name for w in enum)}") from None


def _is_path(value: str) -> bool:
    return value.endswith((".pth", ".pt", ".bin")) or os.sep in value or os.path.exists(value)


def weights_preprocess(arch: str, pretrained: str | None) -> dict[str, Any] | None:
    """Eval preprocessing the pretrained weights were trained with (crop, resize, mean, std), if any."""
    weights = resolve_weights(arch, pretrained)
    if weights is None:
        return None
    t = weights.transforms()
    return {"size": int(t.crop_size[0]), "resize": int(t.resize_size[0]),
            "mean": [float(m) for m in t.mean], "std": [float(s) for s in t.std]}


def _import_factory(arch: str) -> Any:
    """The callable `package.module:factory` names (only ever a name from the command line)."""
    module_name, _, factory_name = arch.partition(":")
    try:
        return getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise TorchferryError(f"--model {arch!r}: cannot import {factory_name} from {module_name}: {exc}") from None


def _build_bare(arch: str, num_classes: int, channels: int, kwargs: dict[str, Any]) -> nn.Module:
    if arch == "smallcnn":
        return SmallCNN(num_classes, in_channels=channels, **kwargs)
    if is_custom(arch):
        model = _import_factory(arch)(num_classes=num_classes, **kwargs)
        if not isinstance(model, nn.Module):
            raise TorchferryError(f"--model {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    check_arch(arch)
    if channels != 3:
        raise TorchferryError(f"{arch} takes 3-channel input; --channels 1 works with smallcnn or your own model")
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def find_head(model: nn.Module, num_classes: int) -> list[str]:
    """Names of the modules that produce the class scores, whatever they are called.

    The head is the last Linear (`fc`, `classifier[-1]`, `heads.head`) or, in a model without one, the
    last Conv2d (squeezenet's 1×1 conv); inception/googlenet's auxiliary heads come along. Layers deeper
    in the network that happen to have `num_classes` outputs are not mistaken for it.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not linears and not convs:
        raise TorchferryError(f"cannot find the classification head of {type(model).__name__}")
    last = linears[-1] if linears else convs[-1]
    modules = dict(model.named_modules())

    def outputs(name: str) -> int:
        m = modules[name]
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels

    aux = [n for n in linears if n != last and "aux" in n.lower() and outputs(n) == num_classes]
    return aux + [last]


def replace_head(model: nn.Module, head_names: list[str], num_classes: int) -> None:
    """Swap each head module for a freshly initialised one with `num_classes` outputs."""
    for name in head_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                            bias=old.bias is not None)
        setattr(parent, child, new)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file (a bare one, or a checkpoint's `state_dict`/`model`), DDP prefix removed."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise TorchferryError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or hostile file makes torch.load raise is bad input
        raise TorchferryError(f"cannot load weights from {path!r} with weights_only=True: "
                              f"{str(exc).splitlines()[0]}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TorchferryError(f"{path!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _enum_state_dict(weights: Any) -> dict[str, torch.Tensor]:
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.isfile(cached):
        return load_state_dict_file(cached)
    try:
        # torch.hub announces downloads on stdout; stdout is for the command's result (issue 14).
        with contextlib.redirect_stdout(sys.stderr):
            return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True,
                                                      weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - no network, a proxy's refusal, a bad hash: one line saying where to put it
        raise TorchferryError(f"cannot fetch {weights} ({exc}); place the file at {cached} or pass "
                              "--pretrained /path/to/weights.pth") from None


def build_model(arch: str, num_classes: int, pretrained: str | None = None, channels: int = 3,
                arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A classifier for `num_classes`, from scratch or from pretrained weights with its head replaced."""
    kwargs = dict(arch_kwargs or {})
    weights = resolve_weights(arch, pretrained)
    if weights is None and not pretrained:
        return _build_bare(arch, num_classes, channels, kwargs)
    if weights is not None:
        source_classes = len(weights.meta["categories"])
        kwargs = {**_PRETRAINED_KWARGS.get(arch, {}), **kwargs}
        if arch.startswith("vit_"):
            kwargs.setdefault("image_size", int(weights.meta["min_size"][0]))
        state = _enum_state_dict(weights)
    else:
        assert pretrained is not None
        state = load_state_dict_file(pretrained)
        source_classes = _classes_in_state(state, arch, channels, kwargs)
    model = _build_bare(arch, source_classes, channels, kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TorchferryError(f"--pretrained {pretrained!r} does not fit {arch}: {str(exc).splitlines()[0]} "
                              f"{str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else ''}".strip()) from None
    if source_classes != num_classes:
        replace_head(model, find_head(model, source_classes), num_classes)
    _logger.info("loaded pretrained %s weights from %s (%d source classes)", arch, pretrained, source_classes)
    return model


def _classes_in_state(state: dict[str, torch.Tensor], arch: str, channels: int, kwargs: dict[str, Any]) -> int:
    """How many classes a local state dict's head has: read off the head tensor of a probe model."""
    probe = _build_bare(arch, 2, channels, kwargs)
    head = find_head(probe, 2)[-1]
    weight = state.get(f"{head}.weight")
    if weight is None:
        raise TorchferryError(f"the weights file has no {head}.weight, so it is not a {arch} state dict")
    return int(weight.shape[0])


def set_backbone_trainable(model: nn.Module, head_names: list[str], trainable: bool) -> None:
    """Freeze (or unfreeze) every parameter outside the head modules; `keep_frozen_norms_in_eval` does the
    same for the BatchNorm running statistics once the model is put in training mode."""
    head_params = {id(p) for name in head_names for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        if id(p) not in head_params:
            p.requires_grad_(trainable)


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer whose parameters are all frozen in eval mode, so its running statistics stay
    as they are: frozen means frozen, as in torchvision's and timm's fine-tuning recipes. Call after
    `model.train()`; layers that train are left alone."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
