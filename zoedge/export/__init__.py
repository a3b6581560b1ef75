"""Workstation side: PyTorch / Hugging Face model -> bundle (needs the `export` extra: torch, transformers, peft, onnx)."""
