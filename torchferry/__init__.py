"""torchferry: train an image classifier with Ray Train, export it to ONNX with proof, serve it on ONNX Runtime.

The code lives in three packages, one per command, importing one way (docs/design.md, "Layout"):
`torchferry.distributed` (training), `torchferry.export` (checkpoint → ONNX) and `torchferry.serve` (HTTP, never
torch). The commands keep their short names through the thin `distributed/`, `export/` and `serve/` folders at the top
of the tree, which hold no `__init__.py`: they are namespace portions, so they install beside Dask's `distributed` (or
any other project of those names) and add only their command modules to it.
"""

__version__ = "0.1.0"
