"""Meta's checkpoint format: ``params.json`` plus ``consolidated.NN.pth``, one shard per
model-parallel rank of the run that saved it.

Shards are read with ``torch.load(mmap=True, weights_only=True)``: nothing is read until a tensor
is touched, and a pickle that would run code is refused. Meta's params.json has no field for the
RoPE scaling factor; see :meth:`MetaFormat.model_args` for how it is chosen.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..model import ModelArgs
from ..presets import PRESETS
from .base import (
    CheckpointInfo,
    ConfigReader,
    Convert,
    build_args,
    exists_at_all,
    file_mode,
    read_json,
    regular_file,
    validate_overrides,
)
from .errors import (
    CheckpointFormatError,
    KVReplicaMismatchError,
    ParamsMismatchError,
    ShardFilesError,
    TensorDtypeError,
    TiedWeightsMismatchError,
    UnsafeCheckpointError,
)
from .layout import (
    check_shard_layout,
    interval,
    param_names,
    replica_shards,
    shard_shape,
    source_shards,
    split_dim,
)

__all__ = ["MetaFormat", "META", "save_meta_checkpoint", "meta_params", "torch_load"]

logger = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
# Keys some Meta checkpoints carry that the model computes itself.
_IGNORED_KEYS = ("rope.freqs",)
# Keys our params.json may carry beyond Meta's; written only when they differ from the defaults so
# an ordinary checkpoint's params.json stays exactly Meta's.
EXTRA_PARAMS = ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_seq_len")
# Llama 3.2's RoPE scaling factor (Hugging Face's config.json for 3.2; llama-models issues 166, 241).
LLAMA32_ROPE_FACTOR = 32.0


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .pth file, memory-mapped, refusing pickles that run code."""
    regular_file(path, "shard")
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files written by torch < 1.6 (legacy format) cannot be memory-mapped.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint - its pickle would import or "
            f"call code, which torch.load(weights_only=True) does not run ({first_line}). Only use "
            "checkpoints from a source you trust; re-download the file."
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointFormatError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFormatError(f"{path} does not hold a flat dict of tensors (name -> tensor)")
    return sd


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape)


def shard_is_tied(sd: dict[str, torch.Tensor]) -> bool:
    """Tied when output.weight is absent, stored as the very same bytes as the embedding, or a
    separate copy equal to it (a few rows compared; the loader checks the rest)."""
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    if emb is None:
        return False
    if out is None:
        return True
    if _same_storage(out, emb):
        return True
    if out.shape != emb.shape or out.dtype != emb.dtype or emb.shape[0] == 0:
        return False
    rows = sorted({0, 1, emb.shape[0] // 2, emb.shape[0] - 2, emb.shape[0] - 1} & set(range(emb.shape[0])))
    return all(torch.equal(out[r], emb[r]) for r in rows)


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a.float() - b.float()).abs()
    row = int(diff.amax(dim=tuple(range(1, diff.dim()))).argmax()) if diff.dim() > 1 else int(diff.argmax())
    return f"max |difference| {diff.max().item():.4g}, e.g. in row {row}"


def _llama32_evidence(args: ModelArgs, tied: bool) -> str | None:
    """Why this looks like Llama 3.2 1B/3B (the only Llama 3.x text models with tied embeddings)."""
    if tied:
        return "tied input/output embeddings, which only Llama 3.2 1B/3B have"
    for name in ("llama-3.2-1b", "llama-3.2-3b"):
        p = PRESETS[name]
        if (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (
                p["dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"]):
            return f"the {name} shape"
    return None


class MetaFormat:
    """Reader of Meta's format (see the module docstring)."""

    name = "meta"
    title = "Meta"

    def detect(self, root: Path) -> CheckpointInfo | None:
        candidates = sorted(root.glob("consolidated.*.pth"))
        if not candidates:
            return None
        numbered: dict[int, Path] = {}
        odd = []
        for path in candidates:
            m = _SHARD_RE.fullmatch(path.name)
            if m is None or path.name != f"consolidated.{int(m.group(1)):02d}.pth":
                odd.append(path.name)
            elif int(m.group(1)) in numbered:
                odd.append(path.name)
            else:
                numbered[int(m.group(1))] = path
        missing = [f"consolidated.{i:02d}.pth" for i in range(len(candidates)) if i not in numbered]
        beyond = [numbered[i].name for i in sorted(numbered) if i >= len(candidates)]
        if odd or missing or beyond:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if beyond or odd:
                problems.append(f"unexpected {', '.join(beyond + odd)}")
            raise ShardFilesError(
                f"{root} holds {len(candidates)} consolidated.*.pth file(s), which must be numbered "
                f"consolidated.00.pth to consolidated.{len(candidates) - 1:02d}.pth (one per model-parallel "
                f"rank): {'; '.join(problems)}. Re-download the missing shards or remove stray files.")
        files = [numbered[i] for i in range(len(candidates))]
        for path in files:
            regular_file(path, "shard")
        if not exists_at_all(root / "params.json"):
            raise CheckpointFormatError(f"{root} has {len(files)} consolidated.*.pth shard(s) but no "
                                        "params.json next to them")
        return CheckpointInfo(self, root, files, read_json(root / "params.json"))

    def num_shards(self, info: CheckpointInfo) -> int:
        return len(info.files)

    def model_args(self, info: CheckpointInfo, overrides: dict[str, Any]) -> ModelArgs:
        """ModelArgs from params.json, every value type-checked.

        The RoPE scaling factor, which params.json lacks, is: the caller's ``rope_scale_factor``;
        else our own params.json extension key; else the ``config.json`` of a Hugging Face
        download this folder is the ``original/`` of (``info.extra["rope_scaling"]``, found by
        ``inspect_checkpoint``); else 32 for Llama 3.2 1B/3B (recognised by
        tied embeddings or their shape); else Meta's 8.
        """
        source = info.path / "params.json"
        cfg = ConfigReader(info.config, source)
        params = dict(info.config)
        for key in ("dim", "n_layers", "n_heads", "vocab_size"):
            params[key] = cfg.int(key)
        for key in ("n_kv_heads", "multiple_of", "rope_original_max_seq_len"):
            if cfg.has(key):
                params[key] = cfg.int(key)
        for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scale_factor",
                    "rope_low_freq_factor", "rope_high_freq_factor"):
            if cfg.has(key):
                params[key] = cfg.float(key)
        for key in ("use_scaled_rope", "tie_word_embeddings"):
            if cfg.has(key):
                params[key] = cfg.bool(key)
        overrides = validate_overrides(overrides)

        note = None
        if params.get("use_scaled_rope") and "rope_scaling" in info.extra:
            # HF download: inspect_checkpoint found the scaling constants in its config.json
            # (Meta's files have none).
            scaling, note = info.extra["rope_scaling"]
            params.update({k: scaling[k] for k in EXTRA_PARAMS})
        if "tie_word_embeddings" not in params:
            params["tie_word_embeddings"] = shard_is_tied(torch_load(info.files[0]))
        if params.get("use_scaled_rope") and note is None:
            if "rope_scale_factor" in info.config:
                note = "from params.json"
            else:
                evidence = _llama32_evidence(build_args(params, {}, source), params["tie_word_embeddings"])
                if evidence:
                    params["rope_scale_factor"] = LLAMA32_ROPE_FACTOR
                    note = (f"Llama 3.2 recognised by {evidence}; params.json has no factor; "
                            "override with rope_scale_factor=")
                else:
                    note = ("Meta's default for 3.1/3.3: params.json has no factor; override with "
                            "rope_scale_factor=")
        if "rope_scale_factor" in overrides:
            note = "rope_scale_factor argument"
        info.extra["rope_note"] = note
        return build_args(params, overrides, source)

    def read_rank(self, info: CheckpointInfo, args: ModelArgs, rank: int, world: int,
                  convert: Convert) -> dict[str, torch.Tensor]:
        num_shards = len(info.files)
        shard_ids = source_shards(rank, world, num_shards)
        shards: dict[int, dict[str, torch.Tensor]] = {}

        def shard(s: int) -> dict[str, torch.Tensor]:
            if s not in shards:
                path = info.files[s]
                logger.info("  reading %s (%.2f GB)", path.name, path.stat().st_size / 1e9)
                shards[s] = torch_load(path)
                _check_shard(shards[s], path, args, s, num_shards)
            return shards[s]

        out: dict[str, torch.Tensor] = {}
        for name in param_names(args):
            if name == "output.weight" and args.tie_word_embeddings:
                continue
            dim = split_dim(name)
            if dim is None:
                out[name] = convert(shard(shard_ids[0])[name])
                continue
            start, stop, unit = interval(name, args, rank, world)
            pieces, covered = [], start
            for s in shard_ids:
                s_start, s_stop, _ = interval(name, args, s, num_shards)
                lo, hi = max(covered, s_start), min(stop, s_stop)
                if lo < hi:
                    _check_replicas(name, args, s, num_shards, shard, info)
                    pieces.append(shard(s)[name].narrow(dim, (lo - s_start) * unit, (hi - lo) * unit))
                    covered = hi
            if covered != stop:  # the shard arithmetic above guarantees this; a bug if not
                raise RuntimeError(f"internal error: shards {shard_ids} do not cover {name} for rank {rank}")
            out[name] = convert(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim))
        if args.tie_word_embeddings:
            for s in shard_ids:
                _check_tied_copy(shard(s), info.files[s])
            out["output.weight"] = out["tok_embeddings.weight"]
        return out


def _check_tied_copy(sd: dict[str, torch.Tensor], path: Path) -> None:
    emb, out = sd["tok_embeddings.weight"], sd.get("output.weight")
    if out is None or _same_storage(out, emb):
        return
    if out.shape != emb.shape or not torch.equal(out, emb):
        detail = (f"shape {list(out.shape)} vs {list(emb.shape)}" if out.shape != emb.shape
                  else _first_difference(out, emb))
        raise TiedWeightsMismatchError(
            f"{path}: the model ties output.weight to tok_embeddings.weight (tie_word_embeddings), but the "
            f"stored output.weight differs from the embedding ({detail}); remove tie_word_embeddings from "
            "params.json if the model has its own output projection")


def _check_replicas(name: str, args: ModelArgs, s: int, num_shards: int, shard, info: CheckpointInfo) -> None:
    for r in replica_shards(name, args, s, num_shards):
        if r != s and not torch.equal(shard(r)[name], shard(s)[name]):
            raise KVReplicaMismatchError(
                f"{info.files[s].name} and {info.files[r].name} must hold identical copies of KV head "
                f"{interval(name, args, s, num_shards)[0]} of {name} (n_kv_heads={args.n_kv_heads} on "
                f"{num_shards} shards), but they differ "
                f"({_first_difference(shard(r)[name], shard(s)[name])}); "
                "the shards are corrupt or from different models")


def _check_shard(sd: dict[str, torch.Tensor], path: Path, args: ModelArgs, shard: int,
                 num_shards: int) -> None:
    expected = set(param_names(args))
    if args.tie_word_embeddings:
        expected.discard("output.weight")
    present = set(sd) - set(_IGNORED_KEYS)
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - {"output.weight"})
    if missing or unexpected:
        problems = [f"{what} {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                    for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise ParamsMismatchError(f"{path} does not match params.json (n_layers={args.n_layers}): "
                                  f"{'; '.join(problems)}")
    for name in sorted(present):
        t = sd[name]
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:  # float8: never cast without its scales
            raise TensorDtypeError(f"{path}: tensor {name} is {str(t.dtype).removeprefix('torch.')}; float8 "
                                   "weights need their scales (Meta fp8_mixed: fp8_scales_N.pt beside the "
                                   "shards), and this loader reads only bfloat16/float16/float32 weights. "
                                   "Casting them would compute wrong numbers; use the bf16 release.")
        if not t.dtype.is_floating_point:
            raise TensorDtypeError(f"{path}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')} "
                                   f"(shape {list(t.shape)}); weights must be floating point (bfloat16, "
                                   "float16, float32). The file is corrupt or not a Llama checkpoint.")
    emb_rows = sd["tok_embeddings.weight"].shape[0]
    if emb_rows != shard_shape("tok_embeddings.weight", args, shard, num_shards)[0] and emb_rows > 0 \
            and args.vocab_size % emb_rows == 0 and args.vocab_size // emb_rows != num_shards:
        saved = args.vocab_size // emb_rows
        raise ShardFilesError(
            f"{path}: its tok_embeddings.weight holds {emb_rows} of {args.vocab_size} vocabulary rows, so "
            f"the checkpoint was saved as {saved} shards, but {path.parent} holds {num_shards} "
            f"consolidated.*.pth file(s): "
            + (f"{saved - num_shards} shard(s) are missing" if saved > num_shards
               else f"{num_shards - saved} extra shard file(s)") + "; re-download the checkpoint")
    for name in sorted(expected):
        want = shard_shape(name, args, shard, num_shards)
        got = tuple(sd[name].shape)
        if got != want:
            raise ParamsMismatchError(
                f"{path}: tensor {name} has shape {list(got)} but params.json implies {list(want)} for "
                f"shard {shard} of {num_shards} (dim={args.dim}, n_heads={args.n_heads}, "
                f"n_kv_heads={args.n_kv_heads}, vocab_size={args.vocab_size}, ffn hidden "
                f"{args.ffn_hidden_dim}); is params.json from the same model as the weights?"
            )


META = MetaFormat()


def meta_params(args: ModelArgs) -> dict[str, Any]:
    """params.json for ``args``: Meta's keys, plus our RoPE keys where they differ from defaults."""
    params: dict[str, Any] = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                                  n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size,
                                  multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier,
                                  norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                                  use_scaled_rope=args.use_scaled_rope)
    if params["ffn_dim_multiplier"] is None:
        del params["ffn_dim_multiplier"]
    defaults = ModelArgs()
    if args.use_scaled_rope:
        params.update({k: getattr(args, k) for k in EXTRA_PARAMS if getattr(args, k) != getattr(defaults, k)})
    return params


def save_meta_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                         num_shards: int = 1, dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``params.json`` and ``consolidated.00.pth`` ... for ``num_shards`` model-parallel ranks
    from a whole (one-shard) state dict in our names. With more shards than KV heads each shard
    gets a copy of its KV head, as Meta's own checkpoints do. A tied output weight is stored as
    the same bytes as the embedding (the file holds it once; Meta's reference still finds it).
    Writes into ``out_dir`` directly; ``convert_checkpoint`` and ``write_random_checkpoint`` wrap
    this in an atomic temporary directory."""
    check_shard_layout(1, num_shards, args)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in range(num_shards):
        shard: dict[str, torch.Tensor] = {}
        for name in param_names(args):
            if name == "output.weight" and args.tie_word_embeddings:
                shard[name] = shard["tok_embeddings.weight"]
                continue
            t = state_dict[name]
            dim = split_dim(name)
            if dim is not None:
                start, stop, unit = interval(name, args, rank, num_shards)
                t = t.narrow(dim, start * unit, (stop - start) * unit)
            # clone: torch.save of a view would write the whole underlying storage.
            shard[name] = t.to(dtype=dtype or t.dtype).contiguous().clone()
        path = out / f"consolidated.{rank:02d}.pth"
        torch.save(shard, path)
        path.chmod(file_mode())
        paths.append(path)
        del shard
    (out / "params.json").write_text(json.dumps(meta_params(args), indent=2) + "\n")
    return paths
