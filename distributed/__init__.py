"""torchferry training: Ray Train runs a PyTorch image classifier as DDP over GPU or CPU workers."""

__version__ = "0.1.0"


class TorchferryError(Exception):
    """A problem the user can fix (bad flag, bad data, missing resources); CLIs print it as one line."""
