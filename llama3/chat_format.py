"""Llama 3 chat format: messages, dialogs, roles, and encoding / decoding them (tool calls included).

A message is a plain dict, ``{"role": ..., "content": ...}``, so Meta-style dialogs work
unchanged. An assistant message may also carry what tool calling needs::

    {"role": "assistant", "content": "",
     "tool_calls": [{"call_id": "...", "tool_name": "get_weather", "arguments": {"city": "Paris"}}],
     "stop_reason": "end_of_message"}          # or "end_of_turn" / "out_of_tokens"

and tool results come back as ``{"role": "ipython", "content": "..."}``. The token layout
of every message equals Meta's ``llama_models.llama3.ChatFormat`` (python tag, call text,
``<|eom_id|>`` after a message that stopped for a tool), with one documented difference:
content is stripped of surrounding whitespace, as in Meta's llama3 repository and the
Hugging Face chat template.

Tool definitions, Meta's tool prompts and the text of calls live in :mod:`llama3.tools`;
their names are re-exported here.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, TypedDict, get_args

try:
    from typing import NotRequired
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired

from .errors import InvalidArgumentError
from .tools import (
    BRAVE_SEARCH,
    BUILTIN_TOOLS,
    CODE_INTERPRETER,
    NO_DEFAULT,
    TOOL_PROMPT_FORMATS,
    WOLFRAM_ALPHA,
    ToolCall,
    ToolDefinition,
    ToolParameter,
    ToolPromptFormat,
    builtin_tools_system_prompt,
    check_tool_call,
    format_tool_call,
    function_tag_tools_prompt,
    json_tools_prompt,
    parse_tool_calls,
    python_list_tools_prompt,
)

# The tool names are re-exported: chat_format is where Meta-style code looks for them.
__all__ = [
    "BRAVE_SEARCH",
    "BUILTIN_TOOLS",
    "CODE_INTERPRETER",
    "NO_DEFAULT",
    "ROLES",
    "STOP_REASONS",
    "TOOL_PROMPT_FORMATS",
    "WOLFRAM_ALPHA",
    "ChatFormat",
    "ChatTokenizer",
    "Dialog",
    "Message",
    "Role",
    "StopReason",
    "ToolCall",
    "ToolDefinition",
    "ToolParameter",
    "ToolPromptFormat",
    "builtin_tools_system_prompt",
    "format_tool_call",
    "function_tag_tools_prompt",
    "json_tools_prompt",
    "parse_tool_calls",
    "python_list_tools_prompt",
    "validate_dialog",
]

Role = Literal["system", "user", "assistant", "ipython"]
ROLES: tuple[str, ...] = get_args(Role)
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
STOP_REASONS: tuple[str, ...] = get_args(StopReason)
PROMPT_ENDING_ROLES: tuple[str, ...] = ("user", "ipython")  # roles the assistant answers


class Message(TypedDict):
    """One chat message. ``tool_calls`` / ``stop_reason`` only matter for assistant messages
    and may be left out (no calls; ``"end_of_turn"``). ``python_tag`` and ``tool_call_text``
    are set by :meth:`ChatFormat.decode_assistant_message` so that the message re-encodes to
    exactly the ids the model generated; callers never need to set them."""

    role: Role
    content: str
    tool_calls: NotRequired[list[ToolCall]]
    stop_reason: NotRequired[StopReason]
    python_tag: NotRequired[bool]
    tool_call_text: NotRequired[str]


Dialog = Sequence[Message]


# ------------------------------------------------------------------------ validation


def validate_dialog(dialog: Dialog, index: int | None = None) -> None:
    """Raise :class:`~llama3.errors.InvalidArgumentError` (a ``ValueError``) unless ``dialog`` is a
    non-empty list of messages with known roles whose last message is one the assistant answers
    (``user`` or ``ipython``)."""
    where = f"dialog {index}" if index is not None else "dialog"
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise InvalidArgumentError(f"{where} must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise InvalidArgumentError(
            f"{where} is empty; it needs at least one message with role {' or '.join(PROMPT_ENDING_ROLES)}"
        )
    for j, message in enumerate(dialog):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise InvalidArgumentError(f"{where}, message {j}: unknown role {role!r}; "
                                       f"roles are {', '.join(ROLES)}")
    last = dialog[-1]["role"]
    if last not in PROMPT_ENDING_ROLES:
        raise InvalidArgumentError(
            f"{where} ends with a message of role {last!r}; the last message must have role "
            f"{' or '.join(PROMPT_ENDING_ROLES)} for the assistant to answer it"
        )


def _role_of(message: Message) -> str:
    if not isinstance(message, Mapping):
        raise TypeError(
            f"a message must be a mapping with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        hint = " (tool results use the role 'ipython')" if role == "tool" else ""
        raise InvalidArgumentError(f"unknown role {role!r}{hint}; expected one of: {', '.join(ROLES)}")
    return role


def _check_stop_reason(stop_reason: Any) -> StopReason:
    if stop_reason not in STOP_REASONS:
        raise InvalidArgumentError(f"unknown stop_reason {stop_reason!r}; "
                                   f"expected one of {', '.join(STOP_REASONS)}")
    return stop_reason


def _same_calls(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.get("tool_name") == y.get("tool_name") and x.get("arguments", {}) == y.get("arguments", {})
        for x, y in zip(a, b, strict=False)
    )


# ------------------------------------------------------------------------ chat format


class ChatTokenizer(Protocol):
    """What :class:`ChatFormat` needs of a tokenizer. :class:`llama3.tokenizer.Tokenizer` is one
    (and so is Meta's reference tokenizer); the chat format depends on this, not on tokenizer.py,
    so the tokenizer module can re-export the chat format as Meta's package does."""

    special_tokens: dict[str, int]
    bos_id: int
    eos_id: int
    eot_id: int
    eom_id: int
    python_tag_id: int

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, t: Sequence[int]) -> str: ...


class ChatFormat:
    """Llama 3 chat prompt format.

    A message is ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
    with ``content`` stripped of surrounding whitespace, as in Meta's llama3 repository
    and the Hugging Face chat template (Meta's newer llama-models package does not
    strip; the two agree whenever content has no surrounding whitespace). A dialog
    prompt is ``<|begin_of_text|>``, the messages, then an open assistant header for
    the model to complete. Message content is always encoded as plain text, so text
    such as ``<|eot_id|>`` inside it cannot act as a control token.

    Assistant messages with ``tool_calls`` encode as Meta's llama-models does: a
    ``<|python_tag|>`` before a code_interpreter call, the content, each call's text, and
    ``<|eom_id|>`` instead of ``<|eot_id|>`` when ``stop_reason`` is ``"end_of_message"``.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        special = tokenizer.special_tokens
        self._headers = {
            role: [special["<|start_header_id|>"]]
            + tokenizer.encode(role, bos=False, eos=False)
            + [special["<|end_header_id|>"]]
            + tokenizer.encode("\n\n", bos=False, eos=False)
            for role in ROLES
        }

    def encode_header(self, message: Message) -> list[int]:
        """Ids of the header of ``message`` (only its ``role`` is used)."""
        return list(self._headers[_role_of(message)])

    def encode_message(self, message: Message, tool_prompt_format: ToolPromptFormat = "json") -> list[int]:
        """Ids of a whole message: header, stripped content, tool calls, ``<|eot_id|>``/``<|eom_id|>``.

        ``tool_prompt_format`` says how custom tool calls without their original text are
        written (``"json"``, ``"function_tag"``, ``"python_list"``), as in Meta's ChatFormat.
        """
        role = _role_of(message)
        content = message.get("content")
        if not isinstance(content, str):
            raise TypeError(f"message content must be a str, got {type(content).__name__}")
        encode = self.tokenizer.encode
        ids = self._headers[role].copy()
        if role != "assistant":
            return ids + encode(content.strip(), bos=False, eos=False) + [self.tokenizer.eot_id]

        calls = message.get("tool_calls") or []
        if not isinstance(calls, Sequence) or isinstance(calls, (str, Mapping)):
            raise TypeError(f"tool_calls must be a list of tool calls, got {type(calls).__name__}")
        for call in calls:
            check_tool_call(call)
        stop_reason = _check_stop_reason(message.get("stop_reason", "end_of_turn"))
        python_tag = message.get("python_tag")
        if python_tag is None:
            python_tag = bool(calls) and calls[0]["tool_name"] == CODE_INTERPRETER
        if python_tag:
            ids.append(self.tokenizer.python_tag_id)
        ids += encode(content.strip(), bos=False, eos=False)
        if calls:
            text = message.get("tool_call_text")
            parsed = parse_tool_calls(text, python_tag=bool(python_tag)) if isinstance(text, str) else None
            if parsed and _same_calls(parsed, calls):
                ids += encode(text, bos=False, eos=False)  # exactly what the model wrote
            else:
                for call in calls:
                    ids += encode(format_tool_call(call, tool_prompt_format), bos=False, eos=False)
        ids.append(self.tokenizer.eom_id if stop_reason == "end_of_message" else self.tokenizer.eot_id)
        return ids

    def encode_dialog_prompt(
        self, dialog: Dialog, tool_prompt_format: ToolPromptFormat = "json"
    ) -> list[int]:
        """Ids of a full prompt: ``<|begin_of_text|>``, every message, an open assistant header."""
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids += self.encode_message(message, tool_prompt_format)
        ids += self._headers["assistant"]
        return ids

    def decode_assistant_message(self, ids: Sequence[int], stop_reason: StopReason | None = None) -> Message:
        """Turn ids generated after :meth:`encode_dialog_prompt` into an assistant message dict.

        The reply ends at the first ``<|eot_id|>`` / ``<|end_of_text|>`` (``"end_of_turn"``) or
        ``<|eom_id|>`` (``"end_of_message"``); ids after it are ignored. Without a stop token
        ``stop_reason`` is used (generation strips the stop token and passes it), else
        ``"out_of_tokens"``. A leading ``<|python_tag|>`` is removed (``"python_tag": True``).

        Tool calls (see :func:`parse_tool_calls`) go to ``"tool_calls"`` with ``"content": ""``,
        and the call text to ``"tool_call_text"``, so the message re-encodes to these ids.
        Anything else, including malformed or cut-off calls, is returned as ``"content"``,
        as decoded (not stripped). Never raises on generated ids.
        """
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        tok = self.tokenizer
        reason: StopReason = "out_of_tokens" if stop_reason is None else _check_stop_reason(stop_reason)
        for i, token in enumerate(ids):
            if token in (tok.eot_id, tok.eos_id):
                reason = "end_of_turn"
            elif token == tok.eom_id:
                reason = "end_of_message"
            else:
                continue
            ids = ids[:i]
            break
        python_tag = bool(ids) and ids[0] == tok.python_tag_id
        text = tok.decode(ids[1:] if python_tag else ids)
        calls = parse_tool_calls(text, python_tag=python_tag, complete=reason != "out_of_tokens")
        message: Message = {
            "role": "assistant",
            "content": "" if calls else text,
            "tool_calls": calls or [],
            "stop_reason": reason,
            "python_tag": python_tag,
        }
        if calls:
            message["tool_call_text"] = text
        return message
