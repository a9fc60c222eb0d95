"""Tool calling for Llama 3.1 / 3.2 / 3.3: tool definitions, Meta's tool prompts, call text.

Meta documents the formats in the prompt-format pages of the ``llama-models`` wheel
(``llama_models/llama3_1/prompt_format.md``, ``llama_models/llama3_2/text_prompt_format.md``):

* built-in tools (``brave_search``, ``wolfram_alpha``, ``code_interpreter``), turned on by an
  ``Environment: ipython`` system prompt (:func:`builtin_tools_system_prompt`) and called as
  ``<|python_tag|>brave_search.call(query="...")`` or ``<|python_tag|>`` + code;
* Llama 3.1 custom tools as JSON (:func:`json_tools_prompt`; the model answers
  ``{"name": ..., "parameters": {...}}``) or with ``<function=name>{...}</function>``
  (:func:`function_tag_tools_prompt`);
* Llama 3.2 / 3.3 custom tools answered as a Python list of calls, ``[f(a=1), g(b="x")]``
  (:func:`python_list_tools_prompt`).

Each prompt helper writes Meta's documented example byte for byte. :func:`parse_tool_calls` reads
calls back from a reply's text (never raising), and :func:`format_tool_call` writes a call as
Meta's ChatFormat does. Messages and their encoding are in :mod:`llama3.chat_format`.
"""

import ast
import json
import keyword
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal, TypedDict, get_args

from .errors import LlamaError

__all__ = [
    "BRAVE_SEARCH",
    "BUILTIN_TOOLS",
    "CODE_INTERPRETER",
    "NO_DEFAULT",
    "TOOL_PROMPT_FORMATS",
    "WOLFRAM_ALPHA",
    "ToolCall",
    "ToolCallError",
    "ToolDefinition",
    "ToolDefinitionError",
    "ToolParameter",
    "ToolPromptFormat",
    "builtin_tools_system_prompt",
    "check_tool_call",
    "format_tool_call",
    "function_tag_tools_prompt",
    "json_tools_prompt",
    "json_value_problem",
    "parse_tool_calls",
    "python_list_tools_prompt",
]

ToolPromptFormat = Literal["json", "function_tag", "python_list"]
TOOL_PROMPT_FORMATS: tuple[str, ...] = get_args(ToolPromptFormat)

# The built-in tools of Llama 3.1+, by the names the model uses.
BRAVE_SEARCH = "brave_search"
WOLFRAM_ALPHA = "wolfram_alpha"
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOLS: tuple[str, ...] = (BRAVE_SEARCH, WOLFRAM_ALPHA, CODE_INTERPRETER)
# Built-ins called as `name.call(query="...")` (Meta's reference also knows photogen).
_QUERY_TOOLS = (BRAVE_SEARCH, WOLFRAM_ALPHA, "photogen")


class ToolDefinitionError(LlamaError, ValueError):
    """A tool definition that cannot be used; the message names the tool and what is wrong."""


class ToolCallError(LlamaError, ValueError):
    """A tool call that cannot be written as text that reads back as the same call."""


class ToolCall(TypedDict):
    """One call the model asked for. Built-ins take ``arguments["query"]`` (search, Wolfram
    Alpha) or ``arguments["code"]`` (code interpreter)."""

    call_id: str
    tool_name: str
    arguments: dict[str, Any]


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


@dataclass(frozen=True)
class ToolParameter:
    """One parameter of a custom tool.

    Attributes:
        param_type: its type as the model should read it (``"string"``, ``"int"``, ...).
        description: what it means.
        required: whether every call must give it.
        default: the value used when it is left out (``NO_DEFAULT``: none).
    """

    param_type: str
    description: str = ""
    required: bool = True
    default: Any = NO_DEFAULT


@dataclass(frozen=True)
class ToolDefinition:
    """A custom tool the model may call: a name, what it does, and its parameters (in order)."""

    name: str
    description: str
    parameters: Mapping[str, ToolParameter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ToolDefinitionError(
                f"a tool name must be a Python identifier (letters, digits, _): {self.name!r}")
        if self.description is None:  # no description: absent, never the text "None"
            object.__setattr__(self, "description", "")
        if not isinstance(self.description, str):
            raise ToolDefinitionError(f"tool {self.name!r}: description must be a string")
        for pname, param in self.parameters.items():
            if not isinstance(pname, str) or not pname:
                raise ToolDefinitionError(
                    f"tool {self.name!r}: parameter names must be non-empty strings: {pname!r}")
            if not isinstance(param, ToolParameter):
                raise ToolDefinitionError(f"tool {self.name!r}: parameter {pname!r} must be a ToolParameter")
            if not isinstance(param.description, str) or not isinstance(param.param_type, str):
                raise ToolDefinitionError(
                    f"tool {self.name!r}: parameter {pname!r}: param_type and description must "
                    "be strings")
            if not isinstance(param.required, bool):
                raise ToolDefinitionError(
                    f"tool {self.name!r}: parameter {pname!r}: 'required' must be true or false")
            problem = None if param.default is NO_DEFAULT else json_value_problem(param.default)
            if problem is not None:
                raise ToolDefinitionError(
                    f"tool {self.name!r}: parameter {pname!r}: the default must be a JSON value "
                    f"({problem})")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "ToolDefinition":
        """Build a definition from JSON-like data.

        Accepts ``{"name", "description", "parameters": {pname: {"param_type" (or "type"),
        "description", "required", "default"}}}`` and the JSON-schema form
        ``"parameters": {"type": "object", "properties": {...}, "required": [...]}``; an
        OpenAI-style ``{"type": "function", "function": {...}}`` wrapper is unwrapped.

        Raises:
            ValueError: the data is not a tool definition; the message says what is wrong.
        """
        if not isinstance(spec, Mapping):
            raise ToolDefinitionError(f"a tool definition must be a JSON object, got {type(spec).__name__}")
        if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
            spec = spec["function"]
        name = spec.get("name")
        where = f"tool {name!r}" if isinstance(name, str) else "tool definition"
        if not isinstance(name, str):
            raise ToolDefinitionError(f"{where} needs a string 'name'")
        raw = spec.get("parameters", {})
        if not isinstance(raw, Mapping):
            raise ToolDefinitionError(f"{where}: 'parameters' must be an object")
        required_list = None
        if isinstance(raw.get("properties"), Mapping):  # JSON-schema form
            required_list = raw.get("required", [])
            if required_list is None:
                required_list = []
            if not isinstance(required_list, list) or not all(isinstance(r, str) for r in required_list):
                raise ToolDefinitionError(f"{where}: 'required' must be a list of parameter names")
            raw = raw["properties"]
            unknown = [r for r in required_list if r not in raw]
            if unknown:
                raise ToolDefinitionError(f"{where}: 'required' names {', '.join(map(repr, unknown))}, which "
                                 f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'}; "
                                 f"the parameters are {', '.join(map(repr, raw)) or '(none)'}")
        params = {}
        for pname, p in raw.items():
            if not isinstance(p, Mapping):
                raise ToolDefinitionError(f"{where}: parameter {pname!r} must be an object")
            ptype = p.get("param_type", p.get("type"))
            if not isinstance(ptype, str):
                raise ToolDefinitionError(
                    f"{where}: parameter {pname!r} needs a string 'param_type' (or 'type')")
            required = pname in required_list if required_list is not None else p.get("required", True)
            if not isinstance(required, bool):
                raise ToolDefinitionError(f"{where}: parameter {pname!r}: 'required' must be true or false")
            pdescription = p.get("description")
            if pdescription is not None and not isinstance(pdescription, str):
                raise ToolDefinitionError(f"{where}: parameter {pname!r}: 'description' must be a string")
            params[pname] = ToolParameter(
                param_type=ptype,
                description=pdescription or "",
                required=required,
                default=p.get("default", NO_DEFAULT),
            )
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolDefinitionError(f"{where}: 'description' must be a string")
        return cls(name=name, description=description or "", parameters=params)


# ------------------------------------------------------------------------ tool prompts


def _date_text(today: date | str) -> str:
    return today if isinstance(today, str) else today.strftime("%d %B %Y")


def builtin_tools_system_prompt(
    tools: Sequence[str] = (),
    *,
    today: date | str | None = None,
    knowledge_cutoff: str = "December 2023",
    instructions: str | None = None,
) -> str:
    """The Llama 3.1+ system prompt that turns on tool use (``Environment: ipython``).

    Args:
        tools: built-in tools to list (``brave_search``, ``wolfram_alpha``);
            ``code_interpreter`` is implied by the environment line and never listed.
        today: adds the ``Cutting Knowledge Date`` / ``Today Date`` lines (a date is written
            like ``21 September 2024``).
        knowledge_cutoff: the cut-off date line's text.
        instructions: the rest of the system prompt (e.g. ``"You are a helpful assistant."``).

    Also use it with no built-in tools next to custom tools (JSON / ``<function>`` formats),
    as Meta's examples do.
    """
    unknown = [t for t in tools if t not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(f"unknown built-in tool(s) {unknown}; built-in tools are {', '.join(BUILTIN_TOOLS)}")
    text = "Environment: ipython"
    listed = [t for t in tools if t != CODE_INTERPRETER]
    if listed:
        text += "\nTools: " + ", ".join(listed) + "\n"
    rest = []
    if today is not None:
        rest.append(f"Cutting Knowledge Date: {knowledge_cutoff}\nToday Date: {_date_text(today)}\n")
    if instructions is not None:
        rest.append(instructions + "\n")
    if rest:
        text += ("" if text.endswith("\n") else "\n\n") + "\n".join(rest)
    return text


def json_tools_prompt(tools: Sequence[ToolDefinition]) -> str:
    """Llama 3.1 custom tools in JSON (put it in a user message; the model answers with a JSON
    object ``{"type": "function", "name": ..., "parameters": {...}}``).

    The layout, including every parameter shown as ``"type": "object"``, is Meta's."""
    blocks = []
    for tool in _check_tools(tools):
        props = ",".join(
            "\n                {\n"
            f'                    "{pname}": {{\n'
            '                        "type": "object",\n'
            f'                        "description": "{p.description}"\n'
            "                    }\n"
            "                }"
            for pname, p in tool.parameters.items()
        )
        required = json.dumps([pname for pname, p in tool.parameters.items() if p.required])
        blocks.append(
            "{\n"
            '    "type": "function",\n'
            '    "function": {\n'
            f'        "name": "{tool.name}",\n'
            f'        "description": "{tool.description}",\n'
            '        "parameters": {\n'
            '            "type": "object",\n'
            f'            "properties": [{props}\n'
            "            ],\n"
            f'            "required": {required}\n'
            "        }\n"
            "    }\n"
            "}"
        )
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n" + "\n".join(blocks) + "\n\n"
        "Return function calls in JSON format."
    )


def _html_safe_json(value: Any) -> str:
    # Sorted keys and <, >, &, ' escaped: how Meta's template engine (Jinja's tojson) writes JSON.
    text = json.dumps(value, sort_keys=True)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escape)
    return text


def function_tag_tools_prompt(tools: Sequence[ToolDefinition]) -> str:
    """Llama 3.1 custom tools answered as ``<function=name>{"arg": value}</function>`` (put it in
    a user message)."""
    blocks = []
    for tool in _check_tools(tools):
        params = {
            pname: {
                "description": p.description,
                "param_type": p.param_type,
                "required": p.required,
                **({} if p.default is NO_DEFAULT else {"default": p.default}),
            }
            for pname, p in tool.parameters.items()
        }
        blocks.append(
            f"Use the function '{tool.name}' to '{tool.description}':\n"
            f'{{"name": "{tool.name}", "description": "{tool.description}", '
            f'"parameters": {_html_safe_json(params)}}}\n'
        )
    return (
        "You have access to the following functions:\n\n" + "\n".join(blocks) + "\n"
        "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )


def python_list_tools_prompt(tools: Sequence[ToolDefinition], instructions: str | None = None) -> str:
    """Llama 3.2 / 3.3 system prompt for custom tools answered as a Python list of calls,
    ``[func1(a=1), func2(b="x")]``; ``instructions`` (optional) follow after a blank line."""
    described = [
        {
            "name": tool.name,
            "description": tool.description,
            "parameters": {
                "type": "dict",
                "required": [pname for pname, p in tool.parameters.items() if p.required],
                "properties": {
                    pname: {
                        "type": p.param_type,
                        "description": p.description,
                        **({} if p.default is NO_DEFAULT else {"default": p.default}),
                    }
                    for pname, p in tool.parameters.items()
                },
            },
        }
        for tool in _check_tools(tools)
    ]
    text = (
        "You are an expert in composing functions. You are given a question and a set of possible "
        "functions.\nBased on the question, you will need to make one or more function/tool calls to "
        "achieve the purpose.\n"
        "If none of the function can be used, point it out. If the given question lacks the parameters "
        "required by the function,\n"
        "also point it out. You should only return the function call in tools call sections.\n\n"
        "If you decide to invoke any of the function(s), you MUST put it in the format of "
        "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
        "You SHOULD NOT include any other text in the response.\n\n"
        "Here is a list of functions in JSON format that you can invoke.\n\n"
        + json.dumps(described, indent=4)
    )
    return text if instructions is None else f"{text}\n\n{instructions}"


def _check_tools(tools: Sequence[ToolDefinition]) -> Sequence[ToolDefinition]:
    if isinstance(tools, ToolDefinition) or not all(isinstance(t, ToolDefinition) for t in tools):
        raise TypeError("tools must be a list of ToolDefinition (see ToolDefinition.from_dict)")
    return tools


# ------------------------------------------------------------------- tool call text

# Arguments nested deeper than this are not a call (printing or re-sending them could overflow
# the stack); and no integer longer than str() can write (Python's 4300-digit limit).
MAX_ARGUMENT_DEPTH = 100
_MAX_INT_BITS = 14_000


def json_value_problem(value: Any) -> str | None:
    """Why ``value`` is not a JSON value (``None`` if it is one).

    JSON values: ``str`` (valid Unicode, no lone surrogates), ``int`` (what ``str()`` can
    write), finite ``float``, ``bool``, ``None``, and lists and string-keyed dicts of those,
    nested at most :data:`MAX_ARGUMENT_DEPTH` deep. Tuples, sets, bytes, complex numbers,
    ``Ellipsis``, NaN and infinities are not.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_ARGUMENT_DEPTH:
            return f"nested more than {MAX_ARGUMENT_DEPTH} levels deep"
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            if not _valid_unicode(item):
                return f"the string {item!r} is not valid Unicode (lone surrogate)"
        elif isinstance(item, int):
            if item.bit_length() > _MAX_INT_BITS:
                return "an integer too long to write"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{item!r} is not a JSON number"
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            for key, v in item.items():
                if not isinstance(key, str) or not _valid_unicode(key):
                    return f"the key {key!r} is not a (valid Unicode) string"
                stack.append((v, depth + 1))
        else:
            return f"a {type(item).__name__} ({_short_repr(item)}) is not a JSON value"
    return None


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails is still only described
        return type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    if name in _QUERY_TOOLS:
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
            and not any(c.isspace() for c in name) and _valid_unicode(name))


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
        and node.func.value.id in _QUERY_TOOLS
        and not node.args
        and len(node.keywords) == 1
        and node.keywords[0].arg == "query"
    ):
        return None
    query = ast.literal_eval(node.keywords[0].value)
    return [_call(node.func.value.id, {"query": query})] if isinstance(query, str) else None


def _builtin_arguments(name: str, args: dict[str, Any]) -> dict[str, Any]:
    # A built-in called in a custom-tool format: keep its documented argument name.
    key = "code" if name == CODE_INTERPRETER else "query" if name in _QUERY_TOOLS else None
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
    (_parse_builtin, lambda s: s.startswith(_QUERY_TOOLS) and ".call(" in s[:32]),
    (_parse_function_tags, lambda s: s.startswith(_OPEN_TAG)),
    (_parse_json_call, lambda s: s.startswith("{")),
    (_parse_python_list, lambda s: s.startswith("[")),
)
