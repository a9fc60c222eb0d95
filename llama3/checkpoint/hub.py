"""Hugging Face Hub ids as checkpoint names: ``"meta-llama/Llama-3.1-8B-Instruct"`` resolves to a
local snapshot folder through ``huggingface_hub`` (the optional extra ``pip install llama3[hub]``),
downloading only what loading needs (safetensors + JSON + ``original/tokenizer.model``) or using
the local cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` for no network at all)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import CheckpointNotFoundError, HubError

__all__ = ["resolve_checkpoint_dir", "looks_like_hub_id"]

logger = logging.getLogger(__name__)

# owner/name: letters, digits, "-", "_", "."; no "--" or ".." (the Hub's own rule), one slash.
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[\w.-]+")
_FILES = ["*.json", "*.safetensors", "tokenizer.model", "original/params.json", "original/tokenizer.model"]
_META_WEIGHTS = ["original/consolidated.*.pth"]
_LOCAL_HINT = "or pass a local checkpoint directory instead"


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` in the Hub's spelling (and not a path that starts with ``/``, ``.`` or ``~``)."""
    return bool(_HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name


def resolve_checkpoint_dir(name_or_path: str | Path) -> Path:
    """The local directory for a checkpoint name: an existing directory always wins; a string
    that looks like a Hub repo id (``owner/name``, where no local folder ``owner`` exists) is
    resolved to its snapshot folder, downloaded if needed. Anything else is returned unchanged
    (the loader then reports what is missing).

    Raises ``HubError`` (a ``CheckpointNotFoundError``) saying what to do when the repository is
    gated (accept the license and log in), unreachable (no network and not cached) or unknown.
    """
    path = Path(name_or_path).expanduser()
    if (isinstance(name_or_path, Path) or path.is_dir() or not looks_like_hub_id(str(name_or_path))
            or path.parent.is_dir()):  # "checkpoints/typo" beside a real checkpoints/: a local path
        return path
    repo_id = str(name_or_path)
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a directory; to load it as a Hugging Face Hub id install the optional "
            f"extra: pip install 'llama3[hub]' (huggingface_hub), {_LOCAL_HINT}") from None

    def download(patterns: list[str]) -> Path:
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:  # every failure becomes one message saying what to do
            raise HubError(f"no directory {repo_id!r} here; as a Hugging Face Hub id: "
                           f"{_explain(repo_id, e)}") from e

    logger.info("Resolving Hugging Face Hub id %s", repo_id)
    folder = download(_FILES)
    if not any(folder.glob("*.safetensors")) and (folder / "original" / "params.json").is_file():
        folder = download(_FILES + _META_WEIGHTS)  # a repository with Meta's files only
    logger.info("  %s -> %s", repo_id, folder)
    return folder


def _explain(repo_id: str, e: Exception) -> str:
    """What went wrong resolving ``repo_id``, and what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    if isinstance(e, hub_errors.GatedRepoError):
        return (f"{repo_id} is a gated model: accept its license at https://huggingface.co/{repo_id} "
                f"while logged in, then log in here with `huggingface-cli login` (or set HF_TOKEN), "
                f"{_LOCAL_HINT}")
    if isinstance(e, hub_errors.RepositoryNotFoundError):
        return (f"there is no Hub repository {repo_id} (or it is private: log in with "
                f"`huggingface-cli login`); check the spelling, {_LOCAL_HINT}")
    if isinstance(e, (hub_errors.LocalEntryNotFoundError, hub_errors.IncompleteSnapshotError)):
        return (f"cannot download {repo_id} from the Hugging Face Hub (no network, or HF_HUB_OFFLINE=1) "
                f"and it is not (completely) in the local cache {constants.HF_HUB_CACHE}; connect and "
                f"retry, {_LOCAL_HINT}")
    if isinstance(e, hub_errors.HfHubHTTPError):
        return f"the Hugging Face Hub refused {repo_id}: {e}; {_LOCAL_HINT}"
    return f"cannot fetch {repo_id} from the Hugging Face Hub ({type(e).__name__}: {e}); {_LOCAL_HINT}"
