"""llama3: a pure-PyTorch reference implementation of Llama 3 / 3.1 / 3.2 / 3.3 inference."""

from .model import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer"]
