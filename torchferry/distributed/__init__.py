"""torchferry training: Ray Train runs a PyTorch image classifier as DDP over GPU or CPU workers."""


class TorchferryError(Exception):
    """A problem the user can fix (bad flag, bad data, missing resources); CLIs print it as one line."""
