"""A user's own model, as `--model custom_model:build` would name it (tests put this folder on sys.path)."""

from torch import nn


def build(num_classes: int) -> nn.Module:
    """A tiny CNN: what someone brings without forking torchferry."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def not_a_module(num_classes: int) -> str:
    """A factory that returns the wrong thing."""
    return f"{num_classes} classes"


class BatchTwoSpecial(nn.Module):
    """A model that traces wrongly: it treats a batch of exactly 2 differently (eager sees every batch size)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = build(num_classes)

    def forward(self, x):
        out = self.body(x)
        if x.shape[0] == 2:
            return out * 2.0
        return out


def batch_two_special(num_classes: int) -> nn.Module:
    """Factory for BatchTwoSpecial."""
    return BatchTwoSpecial(num_classes)


class DataDependent(nn.Module):
    """Control flow on tensor values: the dynamo exporter refuses it, the TorchScript tracer follows the branch taken
    (always the same one here, so the traced model is right)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = build(num_classes)

    def forward(self, x):
        if x.abs().sum() >= 0:
            return self.body(x)
        return -self.body(x)


def data_dependent(num_classes: int) -> nn.Module:
    """Factory for DataDependent."""
    return DataDependent(num_classes)


def build_gray(num_classes: int) -> nn.Module:
    """A tiny CNN for 1-channel (grayscale) input."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def text_five_outputs(num_classes: int, vocab_size: int, max_length: int) -> nn.Module:
    """A text model that gives 5 columns whatever the classes: refused before training."""
    return nn.Sequential(nn.Embedding(vocab_size, 4), nn.Flatten(), nn.Linear(4 * max_length, 5))
