"""`python -m serve.batch`: scores a folder, list file or bucket of images with an exported model on Ray Data.

The code is `torchferry.batch.command`; torchferry/__init__.py says why this folder has no __init__.py.
"""

import sys

from torchferry.batch.command import main

if __name__ == "__main__":
    sys.exit(main())
