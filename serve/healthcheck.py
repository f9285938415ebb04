"""`python -m serve.healthcheck`: the container's health probe (/readyz).

The code is `torchferry.serve.healthcheck`; torchferry/__init__.py says why this folder has no __init__.py.
"""

import sys

from torchferry.serve.healthcheck import main

if __name__ == "__main__":
    sys.exit(main())
