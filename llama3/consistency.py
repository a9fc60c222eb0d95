"""Model-parallel ranks must agree: on what they loaded, and on every call's inputs.

Under ``torchrun`` each rank loads its own slice and is handed its own prompt, so nothing else
notices when ranks are given different checkpoints (the job prints the text of a mixed model) or
different prompts (collectives of different shapes: gloo aborts the process without a message).
So each rank describes what it has in a small dict of fingerprints (a few short strings and
numbers, never the data) and the ranks of the model-parallel group exchange them
(``all_gather_object``, one small message). Every rank compares every rank's description with
rank 0's, so all of them raise the same :class:`RanksDisagreeError`, naming the ranks and what
differs, before any token is produced. In a single process nothing is exchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import LlamaError

__all__ = ["RanksDisagreeError", "call_fingerprint", "check_call_agrees", "check_load_agrees",
           "check_ranks_agree", "load_fingerprint"]


class RanksDisagreeError(LlamaError, RuntimeError):
    """The model-parallel ranks were given different checkpoints, tokenizers or call inputs."""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_fingerprint(info: Any, args: Any, tokenizer_file: str | Path | None) -> dict[str, Any]:
    """What a rank loaded: the model's parameters, the weight files (names and sizes), the
    tokenizer file's contents. ``info`` is the checkpoint's ``CheckpointInfo``, ``args`` its
    ``ModelArgs``."""
    params = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    files = [Path(p) for p in info.files]
    return {
        "model parameters": params,
        "weight files (names and sizes)": [(p.name, p.stat().st_size) for p in files],
        "weight files (contents)": _digest([_ends_digest(p) for p in files]),
        "tokenizer file": None if tokenizer_file is None else _file_digest(Path(tokenizer_file)),
    }


def _ends_digest(path: Path, span: int = 1 << 16) -> str:
    """A digest of a weight file's first and last ``span`` bytes: cheap, and it tells checkpoints
    apart (a ``.pth`` ends in its zip directory, which holds every tensor's CRC-32; a safetensors
    file starts with its header and ends in tensor data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(span))
        size = f.seek(0, 2)
        f.seek(max(span, size - span))
        digest.update(f.read(span))
    return digest.hexdigest()[:16]


def call_fingerprint(prompt_tokens: Sequence[Sequence[int]], **settings: Any) -> dict[str, Any]:
    """A call's inputs: the prompt ids (their lengths and a digest), every setting given, and the
    random number generator's state (ranks that sample must draw the same tokens). Taken before the
    inputs are validated, so it accepts anything: a rank with bad input must still take part in
    the exchange, or the others would wait for it."""
    import torch

    try:
        rows = [list(row) for row in prompt_tokens]
    except TypeError:
        rows = [repr(prompt_tokens)]
    return {
        "number of prompts": len(rows),
        "prompt lengths": [len(r) if isinstance(r, list) else None for r in rows],
        "prompt token ids": _digest(rows),
        "random state": hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()[:16],
        **{name: (value if isinstance(value, (bool, int, float, str, type(None))) else repr(value))
           for name, value in settings.items()},
    }


def _group() -> Any | None:
    """The model-parallel process group, when there is one with more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        import fairscale.nn.model_parallel.initialize as fs_init

        if fs_init.model_parallel_is_initialized():
            group = fs_init.get_model_parallel_group()
            return group if dist.get_world_size(group) > 1 else None
    except ImportError:  # pragma: no cover - fairscale is a dependency
        pass
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(mine: Mapping[str, Any], reference: Mapping[str, Any]) -> list[str]:
    out = []
    for key in list(reference) + [k for k in mine if k not in reference]:
        a, b = reference.get(key), mine.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = [f"{k} {_shown(b.get(k))} vs {_shown(a.get(k))}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
            out.append(f"{key} ({'; '.join(inner)})")
        else:
            out.append(f"{key} ({_shown(b)} vs {_shown(a)})")
    return out


def check_ranks_agree(fingerprint: Mapping[str, Any], what: str) -> None:
    """Exchange ``fingerprint`` across the model-parallel group; on every rank, raise
    :class:`RanksDisagreeError` if any rank's differs from rank 0's. ``what`` says what is being
    compared ("what was loaded", "the inputs of this call"). No-op in a single process."""
    group = _group()
    if group is None:
        return
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (dist.get_rank(), dict(fingerprint)), group=group)
    rank0, reference = gathered[0]
    problems = []
    for rank, theirs in gathered[1:]:
        diff = _differences(theirs, reference)
        if diff:
            problems.append(f"rank {rank} differs from rank {rank0} in {', '.join(diff)}")
    if problems:
        raise RanksDisagreeError(
            f"the model-parallel ranks disagree on {what}: {'; '.join(problems)}. Every rank must be given "
            "the same checkpoint, tokenizer and inputs (e.g. the same command line and the same seed); "
            "nothing was generated")


def check_load_agrees(info: Any, args: Any, tokenizer_file: str | Path | None) -> None:
    """:func:`check_ranks_agree` on :func:`load_fingerprint` (computed only when there are ranks)."""
    if _group() is not None:
        check_ranks_agree(load_fingerprint(info, args, tokenizer_file), "what was loaded")


def check_call_agrees(prompt_tokens: Sequence[Sequence[int]], **settings: Any) -> None:
    """:func:`check_ranks_agree` on :func:`call_fingerprint` (computed only when there are ranks)."""
    if _group() is not None:
        check_ranks_agree(call_fingerprint(prompt_tokens, **settings), "the inputs of this call")
