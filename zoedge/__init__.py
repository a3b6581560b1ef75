"""zoedge: export a model to an ONNX bundle, fine-tune it on-device with forward passes only, sync patches."""

__version__ = "0.1.0"
