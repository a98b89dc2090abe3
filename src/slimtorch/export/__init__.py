"""Exporters: a slimtorch model to the files other runtimes load (ONNX, Hugging Face,
compressed-tensors)."""
