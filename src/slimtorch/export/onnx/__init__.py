"""ONNX export with low-bit weights kept as codes, verified in onnxruntime."""
