"""Reading the chat's input: a terminal with line editing, history and pastes kept whole, or plain
lines from a pipe; under ``torchrun`` rank 0 reads and every rank gets the line.

On a terminal the line is edited with ``readline`` (arrow keys, Ctrl-R search, history kept in
``$XDG_STATE_HOME/llama3/chat_history`` or ``~/.llama3_chat_history``; ``LLAMA3_CHAT_HISTORY``
names another file, one entry per message, multi-line messages escaped). A paste arrives whole:
bracketed paste when the terminal supports it, and otherwise lines that arrive faster than anyone
types are joined into one message, summarised on screen as it is sent. The chat session and its
commands are in :mod:`llama3.chat`.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

__all__ = ["CONTINUATION", "PROMPT", "ReadLine", "TerminalInput", "make_read_line"]

PROMPT = "> "
CONTINUATION = "... "
# The Linux terminal driver keeps at most 4095 characters of one line in its canonical mode.
TERMINAL_LINE_LIMIT = 4095

ReadLine = Callable[[str], "str | None"]
HISTORY_LENGTH = 2000
HISTORY_HEADER = "#llama3-chat history: one entry per line, \\n and \\\\ escaped"
# Input at least this long, or of several lines, is summarised on screen as it is sent.
PASTE_SUMMARY_CHARS = 1000


def _escape(entry: str) -> str:
    return entry.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append("\n" if line[i + 1] == "n" else line[i + 1])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def _history_file() -> Path:
    if os.environ.get("LLAMA3_CHAT_HISTORY"):
        return Path(os.environ["LLAMA3_CHAT_HISTORY"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME")
    if state:
        return Path(state) / "llama3" / "chat_history"
    return Path.home() / ".llama3_chat_history"


class TerminalInput:
    """Reads messages from a terminal: ``readline`` line editing and history where available, and
    pastes kept whole (bracketed paste, else lines arriving faster than typing are joined).

    Call it with the prompt to show; returns the input, or None at end of input (Ctrl-D), after
    moving to a new line.
    """

    PASTE_GAP_S = 0.03  # more input within this time after Enter is part of the same paste

    def __init__(self, out: TextIO, stdin: TextIO | None = None, history: Path | None = None) -> None:
        self.out = out
        self.stdin = stdin if stdin is not None else sys.stdin
        self.history = history if history is not None else _history_file()
        self.readline = None
        try:
            import readline
        except ImportError:  # e.g. Windows: plain input(), no editing
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        if "libedit" not in (readline.__doc__ or ""):
            readline.parse_and_bind("set enable-bracketed-paste on")
        self._load_history()

    def _load_history(self) -> None:
        # readline's own file format is one entry per line, so a multi-line message would come back
        # as one entry per line: entries are written escaped, under a header that says so.
        try:
            lines = self.history.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return
        escaped = bool(lines) and lines[0] == HISTORY_HEADER
        for line in lines[1:] if escaped else lines:
            if line:
                self.readline.add_history(_unescape(line) if escaped else line)

    def save_history(self) -> None:
        """Write the history file (quietly skipped where it cannot be written); a multi-line
        message is kept as one entry."""
        if self.readline is None:
            return
        n = self.readline.get_current_history_length()
        entries = [self.readline.get_history_item(i) for i in range(max(1, n - HISTORY_LENGTH + 1), n + 1)]
        text = "".join(_escape(e) + "\n" for e in entries if e)
        with contextlib.suppress(OSError):
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.history.write_text(HISTORY_HEADER + "\n" + text, encoding="utf-8")

    def _pending(self) -> bool:
        import select

        try:
            ready, _, _ = select.select([self.stdin], [], [], self.PASTE_GAP_S)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def __call__(self, prompt: str) -> str | None:
        before = self.readline.get_current_history_length() if self.readline is not None else 0
        try:
            lines = [input(prompt)]
        except EOFError:
            self.out.write("\n")
            self.out.flush()
            return None
        while self._pending():  # the rest of a paste the terminal did not bracket
            try:
                lines.append(input(""))
            except EOFError:  # the paste ended the input: send it; the next call sees the end
                break
        if self.readline is None and any(len(x) >= TERMINAL_LINE_LIMIT for x in lines):
            # Without readline the terminal driver keeps only the first 4095 characters of a line.
            self.out.write(f"[a line of {TERMINAL_LINE_LIMIT} characters was probably cut short by the "
                           "terminal; not sent: put a long message in a file and use /file PATH]\n")
            self.out.flush()
            return ""
        text = "\n".join(lines)
        if len(lines) > 1 and self.readline is not None:
            # One history entry for the whole paste, as it was sent, instead of one per line.
            while self.readline.get_current_history_length() > before:
                self.readline.remove_history_item(self.readline.get_current_history_length() - 1)
            self.readline.add_history(text)
        if "\n" in text or len(text) >= PASTE_SUMMARY_CHARS:
            # A terminal may draw only part of a long paste: say what is being sent.
            n_lines = text.count("\n") + 1
            plural = "s" if n_lines > 1 else ""
            self.out.write(f"[pasted: {n_lines} line{plural}, {len(text):,} characters]\n")
            self.out.flush()
        return text


def make_read_line(out: TextIO, *, rank: int = 0, multi: bool = False,
                   stdin: TextIO | None = None) -> tuple[ReadLine, TerminalInput | None]:
    """The ``read_line(prompt)`` that :meth:`ChatSession.run` takes, for this process's stdin: a
    :class:`TerminalInput` on a terminal (returned too, to save its history), plain lines otherwise.
    Under ``torchrun`` (``multi``) rank 0 reads and every rank gets the line."""
    stdin = stdin if stdin is not None else sys.stdin
    if rank == 0 and not _readable(stdin):  # stdin closed (<&-) or missing: the input has ended
        stdin = io.StringIO()
    terminal = TerminalInput(out, stdin) if rank == 0 and stdin.isatty() else None

    def read_line(prompt: str) -> str | None:
        line: str | None = None
        if terminal is not None:
            if prompt == PROMPT:
                out.write("\n")  # a blank line between an answer and the next prompt
            line = terminal(prompt)
        elif rank == 0:
            try:
                raw = stdin.readline()
            except (OSError, ValueError):  # closed under us: the input has ended
                raw = ""
            line = raw.removesuffix("\n") if raw else None
        if multi:
            import torch.distributed as dist

            # Every rank takes part in generation, so every rank needs the line.
            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        return line

    return read_line, terminal


def _readable(stream: TextIO | None) -> bool:
    try:
        return stream is not None and not stream.closed and stream.readable()
    except (OSError, ValueError, AttributeError):
        return False
