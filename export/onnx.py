"""`python -m export.onnx`: exports a checkpoint to ONNX and proves it against PyTorch.

The code is `torchferry.export.onnx`; torchferry/__init__.py says why this folder has no __init__.py.
"""

import sys

from torchferry.export.onnx import main

if __name__ == "__main__":
    sys.exit(main())
