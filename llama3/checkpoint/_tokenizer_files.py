"""Finding tokenizer.model beside a checkpoint. Interim home: engineer "tok" moves these names to
``llama3.tokenizer``; ``llama3.checkpoint`` imports them from there when they exist (delete this
file then)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import CheckpointError, CheckpointNotFoundError

__all__ = ["TokenizerNotFoundError", "find_tokenizer", "require_tokenizer", "llama_models_tokenizer"]

_TOKENIZER_HELP = (
    "The Llama 3 tokenizer.model comes with Meta's weights download (also in a Hugging Face "
    "download's original/ folder), or from the llama-models wheel: `pip install --no-deps "
    "llama-models` ships llama_models/llama3/tokenizer.model."
)


class TokenizerNotFoundError(CheckpointError, FileNotFoundError):
    """No tokenizer.model where one was expected."""


def find_tokenizer(ckpt_dir: str | Path) -> Path | None:
    """``ckpt_dir/tokenizer.model`` or ``ckpt_dir/original/tokenizer.model``, whichever exists."""
    root = Path(ckpt_dir).expanduser()
    for candidate in (root / "tokenizer.model", root / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def require_tokenizer(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``tokenizer_path`` if given (it must exist), else ``find_tokenizer(ckpt_dir)``; raises
    ``TokenizerNotFoundError`` saying where to get the file, or ``CheckpointNotFoundError`` when
    ``ckpt_dir`` itself does not exist (a mistyped path is not a missing tokenizer)."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        if path.is_file():
            return path
        raise TokenizerNotFoundError(f"tokenizer file {path} does not exist. {_TOKENIZER_HELP}")
    if not Path(ckpt_dir).expanduser().is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    found = find_tokenizer(ckpt_dir)
    if found is None:
        raise TokenizerNotFoundError(f"no tokenizer.model in {ckpt_dir} or {Path(ckpt_dir) / 'original'}. "
                                     f"{_TOKENIZER_HELP}")
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
