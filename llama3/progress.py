"""Logging and progress reports, shared by every module.

Every module logs through ``logging.getLogger(__name__)``, i.e. under the ``llama3`` logger.
:func:`configure_logging` is the one switch: it gives that logger a stderr handler on
model-parallel rank 0 (other ranks stay quiet, so ``torchrun --nproc_per_node 8`` prints one
copy), INFO level when ``verbose`` and WARNING otherwise. A program that sets up logging itself
can skip it: nothing here prints unless a handler is attached.

:class:`Progress` reports a long step (loading shards, compile warm-up, a long generation) as
log lines at most every few seconds, with a rate and an ETA when the total is known.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import TracebackType

__all__ = ["Progress", "configure_logging", "is_rank_zero"]

_ROOT = "llama3"
_HANDLER_NAME = "llama3-stderr"


def is_rank_zero() -> bool:
    """True in a plain process and on global rank 0 under ``torchrun``."""
    return os.environ.get("RANK", "0") == "0"


def configure_logging(verbose: bool = True) -> None:
    """Send the package's log lines to stderr on rank 0: INFO and up when ``verbose``, else
    warnings only. Idempotent; other ranks log errors only."""
    logger = logging.getLogger(_ROOT)
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if not is_rank_zero():
        logger.setLevel(logging.ERROR)
    else:
        logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Progress of one long step, logged at INFO at most every ``interval`` seconds.

    ``Progress("loading", total=n_bytes, unit="B")`` then ``update(k)`` as work is done; the
    closing line gives the elapsed time. Units ``"B"`` are shown as GB and GB/s; other amounts as
    ``12 of 32 new tokens``, with the rate in ``rate_unit`` (default ``unit/s``).
    Nothing is printed for steps that finish within ``interval`` seconds except the final line
    when ``final=True``. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, what: str, total: float | None = None, unit: str = "", *,
                 logger: logging.Logger | None = None, interval: float = 5.0, final: bool = True,
                 rate_unit: str | None = None) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.rate_unit = rate_unit or f"{unit or 'it'}/s"
        self.done = 0.0
        self.logger = logger or logging.getLogger(_ROOT)
        self.interval = interval
        self.final = final
        self.start = time.perf_counter()
        self._last_report = self.start
        self._closed = False

    def _amount(self, n: float) -> str:
        if self.unit == "B":
            return f"{n / 1e9:.2f} GB"
        return f"{n:g}{' ' + self.unit if self.unit else ''}"

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        rate_s = f"{rate / 1e9:.2f} GB/s" if self.unit == "B" else f"{rate:.1f} {self.rate_unit}"
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = _fmt_duration(eta) if eta != float("inf") else "?"
            # "0.50 GB of 2.00 GB", but "12 of 32 new tokens": the unit once.
            done = self._amount(self.done) if self.unit == "B" else f"{self.done:g}"
            return (f"{self.what}: {done} of {self._amount(self.total)} ({pct:.0f}%), "
                    f"{rate_s}, ETA {eta_s}")
        return f"{self.what}: {self._amount(self.done)}, {rate_s}, {_fmt_duration(elapsed)} so far"

    def update(self, n: float = 1) -> None:
        """Record ``n`` more units done; log a line if ``interval`` seconds passed since the last."""
        self.done += n
        now = time.perf_counter()
        if now - self._last_report >= self.interval:
            self._last_report = now
            self.logger.info(self._line(now))

    def close(self) -> float:
        """Log the closing line (when ``final``) and return the elapsed seconds."""
        elapsed = time.perf_counter() - self.start
        if not self._closed:
            self._closed = True
            if self.final:
                self.logger.info("%s: done in %.1f s", self.what, elapsed)
        return elapsed

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
