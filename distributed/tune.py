"""`python -m distributed.tune`: searches hyperparameters with Ray Tune over the launcher's training.

The code is `torchferry.distributed.tune`; torchferry/__init__.py says why this folder has no __init__.py.
"""

from torchferry.distributed.tune import cli

if __name__ == "__main__":
    cli()
