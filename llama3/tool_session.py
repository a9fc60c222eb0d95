"""Tool mode of ``llama3-chat``: the model may call tools, and the person at the keyboard runs them.

``llama3-chat CKPT --tools tools.json --builtin-tools brave_search,code_interpreter`` builds a
system prompt in Meta's documented format (see :mod:`llama3.chat_format`). When a reply is a
tool call, the parsed call is shown and the user is asked for the result (one line; ``/skip``
leaves the call unanswered); the result goes back to the model as an ``ipython`` message and
the conversation continues until the model answers in text. A call of a tool that was not
offered is shown the same way, with a note saying so; the user answers or skips it.

Nothing the model writes is ever executed: a ``code_interpreter`` call is shown as code for
the user to run (or not) themselves.
"""

import json
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from .chat_format import (
    BUILTIN_TOOLS,
    CODE_INTERPRETER,
    TOOL_PROMPT_FORMATS,
    Message,
    ToolDefinition,
    ToolPromptFormat,
    builtin_tools_system_prompt,
    function_tag_tools_prompt,
    json_tools_prompt,
    python_list_tools_prompt,
)
from .errors import LlamaError
from .files import FileCheckError, NotTextError, read_text

__all__ = [
    "ToolMode",
    "as_assistant_message",
    "load_tool_definitions",
    "parse_builtin_tools",
    "tool_options_from_flags",
    "tool_system_prompt",
]

SKIP = "/skip"


class ToolsFileError(LlamaError, ValueError):
    """A ``--tools`` file that cannot be used; the message names the file and the problem."""


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not a JSON value")


def load_tool_definitions(path: str | Path) -> list[ToolDefinition]:
    """Tool definitions from a JSON file: a list of definitions (or ``{"tools": [...]}``), each
    in a form :meth:`ToolDefinition.from_dict` accepts.

    Raises:
        ValueError: the file is missing or not valid; the message names the file and the problem.
    """
    path = Path(path).expanduser()
    try:
        data = json.loads(read_text(path, "tools file"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise ToolsFileError(f"tools file {path} does not exist") from None
    except (FileCheckError, NotTextError) as e:
        raise ToolsFileError(str(e)) from None
    except (OSError, ValueError, RecursionError) as e:
        raise ToolsFileError(f"tools file {path} is not readable JSON: {e}") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise ToolsFileError(f"tools file {path} must hold a non-empty list of tool definitions")
    tools = []
    for i, spec in enumerate(data):
        try:
            tools.append(ToolDefinition.from_dict(spec))
        except ValueError as e:
            raise ToolsFileError(f"tools file {path}, tool {i}: {e}") from None
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ToolsFileError(f"tools file {path} defines a tool name twice: {names}")
    return tools


def parse_builtin_tools(names: str | Sequence[str] | None) -> list[str]:
    """``"brave_search,wolfram_alpha"`` (or a list) -> validated built-in tool names."""
    if names is None:
        return []
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [n.strip() for n in items if n.strip()]
    unknown = [n for n in items if n not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(
            f"unknown built-in tool(s) {', '.join(unknown)}; choose from {', '.join(BUILTIN_TOOLS)}"
        )
    return list(dict.fromkeys(items))


def tool_options_from_flags(args: Any) -> dict[str, Any]:
    """:class:`~llama3.chat.ToolChatSession` keyword arguments from ``llama3-chat``'s ``--tools``,
    ``--builtin-tools`` and ``--tool-format`` (checked before any model is loaded).

    Raises:
        ValueError: a flag's value is not usable; the message says which and why.
    """
    return {
        "tools": load_tool_definitions(args.tools) if args.tools else [],
        "builtin_tools": parse_builtin_tools(args.builtin_tools),
        "tool_format": args.tool_format,
    }


def tool_system_prompt(
    tools: Sequence[ToolDefinition] = (),
    builtin_tools: Sequence[str] = (),
    *,
    tool_format: ToolPromptFormat = "json",
    system: str | None = None,
    today: date | None = None,
) -> str:
    """One system prompt for a chat with tools: the ``Environment: ipython`` block with the
    built-in tools and dates (unless only Python-list custom tools are used, as in Meta's 3.2
    example), then the custom tools in ``tool_format``, then ``system``."""
    if tool_format not in TOOL_PROMPT_FORMATS:
        raise ValueError(f"unknown tool format {tool_format!r}; choose from {', '.join(TOOL_PROMPT_FORMATS)}")
    parts = []
    if builtin_tools or tool_format != "python_list":
        parts.append(builtin_tools_system_prompt(builtin_tools, today=today or date.today()).rstrip("\n"))
    if tools:
        prompt = {"json": json_tools_prompt, "function_tag": function_tag_tools_prompt}.get(tool_format)
        parts.append(prompt(tools) if prompt else python_list_tools_prompt(tools))
    if system:
        parts.append(system)
    return "\n\n".join(parts)


def _show_call(call: dict[str, Any]) -> str:
    if call["tool_name"] == CODE_INTERPRETER:
        code = call["arguments"].get("code", "")
        return f"code_interpreter (not executed; run it yourself if you want its result):\n{code}"
    # Parsed arguments are JSON values (llama3.tools), so this always writes.
    return f"{call['tool_name']}({json.dumps(call['arguments'], ensure_ascii=False)})"


class ToolMode:
    """Tool mode of a chat session: the model may call tools; the user supplies results. A mixin
    over :class:`~llama3.chat.ChatSession` (which it extends through ``super()``); the chat program
    composes the two as :class:`~llama3.chat.ToolChatSession`, so this module never imports it.

    Args:
        generator: the model and tokenizer.
        tools: custom tool definitions.
        builtin_tools: built-in tools to enable (``brave_search``, ``wolfram_alpha``,
            ``code_interpreter``).
        tool_format: how custom tools are described and called (``"json"``, ``"function_tag"``,
            ``"python_list"``).
        system_prompt: added after the tool descriptions.
        today: the date written into the system prompt (default: today).
        max_tool_rounds: tool calls answered in a row before control returns to the user.
        **kwargs: the rest of :class:`~llama3.chat.ChatSession`'s arguments.

    Replies are generated whole (not streamed) so they can be parsed.
    """

    def __init__(
        self,
        generator: Any,
        *,
        tools: Sequence[ToolDefinition] = (),
        builtin_tools: Sequence[str] = (),
        tool_format: ToolPromptFormat = "json",
        system_prompt: str | None = None,
        today: date | None = None,
        max_tool_rounds: int = 8,
        **kwargs: Any,
    ) -> None:
        prompt = tool_system_prompt(
            tools, builtin_tools, tool_format=tool_format, system=system_prompt, today=today
        )
        super().__init__(generator, system_prompt=prompt, **kwargs)
        self.tool_format = tool_format
        self.max_tool_rounds = max_tool_rounds
        self.tool_names = [t.name for t in tools] + list(builtin_tools)
        self.has_custom_tools = bool(tools)
        # A call of a tool not offered is still shown and answered by the user (who may /skip
        # it): the model's text decides nothing, and a note says the tool was not offered.
        self.offered = {t.name for t in tools} | set(builtin_tools)
        self.read_line: Callable[[str], str | None] = lambda prompt: None

    def banner(self, name: str) -> str:
        """The start line in tool mode: the tools, their format and how tool calls are answered."""
        fmt = f" (custom tools in the {self.tool_format} format)" if self.has_custom_tools else ""
        return (f"Chatting with {name} in TOOL MODE: tools {', '.join(self.tool_names)}{fmt}. When the "
                f"model calls a tool you are shown the call; type its result (one line) or {SKIP} to "
                f"leave it unanswered; after {self.max_tool_rounds} calls in a row it is your turn. "
                "Nothing the model writes is executed.\n" + super().banner(name))

    def run(self, read_line: Callable[[str], str | None]) -> None:
        self.read_line = read_line  # tool results are read from the same input
        super().run(read_line)

    def respond(self, dialog: list[Message]) -> list[Message]:
        """Answer ``dialog``; while the model calls tools, show each call, read its result and send
        it back. Returns every message added after ``dialog`` (replies and tool results)."""
        added: list[Message] = []
        encode = self.generator.formatter.encode_dialog_prompt
        for _ in range(self.max_tool_rounds):
            start = time.perf_counter()
            reply = self._complete(dialog + added)
            end = time.perf_counter()
            added.append(reply)
            if not reply.get("tool_calls"):
                self.out.write(reply["content"] + "\n")
                self.out.flush()
                self.report_timing(reply["content"], start, None, end)
                return added
            self.report_timing(reply["content"], start, None, end)
            for call in reply["tool_calls"]:
                unknown = "" if call["tool_name"] in self.offered else " (not among the tools offered)"
                self._note(f"tool call{unknown}: {_show_call(call)}")
                result = self.read_line(f"result of {call['tool_name']} (one line, or {SKIP})> ")
                if result is None or result.strip() == SKIP:
                    self.out.write("\n")
                    self._note("tool call left unanswered; type your next message")
                    return added
                added.append({"role": "ipython", "content": result.strip()})
            try:
                length = len(encode(dialog + added))
            except (ValueError, TypeError) as exc:  # never: replies re-encode from their own text
                self._note(f"cannot continue from this reply ({exc}); type your next message")
                return added
            if length > self.prompt_budget:
                self._note("context full: the tool results do not fit; type your next message")
                return added
        self._note(f"{self.max_tool_rounds} tool calls in a row; back to you")
        return added

    def _complete(self, dialog: list[Message]) -> Message:
        result = self.generator.chat_completion(
            [dialog], temperature=self.temperature, top_p=self.top_p, max_gen_len=self.max_gen_len
        )[0]["generation"]
        return as_assistant_message(self.generator, result)


def as_assistant_message(generator: Any, generation: Message) -> Message:
    """``chat_completion``'s ``generation`` as an assistant message with ``tool_calls``.

    A generation that already has ``tool_calls`` is returned as is. One with only ``role`` and
    ``content`` (decoded text, in which a python tag the model generated reads
    ``<|python_tag|>``) is parsed back with :meth:`ChatFormat.decode_assistant_message`.
    """
    if "tool_calls" in generation:
        return generation
    ids = generator.tokenizer.encode(
        generation["content"], bos=False, eos=False, allowed_special={"<|python_tag|>"}
    )
    return generator.formatter.decode_assistant_message(ids, generation.get("stop_reason", "end_of_turn"))
