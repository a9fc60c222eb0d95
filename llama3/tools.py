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

This module gathers the public names of three: :mod:`llama3.tool_definitions` (what a tool and a
call are), :mod:`llama3.tool_prompts` (Meta's prompts describing tools) and :mod:`llama3.tool_calls`
(the text of calls: writing and parsing).
"""

from .tool_calls import check_tool_call, format_tool_call, parse_tool_calls
from .tool_definitions import (
    BRAVE_SEARCH,
    BUILTIN_TOOLS,
    CODE_INTERPRETER,
    NO_DEFAULT,
    TOOL_PROMPT_FORMATS,
    WOLFRAM_ALPHA,
    ToolCall,
    ToolCallError,
    ToolDefinition,
    ToolDefinitionError,
    ToolParameter,
    ToolPromptFormat,
    json_value_problem,
)
from .tool_prompts import (
    builtin_tools_system_prompt,
    function_tag_tools_prompt,
    json_tools_prompt,
    python_list_tools_prompt,
)

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
