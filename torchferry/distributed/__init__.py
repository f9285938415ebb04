"""torchferry training: Ray Train runs a PyTorch image classifier as DDP over GPU or CPU workers."""

from torchferry.contract import TorchferryError

__all__ = ["TorchferryError"]
