"""Interactive chat with a Llama 3 instruct model in the terminal: ``llama3-chat CKPT_DIR``.

Type a message and press Enter; the answer streams as it is generated. Commands:

* ``\"\"\"`` on a line of its own starts a multi-line message; the next line ending in ``\"\"\"``
  ends it (``\"\"\"one line\"\"\"`` works too). Nothing in a block is taken as a command.
* ``/file PATH`` sends the contents of a text file as the message (any length that fits).
* ``/reset`` forgets the conversation (the system prompt stays);
* ``/exit`` or ``/quit`` (or end of input, Ctrl-D) quits; ``/help`` lists the commands.

On a terminal the line is edited with ``readline`` (arrow keys, Ctrl-R search, history kept in
``$XDG_STATE_HOME/llama3/chat_history`` or ``~/.llama3_chat_history``; ``LLAMA3_CHAT_HISTORY``
names another file; :mod:`llama3.chat_input`). A paste arrives whole: bracketed paste when the
terminal supports it, and otherwise lines that arrive faster than anyone types are joined into one
message, summarised on screen as it is sent (``[pasted: 14 lines, 10,768 characters]``) and kept
as one history entry. Nothing is cut silently: where the terminal itself may have cut a very long
line, a note says so.

After each answer one line on stderr gives its timing: tokens, time to the first token and tokens
per second after it (``--quiet``: none). Tool mode's first line lists the tools and how to answer.

Ctrl-C while an answer streams stops that answer, not the program. The partial answer is kept in
the history as the assistant's turn, so the conversation the model sees next is the one shown.

When the conversation no longer fits the context (``--max-seq-len``, minus room kept for the
answer), the oldest exchanges are dropped, never the system prompt, and a note says how many.
A message too long to fit even alone is refused with a message and the history is left as it was.
A ``--max-gen-len`` that leaves no room for a prompt, or a system prompt that fills the context,
is reported once at start.

Input is read line by line from stdin, so the program can be scripted
(``printf 'Hi\\n/reset\\nHello\\n' | llama3-chat CKPT_DIR``). Under ``torchrun`` rank 0 reads
and prints; every rank generates.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m llama3.chat: Ctrl-C is quiet (status 130) from the first import on
    from llama3.programs import run_module

    run_module("llama3.chat")

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .chat_input import CONTINUATION, PROMPT, ReadLine, TerminalInput, make_read_line
from .cli import UsageError, check_sampling, make_parser, require_dir, run_main
from .files import FileCheckError, NotTextError, read_text
from .tool_session import ToolMode, tool_options_from_flags

if TYPE_CHECKING:
    from .generation import Llama
    from .tokenizer import Message

__all__ = ["ChatSession", "TerminalInput", "ToolChatSession", "make_read_line", "main"]

HELP = ('commands: """ (start/end a multi-line message), /file PATH (send a file), '
        "/reset (forget the conversation), /exit or /quit (leave), /help")
BLOCK = '"""'


class ChatSession:
    """A multi-turn conversation with a :class:`~llama3.generation.Llama`.

    Args:
        generator: the model and tokenizer.
        system_prompt: an optional system message kept at the start of every prompt.
        temperature, top_p: sampling settings (temperature 0 = greedy).
        max_gen_len: the longest answer in tokens; by default as long as the context allows.
        reply_room: tokens kept free for the answer when deciding whether the history fits; by default
            ``max_gen_len`` if given, else a quarter of the context.
        out: where answers and notes are written.
        stats: where the one-line timing after each answer goes (time to first token, tokens,
            tokens per second); None: nowhere. ``llama3-chat`` sends it to stderr unless ``--quiet``.

    Raises:
        ValueError: ``max_gen_len`` leaves no room for a prompt, or the system prompt alone (with
            the room kept for the answer) does not fit the context.

    How an answer is produced is :meth:`respond` (stream one assistant message); override it to
    handle replies differently (e.g. run tool calls and answer again).
    """

    def __init__(self, generator: Llama, *, system_prompt: str | None = None, temperature: float = 0.6,
                 top_p: float = 0.9, max_gen_len: int | None = None, reply_room: int | None = None,
                 out: TextIO | None = None, stats: TextIO | None = None) -> None:
        self.generator = generator
        self.stats = stats
        self.system: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.temperature = temperature
        self.top_p = top_p
        self.max_gen_len = max_gen_len
        self.max_seq_len = max_seq_len = generator.model.params.max_seq_len
        if max_gen_len is not None and not 0 < max_gen_len < max_seq_len:
            raise ValueError(f"max_gen_len {max_gen_len} leaves no room for a prompt in a context of "
                             f"{max_seq_len} tokens (max_seq_len); give a max_gen_len below {max_seq_len}, "
                             "or a larger max_seq_len")
        if reply_room is None:
            reply_room = max_gen_len if max_gen_len is not None else max(1, max_seq_len // 4)
        self.prompt_budget = max_seq_len - reply_room
        empty_turn: list[Message] = [{"role": "user", "content": ""}]
        smallest = len(generator.formatter.encode_dialog_prompt(self.system + empty_turn))
        if smallest > self.prompt_budget:
            raise ValueError(f"the system prompt fills the context: with it a prompt takes at least "
                             f"{smallest} tokens, but only {self.prompt_budget} fit (max_seq_len "
                             f"{max_seq_len} minus {reply_room} kept for the answer); shorten the system "
                             "prompt or raise max_seq_len")
        self.out = out if out is not None else sys.stdout
        self.history: list[Message] = list(self.system)

    def reset(self) -> None:
        """Forget every turn, keeping the system prompt."""
        self.history = list(self.system)

    def handle(self, line: str) -> bool:
        """Act on one input (a message or a command); return False when the user quits."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            command = command.lower()
            if command in ("/exit", "/quit"):
                return False
            if command == "/reset":
                self.reset()
                self._note("conversation cleared")
            elif command == "/help":
                self._note(HELP)
            elif command == "/file":
                self.send_file(rest.strip())
            else:
                self._note(f"unknown command {command}; {HELP}")
            return True
        self.ask(text)
        return True

    def send_file(self, path: str) -> str | None:
        """Send the contents of the text file ``path`` as a user message (see :meth:`ask`)."""
        if not path:
            self._note("usage: /file PATH")
            return None
        try:  # a pipe, device, directory or huge file is refused, never read (llama3.files)
            text = read_text(path, "file")
        except (FileCheckError, NotTextError) as exc:
            self._note(f"cannot read {path}: {exc.reason}")
            return None
        if not text.strip():
            self._note(f"{path} is empty; nothing sent")
            return None
        self._note(f"sending {path} ({len(text)} characters)")
        return self.ask(text)

    def ask(self, text: str) -> str | None:
        """Send a user message, stream the answer to ``out`` and record both in the history.

        Returns the answer (partial if interrupted), or None if the message does not fit.
        """
        user: Message = {"role": "user", "content": text}
        dialog = self._fit(user)
        if dialog is None:
            return None
        replies = self.respond(dialog)
        self.history = dialog + replies
        return replies[-1]["content"] if replies else None

    def respond(self, dialog: list[Message]) -> list[Message]:
        """Answer ``dialog`` (ending in the user's message): write the answer to ``out`` and return
        the messages to append to the history after it. Here: one streamed assistant message."""
        return [{"role": "assistant", "content": self.stream_answer(dialog)}]

    def stream_answer(self, dialog: list[Message]) -> str:
        """Stream the assistant's answer to ``dialog`` to ``out``; Ctrl-C stops it. Returns the text."""
        pieces: list[str] = []
        start = time.perf_counter()
        first: float | None = None
        stream = self.generator.stream_chat_completion(dialog, temperature=self.temperature,
                                                       top_p=self.top_p, max_gen_len=self.max_gen_len)
        try:
            for delta in stream:
                if first is None and delta:
                    first = time.perf_counter()
                pieces.append(delta)
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.out.write("\n")
            self._note("interrupted; the partial answer is kept")
        else:
            self.out.write("\n")
        self.out.flush()
        text = "".join(pieces)
        self.report_timing(text, start, first, time.perf_counter())
        return text

    def report_timing(self, text: str, start: float, first: float | None, end: float) -> None:
        """Write the one-line timing of an answer ``text`` to ``stats`` (if any): the time to the
        first token, the answer's length in tokens and its speed after the first token."""
        if self.stats is None:
            return
        counts = getattr(self.generator, "last_new_tokens", None)  # Llama's; a stand-in may lack it
        if counts:
            n_tokens = counts[0]
        else:  # the text encoded again: the generated ids for what a real model writes
            n_tokens = len(self.generator.tokenizer.encode(text, bos=False, eos=False)) if text else 0
        line = f"[{n_tokens} token{'s' if n_tokens != 1 else ''} in {end - start:.2f} s"
        if first is not None:
            line += f": first token after {first - start:.2f} s"
            if n_tokens > 1 and end > first:
                line += f", then {(n_tokens - 1) / (end - first):.1f} tok/s"
        elif n_tokens and end > start:  # not streamed: only the whole answer's time is known
            line += f", {n_tokens / (end - start):.1f} tok/s"
        self.stats.write(line + "]\n")
        self.stats.flush()

    def banner(self, name: str) -> str:
        """The line shown when the chat starts with ``name`` (the checkpoint): the commands."""
        return f"Chatting with {name}. {HELP}"

    def _fit(self, user: Message) -> list[Message] | None:
        """The history plus ``user``, with the oldest exchanges dropped until the prompt fits."""
        encode = self.generator.formatter.encode_dialog_prompt
        turns = self.history[len(self.system):]
        dropped = 0
        while True:
            dialog = self.system + turns + [user]
            n_tokens = len(encode(dialog))
            if n_tokens <= self.prompt_budget:
                break
            if not turns:
                self._note(f"message too long: the prompt would be {n_tokens} tokens, but only "
                           f"{self.prompt_budget} fit (max_seq_len {self.max_seq_len} minus room for the "
                           "answer); not sent")
                return None
            # Drop the oldest exchange: a user message and every reply up to the next user message.
            cut = 1
            while cut < len(turns) and turns[cut]["role"] != "user":
                cut += 1
            turns = turns[cut:]
            dropped += 1
        if dropped:
            self._note(f"context full: dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''}")
        return dialog

    def _note(self, text: str) -> None:
        self.out.write(f"[{text}]\n")
        self.out.flush()

    def run(self, read_line: ReadLine) -> None:
        """Read input with ``read_line(prompt)`` (None = end of input) until the user quits.

        A line starting with ``\"\"\"`` opens a multi-line block, sent as one message once closed.
        """
        while True:
            try:
                line = read_line(PROMPT)
            except KeyboardInterrupt:
                self.out.write("\n")
                self._note("use /exit or Ctrl-D to quit")
                continue
            if line is None:
                return
            if line.lstrip().startswith(BLOCK):
                text, ended = self._read_block(line.lstrip()[len(BLOCK):], read_line)
                if text is not None:
                    if text.strip():
                        self.ask(text)
                    else:
                        self._note("empty message; nothing sent")
                if ended:
                    return
                continue
            if not self.handle(line):
                return

    def _read_block(self, first: str, read_line: ReadLine) -> tuple[str | None, bool]:
        """The rest of a ``\"\"\"`` block opened by a line whose remainder is ``first``.

        Returns (text or None if cancelled, whether input ended)."""
        # The line breaks right after the opening and right before the closing quotes are not text.
        if first.rstrip().endswith(BLOCK):  # """one line""" (or a pasted block closed in the paste)
            return first.rstrip()[: -len(BLOCK)].removeprefix("\n").removesuffix("\n"), False
        parts = [first.removeprefix("\n")] if first.strip() else []
        while True:
            try:
                line = read_line(CONTINUATION)
            except KeyboardInterrupt:
                self.out.write("\n")
                self._note("multi-line message cancelled")
                return None, False
            if line is None:
                self._note(f'end of input inside a {BLOCK} block: sending the {len(parts)} line(s) read')
                return "\n".join(parts), True
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[: -len(BLOCK)].removesuffix("\n")
                if last:
                    parts.append(last)
                return "\n".join(parts), False
            parts.append(line)


class ToolChatSession(ToolMode, ChatSession):
    """A :class:`ChatSession` whose model may call tools (see :class:`llama3.tool_session.ToolMode`)."""


def _parse_args(argv: list[str] | None):
    parser = make_parser(
        "llama3-chat",
        "Chat with a Llama 3 instruct model. In the chat, " + HELP + ". Every --dashed-flag also accepts the "
        "--underscore_spelling.",
    )
    parser.add_argument("ckpt_dir", help="checkpoint directory (Meta or Hugging Face format)")
    parser.add_argument("--tokenizer-path", default=None,
                        help="tokenizer.model (default: looked for beside the checkpoint)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold, in (0, 1]")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="context length in tokens")
    parser.add_argument("--max-gen-len", type=int, default=None,
                        help="longest answer in tokens (default: what fits)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: per device)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (the same on every rank)")
    parser.add_argument("--model-parallel-size", type=int, default=None,
                        help="ranks to split the model across (default: every torchrun process)")
    parser.add_argument("--rope-scale-factor", type=float, default=None,
                        help="override the Llama 3.1+ RoPE scaling factor")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="process prompts in chunks of this many tokens (default: the library's)")
    parser.add_argument("--compile", action="store_true", help="decode with torch.compile")
    parser.add_argument("--warm-up", action="store_true",
                        help="with --compile: compile every context-length bucket at start-up (minutes "
                             "for 8B on a GPU) instead of pausing mid-answer when a chat grows into one")
    parser.add_argument("--quantize", choices=["int8", "w8a8", "fp8", "int4"], default=None,
                        help="quantize a bf16 checkpoint at load: int8 weight-only, w8a8 (int8 weights and "
                             "activations, CPU), fp8 (Meta's fp8_mixed "
                             "layers) or int4 (group-wise weight-only); a quantized checkpoint needs none")
    parser.add_argument("--tools", default=None, metavar="FILE.json",
                        help="tool mode: custom tool definitions (JSON list); you supply each call's result")
    parser.add_argument("--builtin-tools", default=None, metavar="NAMES",
                        help="tool mode: comma-separated brave_search, wolfram_alpha, code_interpreter")
    parser.add_argument("--tool-format", choices=["json", "function_tag", "python_list"], default="json",
                        help="how custom tools are described and called (default json; python_list for 3.2)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress messages or answer timings on stderr")
    return parser.parse_args(argv)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _chat(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    # Everything that can be checked without the model is checked before minutes of loading.
    temperature, top_p = check_sampling(args.temperature, args.top_p)
    if args.max_seq_len < 1:
        raise UsageError(f"--max-seq-len must be a positive number of tokens, got {args.max_seq_len}")
    if args.max_gen_len is not None and not 0 < args.max_gen_len < args.max_seq_len:
        raise UsageError(f"--max-gen-len {args.max_gen_len} leaves no room for a prompt in --max-seq-len "
                         f"{args.max_seq_len}; give a --max-gen-len below {args.max_seq_len}")
    if args.warm_up and not args.compile:
        raise UsageError("--warm-up compiles the decode step at start-up: add --compile")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be a positive number of tokens, got {args.prefill_chunk}")
    session_class, tool_options = ChatSession, {}
    if args.tools or args.builtin_tools:
        try:
            session_class, tool_options = ToolChatSession, tool_options_from_flags(args)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    ckpt_dir = require_dir(args.ckpt_dir)
    if args.tokenizer_path is not None and not Path(args.tokenizer_path).expanduser().is_file():
        raise UsageError(f"--tokenizer-path {args.tokenizer_path!r} is not a file")

    import torch.distributed as dist

    from .generation import Llama
    from .progress import configure_logging

    configure_logging(not args.quiet)
    options = {} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}
    generator = Llama.build(
        ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len, max_batch_size=1,
        model_parallel_size=args.model_parallel_size, seed=args.seed, device=args.device, dtype=args.dtype,
        rope_scale_factor=args.rope_scale_factor, compile=args.compile, warm_up=args.warm_up,
        quantize=args.quantize, verbose=not args.quiet, **options,
    )
    rank = _rank()
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with contextlib.ExitStack() as stack:
        out = sys.stdout if rank == 0 else stack.enter_context(open(os.devnull, "w"))
        try:
            session = session_class(generator, system_prompt=args.system, temperature=temperature,
                                    top_p=top_p, max_gen_len=args.max_gen_len, out=out,
                                    stats=None if args.quiet or rank != 0 else sys.stderr, **tool_options)
        except ValueError as exc:  # the system prompt fills the context: said once, at start
            raise UsageError(str(exc).replace("max_seq_len", "--max-seq-len")) from None
        read_line, terminal = make_read_line(out, rank=rank, multi=multi)
        if terminal is not None:
            stack.callback(terminal.save_history)
            out.write(session.banner(args.ckpt_dir) + "\n")
        elif rank == 0 and not args.quiet:  # scripted input: the banner stays out of the answers
            print(session.banner(args.ckpt_dir), file=sys.stderr)
        session.run(read_line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llama3-chat`` and ``python -m llama3.chat``."""
    return run_main(lambda: _chat(argv), "llama3-chat")

