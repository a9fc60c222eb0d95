"""Shard arithmetic: which part of each weight a model-parallel rank holds. Pure arithmetic, no I/O.

Think of every weight as one "canonical" tensor (what a one-shard checkpoint holds). A checkpoint
with M shards stores slices of it; a model on N ranks needs other slices. Each rank works out
which canonical interval it needs and copies it out of the few shards that cover it, so no rank
ever assembles a whole weight it does not keep. This works whenever M divides N or N divides M.

Column-parallel weights (wq, wk, wv, w1, w3, output) and Llama 3's vocabulary-parallel embedding
are split on dim 0, row-parallel ones (wo, w2) on dim 1, norms are replicated. Key/value
projections are the one twist: with more ranks than KV heads, every rank holds a copy of the
single KV head its query heads read (as Meta's 405B MP16 shards do).
"""

from __future__ import annotations

from ..model import ModelArgs
from .errors import ShardMismatchError

__all__ = [
    "param_names",
    "split_dim",
    "is_kv",
    "canonical_shape",
    "interval",
    "shard_shape",
    "splits_evenly",
    "check_shard_layout",
    "source_shards",
    "replica_shards",
]

LAYER_PARAMS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm")


def param_names(args: ModelArgs) -> list[str]:
    """Every parameter name of the model, in Meta's names and order (output.weight last)."""
    names = ["tok_embeddings.weight"]
    names += [f"layers.{i}.{p}.weight" for i in range(args.n_layers) for p in LAYER_PARAMS]
    return names + ["norm.weight", "output.weight"]


def split_dim(name: str) -> int | None:
    """The dimension a weight is split along across model-parallel ranks (None: replicated)."""
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    if name.endswith("norm.weight"):
        return None
    return 0


def is_kv(name: str) -> bool:
    """Key/value projections: split by head, replicated when there are more ranks than heads."""
    return name.endswith(("wk.weight", "wv.weight"))


def canonical_shape(name: str, args: ModelArgs) -> tuple[int, ...]:
    """The shape of the whole (one-shard) tensor ``name``."""
    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    tail = name.split(".", 2)[-1] if name.startswith("layers.") else name
    return {
        "tok_embeddings.weight": (args.vocab_size, d), "output.weight": (args.vocab_size, d),
        "norm.weight": (d,), "attention_norm.weight": (d,), "ffn_norm.weight": (d,),
        "attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.n_kv_heads * hd, d),
        "attention.wv.weight": (args.n_kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (ffn, d), "feed_forward.w3.weight": (ffn, d),
        "feed_forward.w2.weight": (d, ffn),
    }[tail]


def interval(name: str, args: ModelArgs, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, unit): the canonical rows (along ``split_dim``) that shard ``rank`` of
    ``world`` holds, counted in units of ``unit`` elements (a head for KV projections, else one)."""
    if is_kv(name):
        n_kv = args.n_kv_heads
        if world <= n_kv:
            return rank * n_kv // world, (rank + 1) * n_kv // world, args.head_dim
        head = rank * n_kv // world  # more ranks than KV heads: the one head this rank's queries use
        return head, head + 1, args.head_dim
    size = canonical_shape(name, args)[split_dim(name)]  # type: ignore[index]
    return rank * size // world, (rank + 1) * size // world, 1


def shard_shape(name: str, args: ModelArgs, rank: int, world: int) -> tuple[int, ...]:
    """The shape of ``name`` in shard ``rank`` of a ``world``-shard checkpoint."""
    shape = list(canonical_shape(name, args))
    dim = split_dim(name)
    if dim is not None:
        start, stop, unit = interval(name, args, rank, world)
        shape[dim] = (stop - start) * unit
    return tuple(shape)


def splits_evenly(args: ModelArgs, n: int) -> bool:
    """True when every split weight of ``args`` divides into ``n`` equal parts."""
    return (args.n_heads % n == 0 and args.vocab_size % n == 0 and args.ffn_hidden_dim % n == 0
            and (args.n_kv_heads % n == 0 or n % args.n_kv_heads == 0))


def check_shard_layout(num_shards: int, world_size: int, args: ModelArgs | None = None) -> None:
    """Raise ``ShardMismatchError`` unless M=num_shards shards can be loaded on N=world_size ranks
    (one must divide the other), naming model-parallel sizes that would work."""
    candidates = [n for n in range(1, 8 * num_shards + 1)
                  if (num_shards % n == 0 or n % num_shards == 0)
                  and (args is None or splits_evenly(args, n))]
    if num_shards % world_size != 0 and world_size % num_shards != 0:
        raise ShardMismatchError(
            f"the checkpoint has {num_shards} shard(s) but the model is split across {world_size} "
            f"model-parallel ranks; one number must divide the other. Model-parallel sizes that would "
            f"work: {', '.join(map(str, candidates))} (torchrun --nproc_per_node N), or reshard with "
            "scripts/convert_checkpoint.py reshard"
        )
    if args is not None and not splits_evenly(args, world_size):
        raise ShardMismatchError(
            f"this model (n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, vocab_size="
            f"{args.vocab_size}, ffn hidden {args.ffn_hidden_dim}) cannot be split evenly into "
            f"{world_size} model-parallel parts; sizes that work with this {num_shards}-shard "
            f"checkpoint: {', '.join(map(str, candidates))}"
        )


def source_shards(rank: int, world: int, num_shards: int) -> list[int]:
    """The shards rank ``rank`` of ``world`` reads: its own one, or the run of shards it merges."""
    if world >= num_shards:
        return [rank * num_shards // world]
    per_rank = num_shards // world
    return list(range(rank * per_rank, (rank + 1) * per_rank))


def replica_shards(name: str, args: ModelArgs, shard: int, num_shards: int) -> list[int]:
    """The shards that hold the same slice of ``name`` as ``shard`` (itself included): more than
    one only for KV projections stored on more shards than there are KV heads."""
    if not is_kv(name) or num_shards <= args.n_kv_heads:
        return [shard]
    mine = interval(name, args, shard, num_shards)
    return [s for s in range(num_shards) if interval(name, args, s, num_shards) == mine]
