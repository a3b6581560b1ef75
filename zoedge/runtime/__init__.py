"""The device runtime: numpy + onnxruntime + tokenizers + safetensors only (never torch or transformers)."""

from zoedge.runtime.bundle import Bundle

__all__ = ["Bundle"]
