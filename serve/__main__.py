"""`python -m serve`: serves an ONNX classifier over HTTP.

The code is `torchferry.serve.__main__`; torchferry/__init__.py says why this folder has no __init__.py.
"""

import sys

from torchferry.serve.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
