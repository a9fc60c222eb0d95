"""llama3: a pure-PyTorch reference implementation of Llama 3 / 3.1 / 3.2 / 3.3 inference."""

from .generation import Llama
from .model import ModelArgs, Transformer
from .tokenizer import ChatFormat, Dialog, Message, StreamDecoder, Tokenizer

__all__ = [
    "ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "StreamDecoder", "Tokenizer", "Transformer",
]
