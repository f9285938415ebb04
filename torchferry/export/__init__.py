"""torchferry export: checkpoint → ONNX, verified against PyTorch with ONNX Runtime."""
