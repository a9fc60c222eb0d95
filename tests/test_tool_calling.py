"""Tool calling (issue 12). Oracles: the prompt-format documents shipped in Meta's llama-models
wheel (read here at run time, never copied into the repository), Meta's llama-models ChatFormat
and tool-call encoder, and exact expectations. Fixtures come from conftest.py."""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import date
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3.chat_format import (
    BRAVE_SEARCH,
    CODE_INTERPRETER,
    WOLFRAM_ALPHA,
    ChatFormat,
    Message,
    ToolDefinition,
    ToolParameter,
    builtin_tools_system_prompt,
    format_tool_call,
    function_tag_tools_prompt,
    json_tools_prompt,
    parse_tool_calls,
    python_list_tools_prompt,
)
from llama3.tokenizer import Tokenizer

EOT, EOM, PYTHON_TAG = 128009, 128008, 128010

# The tools of Meta's documented examples.
TRENDING_SONGS = ToolDefinition(
    "trending_songs",
    "Returns the trending songs on a Music site",
    {
        "n": ToolParameter("int", "The number of songs to return", required=True),
        "genre": ToolParameter("str", "The genre of the songs to return", required=False),
    },
)
GET_WEATHER = ToolDefinition(
    "get_weather",
    "Get weather info for places",
    {
        "city": ToolParameter("string", "The name of the city to get the weather for"),
        "metric": ToolParameter(
            "string",
            "The metric for weather. Options are: celsius, fahrenheit",
            required=False,
            default="celsius",
        ),
    },
)


# ------------------------------------------------------------------ Meta's documents


def _docs_dir(oracle_unavailable) -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        oracle_unavailable("llama_models is not installed (pip install --no-deps llama-models)")
    return Path(next(iter(spec.submodule_search_locations)))


class DocExample:
    """One 'Input Prompt Format' / 'Model Response Format' pair of a prompt-format document."""

    def __init__(self, prompt: str, response: str) -> None:
        self.prompt, self.response = prompt, response
        self.messages = re.findall(
            r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(<\|eot_id\|>|<\|eom_id\|>)", prompt, re.S
        )

    def contents(self, role: str) -> list[str]:
        return [content for r, content, _ in self.messages if r == role]


@pytest.fixture(scope="module")
def docs(oracle_unavailable) -> dict[str, list[DocExample]]:
    base = _docs_dir(oracle_unavailable)
    pattern = re.compile(
        r"##### Input Prompt Format\n```\n(.*?)\n```\n\n##### Model Response Format\n```\n(.*?)\n```", re.S
    )
    out = {}
    for version, name in (("3.1", "llama3_1/prompt_format.md"), ("3.2", "llama3_2/text_prompt_format.md")):
        path = base / name
        if not path.is_file():
            oracle_unavailable(f"{path} is missing from the llama-models wheel")
        out[version] = [DocExample(p, r) for p, r in pattern.findall(path.read_text())]
    return out


def _find(examples: list[DocExample], predicate) -> DocExample:
    found = [e for e in examples if predicate(e)]
    assert len(found) == 1, "the documents changed; update the example selection"
    return found[0]


@pytest.fixture(scope="module")
def chat(llama3_tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(llama3_tokenizer)


def test_builtin_tools_system_prompt_matches_docs(docs) -> None:
    v31, v32 = docs["3.1"], docs["3.2"]
    search = _find(v31, lambda e: e.response.startswith("<|python_tag|>brave_search"))
    expected = builtin_tools_system_prompt(
        [BRAVE_SEARCH, WOLFRAM_ALPHA], today=date(2024, 9, 21), instructions="You are a helpful assistant."
    )
    assert search.contents("system") == [expected]
    full = _find(v31, lambda e: "ipython" in [m[0] for m in e.messages])
    assert full.contents("system") == [builtin_tools_system_prompt([BRAVE_SEARCH, WOLFRAM_ALPHA])]
    code31 = _find(v31, lambda e: e.response.startswith("<|python_tag|>def"))
    assert code31.contents("system") == [builtin_tools_system_prompt([CODE_INTERPRETER])]
    code32 = _find(v32, lambda e: e.response.startswith("<|python_tag|>def"))
    assert code32.contents("system") == [
        builtin_tools_system_prompt([CODE_INTERPRETER], today="24 September 2024")
    ]


def test_json_and_function_tag_prompts_match_docs(docs) -> None:
    system = builtin_tools_system_prompt(today=date(2024, 9, 21), instructions="You are a helpful assistant.")
    as_json = _find(docs["3.1"], lambda e: e.response.startswith("<|python_tag|>{"))
    assert as_json.contents("system") == [system]
    assert as_json.contents("user")[0] == json_tools_prompt([TRENDING_SONGS])
    tagged = _find(docs["3.1"], lambda e: e.response.startswith("<function="))
    assert tagged.contents("system") == [system]
    assert tagged.contents("user")[0] == function_tag_tools_prompt([TRENDING_SONGS])


def test_python_list_prompt_matches_docs(docs) -> None:
    examples = [
        e for e in docs["3.2"] if e.contents("system") and "composing functions" in e.contents("system")[0]
    ]
    assert len(examples) == 2
    for example in examples:
        assert example.contents("system") == [python_list_tools_prompt([GET_WEATHER])]


def test_tool_definitions_from_json() -> None:
    from_schema = ToolDefinition.from_dict(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get weather info for places",
                "parameters": {
                    "type": "dict",
                    "required": ["city"],
                    "properties": {
                        "city": {
                            "type": "string",
                            "description": "The name of the city to get the weather for",
                        },
                        "metric": {
                            "type": "string",
                            "description": "The metric for weather. Options are: celsius, fahrenheit",
                            "default": "celsius",
                        },
                    },
                },
            },
        }
    )
    assert from_schema == GET_WEATHER
    simple = {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {
            "n": {"param_type": "int", "description": "The number of songs to return", "required": True},
            "genre": {
                "param_type": "str",
                "description": "The genre of the songs to return",
                "required": False,
            },
        },
    }
    assert ToolDefinition.from_dict(simple) == TRENDING_SONGS
    for bad, reason in [
        ([], "JSON object"),
        ({"description": "x"}, "name"),
        ({"name": "bad name"}, "identifier"),
        ({"name": "f", "parameters": {"a": {"description": "no type"}}}, "param_type"),
        ({"name": "f", "parameters": {"a": {"type": "int", "required": "yes"}}}, "true or false"),
    ]:
        with pytest.raises(ValueError, match=reason):
            ToolDefinition.from_dict(bad)


# ------------------------------------------------------------ parsing documented outputs


def _reply_ids(tokenizer: Tokenizer, response: str) -> list[int]:
    return tokenizer.encode(response, bos=False, eos=False, allowed_special="all")


def _calls(message: Message) -> list[tuple[str, dict]]:
    return [(c["tool_name"], c["arguments"]) for c in message["tool_calls"]]


DOC_CALLS = {
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")': (
        [(BRAVE_SEARCH, {"query": "latest price of 1oz gold"})],
        "end_of_message",
    ),
    "<|python_tag|>{": ([("trending_songs", {"n": "10", "genre": "all"})], "end_of_message"),
    "<function=trending_songs>": ([("trending_songs", {"n": 10})], "end_of_turn"),
    "[get_weather(city='San Francisco', metric='celsius'), get_weather(": (
        [
            ("get_weather", {"city": "San Francisco", "metric": "celsius"}),
            ("get_weather", {"city": "Seattle", "metric": "celsius"}),
        ],
        "end_of_turn",
    ),
    "[get_user_info(": ([("get_user_info", {"user_id": 7890, "special": "black"})], "end_of_turn"),
}


def test_documented_outputs_parse_to_documented_calls(docs, chat: ChatFormat, llama3_tokenizer) -> None:
    seen = set()
    for example in docs["3.1"] + docs["3.2"]:
        if not example.messages:
            continue  # base-model text completion
        ids = _reply_ids(llama3_tokenizer, example.response)
        message = chat.decode_assistant_message(ids)
        key = next((k for k in DOC_CALLS if example.response.startswith(k)), None)
        if key is not None:
            seen.add(key)
            assert (_calls(message), message["stop_reason"]) == DOC_CALLS[key]
            assert message["content"] == ""
        elif example.response.startswith("<|python_tag|>def is_prime"):
            code = example.response[len("<|python_tag|>") : -len("<|eom_id|>")]
            assert _calls(message) == [(CODE_INTERPRETER, {"code": code})]
            assert message["stop_reason"] == "end_of_message"
        else:
            assert message["tool_calls"] == []
            assert message["stop_reason"] == "end_of_turn"
            assert message["content"] == example.response[: -len("<|eot_id|>")]
        # The decoded message re-encodes to exactly the generated ids.
        assert chat.encode_message(message)[4:] == ids
    assert seen == set(DOC_CALLS)


def _dialog_from_doc(chat: ChatFormat, llama3_tokenizer, example: DocExample) -> list[Message]:
    dialog: list[Message] = []
    for role, content, end in example.messages:
        if role == "assistant":
            ids = _reply_ids(llama3_tokenizer, content + end)
            dialog.append(chat.decode_assistant_message(ids))
        else:
            dialog.append({"role": role, "content": content})
    return dialog


def test_documented_multi_step_prompts(docs, chat: ChatFormat, llama3_tokenizer) -> None:
    # The 3.1 built-in and 3.2 Python-list end-to-end dialogs, rebuilt from parsed history,
    # give the documented prompt (contents stripped: this project's one difference).
    for example in docs["3.1"] + docs["3.2"]:
        if "assistant" not in [m[0] for m in example.messages]:
            continue
        dialog = _dialog_from_doc(chat, llama3_tokenizer, example)
        assistant = next(m for m in dialog if m["role"] == "assistant")
        assert assistant["tool_calls"]
        assert assistant["python_tag"]
        stripped = example.prompt
        for _, content, _ in example.messages:
            stripped = stripped.replace(content, content.strip(), 1)
        expected = llama3_tokenizer.encode(stripped, bos=False, eos=False, allowed_special="all")
        assert chat.encode_dialog_prompt(dialog) == expected


# ------------------------------------------------------------ parity with Meta's ChatFormat


@pytest.fixture(scope="module")
def meta(meta_tokenizer, oracle_unavailable):
    try:
        from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall, ToolPromptFormat
        from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
        from llama_models.llama3.tool_utils import ToolUtils
    except ImportError as e:
        oracle_unavailable(f"Meta's llama-models ChatFormat needs pillow and pydantic ({e})")
    return {
        "format": MetaChatFormat(meta_tokenizer),
        "RawMessage": RawMessage,
        "ToolCall": ToolCall,
        "StopReason": StopReason,
        "BuiltinTool": BuiltinTool,
        "ToolPromptFormat": ToolPromptFormat,
        "ToolUtils": ToolUtils,
    }


def _to_meta(meta, message: Message):
    builtin = meta["BuiltinTool"]
    calls = [
        meta["ToolCall"](
            call_id=c["call_id"],
            tool_name=builtin(c["tool_name"]) if c["tool_name"] in builtin.__members__ else c["tool_name"],
            arguments=c["arguments"],
        )
        for c in message.get("tool_calls", [])
    ]
    stop = message.get("stop_reason")
    return meta["RawMessage"](
        role="tool" if message["role"] == "ipython" else message["role"],
        content=message["content"],
        tool_calls=calls,
        stop_reason=meta["StopReason"](stop) if stop else None,
    )


def _call(name: str, **arguments) -> dict:
    return {"call_id": f"id-{name}", "tool_name": name, "arguments": arguments}


MULTI_STEP = [
    # Built-in search: a call ending with eom, its result, the final answer with eot.
    [
        {"role": "system", "content": builtin_tools_system_prompt([BRAVE_SEARCH, WOLFRAM_ALPHA]).strip()},
        {"role": "user", "content": "What is the price of gold?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call(BRAVE_SEARCH, query="gold price")],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": '{"price": "2650 USD"}'},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call(WOLFRAM_ALPHA, query="2650 USD in EUR")],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": "2512 EUR"},
        {"role": "assistant", "content": "About 2650 USD (2512 EUR).", "stop_reason": "end_of_turn"},
        {"role": "user", "content": "Now compute 2**100."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call(CODE_INTERPRETER, code="print(2**100)")],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": "1267650600228229401496703205376"},
    ],
    # Custom tools: calls ending with eot (zero-shot) and eom, results, an answer.
    [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                _call("get_weather", city="Paris", metric="celsius"),
                _call("get_weather", city="Rome", days=3),
            ],
            "stop_reason": "end_of_turn",
        },
        {"role": "ipython", "content": '"21 C"'},
        {"role": "ipython", "content": '"25 C"'},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                _call("trending_songs", n=10, genre="all", live=True, ratio=0.5, tags=["a", "b"], extra=None)
            ],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": "[]"},
        {"role": "assistant", "content": "Paris 21 C, Rome 25 C; no songs."},
        {"role": "user", "content": "Thanks"},
    ],
]


@pytest.mark.parametrize("tool_format", ["json", "function_tag", "python_list"])
@pytest.mark.parametrize("dialog", MULTI_STEP, ids=["builtin", "custom"])
def test_multi_step_dialogs_match_llama_models(chat: ChatFormat, meta, dialog, tool_format) -> None:
    fmt = meta["ToolPromptFormat"](tool_format)
    raw = [_to_meta(meta, m) for m in dialog]
    assert (
        chat.encode_dialog_prompt(dialog, tool_format) == meta["format"].encode_dialog_prompt(raw, fmt).tokens
    )
    for ours, theirs in zip(dialog, raw, strict=True):
        assert chat.encode_message(ours, tool_format) == meta["format"].encode_message(theirs, fmt)[0]
        for call, meta_call in zip(ours.get("tool_calls", []), theirs.tool_calls, strict=True):
            assert format_tool_call(call, tool_format) == meta["ToolUtils"].encode_tool_call(meta_call, fmt)


@pytest.mark.parametrize(
    "text",
    [
        '<|python_tag|>brave_search.call(query="Menlo Park weather")<|eom_id|>',
        '<|python_tag|>wolfram_alpha.call(query="integral of x^2")<|eom_id|>',
        "<|python_tag|>import math\nprint(math.pi)<|eom_id|>",
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        '{"name": "brave_search", "parameters": {"q": "news"}}<|eom_id|>',
        '<function=get_weather>{"city": "Rome", "days": 3}</function><|eot_id|>',
        '[get_weather(city="Oslo", days=2, live=True)]<|eot_id|>',
        "The answer is 42.<|eot_id|>",
    ],
)
def test_decode_agrees_with_llama_models(chat: ChatFormat, meta, llama3_tokenizer, text: str) -> None:
    ids = _reply_ids(llama3_tokenizer, text)
    ours = chat.decode_assistant_message(ids)
    theirs = meta["format"].decode_assistant_message(ids, meta["StopReason"].out_of_tokens)
    assert ours["stop_reason"] == theirs.stop_reason.value
    assert ours["content"] == theirs.content
    assert _calls(ours) == [
        (c.tool_name.value if hasattr(c.tool_name, "value") else c.tool_name, c.arguments)
        for c in theirs.tool_calls
    ]


def test_python_list_returns_every_call(chat: ChatFormat, llama3_tokenizer) -> None:
    ids = _reply_ids(llama3_tokenizer, '[a(x=1), b(y="two", z=[1, 2]), c()]<|eot_id|>')
    assert _calls(chat.decode_assistant_message(ids)) == [
        ("a", {"x": 1}),
        ("b", {"y": "two", "z": [1, 2]}),
        ("c", {}),
    ]


def test_stop_reason_argument_when_ids_hold_no_stop_token(chat: ChatFormat, llama3_tokenizer) -> None:
    body = _reply_ids(llama3_tokenizer, '<|python_tag|>brave_search.call(query="x")')
    message = chat.decode_assistant_message(body, "end_of_message")
    assert message["stop_reason"] == "end_of_message"
    assert _calls(message) == [(BRAVE_SEARCH, {"query": "x"})]
    assert chat.encode_message(message)[4:] == body + [EOM]
    assert chat.decode_assistant_message(body)["stop_reason"] == "out_of_tokens"
    with pytest.raises(ValueError, match="stop_reason"):
        chat.decode_assistant_message(body, "stopped")


# ------------------------------------------------------------ malformed and partial calls

VALID_REPLIES = [
    '<|python_tag|>brave_search.call(query="latest price of gold")',
    '{"type": "function", "name": "get_weather", "parameters": {"city": "San Francisco"}}',
    '<function=trending_songs>{"n": 10, "genre": "all"}</function>',
    "[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle')]",
    "<|python_tag|>def f(n):\n    return n * 2\n\nprint(f(21))",
]


@pytest.mark.parametrize("reply", VALID_REPLIES)
def test_cut_off_calls_are_content(chat: ChatFormat, llama3_tokenizer, reply: str) -> None:
    # Every proper prefix (generation stopped at max_gen_len) is plain content, out_of_tokens.
    ids = _reply_ids(llama3_tokenizer, reply)
    for cut in range(len(ids)):
        message = chat.decode_assistant_message(ids[:cut])
        assert message["tool_calls"] == []
        assert message["stop_reason"] == "out_of_tokens"
        tagged = ids[:1] == [PYTHON_TAG]
        assert message["content"] == llama3_tokenizer.decode(ids[1:cut] if tagged else ids[:cut])
    complete = chat.decode_assistant_message(ids + [EOM])
    assert complete["tool_calls"]
    assert complete["stop_reason"] == "end_of_message"


FRAGMENTS = [
    "[",
    "]",
    "(",
    ")",
    "{",
    "}",
    ",",
    "=",
    '"',
    "'",
    ":",
    " ",
    "\n",
    "x",
    "1",
    "2.5",
    "True",
    "None",
    "f(",
    "a=",
    '"name"',
    '"parameters"',
    '"type"',
    '"function"',
    "<function=",
    "</function>",
    ">",
    "brave_search",
    "wolfram_alpha",
    ".call(",
    "query=",
    "**k",
    "lambda: 0",
    "\\",
    "[[",
    "]]",
    "1e999",
    "{'a': 1}",
    "__import__('os')",
    "é",
    "<|eot_id|>",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.sampled_from(FRAGMENTS), max_size=25),
    tagged=st.booleans(),
    stop=st.sampled_from([None, EOT, EOM]),
)
def test_malformed_outputs_never_raise(chat: ChatFormat, llama3_tokenizer, pieces, tagged, stop) -> None:
    text = "".join(pieces)
    body = llama3_tokenizer.encode(text, bos=False, eos=False)
    ids = ([PYTHON_TAG] if tagged else []) + body + ([stop] if stop else [])
    message = chat.decode_assistant_message(ids)
    assert message["role"] == "assistant"
    if message["tool_calls"]:
        assert message["content"] == ""
        assert message["tool_call_text"] == text
        assert chat.encode_message(message)[4:] == ids + ([] if stop else [EOT])
    else:
        assert message["content"] == text
    assert parse_tool_calls(text, python_tag=tagged) is not None or not message["tool_calls"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 128255), max_size=30))
def test_any_ids_decode_without_error(chat: ChatFormat, ids) -> None:
    message = chat.decode_assistant_message(ids)
    assert message["stop_reason"] in ("end_of_turn", "end_of_message", "out_of_tokens")


# ------------------------------------------------------------ round trip

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda s: s not in (BRAVE_SEARCH, WOLFRAM_ALPHA, CODE_INTERPRETER, "photogen")
)
SCALARS = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.none(),
)
ARGUMENTS = st.dictionaries(NAMES, st.one_of(SCALARS, st.lists(SCALARS, max_size=3)), max_size=4)
CUSTOM_CALL = st.builds(lambda n, a: {"call_id": "c", "tool_name": n, "arguments": a}, NAMES, ARGUMENTS)
BUILTIN_CALL = st.one_of(
    st.builds(
        lambda n, q: {"call_id": "c", "tool_name": n, "arguments": {"query": q}},
        st.sampled_from([BRAVE_SEARCH, WOLFRAM_ALPHA]),
        st.text(max_size=20),
    ),
    st.builds(
        lambda code: {"call_id": "c", "tool_name": CODE_INTERPRETER, "arguments": {"code": code}},
        st.sampled_from(["print(1)", "import math\nprint(math.sqrt(2))", "x = [1, 2]\nprint(sum(x))"]),
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    call=st.one_of(CUSTOM_CALL, BUILTIN_CALL),
    tool_format=st.sampled_from(["json", "function_tag", "python_list"]),
    stop=st.sampled_from(["end_of_turn", "end_of_message"]),
)
def test_round_trip_keeps_calls(chat: ChatFormat, call, tool_format, stop) -> None:
    message: Message = {"role": "assistant", "content": "", "tool_calls": [call], "stop_reason": stop}
    ids = chat.encode_message(message, tool_format)
    decoded = chat.decode_assistant_message(ids[4:])
    assert _calls(decoded) == _calls(message)
    assert decoded["stop_reason"] == stop
    assert chat.encode_message(decoded, tool_format) == ids


def test_encode_validates_tool_calls(chat: ChatFormat) -> None:
    base = {"role": "assistant", "content": ""}
    with pytest.raises(TypeError, match="list of tool calls"):
        chat.encode_message({**base, "tool_calls": {"tool_name": "f"}})
    with pytest.raises(ValueError, match="tool_name"):
        chat.encode_message({**base, "tool_calls": [{"arguments": {}}]})
    with pytest.raises(ValueError, match="code"):
        chat.encode_message({**base, "tool_calls": [_call(CODE_INTERPRETER)]})
    with pytest.raises(ValueError, match="stop_reason"):
        chat.encode_message({**base, "stop_reason": "done"})
    with pytest.raises(ValueError, match="tool_prompt_format"):
        chat.encode_message({**base, "tool_calls": [_call("f", a=1)]}, "xml")  # type: ignore[arg-type]


def test_edited_call_is_encoded_from_its_arguments(chat: ChatFormat, llama3_tokenizer) -> None:
    # tool_call_text is only used while it still says what tool_calls say.
    ids = _reply_ids(llama3_tokenizer, '{"name": "f", "parameters": {"a": 1}}<|eom_id|>')
    message = chat.decode_assistant_message(ids)
    assert chat.encode_message(message)[4:] == ids
    message["tool_calls"][0]["arguments"] = {"a": 2}
    expected = llama3_tokenizer.encode(
        json.dumps({"type": "function", "name": "f", "parameters": {"a": 2}}), bos=False, eos=False
    )
    assert chat.encode_message(message)[4:] == expected + [EOM]


# ------------------------------------------------------------ llama3-chat tool mode


class ScriptedLlama:
    """Stands in for Llama: chat_completion answers with the next scripted reply (text with
    special tokens), decoded as generation would, and records every dialog it was given."""

    def __init__(self, tokenizer: Tokenizer, replies: list[str], plain: bool = False) -> None:
        from types import SimpleNamespace

        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self.model = SimpleNamespace(params=SimpleNamespace(max_seq_len=4096))
        self.replies = list(replies)
        self.plain = plain  # reply like the pre-tool-calling generation: {"role", "content"} only
        self.dialogs: list[list[Message]] = []

    def chat_completion(self, dialogs, temperature=0.6, top_p=0.9, max_gen_len=None):
        self.dialogs.append([dict(m) for m in dialogs[0]])
        ids = self.tokenizer.encode(self.replies.pop(0), bos=False, eos=False, allowed_special="all")
        if self.plain:
            stop = next((i for i, t in enumerate(ids) if t in (EOT, EOM)), len(ids))
            return [{"generation": {"role": "assistant", "content": self.tokenizer.decode(ids[:stop])}}]
        return [{"generation": self.formatter.decode_assistant_message(ids)}]


class _Lines:
    """Scripted input: ``read_line(prompt)`` returns the next item (None at the end) and keeps
    the prompts it was shown."""

    def __init__(self, *items: str) -> None:
        self.items = iter(items)
        self.prompts: list[str] = []

    def __call__(self, prompt: str = "") -> str | None:
        self.prompts.append(prompt)
        return next(self.items, None)


@pytest.mark.parametrize("plain", [False, True], ids=["dict-reply", "content-only-reply"])
def test_chat_tool_mode_scripted(llama3_tokenizer, tmp_path: Path, plain: bool) -> None:
    import io

    from llama3.chat import ToolChatSession

    llama = ScriptedLlama(
        llama3_tokenizer,
        [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
            "It is 21 C and sunny in Paris.<|eot_id|>",
        ],
        plain=plain,
    )
    out = io.StringIO()
    session = ToolChatSession(
        llama,
        tools=[GET_WEATHER],
        builtin_tools=[BRAVE_SEARCH],
        today=date(2024, 9, 21),
        out=out,
        system_prompt="Be brief.",
    )
    lines = _Lines("Weather in Paris?", '{"temperature": "21 C", "sky": "sunny"}', "/exit")
    session.run(lines)
    text = out.getvalue()
    assert '[tool call: get_weather({"city": "Paris"})]' in text
    assert lines.prompts[1].startswith("result of get_weather")
    assert text.endswith("It is 21 C and sunny in Paris.\n")
    system = llama.dialogs[0][0]
    assert system["role"] == "system"
    assert system["content"].startswith(
        "Environment: ipython\nTools: brave_search\nCutting Knowledge Date: December 2023\n"
        "Today Date: 21 September 2024\n\n" + json_tools_prompt([GET_WEATHER])
    )
    assert system["content"].endswith("\n\nBe brief.")
    second = llama.dialogs[1]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "ipython"]
    assert _calls(second[2]) == [("get_weather", {"city": "Paris"})]
    assert second[3]["content"] == '{"temperature": "21 C", "sky": "sunny"}'
    if not plain:  # a content-only reply cannot say it ended with <|eom_id|>
        # The history re-encodes the call exactly as generated, ending with <|eom_id|>.
        assert second[2]["stop_reason"] == "end_of_message"
        call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
        call_ids = llama3_tokenizer.encode(call, bos=False, eos=False)
        prompt = llama.formatter.encode_dialog_prompt(second)
        assert _contains(prompt, [78191, 128007, 271] + call_ids + [EOM])
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "ipython", "assistant"]


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_chat_tool_mode_never_runs_code_and_skip(llama3_tokenizer, tmp_path: Path) -> None:
    import io

    from llama3.chat import ToolChatSession

    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')"
    llama = ScriptedLlama(llama3_tokenizer, [f"<|python_tag|>{code}<|eom_id|>", "Fine.<|eot_id|>"])
    out = io.StringIO()
    session = ToolChatSession(llama, builtin_tools=[CODE_INTERPRETER], out=out)
    session.run(_Lines("Write a file", "/skip", "Thanks", "/exit"))
    assert not marker.exists()
    text = out.getvalue()
    assert "not executed" in text
    assert code in text
    assert "left unanswered" in text
    assert text.endswith("Fine.\n")
    assert [m["role"] for m in llama.dialogs[1]] == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize(
    ("flags", "content", "message"),
    [
        (["--builtin-tools", "bing"], None, "unknown built-in tool"),
        (["--tools", "{tmp}/missing.json"], None, "does not exist"),
        (["--tools", "{tmp}/tools.json"], '[{"name": 3}]', "tool 0"),
        (["--tools", "{tmp}/tools.json"], "not json", "not readable JSON"),
    ],
)
def test_chat_tool_flags_rejected_before_loading(tmp_path: Path, capsys, flags, content, message) -> None:
    from llama3.chat import main

    if content is not None:
        (tmp_path / "tools.json").write_text(content)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    # The checkpoint does not exist: a flag error must be reported before any loading.
    assert main([str(tmp_path / "no-checkpoint"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


# ------------------------------------------------------------ scripts/example_tool_calling.py


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "example_tool_calling", Path(__file__).resolve().parents[1] / "scripts" / "example_tool_calling.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool_format", ["json", "function_tag", "python_list"])
def test_example_script_flow(llama3_tokenizer, monkeypatch, capsys, tmp_path, tool_format) -> None:
    example = _load_example()
    call = format_tool_call(
        {"call_id": "1", "tool_name": "get_weather", "arguments": {"city": "Paris"}}, tool_format
    )
    llama = ScriptedLlama(llama3_tokenizer, [call + "<|eot_id|>", "Sunny, 21 C.<|eot_id|>"])
    monkeypatch.setattr("llama3.generation.Llama.build", lambda *a, **k: llama)
    example.main(str(tmp_path), tool_format=tool_format)
    out = capsys.readouterr().out
    assert 'assistant calls get_weather with {"city": "Paris"}' in out
    assert '"temperature": 21' in out
    assert out.rstrip().endswith("Sunny, 21 C.")
    roles = [m["role"] for m in llama.dialogs[1]]
    assert roles[-3:] == ["user", "assistant", "ipython"]
    assert json.loads(llama.dialogs[1][-1]["content"])["city"] == "Paris"


def test_example_script_on_random_checkpoint(generation_checkpoint, capsys) -> None:
    # A random model will not call the tool; the script must still run to the end.
    example = _load_example()
    example.main(str(generation_checkpoint), max_gen_len=4, max_seq_len=1024)
    assert "--- assistant" in capsys.readouterr().out


def test_example_script_rejects_unknown_flags(capsys) -> None:
    example = _load_example()
    # Refused before anything runs: exit 2, one line naming the flag.
    assert example.fire_strict(example.main, ["/ckpt", "--max_gen_lenn", "3"], prog="x") == 2
    err = capsys.readouterr().err
    assert "--max_gen_lenn" in err
    assert err.count("\n") == 1
    # Known flags in either spelling get past the flag check (then the missing /ckpt is the error).
    flags = ["/ckpt", "--max-gen-len=3", "--tool_format", "json"]
    assert example.fire_strict(example.main, flags, prog="x") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": <|eom_id|>', None),
        ("<|python_tag|><function=f>{'a': 1}</function><|eom_id|>", None),
        ('<|python_tag|>brave_search.call(query="unterminated)<|eom_id|>', None),
        ("<|python_tag|>[f(a=1), g(b=<|eom_id|>", None),
        ("<|python_tag|>[print(i) for i in range(3)]<|eom_id|>", "[print(i) for i in range(3)]"),
        ('<|python_tag|>{"a": 1}.get("a")<|eom_id|>', '{"a": 1}.get("a")'),
    ],
)
def test_broken_tagged_calls_are_content_not_code(
    chat: ChatFormat, llama3_tokenizer, reply, expected
) -> None:
    # Broken JSON / call text after the python tag is not a program; valid Python still is.
    message = chat.decode_assistant_message(_reply_ids(llama3_tokenizer, reply))
    assert message["stop_reason"] == "end_of_message"
    assert message["python_tag"] is True
    if expected is None:
        assert (
            message["tool_calls"] == []
        )
        assert (
            message["content"] == reply[len("<|python_tag|>") : -len("<|eom_id|>")]
        )
    else:
        assert _calls(message) == [(CODE_INTERPRETER, {"code": expected})]


def test_chat_main_tool_mode_on_scripted_stdin(llama3_tokenizer, tmp_path: Path, monkeypatch, capsys) -> None:
    import io

    from llama3 import chat

    (tmp_path / "tools.json").write_text(json.dumps([GET_WEATHER_SPEC]))
    llama = ScriptedLlama(
        llama3_tokenizer,
        ['[get_weather(city="Oslo"), get_weather(city="Rome")]<|eot_id|>', "Cold; warm.<|eot_id|>"],
    )
    monkeypatch.setattr("llama3.generation.Llama.build", lambda *a, **k: llama)
    monkeypatch.setattr("sys.stdin", io.StringIO("Oslo and Rome?\n-3 C\n25 C\n"))
    flags = [
        "--tools",
        str(tmp_path / "tools.json"),
        "--builtin-tools",
        "wolfram_alpha",
        "--tool-format",
        "python_list",
    ]
    assert chat.main([str(tmp_path), *flags]) == 0
    out = capsys.readouterr().out
    assert (
        '[tool call: get_weather({"city": "Oslo"})]' in out
    )
    assert (
        '[tool call: get_weather({"city": "Rome"})]' in out
    )
    assert out.endswith("Cold; warm.\n")
    system = llama.dialogs[0][0]["content"]
    assert system.startswith("Environment: ipython\nTools: wolfram_alpha\n")
    assert python_list_tools_prompt([GET_WEATHER]) in system
    assert [(m["role"], m["content"]) for m in llama.dialogs[1][-2:]] == [
        ("ipython", "-3 C"),
        ("ipython", "25 C"),
    ]


GET_WEATHER_SPEC = {
    "name": "get_weather",
    "description": "Get weather info for places",
    "parameters": {
        "city": {"type": "string", "description": "The name of the city to get the weather for"},
        "metric": {
            "type": "string",
            "description": "The metric for weather. Options are: celsius, fahrenheit",
            "required": False,
            "default": "celsius",
        },
    },
}
