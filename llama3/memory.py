"""Memory accounting: the KV cache, the weights per kernel format, and what the process can allocate.

A model needs its weights (:func:`weight_bytes`, in each linear layer's kernel format), its KV cache
(:func:`kv_cache_bytes`, fixed by max_batch_size × max_seq_len) and some scratch while it runs.
:func:`check_fits` (``Llama.build``, before any weight is read) and :func:`check_kv_cache`
(building a ``Transformer``, ``setup_kv_cache``) compare them with what the device has free — on
the CPU also the process's address-space limit (``ulimit -v``) — and raise
:class:`NotEnoughMemoryError` naming the numbers, instead of an out-of-memory crash halfway.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import LlamaError

logger = logging.getLogger(__name__)

__all__ = ["NotEnoughMemoryError", "available_bytes", "check_fits", "check_fits_device", "check_kv_cache",
           "kv_cache_bytes", "trained_context", "weight_bytes"]

GIB = 1024**3
MEMINFO = Path("/proc/meminfo")
PROC_STATUS = Path("/proc/self/status")


class NotEnoughMemoryError(LlamaError, RuntimeError):
    """Weights plus KV cache would not fit in the device's free memory."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(args: Any, dtype: torch.dtype, world_size: int = 1) -> int:
    """Bytes of the KV cache one model-parallel rank allocates for ``args`` (a ``ModelArgs``): keys
    and values of every layer, for max_batch_size × max_seq_len positions of its KV heads."""
    n_local_kv_heads = max(args.n_kv_heads, world_size) // world_size
    per_position = 2 * args.n_layers * n_local_kv_heads * args.head_dim * _itemsize(dtype)  # k and v
    return args.max_batch_size * args.max_seq_len * per_position


def weight_bytes(args: Any, dtype: torch.dtype, plan: Any = None) -> int:
    """Bytes of the model's weights, all ranks together, each linear layer in the format of its
    kernel in ``plan`` (a :class:`~llama3.kernels.KernelPlan`, which knows partial selections such
    as fp8's and settings such as int4's group size; None: ``dtype`` throughout).

    A tied output projection costs nothing extra unless its kernel holds its own copy."""
    def linear(name: str, out_features: int, in_features: int) -> int:
        if plan is None:
            return out_features * in_features * _itemsize(dtype)
        return plan.nbytes(name, out_features, in_features, dtype)

    kv_dim = args.n_kv_heads * args.head_dim
    shapes = {"attention.wq": (args.dim, args.dim), "attention.wk": (kv_dim, args.dim),
              "attention.wv": (kv_dim, args.dim), "attention.wo": (args.dim, args.dim),
              "feed_forward.w1": (args.ffn_hidden_dim, args.dim),
              "feed_forward.w3": (args.ffn_hidden_dim, args.dim),
              "feed_forward.w2": (args.dim, args.ffn_hidden_dim)}
    blocks = sum(linear(f"layers.{i}.{name}", out_f, in_f) for i in range(args.n_layers)
                 for name, (out_f, in_f) in shapes.items())
    norms = (2 * args.n_layers + 1) * args.dim * _itemsize(dtype)
    embedding = args.vocab_size * args.dim * _itemsize(dtype)
    output = linear("output", args.vocab_size, args.dim)
    if args.tie_word_embeddings and (plan is None or plan.kernel("output").shares_float_weight):
        output -= args.vocab_size * args.dim * _itemsize(dtype)  # the embedding's table, counted above
    return embedding + output + blocks + norms


def _address_space_left() -> int | None:
    """Bytes the process may still map under ``RLIMIT_AS`` (``ulimit -v``), or None if unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_bytes(device: torch.device | str) -> int | None:
    """Memory free for a new allocation on ``device``, in bytes, or None where it cannot be told.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` from
    /proc/meminfo (Linux), bounded by what ``RLIMIT_AS`` leaves of the address space. Others: None.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        free = None
    limit = _address_space_left()
    if limit is None:
        return free
    return limit if free is None else min(free, limit)


def check_fits_device(weight_bytes: int, cache_bytes: int, device: torch.device | str) -> None:
    """Raise :class:`NotEnoughMemoryError` when weights + KV cache exceed the free memory of
    ``device`` (see :func:`available_bytes`; no check where it is unknown).

    Pass the sizes one process allocates (one model-parallel rank's slice). Running also needs
    scratch beyond this: O(prefill_chunk × kv_len) for attention and O(prefill_chunk × vocab) for
    logits while a prompt is processed, so a fit with nothing to spare can still fail later.
    """
    device = torch.device(device)
    need = weight_bytes + cache_bytes
    free = available_bytes(device)
    logger.info("memory on %s: weights %.2f GiB + KV cache %.2f GiB = %.2f GiB; free: %s", device,
                weight_bytes / GIB, cache_bytes / GIB, need / GIB,
                "unknown" if free is None else f"{free / GIB:.2f} GiB")
    if free is None or need <= free:
        return
    raise NotEnoughMemoryError(
        f"the model does not fit on {device}: weights {weight_bytes / GIB:.2f} GiB + KV cache "
        f"{cache_bytes / GIB:.2f} GiB = {need / GIB:.2f} GiB, but only {free / GIB:.2f} GiB is free. "
        "The KV cache grows with max_batch_size × max_seq_len: lower them, or shrink the weights "
        "(int8 quantisation, a 16-bit dtype) or split them over more model-parallel ranks."
    )


def check_fits(args: Any, dtype: torch.dtype, device: torch.device, world_size: int,
               plan: Any = None, alternatives: Mapping[str, Any] | None = None) -> Any:
    """Log the KV cache about to be allocated; raise NotEnoughMemoryError if weights (in ``plan``'s
    formats) + cache cannot fit (each GPU holds one rank's share; a CPU job's ranks share the RAM).
    ``alternatives``: quantize mode -> plan; the error then says what each would need.

    Returns the plan to apply: ``plan``, or when it keeps two weight layouts for some layers
    (a decode and a prefill kernel) and those do not fit, its one-layout version if that fits."""
    one = plan.with_one_layout() if plan is not None else None
    if one is not None and one is not plan:
        try:
            _check_fits(args, dtype, device, world_size, plan, None)
            return plan
        except NotEnoughMemoryError as e:
            logger.info("%s; keeping one weight layout per layer (the decode kernel's) instead", e)
            plan = one
    _check_fits(args, dtype, device, world_size, plan, alternatives)
    return plan


def _check_fits(args: Any, dtype: torch.dtype, device: torch.device, world_size: int,
                plan: Any, alternatives: Mapping[str, Any] | None) -> None:
    cache = kv_cache_bytes(args, dtype, world_size)
    logger.info("KV cache: %.2f GiB per rank (max_batch_size %d x max_seq_len %d x %d layers x %d KV heads x "
                "head_dim %d x %d bytes x 2 for keys and values%s)", cache / GIB, args.max_batch_size,
                args.max_seq_len, args.n_layers, args.n_kv_heads, args.head_dim, _itemsize(dtype),
                f" / {world_size} ranks" if world_size > 1 else "")
    ranks_here = world_size if device.type == "cpu" else 1
    weights = weight_bytes(args, dtype, plan) // world_size * ranks_here
    try:
        check_fits_device(weights, cache * ranks_here, device)
    except NotEnoughMemoryError as e:
        if not alternatives:
            raise
        advice = _smaller_formats(args, dtype, world_size, weights // ranks_here, alternatives)
        raise NotEnoughMemoryError(f"{e} {advice}") from None


def _smaller_formats(args: Any, dtype: torch.dtype, world_size: int, weights_per_rank: int,
                     alternatives: Mapping[str, Any]) -> str:
    """"bfloat16 weights need 101.5 GB per rank on 8 ranks; quantize='fp8' needs 60.9 GB, ..."."""
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    needs = [f"quantize={mode!r} needs {weight_bytes(args, dtype, plan) // world_size / 1e9:.1f} GB"
             for mode, plan in alternatives.items()]
    return (f"{str(dtype).removeprefix('torch.')} weights need {weights_per_rank / 1e9:.1f} GB per rank on "
            f"{ranks}; {', '.join(needs)} (Llama.build(..., quantize=...), llama3-chat --quantize).")


def trained_context(args: Any) -> int:
    """The context the model was trained for: 131,072 for Llama 3.1+ (scaled RoPE), 8,192 for 3.0."""
    return 131072 if args.use_scaled_rope else 8192


_said_beyond: set[tuple[int, int]] = set()


def check_kv_cache(args: Any, dtype: torch.dtype, device: torch.device, world_size: int = 1) -> None:
    """Before a KV cache for ``args`` is allocated on ``device``: raise NotEnoughMemoryError if it
    cannot be (same message as :func:`check_fits_device`); say once if max_seq_len goes beyond
    the trained context (allowed: quality past it is not what the model learnt)."""
    trained = trained_context(args)
    if args.max_seq_len > trained and (args.max_seq_len, trained) not in _said_beyond:
        _said_beyond.add((args.max_seq_len, trained))
        logger.warning("max_seq_len %d is beyond the %d positions this model was trained for; it runs, "
                       "but output past %d positions may degrade", args.max_seq_len, trained, trained)
    if device.type == "meta":
        return
    free = available_bytes(device)
    cache = kv_cache_bytes(args, dtype, world_size)
    if free is not None and cache > free:
        check_fits_device(0, cache, device)
