"""Tool-call text written by the model is untrusted input (issue 24).

Oracles: Python's own ``ast.literal_eval`` / ``json`` (what a value is), Meta's tool-call parser in
llama-models where it is right (a missing closing tag), and exact expectations."""

from __future__ import annotations

import importlib.util
import json
import math
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3.errors import LlamaError
from llama3.tool_session import load_tool_definitions
from llama3.tools import (
    CODE_INTERPRETER,
    ToolCallError,
    ToolDefinition,
    ToolDefinitionError,
    ToolParameter,
    format_tool_call,
    json_value_problem,
    parse_tool_calls,
)


def _calls(text: str, **kwargs) -> list[tuple[str, dict]] | None:
    calls = parse_tool_calls(text, **kwargs)
    return None if calls is None else [(c["tool_name"], c["arguments"]) for c in calls]


# ------------------------------------------------------------------ arguments are JSON values

NOT_JSON = [
    "[f(a={1, 2})]",  # set
    "[f(a=b'x')]",  # bytes
    "[f(a=1j)]",  # complex
    "[f(a=...)]",  # Ellipsis
    "[f(a=(1, 2))]",  # tuple
    "[f(a={1: 2})]",  # a dict with a non-string key
    "[f(a=[frozenset()])]",
    "[f(a=float('nan'))]",  # not even a literal
    "[f(a=1e999)]",  # inf
    "[f(a=-1e999)]",
    "[f(a='\\ud800')]",  # lone surrogate
    "[f(a=0x" + "f" * 5000 + ")]",  # an int str() cannot write
    "[f(a=1, a=2)]",  # repeated keyword
    "[f(a=1), g(b=2, b=2)]",
    '{"name": "f", "parameters": {"a": NaN}}',
    '{"name": "f", "parameters": {"a": Infinity}}',
    '{"name": "f", "parameters": {"a": -Infinity}}',
    '{"name": "f", "parameters": {"a": 1e999}}',
    '{"name": "f", "parameters": {"a": "\\ud800"}}',
    '{"name": "f", "parameters": {"a": 1, "a": 2}}',  # repeated key
    '{"name": "f", "parameters": {"a": {"b": 1, "b": 2}}}',
    '<function=f>{"a": NaN}</function>',
    '<function=f>{"a": "\\udfff"}</function>',
    '<function=f>{"a": 1, "a": 1}</function>',
    "brave_search.call(query=b'x')",
    "brave_search.call(query='\\ud800')",
    "[f(a=" + "[" * 150 + "]" * 150 + ")]",  # nested deeper than anyone can print safely
]


@pytest.mark.parametrize("text", NOT_JSON)
@pytest.mark.parametrize("python_tag", [False, True])
def test_non_json_arguments_are_content(text: str, python_tag: bool) -> None:
    calls = parse_tool_calls(text, python_tag=python_tag)
    # With the python tag, valid Python that is no call may still be code for code_interpreter;
    # it is never a call of `f`, `g` or a search with a value that is not JSON.
    assert calls is None or [c["tool_name"] for c in calls] == [CODE_INTERPRETER]


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(), inner, max_size=3)),
    max_leaves=10,
))
def test_every_parsed_argument_survives_json(value) -> None:
    # The oracle: json.dumps with allow_nan=False writes exactly the JSON values.
    assert json_value_problem(value) is None
    for fmt in ("json", "function_tag", "python_list"):
        call = {"call_id": "c", "tool_name": "f", "arguments": {"a": value}}
        text = format_tool_call(call, fmt)
        assert _calls(text) == [("f", {"a": value})]
        json.dumps(_calls(text)[0][1], allow_nan=False).encode("utf-8")


def test_json_value_problem_names_what_is_wrong() -> None:
    for value in ({1}, b"x", 1j, ..., (1,), math.nan, math.inf, "\ud800", {1: 2}, object()):
        assert json_value_problem(value) is not None
        assert json_value_problem([{"k": value}]) is not None


# ------------------------------------------------------------------ <function=NAME>{json}</function>


def test_function_tag_argument_may_contain_the_closing_tag() -> None:
    text = '<function=note>{"text": "write </function> here", "n": {"x": "}"}}</function>'
    assert _calls(text) == [("note", {"text": "write </function> here", "n": {"x": "}"}})]
    two = text + ' <function=g>{"a": [1, "</function>"]}</function>'
    assert _calls(two) == [("note", {"text": "write </function> here", "n": {"x": "}"}}),
                           ("g", {"a": [1, "</function>"]})]


def test_function_tag_missing_closing_tag_at_the_end() -> None:
    text = '<function=trending_songs>{"n": 10, "genre": "all"}'
    assert _calls(text) == [("trending_songs", {"n": 10, "genre": "all"})]
    assert _calls(text + "\n") == [("trending_songs", {"n": 10, "genre": "all"})]
    # A cut-off reply (out of tokens) is not a call; nor is a missing tag between two calls or
    # text after the arguments.
    assert parse_tool_calls(text, complete=False) is None
    assert parse_tool_calls(text + '<function=g>{"a": 1}</function>') is None
    assert parse_tool_calls(text + " and more") is None


def test_missing_closing_tag_agrees_with_meta() -> None:
    if importlib.util.find_spec("llama_models") is None:
        pytest.skip("llama-models (Meta's reference) is not installed")
    from llama_models.llama3.tool_utils import ToolUtils

    for text in ['<function=f>{"a": 1}', '<function=get_weather>{"city": "Paris", "days": [1, 2]}']:
        name, args = ToolUtils.maybe_extract_custom_tool_call(text)
        assert _calls(text) == [(name, args)]


OPENINGS = [
    "<function=",
    "<function=f>",
    '<function=f>{"a": 1}',
    '<function=f>{"a": 1}</function>',
    '<function=f>{"a": "',
    "<function=f>{",
    '{"name": "f", "parameters": ',
    "[f(a=1), ",
    'brave_search.call(query="',
]


@pytest.mark.parametrize("unit", OPENINGS)
def test_parsing_is_linear(unit: str) -> None:
    # 200,000 repetitions: a parser that rescans the text once per opening (quadratic) needs
    # hours here (8,000 openings took ~5 s, 20,000 ~30 s); a linear one needs about a second.
    text = unit * 200_000 + " x"
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(parse_tool_calls(text, python_tag=tag)
                                                            for tag in (False, True)), daemon=True)
    worker.start()
    worker.join(60)  # generous: fails (instead of hanging for hours) on a quadratic parser
    assert not worker.is_alive()
    assert len(results) == 2
    for calls in results:
        assert calls is None or [c["tool_name"] for c in calls] == [CODE_INTERPRETER]


# ------------------------------------------------------------------ the shape of a JSON call


@pytest.mark.parametrize("text", [
    '{"name": "Alice", "age": 30}',
    '{"name": "Alice"}',
    '{"name": "f", "parameters": [1, 2]}',
    '{"name": "f", "parameters": "x"}',
    '{"name": "f", "parameters": {}, "arguments": {}}',
    '{"name": "f", "parameters": {"a": 1}, "note": "hi"}',
    '{"type": "object", "name": "f", "parameters": {}}',
    '{"name": 3, "parameters": {}}',
    '{"name": "", "parameters": {}}',
    '{"name": "two words", "parameters": {}}',
    '{"name": "f", "parameters": {}} trailing',
    '{"parameters": {"a": 1}}',
])
def test_json_that_is_not_shaped_like_a_call_is_content(text: str) -> None:
    assert parse_tool_calls(text) is None


def test_json_calls() -> None:
    assert _calls('{"name": "f", "parameters": {"a": 1}}') == [("f", {"a": 1})]
    assert _calls('{"type": "function", "name": "f", "arguments": {"a": [1]}}') == [("f", {"a": [1]})]


# ------------------------------------------------------------------ format_tool_call round trip

NAMES = st.one_of(st.sampled_from(["f", "get_weather", "class", "not-ident", "a b", "x>y", "é", "1st", "_"]),
                  st.text(min_size=1, max_size=8))
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(name=NAMES, args=st.dictionaries(NAMES, VALUES, max_size=3),
       fmt=st.sampled_from(["json", "function_tag", "python_list"]))
def test_format_tool_call_parses_back_or_is_refused(name: str, args: dict, fmt: str) -> None:
    call = {"call_id": "c", "tool_name": name, "arguments": args}
    try:
        text = format_tool_call(call, fmt)
    except ToolCallError as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert isinstance(refused, LlamaError)
        assert isinstance(refused, ValueError)
        return
    tag = name in (CODE_INTERPRETER, "brave_search", "wolfram_alpha", "photogen")
    assert _calls(text, python_tag=tag) == [(name, args)]


def test_format_refuses_what_cannot_read_back() -> None:
    for name, args, fmt in [
        ("class", {"a": 1}, "python_list"),
        ("f", {"not-ident": 1}, "python_list"),
        ("f", {"lambda": 1}, "python_list"),
        ("a b", {}, "json"),
        ("x>y", {}, "function_tag"),
        ("f", {"a": {1, 2}}, "json"),
        ("f", {"a": math.nan}, "function_tag"),
        ("brave_search", {"query": 3}, "json"),
        ("brave_search", {}, "json"),
        (CODE_INTERPRETER, {"code": '{"name": "f", "parameters": {}}'}, "json"),
    ]:
        with pytest.raises(ToolCallError):
            format_tool_call({"call_id": "c", "tool_name": name, "arguments": args}, fmt)
    nested = {"call_id": "c", "tool_name": "f", "arguments": {"o": {"k": [1, {"x": None}]}}}
    assert _calls(format_tool_call(nested, "python_list")) == [("f", {"o": {"k": [1, {"x": None}]}})]


# ------------------------------------------------------------------ tool definitions


def test_missing_or_null_description_is_absent() -> None:
    for spec in ({"name": "f"}, {"name": "f", "description": None}):
        tool = ToolDefinition.from_dict({**spec, "parameters": {"a": {"type": "int", "description": None}}})
        assert tool.description == ""
        assert tool.parameters["a"].description == ""
    assert ToolDefinition("f", None).description == ""  # type: ignore[arg-type]


@pytest.mark.parametrize(("spec", "words"), [
    ({"name": "lookup", "parameters": {"type": "object", "properties": {"a": {"type": "int"}},
                                       "required": ["b"]}}, ["lookup", "'b'"]),
    ({"name": "lookup", "parameters": {"type": "object", "properties": {"a": {"type": "int"}},
                                       "required": [1]}}, ["lookup", "required"]),
    ({"name": "lookup", "parameters": {"a": {"type": "int", "default": math.nan}}},
     ["lookup", "'a'", "default"]),
    ({"name": "lookup", "description": 3}, ["lookup", "description"]),
])
def test_bad_definitions_name_the_tool(spec: dict, words: list[str]) -> None:
    with pytest.raises(ToolDefinitionError) as info:
        ToolDefinition.from_dict(spec)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_non_json_default_in_python_is_refused() -> None:
    with pytest.raises(ToolDefinitionError, match="'pick'.*'a'.*JSON"):
        ToolDefinition("pick", "d", {"a": ToolParameter("set", default={1, 2})})


def test_tools_file_with_nan_default_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tools.json"
    path.write_text('[{"name": "pick", "parameters": {"a": {"type": "float", "default": NaN}}}]')
    with pytest.raises(ValueError, match="NaN"):
        load_tool_definitions(path)
    path.write_text('[{"name": "pick", "parameters": {"type": "object", "properties": {}, '
                    '"required": ["x"]}}]')
    with pytest.raises(ValueError, match="pick.*'x'"):
        load_tool_definitions(path)


# ------------------------------------------------------------------ tool mode of llama3-chat


class _Scripted:
    """Stands in for Llama in tool mode: each chat_completion answers with the next scripted reply
    (text with special tokens), decoded by the real ChatFormat."""

    def __init__(self, tokenizer, replies: list[str]) -> None:
        from types import SimpleNamespace

        from llama3.chat_format import ChatFormat

        self.tokenizer, self.formatter = tokenizer, ChatFormat(tokenizer)
        self.model = SimpleNamespace(params=SimpleNamespace(max_seq_len=4096))
        self.replies = list(replies)

    def chat_completion(self, dialogs, **kwargs):
        reply = self.replies.pop(0) if self.replies else "Bye.<|eot_id|>"
        ids = self.tokenizer.encode(reply, bos=False, eos=False, allowed_special="all")
        return [{"generation": self.formatter.decode_assistant_message(ids)}]


HOSTILE_REPLIES = [
    '{"name": "delete_everything", "parameters": {"path": "/"}}<|eom_id|>',  # a tool not offered
    "[f(a={1, 2}), g(b=1, b=2)]<|eot_id|>",
    '<function=f>{"a": NaN}</function><|eot_id|>',
    '<|python_tag|>{"name": "x", "parameters": {"a": "\\ud800"}}<|eom_id|>',
    "<function=" * 5000 + "<|eot_id|>",
    '<function=get_weather>{"city": "Paris </function>"}<|eom_id|>',
    "[" * 500 + "<|eot_id|>",
    "<|python_tag|>import os; os.remove('/etc/passwd')<|eom_id|>",
    "",
]


def test_tool_mode_never_ends_because_of_what_the_model_wrote(llama3_tokenizer) -> None:
    import io

    from llama3.chat import ToolChatSession

    weather = ToolDefinition("get_weather", "Get the weather", {"city": ToolParameter("string")})
    for fmt in ("json", "function_tag", "python_list"):
        llama = _Scripted(llama3_tokenizer, HOSTILE_REPLIES)
        out = io.StringIO()
        session = ToolChatSession(llama, tools=[weather], builtin_tools=["code_interpreter"], tool_format=fmt,
                                  out=out, max_tool_rounds=len(HOSTILE_REPLIES) + 1)
        answers = iter(["hello"] + ["some result"] * (2 * len(HOSTILE_REPLIES)))
        session.run(lambda prompt, answers=answers: next(answers, None))
        text = out.getvalue()
        assert "[tool call (not among the tools offered): delete_everything(" in text
        assert '[tool call: get_weather({"city": "Paris </function>"})]' in text
        assert "not executed" in text
        assert text.rstrip().endswith("Bye.")
        assert llama.replies == []  # every hostile reply was answered, and the chat went on
