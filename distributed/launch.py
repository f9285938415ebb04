"""`python -m distributed.launch`: trains a classifier with Ray Train.

The code is `torchferry.distributed.launch`; torchferry/__init__.py says why this folder has no __init__.py.
"""

from torchferry.distributed.launch import cli

if __name__ == "__main__":
    cli()
