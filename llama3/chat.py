"""Interactive chat with a Llama 3 instruct model in the terminal: ``llama3-chat CKPT_DIR``.

Type a message and press Enter; the answer streams as it is generated. Commands:

* ``/reset`` forgets the conversation (the system prompt stays);
* ``/exit`` or ``/quit`` (or end of input, Ctrl-D) quits;
* ``/help`` lists the commands.

Ctrl-C while an answer streams stops that answer, not the program. The partial answer is kept in
the history as the assistant's turn, so the conversation the model sees next is the one shown.

When the conversation no longer fits the context (``--max-seq-len``, minus room kept for the
answer), the oldest exchanges are dropped, never the system prompt, and a note says how many.
A message too long to fit even alone is refused with a message and the history is left as it was.

Input is read line by line from stdin, so the program can be scripted
(``printf 'Hi\\n/reset\\nHello\\n' | llama3-chat CKPT_DIR``). Under ``torchrun`` rank 0 reads
and prints; every rank generates.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TextIO

import torch.distributed as dist

from .generation import Llama
from .tokenizer import Message

__all__ = ["ChatSession", "main"]

HELP = "commands: /reset (forget the conversation), /exit or /quit (leave), /help"


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
    """

    def __init__(self, generator: Llama, *, system_prompt: str | None = None, temperature: float = 0.6,
                 top_p: float = 0.9, max_gen_len: int | None = None, reply_room: int | None = None,
                 out: TextIO | None = None) -> None:
        self.generator = generator
        self.system: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.temperature = temperature
        self.top_p = top_p
        self.max_gen_len = max_gen_len
        max_seq_len = generator.model.params.max_seq_len
        if reply_room is None:
            reply_room = max_gen_len if max_gen_len is not None else max(1, max_seq_len // 4)
        self.prompt_budget = max_seq_len - reply_room
        self.out = out if out is not None else sys.stdout
        self.history: list[Message] = list(self.system)

    def reset(self) -> None:
        """Forget every turn, keeping the system prompt."""
        self.history = list(self.system)

    def handle(self, line: str) -> bool:
        """Act on one input line (a message or a command); return False when the user quits."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                return False
            if command == "/reset":
                self.reset()
                self._note("conversation cleared")
            elif command == "/help":
                self._note(HELP)
            else:
                self._note(f"unknown command {command}; {HELP}")
            return True
        self.ask(text)
        return True

    def ask(self, text: str) -> str | None:
        """Send a user message, stream the answer to ``out`` and record both in the history.

        Returns the answer (partial if interrupted), or None if the message does not fit.
        """
        user: Message = {"role": "user", "content": text}
        dialog = self._fit(user)
        if dialog is None:
            return None
        pieces: list[str] = []
        stream = self.generator.stream_chat_completion(dialog, temperature=self.temperature,
                                                       top_p=self.top_p, max_gen_len=self.max_gen_len)
        try:
            for delta in stream:
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
        answer = "".join(pieces)
        self.history = dialog + [{"role": "assistant", "content": answer}]
        return answer

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
                           f"{self.prompt_budget} fit (max_seq_len "
                           f"{self.generator.model.params.max_seq_len} minus room for the answer); "
                           "not sent")
                return None
            turns = turns[2:]  # one exchange: a user message and its answer
            dropped += 1
        if dropped:
            self._note(f"context full: dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''}")
        return dialog

    def _note(self, text: str) -> None:
        self.out.write(f"[{text}]\n")
        self.out.flush()

    def run(self, read_line: Callable[[], str | None]) -> None:
        """Read lines with ``read_line`` (None = end of input) until the user quits."""
        while True:
            try:
                line = read_line()
            except KeyboardInterrupt:
                self.out.write("\n")
                self._note("use /exit or Ctrl-D to quit")
                continue
            if line is None or not self.handle(line):
                return


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llama3-chat", description="Chat with a Llama 3 instruct model. " + HELP + ".",
    )
    parser.add_argument("ckpt_dir", help="checkpoint directory (Meta or Hugging Face format)")
    parser.add_argument("--tokenizer-path", default=None,
                        help="tokenizer.model (default: looked for beside the checkpoint)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="context length (default 4096)")
    parser.add_argument("--max-gen-len", type=int, default=None,
                        help="longest answer in tokens (default: what fits)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: per device)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model-parallel-size", type=int, default=None)
    parser.add_argument("--rope-scale-factor", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="decode with torch.compile")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linear layers")
    parser.add_argument("--tools", default=None, metavar="FILE.json",
                        help="tool mode: custom tool definitions (JSON list); you supply each call's result")
    parser.add_argument("--builtin-tools", default=None, metavar="NAMES",
                        help="tool mode: comma-separated brave_search, wolfram_alpha, code_interpreter")
    parser.add_argument("--tool-format", choices=["json", "function_tag", "python_list"], default="json",
                        help="how custom tools are described and called (default json; python_list for 3.2)")
    return parser.parse_args(argv)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llama3-chat`` and ``python -m llama3.chat``."""
    args = _parse_args(argv)
    session_class, tool_options = ChatSession, {}
    if args.tools or args.builtin_tools:
        from .tool_session import ToolChatSession, tool_options_from_flags
        try:
            session_class, tool_options = ToolChatSession, tool_options_from_flags(args)
        except ValueError as e:
            print(f"llama3-chat: error: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    generator = Llama.build(
        args.ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len, max_batch_size=1,
        model_parallel_size=args.model_parallel_size, seed=args.seed, device=args.device, dtype=args.dtype,
        rope_scale_factor=args.rope_scale_factor, compile=args.compile, quantize=args.quantize,
    )
    rank = _rank()
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with contextlib.ExitStack() as stack:
        out = sys.stdout if rank == 0 else stack.enter_context(open(os.devnull, "w"))
        session = session_class(generator, system_prompt=args.system, temperature=args.temperature,
                                top_p=args.top_p, max_gen_len=args.max_gen_len, out=out, **tool_options)
        interactive = rank == 0 and sys.stdin.isatty()

        def read_line() -> str | None:
            line: str | None = None
            if interactive:
                try:
                    line = input("\n> ")  # input() gives line editing on a terminal
                except EOFError:
                    line = None
            elif rank == 0:
                raw = sys.stdin.readline()
                line = raw if raw else None
            if multi:
                # Every rank takes part in generation, so every rank needs the line.
                box = [line]
                dist.broadcast_object_list(box, src=0)
                line = box[0]
            return line

        if interactive:
            out.write(f"Chatting with {args.ckpt_dir}. {HELP}\n")
        session.run(read_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
