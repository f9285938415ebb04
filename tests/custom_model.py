"""A user's own model, as `--model custom_model:build` would name it (tests put this folder on sys.path)."""

from torch import nn


def build(num_classes: int) -> nn.Module:
    """A tiny CNN: what someone brings without forking torchferry."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def not_a_module(num_classes: int) -> str:
    """A factory that returns the wrong thing."""
    return f"{num_classes} classes"
