"""Llama 3 tokenizer, and where to find its ``tokenizer.model``.

The tokenizer is a tiktoken byte-level BPE built from Meta's ``tokenizer.model``
(128,000 ranks) plus the 256 special tokens of the Llama 3.1 layout. Its output is
meant to be identical, id for id, to Meta's reference implementation, and its public
API mirrors Meta's so that code written against Meta's ``llama`` package ports without
changes. The chat format lives in :mod:`llama3.chat_format`; ``ChatFormat``, ``Message``,
``Dialog`` and ``Role`` can still be imported from here, as in Meta's package.

Additions over the reference:

* ``StreamDecoder`` / ``Tokenizer.decode_stream`` turn a stream of ids into text
  without ever emitting half of a multi-byte UTF-8 character.
* Very long inputs are encoded exactly as tiktoken would encode them whole, even where
  tiktoken itself cannot, in time linear in the input (see ``Tokenizer.encode``).
* A truncated or foreign ``tokenizer.model`` is refused with a message saying what is wrong.
* ``find_tokenizer`` / ``require_tokenizer`` / ``llama_models_tokenizer`` locate the file.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import importlib.util
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

import tiktoken

from .errors import LlamaError
from .files import read_bytes

__all__ = [
    "LLAMA3_NUM_BASE_TOKENS",
    "TOKENIZER_HELP",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerFileError",
    "TokenizerNotFoundError",
    "find_tokenizer",
    "llama_models_tokenizer",
    "load_bpe_ranks",
    "require_tokenizer",
]

# Names that moved to llama3.chat_format; importable from here as in Meta's package
# (resolved lazily: chat_format imports this module).
_CHAT_FORMAT_NAMES = frozenset({"ChatFormat", "Dialog", "Message", "Role", "StopReason", "ROLES"})


def __getattr__(name: str) -> Any:
    if name in _CHAT_FORMAT_NAMES:
        from . import chat_format

        return getattr(chat_format, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Meta's pre-tokenizer pattern; it must stay byte-for-byte identical for the ids to match.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_NAMED_SPECIAL_TOKENS = (
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
)
NUM_SPECIAL_TOKENS = 256
SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)

# The one text saying where the tokenizer file comes from.
TOKENIZER_HELP = (
    "The Llama 3 tokenizer.model comes with Meta's weights download (in a Hugging Face model repo, "
    "e.g. meta-llama/Llama-3.1-8B-Instruct, it is original/tokenizer.model), or run "
    "`pip install --no-deps llama-models`, which ships it as "
    "<site-packages>/llama_models/llama3/tokenizer.model."
)

# Meta's Llama 3 file: 128,000 ranks. Its first 256 tokens (in rank order) have this
# fingerprint, which tells a cut-short copy of it from a genuinely different vocabulary.
LLAMA3_NUM_BASE_TOKENS = 128_000
_LLAMA3_HEAD_SHA256 = "e3f664cdc34b1341932cd4aea21c3f052ff7c759bfeac8b5830c5992be912c99"


# tiktoken's pattern engine (fancy-regex) evaluates the `\s+(?!\S)` branch with a
# backtracking VM whose stack is capped at ~1M entries, so a whitespace run without
# \r/\n of about a million characters makes tiktoken panic (PanicException: StackOverflow).
# Runs at least this long are cut out and byte-pair encoded directly; anything shorter
# goes to tiktoken untouched. Well below the cap so other tiktoken versions have headroom.
_MIN_SPLIT_RUN = 100_000

# Unicode White_Space minus \r and \n: what `\s` means to both tiktoken's Rust regex and
# the `regex` module (Python's `re` would add \x1c-\x1f, hence the explicit class).
_HSPACE_CLASS = "\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


class TokenizerFileError(LlamaError, ValueError):
    """The tokenizer file exists but is not a usable tiktoken BPE file (or is cut short)."""


class TokenizerNotFoundError(LlamaError, FileNotFoundError):
    """No tokenizer.model where one was expected."""


def find_tokenizer(ckpt_dir: str | Path) -> Path | None:
    """``ckpt_dir/tokenizer.model`` or ``ckpt_dir/original/tokenizer.model``, whichever exists."""
    root = Path(ckpt_dir).expanduser()
    for candidate in (root / "tokenizer.model", root / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def require_tokenizer(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``tokenizer_path`` if given (it must exist), else :func:`find_tokenizer` of ``ckpt_dir``.

    Raises:
        TokenizerNotFoundError: (a ``FileNotFoundError``) no file; the message says where to get it.
    """
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        if path.is_file():
            return path
        raise TokenizerNotFoundError(f"tokenizer file {path} does not exist. {TOKENIZER_HELP}")
    found = find_tokenizer(ckpt_dir)
    if found is None:
        raise TokenizerNotFoundError(
            f"no tokenizer.model in {ckpt_dir} or {Path(ckpt_dir) / 'original'}. {TOKENIZER_HELP}"
        )
    return found


def llama_models_tokenizer() -> Path | None:
    """The tokenizer.model inside an installed ``llama-models`` wheel, if there is one."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    return None


def _parse_bpe_line(line: str) -> tuple[bytes, int]:
    fields = line.split()
    if len(fields) != 2:
        raise ValueError(line)
    try:
        return base64.b64decode(fields[0], validate=True), int(fields[1])
    except binascii.Error:
        raise ValueError(line) from None


def _head_fingerprint(ranks: dict[bytes, int], n: int = 256) -> str:
    """SHA-256 over the first ``n`` tokens in rank order (length-prefixed)."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])[:n]
    digest = hashlib.sha256()
    for token, _ in by_rank:
        digest.update(len(token).to_bytes(4, "little") + token)
    return digest.hexdigest()


def load_bpe_ranks(model_path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (lines of ``base64(token) rank``) into ``{token_bytes: rank}``.

    Unlike tiktoken's loader this validates what byte-level BPE relies on: ranks are
    exactly ``0..n-1`` without duplicates and every single byte is a token.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        TokenizerFileError: the file is not a valid tiktoken BPE file.
    """
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"Tokenizer file not found: {str(path)!r}. {TOKENIZER_HELP}")
    if path.is_dir():
        hint = (
            " It contains a tokenizer.model; pass that file." if (path / "tokenizer.model").is_file() else ""
        )
        raise TokenizerFileError(
            f"{str(path)!r} is a directory, not a tokenizer file.{hint} {TOKENIZER_HELP}"
        )

    def bad(reason: str) -> TokenizerFileError:
        return TokenizerFileError(f"{str(path)!r} is not a tiktoken BPE file: {reason}. {TOKENIZER_HELP}")

    data = read_bytes(path, "tokenizer file")  # a pipe or device is refused, not read forever
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        # The classic mix-up is Llama 2's tokenizer.model, a SentencePiece protobuf.
        raise bad("it is binary (a SentencePiece model such as Llama 2's tokenizer.model?)") from None
    if text.lstrip().startswith("{"):
        raise bad("it looks like JSON (a Hugging Face tokenizer.json?)")

    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    lines = text.splitlines()
    cut_short = bool(lines) and not text.endswith("\n")

    def bad_line(lineno: int, reason: str) -> TokenizerFileError:
        if cut_short and lineno == len(lines):
            # A file cut in the middle of a line (an interrupted download or copy) fails on
            # its last line in one of many ways; say what happened rather than what broke.
            return TokenizerFileError(
                f"{str(path)!r} ends in the middle of a line ({reason}): it is an incomplete "
                f"(cut-short) file; get it again. {TOKENIZER_HELP}"
            )
        return bad(reason)

    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token, rank = _parse_bpe_line(line)
        except ValueError:
            reason = f"line {lineno} should be 'base64-token rank', got {line[:80]!r}"
            raise bad_line(lineno, reason) from None
        if token in ranks:
            raise bad_line(lineno, f"line {lineno} repeats token {token!r}")
        if rank in seen_ranks:
            raise bad_line(lineno, f"line {lineno} repeats rank {rank}")
        ranks[token] = rank
        seen_ranks.add(rank)

    if not ranks:
        raise bad("it is empty")
    truncated = (
        f"{str(path)!r} looks like an incomplete copy of the Llama 3 tokenizer.model "
        f"(a cut-short download or copy?): get the file again. {TOKENIZER_HELP}"
    )
    # Special-token ids are appended after the last rank, so gaps would make them collide.
    if min(seen_ranks) != 0 or max(seen_ranks) != len(ranks) - 1:
        raise TokenizerFileError(
            f"{str(path)!r} is not a usable tiktoken BPE file: its {len(ranks)} ranks must be exactly "
            f"0..{len(ranks) - 1} (a file cut in the middle of a line ends this way; if it is Meta's "
            f"Llama 3 file, get it again). {TOKENIZER_HELP}"
        )
    looks_like_llama3 = len(ranks) >= 256 and _head_fingerprint(ranks) == _LLAMA3_HEAD_SHA256
    if looks_like_llama3 and len(ranks) != LLAMA3_NUM_BASE_TOKENS:
        raise TokenizerFileError(
            f"{truncated} It has {len(ranks):,} ranks; the Llama 3 file has {LLAMA3_NUM_BASE_TOKENS:,}, "
            "and with fewer every special token id would shift."
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise bad(
            f"{len(missing)} of the 256 single bytes are not tokens (first: {bytes([missing[0]])!r}); "
            "a cut-short file ends this way"
        )
    return ranks


# Maximal runs of horizontal whitespace. Matching whole runs (then filtering by length)
# keeps the scan linear: a pattern like `[ ]{100000,}` would restart inside every run
# shorter than the threshold, once per start position (quadratic in the run length).
_HSPACE_RUN = re.compile(f"[{_HSPACE_CLASS}]+")


@functools.lru_cache(maxsize=64)
def _literal_alternation(strings: frozenset[str]) -> re.Pattern[str]:
    # Longest first, so that if one string were a prefix of another the longer wins.
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=lambda s: (-len(s), s))))


def _plan_ordinary(text: str, min_run: int) -> Iterator[tuple[int, int, bool]]:
    """Cut ``text`` into spans that encode independently to exactly the ids of the whole.

    Yields ``(start, end, single_piece)``: spans with ``single_piece`` false go through
    tiktoken's normal path; true ones are exactly one pre-tokenizer piece and must be
    byte-pair encoded without the regex (they are the runs tiktoken would choke on).

    Why the cuts are exact: tiktoken's regex pieces are disjoint and cover the text,
    and with no lookbehind in the pattern, encoding the text on either side of a piece
    boundary separately reproduces the same pieces. For a maximal run of whitespace
    without \\r/\\n spanning [a, b) that is not followed by \\r/\\n:

    * ``a`` is a boundary: no piece that ends in a non-space reaches into whitespace
      except via ``[\\r\\n]*``, and a newline piece before ``a`` cannot extend past it
      because the run contains no newline to end on.
    * From ``a`` only ``\\s+(?!\\S)`` can match (``\\s*[\\r\\n]+`` finds no newline); it takes
      the run up to one character before a following non-space, or all of it at the end.

    These facts only depend on what counts as whitespace, which is stable across
    Unicode versions, unlike letter/number classes where tiktoken's Rust tables and
    the ``regex`` module disagree on recently assigned characters. A long run followed
    by \\r/\\n is left alone: it belongs to a ``\\s*[\\r\\n]+`` piece, which tiktoken matches
    without the capped backtracking stack.
    """
    pos = 0
    n = len(text)
    if n < min_run:
        if n:
            yield 0, n, False
        return
    for m in _HSPACE_RUN.finditer(text):
        start, end = m.span()
        if end - start < min_run or (end < n and text[end] in "\r\n"):
            continue
        if end < n:
            end -= 1  # the last space joins the next piece (" word") or stands alone
            if end == start:
                continue
        if pos < start:
            yield pos, start, False
        yield start, end, True
        pos = end
    if pos < n:
        yield pos, n, False


class Tokenizer:
    """Llama 3 tokenizer: tiktoken BPE with Meta's pre-tokenizer and special tokens.

    Args:
        model_path: path (``str`` or ``Path``) to Meta's ``tokenizer.model``, a tiktoken
            BPE file with 128,000 ranks. Special tokens take the ids right after the
            last rank (128000-128255 for Llama 3).

    Raises:
        FileNotFoundError: the file does not exist.
        TokenizerFileError: (a ``ValueError``) the file is not a tiktoken BPE file.
    """

    special_tokens: dict[str, int]
    num_reserved_special_tokens = NUM_SPECIAL_TOKENS
    pat_str = PAT_STR

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        mergeable_ranks = load_bpe_ranks(path)
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens = {token: num_base_tokens + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._special_set = frozenset(self.special_tokens)
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = num_base_tokens + len(SPECIAL_TOKENS)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]

    def __repr__(self) -> str:
        return f"Tokenizer({self.model.name!r}, n_words={self.n_words})"

    # ------------------------------------------------------------------ encoding

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | AbstractSet[str] | None = None,
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Encode ``s`` into token ids.

        Args:
            s: the text.
            bos: prepend ``<|begin_of_text|>``.
            eos: append ``<|end_of_text|>``.
            allowed_special: special tokens whose text in ``s`` becomes the special token
                (``"all"`` or a set). By default none: the text ``<|eot_id|>`` inside
                ``s`` is encoded as ordinary text, so content cannot forge control tokens.
            disallowed_special: special tokens whose text in ``s`` raises ``ValueError``
                (``"all"`` = every special token not allowed). Same semantics as tiktoken.

        Inputs of any length are supported and give the ids tiktoken would give for
        the whole string: whitespace runs long enough to crash tiktoken are cut out
        at exact piece boundaries and byte-pair encoded directly.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() expects a str, got {type(s).__name__}")
        allowed, disallowed = self._resolve_special(allowed_special, disallowed_special)
        if len(s) >= _MIN_SPLIT_RUN and any(single for _, _, single in _plan_ordinary(s, _MIN_SPLIT_RUN)):
            ids = self._encode_long(s, allowed, disallowed)
        else:
            ids = self.model.encode(s, allowed_special=allowed, disallowed_special=disallowed)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _resolve_special(
        self,
        allowed_special: Literal["all"] | AbstractSet[str] | None,
        disallowed_special: Literal["all"] | Collection[str],
    ) -> tuple[frozenset[str], frozenset[str]]:
        # A bare string would otherwise be taken as a set of characters.
        if isinstance(allowed_special, str) and allowed_special != "all":
            raise TypeError(f"allowed_special must be 'all' or a set of strings, got {allowed_special!r}")
        if isinstance(disallowed_special, str) and disallowed_special != "all":
            raise TypeError(f"disallowed_special must be 'all' or a collection, got {disallowed_special!r}")
        if allowed_special is None:
            allowed: frozenset[str] = frozenset()
        elif allowed_special == "all":
            allowed = self._special_set
        else:
            allowed = frozenset(allowed_special)
        if disallowed_special == "all":
            disallowed = self._special_set - allowed
        else:
            disallowed = frozenset(disallowed_special)
        return allowed, disallowed

    def _encode_long(self, s: str, allowed: frozenset[str], disallowed: frozenset[str]) -> list[int]:
        if disallowed and (m := _literal_alternation(disallowed).search(s)):
            raise ValueError(
                f"Encountered text corresponding to disallowed special token {m.group()!r}; pass it in "
                "allowed_special to encode it as a special token, or leave it out of disallowed_special "
                "to encode it as text."
            )
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            # Same repair tiktoken applies: join split surrogate pairs, replace lone ones.
            s = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        # tiktoken encodes the text between allowed special tokens as separate strings,
        # so each segment is a text of its own for the pre-tokenizer as well.
        specials = frozenset(t for t in allowed if t in self.special_tokens)
        if not specials:
            return self._encode_ordinary_split(s)
        ids: list[int] = []
        pos = 0
        for m in _literal_alternation(specials).finditer(s):
            ids += self._encode_ordinary_split(s[pos : m.start()])
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        ids += self._encode_ordinary_split(s[pos:])
        return ids

    def _encode_ordinary_split(self, text: str, min_run: int | None = None) -> list[int]:
        """``encode_ordinary(text)`` as tiktoken would compute it whole, for any length."""
        ids: list[int] = []
        for start, end, single_piece in _plan_ordinary(text, _MIN_SPLIT_RUN if min_run is None else min_run):
            if single_piece:
                ids += self.model._core_bpe.encode_single_piece(text[start:end].encode("utf-8"))
            else:
                ids += self.model.encode_ordinary(text[start:end])
        return ids

    # ------------------------------------------------------------------ decoding

    def decode(self, t: Sequence[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD.

        Special tokens decode to their text (e.g. ``"<|eot_id|>"``).

        Raises:
            ValueError: an id is outside ``0 .. n_words - 1``.
        """
        return self.decode_bytes(t).decode("utf-8", errors="replace")

    def decode_bytes(self, t: Sequence[int]) -> bytes:
        """Decode ids to the raw bytes they stand for (special tokens as their text)."""
        ids = t.tolist() if hasattr(t, "tolist") else t  # torch / numpy arrays
        if isinstance(ids, int):
            raise TypeError("expected a sequence of token ids, got a single int")
        ids = list(ids)
        try:
            return self.model.decode_bytes(ids)
        except (KeyError, OverflowError):
            bad = next((i for i in ids if isinstance(i, int) and not 0 <= i < self.n_words), None)
            raise ValueError(f"invalid token id {bad}; ids must be in 0..{self.n_words - 1}") from None

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Decode an iterable of ids lazily, yielding text as soon as it is complete.

        Never yields part of a multi-byte character; the concatenation of everything
        yielded equals ``decode(list(ids))``. Empty strings are not yielded.
        """
        decoder = StreamDecoder(self)
        for token in ids:
            if text := decoder.push(token):
                yield text
        if text := decoder.flush():
            yield text


class StreamDecoder:
    """Incremental decoding for streaming generation.

    Feed new ids with :meth:`push` as they are generated; it returns only the text
    they complete. Bytes of a UTF-8 character split across tokens (emoji, CJK and
    the like are often split) are held back until the character is complete. Call
    :meth:`flush` at the end of the stream: held-back bytes that never completed a
    character come out as U+FFFD, exactly as :meth:`Tokenizer.decode` would render them.

    Invariant: ``"".join(push(chunk) for chunk in chunks) + flush()`` equals
    ``tokenizer.decode(all ids)`` however the ids are chunked.

    Example::

        stream = StreamDecoder(tokenizer)
        for token in generated_ids:
            print(stream.push(token), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # Python's incremental UTF-8 decoder already holds back incomplete sequences and,
        # with errors="replace", produces the same text as a one-shot decode.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Add one id or several (only the new ones) and return the newly completed text."""
        if hasattr(ids, "tolist"):  # torch / numpy scalars and arrays
            ids = ids.tolist()
        chunk = [ids] if isinstance(ids, int) else ids
        return self._decoder.decode(self.tokenizer.decode_bytes(chunk), final=False)

    def flush(self) -> str:
        """End the stream: return any held-back bytes (as U+FFFD) and reset for reuse."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending_bytes(self) -> bytes:
        """Bytes received but not yet returned because their character is incomplete."""
        return self._decoder.getstate()[0]
