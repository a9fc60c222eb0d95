"""Tokenizer tests: Meta's reference, tiktoken encoding whole strings, and exact expectations
are the oracles. Fixtures `llama3_tokenizer`, `meta_tokenizer`, `llama3_tokenizer_path`
come from conftest.py (they need Meta's llama-models package)."""

from __future__ import annotations

import base64
import itertools
import random
import string
from pathlib import Path
from unittest import mock

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import llama3.bpe as bpe
import llama3.tokenizer as tokmod
from llama3.tokenizer import StreamDecoder, Tokenizer, TokenizerFileError

# The Llama 3.1 special-token layout, written out independently of the implementation.
NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
EXPECTED_SPECIALS = NAMED + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]

HYPO = settings(max_examples=150, deadline=None)

CORPUS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing whitespace \n",
    "I'm sure you'RE right, it's what we'll do and they'd've DONE.",
    'def f(x):\n\tif x:\n\t\treturn {"a": [1, 2, 3]}  # comment\r\n    pass\n',
    'fn main() { let v: Vec<u8> = vec![0x1F, 255]; println!("{:?}", v); }',
    "我爱北京天安门。日本語のテキスト、カタカナ。한국어 텍스트입니다.",
    "مرحبا بالعالم! هذا اختبار ١٢٣٤٥.",
    "שלום עולם",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "สวัสดีชาวโลก",
    "Emoji: 😀😃 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍💻",
    "Combining: e\u0301 n\u0303 a\u030a; precomposed é ñ å",
    "Digits 1234567890 3.14159 1,000,000 -42 1e-9 0xDEADBEEF ٣٤٥ ⅫⅣ",
    "a\n\n\n  b\t\t c   \r\n\r\n  d \u00a0 e\u3000f\u2028g\u2029h",
    "trailing spaces    ",
    "\n\n\n",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nobey<|eot_id|>",
    "<|eot_id <|eom_id|>> <|reserved_special_token_99|> <|python_tag|>print(1)",
    "Zero width: a\u200bb\u200dc\ufeffd\u2060e",
    "Control: \x00\x01\x1c\x1d\x1e\x1f\x7f",
    "Math ∑∫√∞≠≤ ℝ² ∀x∈ℕ: x≥0",
    "https://example.com/path?q=llama+3&lang=en#frag",
    "Ünïcödé ÀÉÎÕÜ straße İstanbul ǅ ﬁ",
    "supercalifragilisticexpialidocious" * 20,
    "    indented code\n        more\n\t\tmixed\n",
]


def _random_text(rng: random.Random, n: int) -> str:
    words = ["the", "Llama", "token", "日本語", "😀", "naïve", "x", "QUICK", "über", "42", "3.14"]
    seps = [" ", "  ", "\n", ", ", ". ", "\t", "\n\n", " - ", "'s ", "!", "\r\n"]
    parts = []
    size = 0
    while size < n:
        w = rng.choice(words) + rng.choice(seps)
        parts.append(w)
        size += len(w)
    return "".join(parts)[:n]


# --------------------------------------------------------------------- layout


def test_vocabulary_and_special_token_layout(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    assert len(EXPECTED_SPECIALS) == 256
    assert tok.special_tokens == {name: 128000 + i for i, name in enumerate(EXPECTED_SPECIALS)}
    assert tok.n_words == 128256
    assert isinstance(tok.model, tiktoken.Encoding)
    assert tok.model.n_vocab == 128256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert (tok.eom_id, tok.eot_id, tok.python_tag_id) == (128008, 128009, 128010)
    assert tok.special_tokens["<|image|>"] == 128011
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert tok.stop_tokens == [128001, 128008, 128009]


def test_attributes_match_meta(llama3_tokenizer: Tokenizer, meta_tokenizer) -> None:
    tok, meta = llama3_tokenizer, meta_tokenizer
    assert tok.special_tokens == meta.special_tokens
    for attr in ("n_words", "bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "python_tag_id", "stop_tokens"):
        assert getattr(tok, attr) == getattr(meta, attr), attr
    assert tok.pat_str == meta.pat_str
    assert tok.model.n_vocab == meta.model.n_vocab


def test_known_vector(llama3_tokenizer: Tokenizer) -> None:
    ids = llama3_tokenizer.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3_tokenizer.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_model_path_as_str_or_path(llama3_tokenizer_path: Path) -> None:
    for path in (str(llama3_tokenizer_path), Path(llama3_tokenizer_path)):
        tok = Tokenizer(path)
        ids = tok.encode("This is a test sentence.", bos=False, eos=False)
        assert ids == [2028, 374, 264, 1296, 11914, 13]


# --------------------------------------------------------------------- parity with Meta


@pytest.mark.parametrize("text", CORPUS)
def test_corpus_parity_with_meta(llama3_tokenizer: Tokenizer, meta_tokenizer, text: str) -> None:
    for bos, eos in itertools.product([False, True], repeat=2):
        ids = llama3_tokenizer.encode(text, bos=bos, eos=eos)
        assert ids == meta_tokenizer.encode(text, bos=bos, eos=eos)
    ids = llama3_tokenizer.encode(text, bos=False, eos=False)
    assert llama3_tokenizer.decode(ids) == meta_tokenizer.decode(ids) == text
    special = llama3_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert special == meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert llama3_tokenizer.decode(special) == text


def test_generated_text_parity_with_meta(llama3_tokenizer: Tokenizer, meta_tokenizer) -> None:
    # 20k characters: long enough to be interesting, short of Meta's 25k-character run splitting.
    text = _random_text(random.Random(1), 20_000)
    ours = llama3_tokenizer.encode(text, bos=True, eos=False)
    assert ours == meta_tokenizer.encode(text, bos=True, eos=False)


# --------------------------------------------------------------------- special tokens


def test_special_token_text_is_plain_text_by_default(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    for name in EXPECTED_SPECIALS:
        ids = tok.encode(name, bos=False, eos=False)
        assert max(ids) < 128000, name
        assert ids == tok.model.encode_ordinary(name)
        assert tok.decode(ids) == name
    assert tok.encode("<|eot_id|>", bos=False, eos=False) == [27, 91, 68, 354, 851, 91, 29]


def test_allowed_special(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    for i, name in enumerate(EXPECTED_SPECIALS):
        assert tok.encode(name, bos=False, eos=False, allowed_special="all") == [128000 + i]
    text = "a<|eot_id|>b<|eom_id|>"
    ids = tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert ids == tok.model.encode_ordinary("a") + [128009] + tok.model.encode_ordinary("b<|eom_id|>")
    assert tok.encode(text, bos=False, eos=False, allowed_special=set()) == tok.model.encode_ordinary(text)


def test_disallowed_special_raises(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    with pytest.raises(ValueError, match="eot_id"):
        tok.encode("x <|eot_id|>", bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="eom_id"):
        tok.encode("<|eom_id|>", bos=False, eos=False, disallowed_special={"<|eom_id|>"})
    # Only the listed tokens are checked; allowed ones are exempt from "all".
    assert tok.encode("<|eot_id|>", bos=False, eos=False, disallowed_special={"<|eom_id|>"}) == [
        27, 91, 68, 354, 851, 91, 29,
    ]  # fmt: skip
    eot = {"<|eot_id|>"}
    assert tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special=eot, disallowed_special="all") == [
        128009
    ]


def test_bad_arguments(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    with pytest.raises(TypeError):
        tok.encode(b"bytes", bos=False, eos=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tok.encode(None, bos=False, eos=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="allowed_special"):
        tok.encode("x", bos=False, eos=False, allowed_special="<|eot_id|>")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tok.encode("x")  # type: ignore[call-arg]


# --------------------------------------------------------------------- long inputs


def test_500k_letters_same_as_tiktoken_whole(llama3_tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    text = "".join(rng.choices(string.ascii_letters, k=500_000))
    assert llama3_tokenizer.encode(text, bos=False, eos=False) == llama3_tokenizer.model.encode_ordinary(text)


def test_500k_without_whitespace_same_as_tiktoken_whole(llama3_tokenizer: Tokenizer) -> None:
    rng = random.Random(2)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "中文😀é"
    text = "".join(rng.choices(alphabet, k=500_000))
    assert llama3_tokenizer.encode(text, bos=False, eos=False) == llama3_tokenizer.model.encode_ordinary(text)


def test_1m_mixed_text_same_as_tiktoken_whole(llama3_tokenizer: Tokenizer) -> None:
    rng = random.Random(3)
    # Long whitespace runs (below tiktoken's crash size) make encode() take its splitting path.
    text = (
        _random_text(rng, 300_000)
        + " " * 150_000
        + "word"
        + _random_text(rng, 200_000)
        + "\t \u3000" * 40_000
        + "\n"
        + " " * 110_000
        + "!"
        + _random_text(rng, 120_000)
        + " " * 100_000
    )
    assert len(text) > 1_000_000
    assert any(single for *_, single in bpe.plan_ordinary(text, bpe.MIN_SPLIT_RUN))
    assert llama3_tokenizer.encode(text, bos=False, eos=False) == llama3_tokenizer.model.encode_ordinary(text)


def test_200k_space_runs_same_as_tiktoken_whole(llama3_tokenizer: Tokenizer) -> None:
    text = (" " * 200_000 + "hello world\n") * 2 + " " * 200_000 + "42" + "\t" * 150_000
    expected = llama3_tokenizer.model.encode_ordinary(text)
    assert llama3_tokenizer.encode(text, bos=True, eos=True) == [128000] + expected + [128001]


def test_long_runs_with_special_tokens_same_as_tiktoken_whole(llama3_tokenizer: Tokenizer) -> None:
    text = "<|eot_id|>" + " " * 150_000 + "<|eom_id|>" + " " * 150_000 + "x<|python_tag|>"
    for allowed in ("all", {"<|eom_id|>"}, set()):
        expected = llama3_tokenizer.model.encode(text, allowed_special=allowed, disallowed_special=())
        assert llama3_tokenizer.encode(text, bos=False, eos=False, allowed_special=allowed) == expected
    with pytest.raises(ValueError, match="python_tag"):
        llama3_tokenizer.encode(
            text, bos=False, eos=False, allowed_special={"<|eot_id|>", "<|eom_id|>"}, disallowed_special="all"
        )


@pytest.mark.parametrize(
    "text",
    [" " * 1_000_000, "a" + "\t" * 1_000_000 + "b", "<|eot_id|>" + "\u3000" * 1_000_000 + "<|eot_id|>"],
    ids=["1M spaces", "1M tabs between letters", "1M ideographic spaces between specials"],
)
def test_million_character_whitespace_runs(llama3_tokenizer: Tokenizer, text: str) -> None:
    # tiktoken panics on these; its own Python-side reference path (regex pieces +
    # single-piece BPE) is the oracle. Specials are matched literally in that path, so
    # the allowed-special case is assembled around it.
    tok = llama3_tokenizer
    ids = tok.encode(text, bos=False, eos=False, allowed_special="all")
    if text.startswith("<|eot_id|>"):
        inner = text[len("<|eot_id|>") : -len("<|eot_id|>")]
        expected = [128009] + tok.model._encode_only_native_bpe(inner) + [128009]
    else:
        expected = tok.model._encode_only_native_bpe(text)
    assert ids == expected
    assert tok.decode(ids) == text


# Whitespace kinds for the splitting tests, with a few look-alikes that are not whitespace.
WS_CHARS = " \t\x0b\x0c\x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
NON_WS_LOOKALIKES = "\x1c\x1d\x1e\x1f\u180e\u200b\u2060\ufeff\x00"


def test_split_exhaustively_on_short_strings(llama3_tokenizer: Tokenizer) -> None:
    # With the split threshold at 1, every whitespace run is cut out; on all short strings
    # over an alphabet covering each regex branch the ids must equal tiktoken's.
    tok = llama3_tokenizer
    alphabet = [" ", "\n", "\r", "\t", "a", "7", "!", "'", "\u3000", "\x1c"]
    for n in range(1, 5):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            ids = bpe.encode_ordinary_split(tok.model, text, min_run=1)
            assert ids == tok.model.encode_ordinary(text), repr(text)


@pytest.mark.parametrize("c", list(WS_CHARS + NON_WS_LOOKALIKES))
def test_split_whitespace_class_matches_tiktoken(llama3_tokenizer: Tokenizer, c: str) -> None:
    tok = llama3_tokenizer
    templates = [
        "x{0}{0}{0}y",
        "{0}{0}{0}",
        "\n{0}{0}{0}!",
        "{0}{0} 1",
        "a {0}{0}\n",
        "'{0}{0}s",
        "é{0}{0}中",
    ]
    for template in templates:
        text = template.format(c)
        ids = bpe.encode_ordinary_split(tok.model, text, min_run=2)
        assert ids == tok.model.encode_ordinary(text), repr(text)


def test_whitespace_class_is_unicode_white_space() -> None:
    # Both tiktoken's Rust regex and the `regex` module treat \s as Unicode White_Space;
    # the splitter's class must be exactly that minus \r and \n.
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    white_space = set(regex.findall(r"\s", everything))
    ours = set(regex.findall(f"[{bpe.HSPACE_CLASS}]", everything))
    assert ours == white_space - {"\r", "\n"}


_fragment = st.one_of(
    st.sampled_from(list(WS_CHARS + NON_WS_LOOKALIKES + "\r\n")),
    st.sampled_from(list("aZé中😀7٣!.<|>_\u0301") + ["'s", "'LL"]),
    st.sampled_from(EXPECTED_SPECIALS[:12]),
    st.tuples(st.sampled_from(list(WS_CHARS + "\r\n")), st.integers(1, 30)).map(lambda t: t[0] * t[1]),
    st.text(max_size=4),
)


@HYPO
@given(
    text=st.lists(_fragment, max_size=30).map("".join),
    min_run=st.integers(1, 6),
    allowed=st.sampled_from(["all", frozenset(), frozenset({"<|eot_id|>", "<|python_tag|>"})]),
)
def test_split_path_equals_tiktoken_whole(llama3_tokenizer: Tokenizer, text: str, min_run: int, allowed):
    tok = llama3_tokenizer
    assert bpe.encode_ordinary_split(tok.model, text, min_run=min_run) == tok.model.encode_ordinary(text)
    with mock.patch.object(bpe, "MIN_SPLIT_RUN", min_run):
        ids = tok.encode(text, bos=False, eos=False, allowed_special=allowed)
    assert ids == tok.model.encode(text, allowed_special=allowed, disallowed_special=())


def test_split_path_repairs_surrogates_like_tiktoken(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    text = "a\ud83d\ude00   b\ud800    \udc00x<|eot_id|>   "
    with mock.patch.object(bpe, "MIN_SPLIT_RUN", 2):
        for allowed in ("all", set()):
            ids = tok.encode(text, bos=False, eos=False, allowed_special=allowed)
            assert ids == tok.model.encode(text, allowed_special=allowed, disallowed_special=())
    assert tok.decode(tok.encode("a\ud800b", bos=False, eos=False)) == "a\ufffdb"


# --------------------------------------------------------------------- decoding


@HYPO
@given(text=st.text())
def test_roundtrip(llama3_tokenizer: Tokenizer, text: str) -> None:
    tok = llama3_tokenizer
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.decode(tok.encode(text, bos=False, eos=False, allowed_special="all")) == text


def test_decode_invalid_ids(llama3_tokenizer: Tokenizer) -> None:
    for bad in ([128256], [1, -1], [2**40]):
        with pytest.raises(ValueError, match="invalid token id"):
            llama3_tokenizer.decode(bad)


def test_decode_accepts_tensors(llama3_tokenizer: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = [128000, 2028, 374, 264, 1296, 11914, 13]
    assert llama3_tokenizer.decode(torch.tensor(ids)) == llama3_tokenizer.decode(ids)


def test_stream_accepts_tensors(llama3_tokenizer: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    stream = StreamDecoder(llama3_tokenizer)
    assert stream.push(torch.tensor(9906)) + stream.push(torch.tensor([1917, 0])) == "Hello world!"


def test_decode_bytes_and_replacement(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    ids = tok.encode("😀", bos=False, eos=False)
    assert tok.decode_bytes(ids) == "😀".encode()
    assert len(ids) > 1  # the emoji's bytes are split over tokens
    assert tok.decode(ids[:-1]) == "\ufffd"


# --------------------------------------------------------------------- streaming


def test_stream_holds_back_partial_characters(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    ids = tok.encode("😀", bos=False, eos=False)
    stream = StreamDecoder(tok)
    outputs = [stream.push(i) for i in ids]
    assert outputs[:-1] == [""] * (len(ids) - 1)
    assert outputs[-1] == "😀"
    assert stream.pending_bytes == b""
    assert stream.flush() == ""

    assert stream.push(ids[:-1]) == ""
    assert stream.pending_bytes
    assert "😀".encode().startswith(stream.pending_bytes)
    assert stream.flush() == "\ufffd"  # the stream ended inside a character, as decode() renders it
    assert stream.push([9906]) == "Hello"  # flush resets the decoder for reuse


@HYPO
@given(text=st.text(max_size=80))
def test_stream_never_emits_broken_characters(llama3_tokenizer: Tokenizer, text: str) -> None:
    tok = llama3_tokenizer
    stream = StreamDecoder(tok)
    emitted = ""
    for token in tok.encode(text, bos=False, eos=False):
        emitted += stream.push(token)
        assert text.startswith(emitted)
    emitted += stream.flush()
    assert emitted == text


@HYPO
@given(
    ids=st.lists(st.one_of(st.integers(0, 255), st.integers(0, 128255)), max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stream_concatenates_to_decode_for_any_ids(llama3_tokenizer: Tokenizer, ids: list[int], cuts) -> None:
    # Ids 0-255 include lone bytes, so this covers invalid and truncated UTF-8.
    tok = llama3_tokenizer
    bounds = sorted({0, len(ids), *(c for c in cuts if c <= len(ids))})
    stream = StreamDecoder(tok)
    text = "".join(stream.push(ids[a:b]) for a, b in itertools.pairwise(bounds)) + stream.flush()
    assert text == tok.decode(ids)
    assert "".join(tok.decode_stream(iter(ids))) == tok.decode(ids)


# --------------------------------------------------------------------- tokenizer files


def _write_bpe(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


TINY = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"  ", b"    "]


def test_tiny_bpe_tokenizer(tmp_path: Path) -> None:
    tok = Tokenizer(_write_bpe(tmp_path / "tiny.model", TINY))
    assert tok.n_words == len(TINY) + 256
    assert tok.bos_id == len(TINY)
    assert tok.eot_id == len(TINY) + 9
    assert tok.encode("abc ab", bos=True, eos=False) == [len(TINY), 257, 32, 256]
    ids = tok.encode("xabc<|eot_id|>", bos=False, eos=False, allowed_special="all")
    assert ids == [ord("x"), 257, tok.eot_id]
    assert tok.decode(ids) == "xabc<|eot_id|>"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer(tmp_path / "nope" / "tokenizer.model")
    message = str(info.value)
    assert "nope" in message
    assert "llama-models" in message
    assert "original/tokenizer.model" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    _write_bpe(tmp_path / "tokenizer.model", TINY)
    with pytest.raises(TokenizerFileError, match="pass that file"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x07\n\x03<s>\xff", "SentencePiece"),
        (b'{"version": "1.0", "model": {"type": "BPE"}}', "tokenizer.json"),
        (b"", "empty"),
        (b"\n  \n", "empty"),
        (b"QQ== 0 extra\n", "line 1"),
        (b"QQ==\n", "line 1"),
        (b"not-base64! 0\n", "line 1"),
        (b"QQ== zero\n", "line 1"),
    ],
)
def test_not_a_bpe_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerFileError, match=reason) as info:
        Tokenizer(path)
    assert isinstance(info.value, ValueError)
    assert "llama-models" in str(info.value)


def test_inconsistent_ranks(tmp_path: Path) -> None:
    cases = {
        "repeats token": TINY + [b"ab"],
        "single bytes": TINY[1:],
    }
    for reason, tokens in cases.items():
        with pytest.raises(TokenizerFileError, match=reason):
            Tokenizer(_write_bpe(tmp_path / "t.model", tokens))
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(TINY)]
    (tmp_path / "dup.model").write_text("\n".join(lines + [f"{base64.b64encode(b'zz').decode()} 3"]))
    with pytest.raises(TokenizerFileError, match="repeats rank"):
        Tokenizer(tmp_path / "dup.model")
    (tmp_path / "gap.model").write_text("\n".join(lines + [f"{base64.b64encode(b'zz').decode()} 999"]))
    with pytest.raises(TokenizerFileError, match="exactly 0"):
        Tokenizer(tmp_path / "gap.model")


# --------------------------------------------------------------------- reliability (issue 10)


def _llama3_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("keep", [256, 5_000, 100_000, 127_999])
def test_reliability_truncated_tokenizer_file_at_line_boundary(
    llama3_tokenizer_path: Path, tmp_path: Path, keep: int
) -> None:
    # Cut at a line boundary the file is a smaller valid BPE whose special ids would shift.
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(_llama3_lines(llama3_tokenizer_path)[:keep]))
    with pytest.raises(TokenizerFileError, match="incomplete copy of the Llama 3 tokenizer.model") as info:
        Tokenizer(path)
    message = str(info.value)
    assert f"{keep:,} ranks" in message
    assert "128,000" in message
    assert "pip install --no-deps llama-models" in message


def test_reliability_truncated_tokenizer_file_inside_a_line(
    llama3_tokenizer_path: Path, tmp_path: Path
) -> None:
    data = llama3_tokenizer_path.read_bytes()
    path = tmp_path / "tokenizer.model"
    for cut in (len(data) - 3, len(data) // 2 + 1, 1_000):
        path.write_bytes(data[:cut])
        with pytest.raises(TokenizerFileError, match="get it again|cut-short|incomplete") as info:
            Tokenizer(path)
        assert "llama-models" in str(info.value)


def test_reliability_vocabulary_size_is_exposed(llama3_tokenizer: Tokenizer) -> None:
    # Llama.build compares this with the model's vocab_size.
    assert llama3_tokenizer.n_words == tokmod.LLAMA3_NUM_BASE_TOKENS + 256 == 128_256


def test_reliability_tokenizer_discovery(tmp_path: Path) -> None:
    assert tokmod.find_tokenizer(tmp_path) is None
    with pytest.raises(tokmod.TokenizerNotFoundError, match="pip install --no-deps llama-models") as info:
        tokmod.require_tokenizer(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "original").mkdir()
    _write_bpe(tmp_path / "original" / "tokenizer.model", TINY)
    assert tokmod.require_tokenizer(tmp_path) == tmp_path / "original" / "tokenizer.model"
    _write_bpe(tmp_path / "tokenizer.model", TINY)
    assert tokmod.find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"
    with pytest.raises(tokmod.TokenizerNotFoundError, match="does not exist"):
        tokmod.require_tokenizer(tmp_path, tmp_path / "other.model")


_T = bpe.MIN_SPLIT_RUN
# Run lengths just under and over the split threshold, and short ones between them.
_RUN_LENGTHS = st.sampled_from([1, 2, 3, _T - 2, _T - 1, _T, _T + 1, _T + 2])
_SEPARATORS = st.sampled_from(["x", "word", "\n", "\r\n", "!", "é", "7", "<|eot_id|>", "'s", "\u3000a"])


@settings(max_examples=12, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.text(alphabet=WS_CHARS, min_size=1, max_size=4), _RUN_LENGTHS, _SEPARATORS),
        min_size=1,
        max_size=6,
    ),
    tail=st.booleans(),
)
def test_reliability_whitespace_runs_linear_and_exact(llama3_tokenizer: Tokenizer, runs, tail) -> None:
    # Many runs of mixed whitespace kinds around the threshold: exact ids (tiktoken on the
    # whole string is the oracle; these runs are far below its crash size) in bounded time.
    # Before the fix a single 99,999-character run took over 10 s.
    import time

    text = "".join((kinds * length)[:length] + sep for kinds, length, sep in runs)
    if tail:
        text += " " * _T
    start = time.perf_counter()
    ids = llama3_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    elapsed = time.perf_counter() - start
    assert ids == llama3_tokenizer.model.encode(text, allowed_special="all")
    assert elapsed < 10.0, f"{len(text):,} characters took {elapsed:.1f} s"


def test_reliability_planner_is_linear_in_run_count() -> None:
    # Fifty runs just under and fifty just over the threshold, mixed kinds: the planner used
    # to rescan each run once per start position (fifty such runs: more than 120 s).
    import time

    text = ("a" + " \t" * (_T // 2) + "b" + "\u3000" * (_T - 1)) * 50
    start = time.perf_counter()
    plan = list(bpe.plan_ordinary(text, _T))
    elapsed = time.perf_counter() - start
    singles = [(s, e) for s, e, single in plan if single]
    assert len(singles) == 50
    assert all(e - s == _T - 1 for s, e in singles)
    assert plan[0][0] == 0
    assert plan[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    assert elapsed < 5.0, f"planning {len(text):,} characters took {elapsed:.1f} s"
