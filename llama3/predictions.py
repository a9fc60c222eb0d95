"""What :class:`llama3.generation.Llama`'s text and chat completions return, per prompt (Meta's
``CompletionPrediction`` and ``ChatPrediction``)."""

from __future__ import annotations

from typing import TypedDict

from .chat_format import Message

__all__ = ["ChatPrediction", "CompletionPrediction"]


class CompletionPrediction(TypedDict, total=False):
    """One result of :meth:`~llama3.generation.Llama.text_completion`; ``tokens``/``logprobs`` only
    with ``logprobs=True``."""

    generation: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    """One result of :meth:`~llama3.generation.Llama.chat_completion`; ``tokens``/``logprobs`` only
    with ``logprobs=True``."""

    generation: Message
    tokens: list[str]
    logprobs: list[float]
