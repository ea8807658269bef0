"""Floor 5, the graph side: QDQ ONNX export, the TensorRT rule checker, ONNX Runtime parity, scale matching."""
