"""torchferry's benchmarks: each module runs as `python -m bench.<name>` from the repository root."""
