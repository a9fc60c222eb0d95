"""The Llama 3 Transformer, to be read beside "The Llama 3 Herd of Models" (Meta, 2024).

A decoder-only Transformer (Vaswani et al., 2017) with the Llama changes:

* pre-normalisation with RMSNorm (Zhang & Sennrich, 2019) before attention and feed-forward;
* rotary position embeddings, RoPE (Su et al., 2021), base theta 500,000, with Llama 3.1's
  frequency scaling for long context;
* grouped-query attention, GQA (Ainslie et al., 2023): ``n_kv_heads`` key/value heads shared by
  ``n_heads`` query heads, with a key/value cache for incremental decoding;
* a SwiGLU feed-forward network (Shazeer, 2020).

Parameter names are Meta's, so a Meta checkpoint shard loads with ``load_state_dict(strict=True)``.
The linear layers are fairscale's model-parallel ones; with one process they are plain linears.

Beyond the paper, for long context: a prompt is processed in chunks (``Transformer.prefill_chunk``)
that attend causally to the cache without a mask over the whole prompt, so the memory it needs
beyond weights and cache grows with the chunk, not with the prompt's square.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .distributed import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    model_parallel_world_size,
)
from .validation import finite_float, optional, positive_int, strict_bool

logger = logging.getLogger(__name__)


@dataclass(init=False)
class ModelArgs:
    """Hyper-parameters, named as in Meta's ``params.json``.

    Built from keyword arguments (``ModelArgs(**params, max_seq_len=...)``); keys it does not know
    (``vision_*``, ``quantization_args``...) are ignored with a logged note, so any Llama 3.x
    ``params.json`` can be passed as it is.

    ``params.json`` has no field for the RoPE scaling constants: Meta's reference hard-codes
    factor 8, which is right for 3.1 and 3.3; Hugging Face's config for 3.2 says 32. They are
    fields here so a caller (or the Hugging Face loader, from ``config.json``) can set them.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # Llama 3.1 RoPE scaling (used only when use_scaled_rope):
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # Llama 3.2 1B/3B reuse the token embedding as the output projection.
    tie_word_embeddings: bool = False

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __init__(self, **params: Any) -> None:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(params) - names)
        if unknown:
            logger.info("ModelArgs: ignoring keys it does not use: %s", ", ".join(unknown))
        for f in fields(self):
            setattr(self, f.name, params.get(f.name, f.default))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._validate()

    def _validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim (dim / n_heads = "
                             f"{self.head_dim}) must be even")
        # Flags are real bools ("false" is truthy) and every number that must be positive is.
        for name in ("use_scaled_rope", "tie_word_embeddings"):
            strict_bool(getattr(self, name), f"ModelArgs.{name}")
        positive_int(self.rope_original_max_seq_len, "ModelArgs.rope_original_max_seq_len")
        for name in ("norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            finite_float(getattr(self, name), f"ModelArgs.{name}", positive=True)
        optional(finite_float, self.ffn_dim_multiplier, "ModelArgs.ffn_dim_multiplier", positive=True)
        if self.use_scaled_rope and not (
            self.rope_scale_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        ):
            raise ValueError("RoPE scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4·dim (SwiGLU has three matrices, so this keeps the parameter
        count of a 4·dim two-matrix MLP), times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g, computed in float32 whatever the model's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# --- Rotary position embedding -----------------------------------------------------------------


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The head_dim/2 rotation frequencies θ_i = theta^(-2i/d), float32.

    With ``use_scaled_rope`` (Llama 3.1+), long wavelengths are stretched by the scale factor,
    short ones kept, and the band between interpolated smoothly: the model then sees, at long
    context, low frequencies it learnt at 8K context.
    """
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device="cpu").float() / d))
    if not args.use_scaled_rope:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor  # longest kept
    high_freq_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor  # shortest scaled
    smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    interpolated = (1 - smooth) * freqs / args.rope_scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scale_factor, freqs)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, interpolated, scaled)


def rope_table(args: ModelArgs, n_positions: int) -> torch.Tensor:
    """cos and sin of position·θ_i for every position: [n_positions, head_dim/2, 2], float32.

    Built once, on the CPU, in float32 (as Meta's and Hugging Face's code do) whatever the model
    dtype: angles of large positions lose their meaning in 16-bit floats.
    """
    angles = torch.outer(torch.arange(n_positions, device="cpu", dtype=torch.float32),
                         rope_frequencies(args))
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x₀, x₁), (x₂, x₃)... of every head by its position's angle.

    x: [batch, seq, heads, head_dim]; rope: [seq, head_dim/2, 2]. Meta's layout pairs adjacent
    dimensions (a complex multiply); Hugging Face checkpoints pair i with i + head_dim/2 instead,
    which the loader undoes by permuting wq and wk.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., head_dim/2, 2]
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]  # broadcast over batch and heads
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


# --- Attention ---------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated once: [batch, kv_heads, seq, head_dim].

    Buffers (so ``.to()`` moves them) but not persistent (so they stay out of state_dict).
    Writing in place at fixed addresses keeps decoding free of reallocation and lets
    ``torch.compile``/CUDA graphs capture the step.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, seq, head_dim] at positions ``input_pos``; return the first
        ``kv_len`` positions of the cache for the same batch rows."""
        bsz = k.shape[0]
        self.k[:bsz].index_copy_(2, input_pos, k)
        self.v[:bsz].index_copy_(2, input_pos, v)
        return self.k[:bsz, :, :kv_len], self.v[:bsz, :, :kv_len]


def grouped_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim + mask) v with several query heads per key/value head.

    Query head h reads KV head h // n_rep. The n_rep query heads of one KV head are stacked as extra
    query rows of that head, so plain attention serves the whole group and the cache is never
    copied per query head. Same result as SDPA with ``enable_gqa=True`` or Meta's ``repeat_kv``
    (whose CPU kernels are slower here in bfloat16 at decode).

    q: [b, n_heads, s, hd]; keys, values: [b, n_kv_heads, kv_len, hd]; mask: [s, kv_len] boolean,
    True where a query may attend, or None for no mask. Returns [b, n_heads, s, hd].
    """
    b, n_heads, s, hd = q.shape
    n_kv_heads = keys.shape[1]
    n_rep = n_heads // n_kv_heads
    q = q.reshape(b, n_kv_heads, n_rep * s, hd)  # (b, n_kv_heads, n_rep·s, hd): a group's heads as rows
    if mask is not None and s > 1:
        mask = mask.repeat(n_rep, 1)  # (n_rep·s, kv_len): the same rows for every head of the group
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (b, n_kv_heads, n_rep·s, hd)
    return out.view(b, n_heads, s, hd)


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention for queries at the last s of kv_len positions: query i sees keys 0 .. kv_len - s + i.

    Shapes as in :func:`grouped_query_attention`. No mask of the whole prompt is ever built, and
    none at all where the kernel can apply causality itself:

    * one query (decoding) sees every cached key: no mask;
    * a chunk that fills the cache from position 0 is the square causal case, ``is_causal``;
    * a chunk after earlier ones, on the CPU: the cached prefix (seen by every query, no mask) and
      the chunk's own keys (square causal) are attended separately and merged exactly by their
      log-sum-exp, as flash-decoding merges its splits;
    * elsewhere (CUDA): SDPA's lower-right causal bias, which runs in the flash kernel there.
    """
    s, kv_len = q.shape[2], keys.shape[2]
    if s == 1:
        return grouped_query_attention(q, keys, values)
    if s == kv_len:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    if q.device.type == "cpu" and _cpu_flash_attention is not None:
        return _prefix_then_chunk_attention(q, keys, values)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(s, kv_len),
                                          enable_gqa=True)


# PyTorch's CPU flash-attention kernel, called directly because it also returns the log-sum-exp of
# each query's scores, which merging two attentions needs. (SDPA with a lower-right causal mask
# gives the same result, twice as slow in float32, with a [chunk, kv_len] mask as scratch.)
_cpu_flash_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_then_chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    b, n_heads, s, hd = q.shape
    n_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    n_rep, start = n_heads // n_kv_heads, kv_len - s
    # The cached prefix: every query sees all of it. Folded as in grouped_query_attention.
    out1, lse1 = _cpu_flash_attention(q.reshape(b, n_kv_heads, n_rep * s, hd),
                                      keys[:, :, :start], values[:, :, :start])
    # The chunk's own keys, square causal; only s of them, so repeating them per head is cheap.
    out2, lse2 = _cpu_flash_attention(q, keys[:, :, start:].repeat_interleave(n_rep, dim=1),
                                      values[:, :, start:].repeat_interleave(n_rep, dim=1), is_causal=True)
    lse1 = lse1.reshape(b, n_heads, s, 1)
    lse2 = lse2.reshape(b, n_heads, s, 1)
    lse = torch.logaddexp(lse1, lse2)  # log of the softmax denominator over both parts
    out = out1.reshape(b, n_heads, s, hd) * (lse1 - lse).exp() + out2 * (lse2 - lse).exp()
    return out.type_as(q)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and a KV cache, heads split across model-parallel ranks."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        world_size = model_parallel_world_size()
        if args.n_heads % world_size != 0:
            raise ValueError(f"n_heads ({args.n_heads}) must be divisible by the model-parallel "
                             f"size ({world_size})")
        if args.n_kv_heads % world_size != 0 and world_size % args.n_kv_heads != 0:
            raise ValueError(f"n_kv_heads ({args.n_kv_heads}) and the model-parallel size "
                             f"({world_size}) must divide one another")
        # With more ranks than KV heads, each rank keeps a copy of the one KV head its queries use.
        n_kv_heads = max(args.n_kv_heads, world_size)
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // world_size
        self.n_local_kv_heads = n_kv_heads // world_size

        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim)
        self.wk = ColumnParallelLinear(args.dim, n_kv_heads * self.head_dim)
        self.wv = ColumnParallelLinear(args.dim, n_kv_heads * self.head_dim)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim)
        self.kv_cache = KVCache(args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: [b, s, dim] at positions ``input_pos``; attends over the first ``kv_len`` cache
        positions, causally (``mask`` None: x holds the last s of them) or through ``mask``."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)

        keys, values = self.kv_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2), kv_len)
        q = q.transpose(1, 2)  # (b, heads, s, hd)
        if mask is None:
            out = causal_attention(q, keys, values)
        else:
            out = grouped_query_attention(q, keys, values, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: W₂ (silu(W₁ x) ⊙ W₃ x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim)
        self.w2 = RowParallelLinear(hidden_dim, dim)
        self.w3 = ColumnParallelLinear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """h = x + Attention(RMSNorm(x)); out = h + FeedForward(RMSNorm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, kv_len, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids [batch, seq] → next-token logits [batch, seq, vocab_size] (float32).

    Building one allocates the weights and a KV cache of ``max_batch_size × max_seq_len`` (see
    :func:`kv_cache_bytes`); it reads the current model-parallel state (one rank when none is set
    up) and never creates a process group.
    """

    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        # Long inputs are processed this many positions at a time, so the memory a prompt needs
        # beyond weights and cache is O(prefill_chunk × kv_len), not O(prompt²).
        self.prefill_chunk: int = 2048

        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True)
        if params.tie_word_embeddings:
            # Embedding and output are both split on the vocabulary, so the shards line up.
            self.output.weight = self.tok_embeddings.weight

        # A plain attribute, not a buffer: .to(dtype) must not round it to 16 bits.
        self.rope = rope_table(params, params.max_seq_len)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Small random weights, so a model built without a checkpoint computes finite numbers
        (benchmarks, tests). Skipped on the meta device, where the loader assigns real ones."""
        for name, p in self.named_parameters():
            if p.device.type != "meta" and not name.endswith("norm.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02)

    def setup_kv_cache(self, max_batch_size: int | None = None, max_seq_len: int | None = None, *,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """(Re)allocate every layer's KV cache, zeroed, on ``device`` in ``dtype`` (default: where
        and what the weights are). Used after loading weights into a model built on the meta device,
        or to change the batch size or context length.

        Arguments are checked before anything changes, and ``self.params`` becomes an updated copy:
        the ``ModelArgs`` the model was built from is never modified. On any error (bad argument,
        allocation failure) the model keeps its previous cache and stays usable.
        """
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"setup_kv_cache: {name} must be a positive integer, got {value!r}")
        weight = self.tok_embeddings.weight
        device = device if device is not None else weight.device
        dtype = dtype if dtype is not None else weight.dtype
        args = dataclasses.replace(
            self.params,
            max_batch_size=max_batch_size if max_batch_size is not None else self.params.max_batch_size,
            max_seq_len=max_seq_len if max_seq_len is not None else self.params.max_seq_len,
        )
        caches = [KVCache(args.max_batch_size, args.max_seq_len, layer.attention.n_local_kv_heads,
                          layer.attention.head_dim, device=device, dtype=dtype) for layer in self.layers]
        rope = self.rope
        if args.max_seq_len != self.params.max_seq_len:
            rope = rope_table(args, args.max_seq_len)
        # Everything allocated: now change the model.
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.attention.kv_cache = cache
        self.params, self.rope = args, rope

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """Logits for ``tokens`` placed at positions start_pos, start_pos+1, ...

        The KV cache keeps every earlier position (written by earlier calls), so a prompt is
        processed once and each new token costs one call with seq = 1. A long input is processed
        ``prefill_chunk`` positions at a time, each chunk attending causally to everything cached
        before it. ``last_only`` returns logits of the last position only ([batch, 1, vocab]),
        which is all generation needs, in O(chunk × vocab) memory; without it the full
        [batch, seq, vocab] is returned (for per-token scores prefer :meth:`forward_logprobs`).

        Raises ValueError for misuse: tokens not a 2-D integer tensor, a negative start_pos,
        more rows than max_batch_size, positions past max_seq_len, or ids outside [0, vocab_size).
        Ids are range-checked on the CPU always and elsewhere when seq > 1: a one-token step on an
        accelerator skips it, since reading the ids back would stall the device's queue and the
        ids of decoding steps come from the model itself.
        """
        start_pos = self._check_call(tokens, start_pos)
        bsz, seqlen = tokens.shape
        logits = None
        if not last_only:
            logits = torch.empty(bsz, seqlen, self.vocab_size, device=tokens.device, dtype=torch.float32)
        for begin, end in self._chunks(seqlen):
            h = self._hidden(tokens[:, begin:end], start_pos + begin)
            if logits is not None:
                logits[:, begin:end] = self._logits(h)
        return self._logits(h[:, -1:]) if logits is None else logits

    @torch.inference_mode()
    def forward_logprobs(self, tokens: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of ``tokens``, computed chunk by chunk like :meth:`forward`
        (which it replaces: it fills the KV cache the same way).

        Returns ``(logprobs, last_logits)``: logprobs [batch, seq-1] float32 with
        ``logprobs[:, i] = log p(tokens[:, i+1] | everything up to tokens[:, i])``, and the logits of
        the last position [batch, 1, vocab] float32 (to sample what follows). Never holds more
        than one chunk of logits: O(prefill_chunk × vocab) memory whatever the length.
        """
        start_pos = self._check_call(tokens, start_pos)
        bsz, seqlen = tokens.shape
        logprobs = torch.empty(bsz, seqlen - 1, device=tokens.device, dtype=torch.float32)
        for begin, end in self._chunks(seqlen):
            logits = self._logits(self._hidden(tokens[:, begin:end], start_pos + begin))
            targets = tokens[:, begin + 1:end + 1].long()  # the next token of each position, if any
            n = targets.shape[1]
            # log_softmax + gather, as generation scores tokens (cross_entropy's float32 CPU kernel
            # rounds log-probabilities near 0 to exactly 0 over a 128K vocabulary).
            logprobs[:, begin:begin + n] = torch.log_softmax(logits[:, :n], dim=-1).gather(
                -1, targets[..., None])[..., 0]
        return logprobs, logits[:, -1:].clone()

    # no_grad, not inference_mode: torch.compile cannot yet trace a function that enters
    # inference mode itself (it fails on the inputs made outside it).
    @torch.no_grad()
    def forward_static(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None
                       ) -> torch.Tensor:
        """One decoding step with every shape fixed, for ``torch.compile`` and CUDA graphs.

        tokens: [batch, 1]; input_pos: [1], the position as a tensor, so one compiled graph serves
        every step. Attention spans the first ``kv_len`` cache positions (default max_seq_len),
        later ones masked out: the cost of a step follows ``kv_len``, not the cache's size.
        ``kv_len`` is a Python int, so each value is its own compiled graph (callers pick a few
        buckets); it must exceed the position, which is not checked (that would read it back
        from the device). Returns the last logits [batch, 1, vocab].
        """
        max_seq_len = self.params.max_seq_len
        kv_len = max_seq_len if kv_len is None else kv_len
        if not isinstance(kv_len, int) or isinstance(kv_len, bool) or not 1 <= kv_len <= max_seq_len:
            raise ValueError(f"kv_len must be an int in [1, max_seq_len={max_seq_len}], got {kv_len!r}")
        mask = torch.arange(kv_len, device=tokens.device)[None, :] <= input_pos[:, None]
        h = self._hidden(tokens, input_pos, kv_len, mask)
        return self._logits(h[:, -1:])

    def _chunks(self, seqlen: int) -> list[tuple[int, int]]:
        """[begin, end) of each prefill chunk of a seqlen-long input."""
        chunk = self.prefill_chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {chunk!r}")
        return [(begin, min(begin + chunk, seqlen)) for begin in range(0, seqlen, chunk)]

    def _hidden(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, kv_len: int | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's output for ``tokens`` (un-normalised), writing their keys and values
        into the cache. Positions: ``start_pos`` onwards (an int), or the tensor ``input_pos``."""
        if isinstance(start_pos, torch.Tensor):
            input_pos = start_pos
        else:
            input_pos = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)
            kv_len = start_pos + tokens.shape[1]
        if self.rope.device != tokens.device:
            self.rope = self.rope.to(tokens.device)
        rope = self.rope[input_pos]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rope, input_pos, kv_len, mask)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

    def _check_call(self, tokens: torch.Tensor, start_pos: int) -> int:
        """Validate a forward call's arguments (see :meth:`forward`); returns start_pos as an int."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a 2-D tensor of token ids [batch, seq], got {got}; "
                             "for a single sequence pass tokens[None]")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
        bsz, seqlen = tokens.shape
        if bsz == 0 or seqlen == 0:
            raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)}); pass at least one token")
        try:
            if isinstance(start_pos, bool):
                raise TypeError
            start_pos = operator.index(start_pos)
        except TypeError:
            raise ValueError(f"start_pos must be an integer position, got {start_pos!r}") from None
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if bsz > self.params.max_batch_size:
            raise ValueError(f"batch of {bsz} sequences exceeds max_batch_size={self.params.max_batch_size}")
        end, max_seq_len = start_pos + seqlen, self.params.max_seq_len
        if end > max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len={max_seq_len}")
        if seqlen > 1 or tokens.device.type == "cpu":
            low, high = (int(x) for x in torch.aminmax(tokens))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}) (the vocabulary), "
                                 f"got ids from {low} to {high}")
        return start_pos


def kv_cache_bytes(args: ModelArgs, dtype: torch.dtype, world_size: int = 1) -> int:
    """Bytes of the KV cache one model-parallel rank allocates for ``args``: keys and values of
    every layer, for max_batch_size × max_seq_len positions of its KV heads."""
    n_local_kv_heads = max(args.n_kv_heads, world_size) // world_size
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_position = 2 * args.n_layers * n_local_kv_heads * args.head_dim * itemsize  # k and v, every layer
    return args.max_batch_size * args.max_seq_len * per_position
