"""llama3: a pure-PyTorch reference implementation of Llama 3 / 3.1 / 3.2 / 3.3 inference."""

# First: outside the project's environment, a one-line hint instead of a traceback.
from . import _deps  # noqa: F401  (checks on import)
from .chat_format import (
    BRAVE_SEARCH,
    CODE_INTERPRETER,
    WOLFRAM_ALPHA,
    ChatFormat,
    Dialog,
    Message,
    ToolCall,
    ToolDefinition,
    ToolParameter,
)
from .generation import Llama
from .model import ModelArgs, Transformer
from .tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "BRAVE_SEARCH", "CODE_INTERPRETER", "WOLFRAM_ALPHA",
    "ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "StreamDecoder", "Tokenizer", "ToolCall",
    "ToolDefinition", "ToolParameter", "Transformer",
]
