"""The lock that serialises calls on one :class:`~llama3.generation.Llama`, refusing re-entry.

One ``Llama`` owns one KV cache, so its calls take turns. A call made while the *same thread*
already holds the lock (from inside the model's own decode step, a documented extension point, or
from any code running under the lock) can never get it: with a plain lock it would wait forever.
:class:`CallLock` raises :class:`ReentrantCallError` instead; the outer call then ends with that
error, the lock is released on the way out, and the ``Llama`` stays usable. Other threads still
simply wait their turn.
"""

from __future__ import annotations

import threading
from types import TracebackType

from .errors import LlamaError

__all__ = ["CallLock", "ReentrantCallError"]


class ReentrantCallError(LlamaError, RuntimeError):
    """A call on a ``Llama`` was made from code that already holds its call lock."""


class CallLock:
    """A non-reentrant lock that raises on re-entry by its holder instead of deadlocking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None  # thread id; only ever set to its own id by a thread

    def held_by_me(self) -> bool:
        """True when the calling thread holds the lock."""
        return self._holder == threading.get_ident()

    def acquire(self) -> None:
        """Wait for the lock; raise :class:`ReentrantCallError` if this thread holds it already."""
        if self.held_by_me():
            raise ReentrantCallError(
                "a call on this Llama was made while the same thread is inside one of its calls (from "
                "the decode step, a stream being consumed under the lock, or code holding the lock); "
                "it would wait for itself forever. Make the call after the running one returns, or use "
                "a second Llama")
        self._lock.acquire()
        self._holder = threading.get_ident()

    def release(self) -> None:
        """Release the lock (held by this thread)."""
        self._holder = None
        self._lock.release()

    def locked(self) -> bool:
        """Whether any thread holds the lock."""
        return self._lock.locked()

    def __enter__(self) -> CallLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
