"""The byte-pair-encoding layer under :class:`llama3.tokenizer.Tokenizer`: reading and checking a
tiktoken BPE file (Meta's ``tokenizer.model``), and encoding text of any length exactly as tiktoken
would encode it whole, in time linear in the input.

tiktoken's pattern engine cannot pre-tokenize a whitespace run of about a million characters
(it panics); :func:`plan_ordinary` cuts such runs out at exact piece boundaries so they can be
byte-pair encoded directly, and :func:`encode_split` / :func:`encode_ordinary_split` put the ids
back together. Nothing here knows about special-token names or the chat format.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

import tiktoken

from .errors import LlamaError
from .files import read_bytes

__all__ = [
    "HSPACE_CLASS",
    "LLAMA3_NUM_BASE_TOKENS",
    "MIN_SPLIT_RUN",
    "TOKENIZER_HELP",
    "TokenizerFileError",
    "encode_ordinary_split",
    "encode_split",
    "load_bpe_ranks",
    "needs_split",
    "plan_ordinary",
]

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
MIN_SPLIT_RUN = 100_000

# Unicode White_Space minus \r and \n: what `\s` means to both tiktoken's Rust regex and
# the `regex` module (Python's `re` would add \x1c-\x1f, hence the explicit class).
HSPACE_CLASS = "\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


class TokenizerFileError(LlamaError, ValueError):
    """The tokenizer file exists but is not a usable tiktoken BPE file (or is cut short)."""


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
_HSPACE_RUN = re.compile(f"[{HSPACE_CLASS}]+")


@functools.lru_cache(maxsize=64)
def _literal_alternation(strings: frozenset[str]) -> re.Pattern[str]:
    # Longest first, so that if one string were a prefix of another the longer wins.
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=lambda s: (-len(s), s))))


def plan_ordinary(text: str, min_run: int) -> Iterator[tuple[int, int, bool]]:
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


def needs_split(text: str) -> bool:
    """Whether ``text`` holds a whitespace run tiktoken must not see whole (see :func:`plan_ordinary`)."""
    return len(text) >= MIN_SPLIT_RUN and any(single for _, _, single in plan_ordinary(text, MIN_SPLIT_RUN))


def encode_split(encoding: tiktoken.Encoding, special_tokens: Mapping[str, int], s: str,
                 allowed: AbstractSet[str], disallowed: AbstractSet[str]) -> list[int]:
    """``encoding.encode(s, allowed_special=allowed, disallowed_special=disallowed)`` as tiktoken
    would compute it for the whole string, for any length: text between allowed special tokens
    goes through :func:`encode_ordinary_split`."""
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
    specials = frozenset(t for t in allowed if t in special_tokens)
    if not specials:
        return encode_ordinary_split(encoding, s)
    ids: list[int] = []
    pos = 0
    for m in _literal_alternation(specials).finditer(s):
        ids += encode_ordinary_split(encoding, s[pos : m.start()])
        ids.append(special_tokens[m.group()])
        pos = m.end()
    ids += encode_ordinary_split(encoding, s[pos:])
    return ids


def encode_ordinary_split(encoding: tiktoken.Encoding, text: str, min_run: int | None = None) -> list[int]:
    """``encoding.encode_ordinary(text)`` as tiktoken would compute it whole, for any length:
    whitespace runs of at least ``min_run`` (default :data:`MIN_SPLIT_RUN`) characters are
    byte-pair encoded directly, everything else by tiktoken."""
    ids: list[int] = []
    for start, end, single_piece in plan_ordinary(text, MIN_SPLIT_RUN if min_run is None else min_run):
        if single_piece:
            ids += encoding._core_bpe.encode_single_piece(text[start:end].encode("utf-8"))
        else:
            ids += encoding.encode_ordinary(text[start:end])
    return ids
