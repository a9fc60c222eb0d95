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
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal, TypedDict, get_args

__all__ = [
    "BRAVE_SEARCH",
    "BUILTIN_TOOLS",
    "CODE_INTERPRETER",
    "NO_DEFAULT",
    "TOOL_PROMPT_FORMATS",
    "WOLFRAM_ALPHA",
    "ToolCall",
    "ToolDefinition",
    "ToolParameter",
    "ToolPromptFormat",
    "builtin_tools_system_prompt",
    "check_tool_call",
    "format_tool_call",
    "function_tag_tools_prompt",
    "json_tools_prompt",
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
            raise ValueError(f"a tool name must be a Python identifier (letters, digits, _): {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"tool {self.name!r}: description must be a string")
        for pname, param in self.parameters.items():
            if not isinstance(param, ToolParameter):
                raise ValueError(f"tool {self.name!r}: parameter {pname!r} must be a ToolParameter")

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
            raise ValueError(f"a tool definition must be a JSON object, got {type(spec).__name__}")
        if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
            spec = spec["function"]
        name = spec.get("name")
        where = f"tool {name!r}" if isinstance(name, str) else "tool definition"
        if not isinstance(name, str):
            raise ValueError(f"{where} needs a string 'name'")
        raw = spec.get("parameters", {})
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: 'parameters' must be an object")
        required_list = None
        if isinstance(raw.get("properties"), Mapping):  # JSON-schema form
            required_list = raw.get("required", [])
            if not isinstance(required_list, list):
                raise ValueError(f"{where}: 'required' must be a list of parameter names")
            raw = raw["properties"]
        params = {}
        for pname, p in raw.items():
            if not isinstance(p, Mapping):
                raise ValueError(f"{where}: parameter {pname!r} must be an object")
            ptype = p.get("param_type", p.get("type"))
            if not isinstance(ptype, str):
                raise ValueError(f"{where}: parameter {pname!r} needs a string 'param_type' (or 'type')")
            required = pname in required_list if required_list is not None else p.get("required", True)
            if not isinstance(required, bool):
                raise ValueError(f"{where}: parameter {pname!r}: 'required' must be true or false")
            params[pname] = ToolParameter(
                param_type=ptype,
                description=str(p.get("description", "")),
                required=required,
                default=p.get("default", NO_DEFAULT),
            )
        return cls(name=name, description=str(spec.get("description", "")), parameters=params)


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


def _python_literal(value: Any) -> str:
    # Meta writes strings in double quotes without escaping; escape only where that would
    # not parse back (a quote, a backslash or a non-printable character inside).
    if isinstance(value, str):
        plain = value.isprintable() and '"' not in value and "\\" not in value
        return f'"{value}"' if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={_python_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write a {type(value).__name__} as a tool-call argument")


def format_tool_call(call: ToolCall, tool_prompt_format: ToolPromptFormat = "json") -> str:
    """The text of ``call`` as the model writes it (Meta's layout): ``brave_search.call(query="...")``
    for search built-ins, the code itself for ``code_interpreter``, and for custom tools JSON,
    ``<function=name>{...}</function>`` or ``[name(a=1)]`` per ``tool_prompt_format``."""
    name, args = check_tool_call(call)
    if name in _QUERY_TOOLS:
        return f"{name}.call(query={_python_literal(args.get('query', ''))})"
    if name == CODE_INTERPRETER:
        code = args.get("code")
        if not isinstance(code, str):
            raise ValueError("a code_interpreter call needs arguments['code'] (a string)")
        return code
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if tool_prompt_format == "python_list":
        return f"[{name}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in args.items()) + ")]"
    raise ValueError(f"unknown tool_prompt_format {tool_prompt_format!r}; use one of {TOOL_PROMPT_FORMATS}")


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


_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.DOTALL)


def _parse_builtin(text: str) -> list[ToolCall] | None:
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
    return [_new_call(node.func.value.id, {"query": query})] if isinstance(query, str) else None


def _builtin_arguments(name: str, args: dict[str, Any]) -> dict[str, Any]:
    # A built-in called in a custom-tool format: keep its documented argument name.
    key = "code" if name == CODE_INTERPRETER else "query" if name in _QUERY_TOOLS else None
    if key is not None and set(args) != {key} and len(args) == 1:
        return {key: next(iter(args.values()))}
    return args


def _parse_function_tags(text: str) -> list[ToolCall] | None:
    calls, pos = [], 0
    for m in _FUNCTION_TAG.finditer(text):
        if text[pos : m.start()].strip():
            return None
        args = json.loads(m.group(2))
        if not isinstance(args, dict):
            return None
        calls.append(_new_call(m.group(1), _builtin_arguments(m.group(1), args)))
        pos = m.end()
    return calls if calls and not text[pos:].strip() else None


def _parse_json_call(text: str) -> list[ToolCall] | None:
    obj = json.loads(text)
    if not isinstance(obj, dict) or obj.get("type", "function") != "function":
        return None
    name, args = obj.get("name"), obj.get("parameters", obj.get("arguments", {}))
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return [_new_call(name, _builtin_arguments(name, args))]


def _parse_python_list(text: str) -> list[ToolCall] | None:
    node = ast.parse(text, mode="eval").body
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = []
    for element in node.elts:
        if not (isinstance(element, ast.Call) and isinstance(element.func, ast.Name) and not element.args):
            return None
        if any(k.arg is None for k in element.keywords):  # **kwargs
            return None
        args = {k.arg: ast.literal_eval(k.value) for k in element.keywords}
        calls.append(_new_call(element.func.id, _builtin_arguments(element.func.id, args)))
    return calls


def parse_tool_calls(text: str, *, python_tag: bool = False, complete: bool = True) -> list[ToolCall] | None:
    """The tool calls in an assistant reply's text, or ``None`` if it is not (only) tool calls.

    Recognised, each as the whole reply: ``brave_search.call(query="...")`` /
    ``wolfram_alpha.call(query="...")``; a JSON object ``{"name": ..., "parameters": {...}}``;
    one or more ``<function=name>{...}</function>``; a Python list ``[f(a=1), g(b="x")]`` (every
    call). Text after ``<|python_tag|>`` (``python_tag=True``) that is none of these is code for
    ``code_interpreter`` — unless the reply was cut off (``complete=False``), since half a program
    is not a call, or it is a broken attempt at one of the formats above (broken JSON is not code).
    Malformed text gives ``None``; this function never raises on any string.
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
            calls = parser(stripped)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, AttributeError):
            calls = None  # malformed call text is just content
        if calls:
            return calls
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
    (_parse_function_tags, lambda s: s.startswith("<function=")),
    (_parse_json_call, lambda s: s.startswith("{")),
    (_parse_python_list, lambda s: s.startswith("[")),
)
