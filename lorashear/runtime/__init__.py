"""Weight storage, execution and emission of IR modules (PyTorch, Hugging Face, ONNX)."""
