"""Starting and ending the command-line programs: Ctrl-C at any moment ends one quietly, status 130.

A program's imports (torch alone takes seconds) run before its ``main`` can catch anything, and a
Ctrl-C there would print a traceback of import machinery. So a program installs
:func:`quiet_interrupts` first, before any heavy import: until :func:`~llama3.cli.run_main` takes
over, and again after it returns (interpreter shutdown), Ctrl-C ends the process at once with
status 130 and nothing but a newline on stderr. Inside ``run_main`` Ctrl-C is Python's
``KeyboardInterrupt`` again (the chat uses it to stop an answer, a conversion to remove its
half-written folder), except while an import is running: interrupting an import can leave broken
half-imported modules behind, so there it still ends the process at once.

The console scripts (``llama3-chat``, ``llama3-convert``, ``llama3-make-tiny-checkpoint``) start
here; ``python -m llama3.chat`` and the ``scripts/`` programs call the same functions first thing.
This module imports only the standard library, so importing it is instant.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["EXIT_INTERRUPTED", "quiet_interrupts", "interrupts_raise", "run_program", "run_module",
           "chat", "convert", "make_tiny_checkpoint"]

EXIT_INTERRUPTED = 130


def _exit_quietly(signum: int, frame: object) -> None:
    try:
        sys.stderr.write("\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # stderr closed or missing: nothing to say it on
    os._exit(EXIT_INTERRUPTED)  # mid-import or at shutdown nothing is left to clean up


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def quiet_interrupts() -> None:
    """From now on Ctrl-C (SIGINT) ends the process at once, status 130, no traceback."""
    # A Ctrl-C that lands while the handler is being put in place (signal.signal is Python code,
    # so Python may deliver it there) is the same Ctrl-C: end quietly too.
    try:
        if _main_thread():
            signal.signal(signal.SIGINT, _exit_quietly)
    except KeyboardInterrupt:
        _exit_quietly(signal.SIGINT, None)


def _raise_unless_importing(signum: int, frame: Any) -> None:
    # A KeyboardInterrupt in the middle of an import (torch imports lazily, long after start) can
    # leave half-initialised modules behind, and code that touches them later fails in strange
    # ways (a RecursionError in numpy's module __getattr__ was seen). So while any import is
    # running, Ctrl-C ends the process at once; elsewhere it is Python's KeyboardInterrupt.
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            _exit_quietly(signum, frame)
        frame = frame.f_back
    raise KeyboardInterrupt


def interrupts_raise() -> bool:
    """If :func:`quiet_interrupts` is in force, give Ctrl-C back to Python (``KeyboardInterrupt``,
    except while an import runs) and return True; otherwise (e.g. ``main()`` called from a test)
    change nothing, return False."""
    if _main_thread() and signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, _raise_unless_importing)
        return True
    return False


def run_program(main: Callable[[], int | None]) -> NoReturn:
    """Run a program's ``main`` (which handles its own errors) and exit with its status; Ctrl-C
    anywhere, before, during or after, gives status 130 quietly."""
    quiet_interrupts()
    try:
        code = main()
    except KeyboardInterrupt:
        quiet_interrupts()
        _exit_quietly(signal.SIGINT, None)
    quiet_interrupts()  # interpreter shutdown
    sys.exit(code or 0)


def run_module(name: str) -> NoReturn:
    """Import the program module ``name`` (Ctrl-C already quiet) and run its ``main``."""
    quiet_interrupts()
    module = importlib.import_module(name)
    run_program(module.main)


def chat() -> NoReturn:
    """``llama3-chat``."""
    run_module("llama3.chat")


def convert() -> NoReturn:
    """``llama3-convert``."""
    run_module("llama3.convert")


def make_tiny_checkpoint() -> NoReturn:
    """``llama3-make-tiny-checkpoint``."""
    run_module("llama3.make_tiny_checkpoint")
