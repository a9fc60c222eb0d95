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
  tiktoken itself cannot, in time linear in the input (see ``Tokenizer.encode``; the splitting
  lives in :mod:`llama3.bpe`).
* A truncated or foreign ``tokenizer.model`` is refused with a message saying what is wrong
  (:func:`llama3.bpe.load_bpe_ranks`).
* ``find_tokenizer`` / ``require_tokenizer`` / ``llama_models_tokenizer`` locate the file.
"""

from __future__ import annotations

import codecs
import importlib.util
from collections.abc import Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import tiktoken

from .bpe import (
    LLAMA3_NUM_BASE_TOKENS,
    TOKENIZER_HELP,
    TokenizerFileError,
    encode_split,
    load_bpe_ranks,
    needs_split,
)

# Meta's package exports the chat format from its tokenizer module; so does this one. chat_format
# depends only on the tokenizer protocol it declares (ChatTokenizer), never on this module.
from .chat_format import ROLES, ChatFormat, Dialog, Message, Role, StopReason
from .errors import InvalidArgumentError, LlamaError

__all__ = [
    "LLAMA3_NUM_BASE_TOKENS",
    "PAT_STR",
    "ROLES",
    "SPECIAL_TOKENS",
    "STOP_TOKENS",
    "TOKENIZER_HELP",
    "ChatFormat",
    "Dialog",
    "Message",
    "Role",
    "StopReason",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerFileError",
    "TokenizerNotFoundError",
    "find_tokenizer",
    "llama_models_tokenizer",
    "load_bpe_ranks",
    "require_tokenizer",
    "special_token_ids",
]

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
# The tokens that end a generation: end of text, end of a message (a tool call follows), end of turn.
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def special_token_ids(num_base_tokens: int = LLAMA3_NUM_BASE_TOKENS) -> dict[str, int]:
    """Id of every special token: they follow the last of ``num_base_tokens`` BPE ranks, in the
    order of ``SPECIAL_TOKENS`` (Llama 3's file: ``<|begin_of_text|>`` = 128000 ... 128255)."""
    return {token: num_base_tokens + i for i, token in enumerate(SPECIAL_TOKENS)}


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
        self.special_tokens = special_token_ids(num_base_tokens)
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
        self.stop_tokens: list[int] = [self.special_tokens[token] for token in STOP_TOKENS]

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
        if needs_split(s):
            ids = encode_split(self.model, self.special_tokens, s, allowed, disallowed)
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

    # ------------------------------------------------------------------ decoding

    def decode(self, t: Sequence[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD.

        Special tokens decode to their text (e.g. ``"<|eot_id|>"``).

        Raises:
            InvalidArgumentError: (a ``ValueError``) an id is outside ``0 .. n_words - 1``.
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
            raise InvalidArgumentError(f"invalid token id {bad}; ids must be in 0..{self.n_words - 1}"
                                       ) from None

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
