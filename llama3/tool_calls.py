"""The text of tool calls in an assistant reply: :func:`parse_tool_calls` reads calls back from a
reply (in any of Meta's formats, never raising), :func:`format_tool_call` writes a call as Meta's
ChatFormat does (so that it parses back to the same call), :func:`check_tool_call` checks a call's
dict. What a call is: :mod:`llama3.tool_definitions`.
"""

import ast
import json
import keyword
import uuid
from collections.abc import Mapping
from typing import Any

from .tool_definitions import (
    CODE_INTERPRETER,
    QUERY_TOOLS,
    TOOL_PROMPT_FORMATS,
    ToolCall,
    ToolCallError,
    ToolPromptFormat,
    json_value_problem,
    valid_unicode,
)


def _python_literal(value: Any) -> str:
    # Meta writes strings in double quotes without escaping; escape only where that would
    # not parse back (a quote, a backslash or a non-printable character inside). Objects are
    # written as Python dict literals, which parse back (Meta's `{k=v}` does not).
    if isinstance(value, str):
        plain = value.isprintable() and '"' not in value and "\\" not in value
        if plain:
            return f'"{value}"'
        # JSON's escapes are Python's; what JSON leaves raw but is not printable gets \U escapes
        # (JSON's \ud83d\ude00 pairs would read back in Python as two lone surrogates).
        return "".join(c if c.isprintable() else f"\\U{ord(c):08x}"
                       for c in json.dumps(value, ensure_ascii=False))
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write a {type(value).__name__} as a tool-call argument")


def _canonical(name: str, args: dict[str, Any]) -> str:
    # Types matter (1 is not 1.0 or True), key order does not.
    return json.dumps([name, args], sort_keys=True)


def format_tool_call(call: ToolCall, tool_prompt_format: ToolPromptFormat = "json") -> str:
    """The text of ``call`` as the model writes it (Meta's layout): ``brave_search.call(query="...")``
    for search built-ins, the code itself for ``code_interpreter``, and for custom tools JSON,
    ``<function=name>{...}</function>`` or ``[name(a=1)]`` per ``tool_prompt_format``.

    What it writes parses back (:func:`parse_tool_calls`) to the same call; a call that cannot be
    written so in this format is refused with ``ValueError`` (e.g. a name that is not a Python
    identifier in the ``python_list`` format, or a code_interpreter program that reads as a call).
    """
    if tool_prompt_format not in TOOL_PROMPT_FORMATS:
        raise ToolCallError(f"unknown tool_prompt_format {tool_prompt_format!r}; "
                         f"use one of {TOOL_PROMPT_FORMATS}")
    name, args = check_tool_call(call)
    problem = json_value_problem(args)
    if problem is not None:
        raise ToolCallError(f"tool call {name!r}: arguments must be JSON values: {problem}")
    python_tag = False
    if name in QUERY_TOOLS:
        if set(args) != {"query"} or not isinstance(args["query"], str):
            raise ToolCallError(f"a {name} call needs exactly one argument, 'query' (a string); "
                             f"got {sorted(args)}")
        text = f"{name}.call(query={_python_literal(args['query'])})"
        python_tag = True
    elif name == CODE_INTERPRETER:
        code = args.get("code")
        if set(args) != {"code"} or not isinstance(code, str):
            raise ToolCallError("a code_interpreter call needs arguments['code'] (a string) and nothing else")
        text, python_tag = code, True
    elif tool_prompt_format == "json":
        text = json.dumps({"type": "function", "name": name, "parameters": args})
    elif tool_prompt_format == "function_tag":
        text = f"<function={name}>{json.dumps(args)}</function>"
    else:
        for word in (name, *args):
            if not word.isidentifier() or keyword.iskeyword(word):
                raise ToolCallError(f"tool call {name!r}: {word!r} is not a Python identifier, which the "
                                 "python_list format needs for tool and parameter names; use the json or "
                                 "function_tag format")
        text = f"[{name}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in args.items()) + ")]"
    parsed = parse_tool_calls(text, python_tag=python_tag)
    back = [_canonical(c["tool_name"], c["arguments"]) for c in parsed or ()]
    if back != [_canonical(name, args)]:
        raise ToolCallError(
            f"tool call {name!r} cannot be written in the {tool_prompt_format} format so that "
                         "it reads back as the same call (check the tool name and arguments)")
    return text


def check_tool_call(call: Any) -> tuple[str, dict[str, Any]]:
    """``(tool_name, arguments)`` of a tool-call dict; ``TypeError`` / ``ValueError`` saying what is wrong."""
    if not isinstance(call, Mapping):
        raise TypeError(f"a tool call must be a dict with 'tool_name' and 'arguments': {type(call).__name__}")
    name, args = call.get("tool_name"), call.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a non-empty string 'tool_name', got {name!r}")
    if not isinstance(args, Mapping):
        raise ValueError(f"tool call {name!r}: 'arguments' must be a dict, got {type(args).__name__}")
    return name, dict(args)


def _new_call(name: str, arguments: dict[str, Any]) -> ToolCall:
    return {"call_id": str(uuid.uuid4()), "tool_name": name, "arguments": arguments}


class _NotACall(ValueError):
    """Raised inside the parsers: the text is not a valid call (it stays content)."""


_Parsed = tuple[str, dict[str, Any]]


def _call(name: Any, arguments: Any) -> _Parsed:
    # Every parsed call goes through here: a usable name and JSON-value arguments, or not a call.
    # (Call ids are drawn only once the whole reply has parsed.)
    if not _is_call_name(name) or not isinstance(arguments, dict) or json_value_problem(arguments):
        raise _NotACall(name)
    return name, _builtin_arguments(name, arguments)


def _is_call_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 256 and name.isprintable()
            and not any(c.isspace() for c in name) and valid_unicode(name))


def _reject_constant(text: str) -> Any:
    raise _NotACall(f"{text} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _NotACall("a key appears twice")
    return obj


# Strict JSON: no NaN/Infinity, no repeated keys.
_JSON = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _parse_builtin(text: str, complete: bool) -> list[_Parsed] | None:
    # name.call(query="...") for brave_search / wolfram_alpha (a Python string literal).
    node = ast.parse(text, mode="eval").body
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "call"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in QUERY_TOOLS
        and not node.args
        and len(node.keywords) == 1
        and node.keywords[0].arg == "query"
    ):
        return None
    query = ast.literal_eval(node.keywords[0].value)
    return [_call(node.func.value.id, {"query": query})] if isinstance(query, str) else None


def _builtin_arguments(name: str, args: dict[str, Any]) -> dict[str, Any]:
    # A built-in called in a custom-tool format: keep its documented argument name.
    key = "code" if name == CODE_INTERPRETER else "query" if name in QUERY_TOOLS else None
    if key is not None and set(args) != {key} and len(args) == 1:
        return {key: next(iter(args.values()))}
    return args


_OPEN_TAG, _CLOSE_TAG = "<function=", "</function>"


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _parse_function_tags(text: str, complete: bool) -> list[_Parsed] | None:
    # One pass, left to right: every step moves past what it read, so the work is linear in the
    # text's length however many openings it holds. The arguments are read by a JSON decoder (an
    # argument may contain "</function>"); the last call's closing tag may be missing when the
    # reply is complete (Meta's parser accepts that too).
    calls, pos = [], 0
    while pos < len(text):
        if not text.startswith(_OPEN_TAG, pos):
            return None
        name_end = text.find(">", pos + len(_OPEN_TAG), pos + len(_OPEN_TAG) + 257)
        if name_end < 0:
            return None
        name = text[pos + len(_OPEN_TAG) : name_end]
        start = _skip_space(text, name_end + 1)
        if not text.startswith("{", start):
            return None
        args, end = _JSON.raw_decode(text, start)
        calls.append(_call(name, args))
        end = _skip_space(text, end)
        if text.startswith(_CLOSE_TAG, end):
            end += len(_CLOSE_TAG)
        elif end < len(text) or not complete:
            return None  # something else follows the arguments, or a cut-off reply
        pos = _skip_space(text, end)
    return calls or None


_CALL_KEYS = {"type", "name", "parameters", "arguments"}


def _parse_json_call(text: str, complete: bool) -> list[_Parsed] | None:
    # A JSON reply is a call only when it has a call's shape: a name, and parameters (or
    # arguments) that are an object, nothing else ({"name": "Alice", "age": 30} is an answer).
    obj, end = _JSON.raw_decode(text)
    if text[end:].strip() or not isinstance(obj, dict) or not set(obj) <= _CALL_KEYS:
        return None
    if obj.get("type", "function") != "function" or ("parameters" in obj) == ("arguments" in obj):
        return None
    args = obj["parameters"] if "parameters" in obj else obj["arguments"]
    return [_call(obj.get("name"), args)] if isinstance(args, dict) else None


def _parse_python_list(text: str, complete: bool) -> list[_Parsed] | None:
    node = ast.parse(text, mode="eval").body
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = []
    for element in node.elts:
        if not (isinstance(element, ast.Call) and isinstance(element.func, ast.Name) and not element.args):
            return None
        names = [k.arg for k in element.keywords]
        if None in names or len(set(names)) != len(names):  # **kwargs, or a keyword given twice
            return None
        args = {k.arg: ast.literal_eval(k.value) for k in element.keywords}
        calls.append(_call(element.func.id, args))
    return calls


def parse_tool_calls(text: str, *, python_tag: bool = False, complete: bool = True) -> list[ToolCall] | None:
    """The tool calls in an assistant reply's text, or ``None`` if it is not (only) tool calls.

    Recognised, each as the whole reply: ``brave_search.call(query="...")`` /
    ``wolfram_alpha.call(query="...")``; a JSON object ``{"name": ..., "parameters": {...}}`` (or
    ``"arguments"``; optional ``"type": "function"``; no other keys); one or more
    ``<function=name>{...}</function>`` (the last closing tag may be missing in a complete reply);
    a Python list ``[f(a=1), g(b="x")]`` (every call). Text after ``<|python_tag|>``
    (``python_tag=True``) that is none of these is code for ``code_interpreter`` — unless the reply
    was cut off (``complete=False``), since half a program is not a call, or it is a broken attempt
    at one of the formats above (broken JSON is not code).

    A call's arguments are JSON values only (see :func:`json_value_problem`), each keyword at most
    once; anything else (sets, bytes, NaN, ``1e999``, lone surrogates, ``f(a=1, a=2)``) means the
    text is not a call and stays content. The tool name is not checked against the tools offered:
    that is the caller's decision (``llama3-chat`` shows such a call and says the tool was not
    offered). Parsing takes time linear in the text's length, and never raises on any string.
    """
    stripped = text.strip()
    if not stripped:
        return None
    attempted = False  # the text starts like a call in one of the formats
    for parser, looks_like in _PARSERS:
        if not looks_like(stripped):
            continue
        attempted = True
        try:
            calls = parser(stripped, complete)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, AttributeError):
            calls = None  # malformed call text is just content
        if calls:
            return [_new_call(name, args) for name, args in calls]
    if python_tag and complete and not (attempted and not _is_python(stripped)):
        return [_new_call(CODE_INTERPRETER, {"code": text})]
    return None


def _is_python(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


_PARSERS = (
    (_parse_builtin, lambda s: s.startswith(QUERY_TOOLS) and ".call(" in s[:32]),
    (_parse_function_tags, lambda s: s.startswith(_OPEN_TAG)),
    (_parse_json_call, lambda s: s.startswith("{")),
    (_parse_python_list, lambda s: s.startswith("[")),
)
