"""What a tool is, for Llama 3.1 / 3.2 / 3.3 tool calling: the built-in tools' names, a custom
tool's :class:`ToolDefinition` (and its JSON-like form), the :class:`ToolCall` a reply holds, and what
counts as a JSON value in a call's arguments (:func:`json_value_problem`).

Meta's prompts that describe tools to the model are in :mod:`llama3.tool_prompts`; the text of calls
(writing and parsing) in :mod:`llama3.tool_calls`; :mod:`llama3.tools` gathers all three.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, get_args

from .errors import LlamaError

ToolPromptFormat = Literal["json", "function_tag", "python_list"]
TOOL_PROMPT_FORMATS: tuple[str, ...] = get_args(ToolPromptFormat)

# The built-in tools of Llama 3.1+, by the names the model uses.
BRAVE_SEARCH = "brave_search"
WOLFRAM_ALPHA = "wolfram_alpha"
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOLS: tuple[str, ...] = (BRAVE_SEARCH, WOLFRAM_ALPHA, CODE_INTERPRETER)
# Built-ins called as `name.call(query="...")` (Meta's reference also knows photogen).
QUERY_TOOLS = (BRAVE_SEARCH, WOLFRAM_ALPHA, "photogen")


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


# ------------------------------------------------------------------------ JSON values

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
            if not valid_unicode(item):
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
                if not isinstance(key, str) or not valid_unicode(key):
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


def valid_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
