"""Ray Train's per-worker entry, as the driver names it: `train_func` here imports the train loop on the worker.

The driver hands Ray Train a function that cloudpickle sends by name, so the driver imports the module that
defines it. This one is small: the driver of a run does not load the loop's own imports (torchvision's
transforms, TensorBoard, the GPU input pipeline) before training starts; each worker loads them when it runs.
"""

from __future__ import annotations

from typing import Any


def train_func(loop_config: dict[str, Any]) -> None:
    """`torchferry.distributed.loop.train_func` on this worker."""
    from torchferry.distributed.loop import train_func as train

    train(loop_config)
