"""`python -m distributed.evaluate`: evaluates a checkpoint on its validation data.

The code is `torchferry.distributed.evaluate`; torchferry/__init__.py says why this folder has no __init__.py.
"""

import sys

from torchferry.distributed.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
