"""torchferry serving: Flask on ONNX Runtime; never imports torch, `distributed` or `export`."""
