"""Meta's prompts that describe tools to a Llama 3.1 / 3.2 / 3.3 model, byte for byte as Meta's
prompt-format pages write them (``llama_models/llama3_1/prompt_format.md``,
``llama_models/llama3_2/text_prompt_format.md``):

* :func:`builtin_tools_system_prompt`: the ``Environment: ipython`` system prompt that turns on the
  built-in tools (``brave_search``, ``wolfram_alpha``, ``code_interpreter``);
* :func:`json_tools_prompt` and :func:`function_tag_tools_prompt`: Llama 3.1 custom tools, answered
  as JSON or as ``<function=name>{...}</function>``;
* :func:`python_list_tools_prompt`: Llama 3.2 / 3.3 custom tools, answered as ``[f(a=1), g(b="x")]``.
"""

import json
from collections.abc import Sequence
from datetime import date
from typing import Any

from .tool_definitions import BUILTIN_TOOLS, CODE_INTERPRETER, NO_DEFAULT, ToolDefinition


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

