"""`python -m export.verify`: checks an ONNX file against its checkpoint again.

The code is `torchferry.export.verify`; torchferry/__init__.py says why this folder has no __init__.py.
"""

import sys

from torchferry.export.verify import main

if __name__ == "__main__":
    sys.exit(main())
