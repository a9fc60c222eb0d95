"""The root of every error this library raises on purpose.

Each specific error keeps the built-in base it always had (``ValueError``, ``FileNotFoundError``,
``RuntimeError``...), so existing ``except`` clauses still catch it, and also derives from
:class:`LlamaError`, so a program can tell "the library refused this, with a message meant for a
person" (report it in one line) from a bug (keep the traceback). This module imports nothing from
the package: every other module may import it.
"""

from __future__ import annotations

__all__ = ["LlamaError", "InvalidArgumentError"]


class LlamaError(Exception):
    """Base class of the errors llama3 raises deliberately; the message says what to do."""


class InvalidArgumentError(LlamaError, ValueError):
    """An argument, flag or config value has the wrong type or an impossible value."""
