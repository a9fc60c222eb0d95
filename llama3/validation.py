"""Checks for arguments, flags and config values, each raising one message that names the value.

One place for "a positive integer", "a real bool" and "a finite number", so every entry point (the
library, ``params.json`` / ``config.json``, the command-line programs) refuses the same things with
the same words. Each check returns the value in its canonical type. Never ``assert``: these guard
user input. The error is :class:`~llama3.errors.InvalidArgumentError` (a ``ValueError``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from .errors import InvalidArgumentError

__all__ = ["check_kv_len", "check_tokens", "finite_float", "non_negative_int", "optional", "positive_int",
           "strict_bool"]


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True is never meant as "1 layer".
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (any integer type, e.g. numpy's), else InvalidArgumentError."""
    return _int_at_least(value, name, 1, "a positive integer")


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0, else InvalidArgumentError."""
    return _int_at_least(value, name, 0, "an integer >= 0")


def _int_at_least(value: Any, name: str, minimum: int, what: str) -> int:
    # bool is an int subclass, but True as a count is a mistake, not 1.
    problem = f"{name} must be {what}, got {value!r}"
    if isinstance(value, bool):
        raise InvalidArgumentError(problem)
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(problem) from None
    if number < minimum:
        raise InvalidArgumentError(problem)
    return number


def strict_bool(value: Any, name: str) -> bool:
    """``value`` if it is a real bool. Strings ("false", "no"), numbers and None are refused: each
    would otherwise be read by truthiness, and ``"false"`` is true."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False (a boolean), got {value!r} "
                                   f"({type(value).__name__})")
    return value


def finite_float(value: Any, name: str, *, positive: bool = False, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """``value`` as a finite float (NaN and ±inf refused); ``positive``: > 0; ``minimum`` /
    ``maximum``: inclusive bounds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        try:  # numpy and torch scalars
            value = float(value) if hasattr(value, "__float__") and not isinstance(value, str) else value
        except (TypeError, ValueError):
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        wanted = "a finite number > 0" if positive else "a finite number"
        raise InvalidArgumentError(f"{name} must be {wanted}, got {value!r}")
    if positive and value <= 0:
        raise InvalidArgumentError(f"{name} must be a finite number > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{name} must be <= {maximum}, got {value!r}")
    return float(value)


def optional(check, value: Any, name: str, **kwargs: Any) -> Any:
    """``None`` stays ``None``; anything else goes through ``check``."""
    return None if value is None else check(value, name, **kwargs)


# --- a model call (Transformer.forward) ---------------------------------------------------------

def check_tokens(tokens: Any, start_pos: Any, params: Any) -> int:
    """Check a forward call; returns start_pos as an int. ValueError for: tokens not a 2-D integer
    tensor, or empty; a start_pos that is not a non-negative integer; more rows than max_batch_size;
    positions past max_seq_len; ids outside [0, vocab_size). Ids are range-checked on the CPU always
    and elsewhere when seq > 1: reading a one-token step's ids back would stall an accelerator's
    queue, and the ids of decoding steps come from the model itself."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InvalidArgumentError(f"tokens must be a 2-D tensor of token ids [batch, seq], got {got}; "
                                   "for a single sequence pass tokens[None]")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InvalidArgumentError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    bsz, seqlen = tokens.shape
    if bsz == 0 or seqlen == 0:
        raise InvalidArgumentError(f"tokens is empty (shape {tuple(tokens.shape)}); pass at least one token")
    try:
        if isinstance(start_pos, bool):
            raise TypeError
        start_pos = operator.index(start_pos)  # ints and 0-d integer tensors
    except TypeError:
        raise InvalidArgumentError(f"start_pos must be an integer position, got {start_pos!r}") from None
    if start_pos < 0:
        raise InvalidArgumentError(f"start_pos must be >= 0, got {start_pos}")
    if bsz > params.max_batch_size:
        raise InvalidArgumentError(f"batch of {bsz} sequences exceeds "
                                   f"max_batch_size={params.max_batch_size}")
    if start_pos + seqlen > params.max_seq_len:
        raise InvalidArgumentError(f"positions up to {start_pos + seqlen} exceed "
                                   f"max_seq_len={params.max_seq_len}")
    if seqlen > 1 or tokens.is_cpu:
        low, high = (int(x) for x in torch.aminmax(tokens))
        if low < 0 or high >= params.vocab_size:
            raise InvalidArgumentError(f"token ids must lie in [0, {params.vocab_size}) (the vocabulary), "
                                       f"got ids from {low} to {high}")
    return start_pos


def check_kv_len(kv_len: Any, max_seq_len: int) -> int:
    """``kv_len`` of the fixed-shape step: an int in [1, max_seq_len]."""
    if isinstance(kv_len, bool) or not isinstance(kv_len, int) or not 1 <= kv_len <= max_seq_len:
        raise InvalidArgumentError(f"kv_len must be an int in [1, max_seq_len={max_seq_len}], got {kv_len!r}")
    return kv_len


def check_model_args(args: Any) -> None:
    """Validate a ``ModelArgs`` in place (positive integers become ``int``): shapes that divide, real
    bools, positive finite numbers. Raises InvalidArgumentError naming the field."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "max_batch_size", "max_seq_len"):
        setattr(args, name, positive_int(getattr(args, name), f"ModelArgs.{name}"))
    if args.dim % args.n_heads != 0:
        raise InvalidArgumentError(f"n_heads ({args.n_heads}) must divide dim ({args.dim})")
    if args.n_heads % args.n_kv_heads != 0:
        raise InvalidArgumentError(f"n_kv_heads ({args.n_kv_heads}) must divide n_heads ({args.n_heads})")
    if args.head_dim % 2 != 0:
        raise InvalidArgumentError(f"RoPE rotates pairs of dimensions: head_dim (dim / n_heads = "
                                   f"{args.head_dim}) must be even")
    # Flags are real bools ("false" is truthy) and every number that must be positive is.
    for name in ("use_scaled_rope", "tie_word_embeddings"):
        strict_bool(getattr(args, name), f"ModelArgs.{name}")
    positive_int(args.rope_original_max_seq_len, "ModelArgs.rope_original_max_seq_len")
    for name in ("norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor"):
        finite_float(getattr(args, name), f"ModelArgs.{name}", positive=True)
    optional(finite_float, args.ffn_dim_multiplier, "ModelArgs.ffn_dim_multiplier", positive=True)
    if args.use_scaled_rope and not (
        args.rope_scale_factor > 0 and 0 < args.rope_low_freq_factor < args.rope_high_freq_factor
    ):
        raise InvalidArgumentError("RoPE scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor")
