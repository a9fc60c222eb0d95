"""llama3: a pure-PyTorch reference implementation of Llama 3 / 3.1 / 3.2 / 3.3 inference.

The public names below are imported on first use (PEP 562), so ``import llama3`` (and starting a
command-line program, which imports the package first) is instant: torch is loaded only when a
name that needs it is touched, and a program has already made Ctrl-C quiet by then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# First: outside the project's environment, a one-line hint instead of a traceback.
from . import _deps  # noqa: F401  (checks on import, without importing torch)

if TYPE_CHECKING:
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

_WHERE = {
    **dict.fromkeys(["BRAVE_SEARCH", "CODE_INTERPRETER", "WOLFRAM_ALPHA", "ChatFormat", "Dialog", "Message",
                     "ToolCall", "ToolDefinition", "ToolParameter"], "chat_format"),
    "Llama": "generation",
    "ModelArgs": "model",
    "Transformer": "model",
    "StreamDecoder": "tokenizer",
    "Tokenizer": "tokenizer",
}

__all__ = [
    "BRAVE_SEARCH", "CODE_INTERPRETER", "WOLFRAM_ALPHA",
    "ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "StreamDecoder", "Tokenizer", "ToolCall",
    "ToolDefinition", "ToolParameter", "Transformer",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
