"""The Llama 3 Transformer, to be read beside "The Llama 3 Herd of Models" (Meta, 2024).

A decoder-only Transformer (Vaswani et al., 2017) with the Llama changes:

* pre-normalisation with RMSNorm (Zhang & Sennrich, 2019) before attention and feed-forward;
* rotary position embeddings, RoPE (Su et al., 2021), base theta 500,000, with Llama 3.1's
  frequency scaling for long context;
* grouped-query attention, GQA (Ainslie et al., 2023): ``n_kv_heads`` key/value heads shared by
  ``n_heads`` query heads, with a key/value cache for incremental decoding;
* a SwiGLU feed-forward network (Shazeer, 2020).

Parameter names are Meta's, so a Meta checkpoint shard loads with ``load_state_dict(strict=True)``.
The linear layers are fairscale's model-parallel ones (:mod:`llama3.distributed`): each computes
its ``local_product`` (``F.linear`` unless :mod:`llama3.kernels` swapped in another kernel for the
device and dtype) and then communicates across ranks. Attention over the KV cache, and the choice
of its kernel, is :func:`llama3.attention.attention`.

One door: ``Transformer.forward(tokens, start_pos)`` serves prefill, chunked prefill (beyond the
paper, for long context: see ``PREFILL_CHUNK``), decoding and (with ``kv_len``) the fixed-shape
compiled step. Scoring prompt positions and compiling the decode step live in :mod:`llama3.decoding`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, attention
from .distributed import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    model_parallel_world_size,
)
from .memory import check_kv_cache
from .validation import check_kv_len, check_model_args, check_tokens, optional, positive_int

logger = logging.getLogger(__name__)

# Long inputs are processed this many positions at a time (Transformer.prefill_chunk), each chunk
# attending causally to the cache without a mask over the whole prompt: the memory a prompt needs
# beyond weights and cache is O(chunk × kv_len), not O(prompt²).
PREFILL_CHUNK = 2048


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
        check_model_args(self)

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
        out = attention(q.transpose(1, 2), keys, values, mask=mask)  # (b, heads, s, hd)
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

    Building one allocates the weights and a KV cache of ``max_batch_size × max_seq_len``,
    checked first against what the process can allocate (``llama3.memory.check_kv_cache``); it
    reads the current model-parallel state (one rank when none is set up) and never creates a
    process group.
    """

    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.prefill_chunk: int = PREFILL_CHUNK
        check_kv_cache(params, torch.get_default_dtype(), torch.empty(0).device, model_parallel_world_size())

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
            if not p.is_meta and not name.endswith("norm.weight"):
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
        max_batch_size = optional(positive_int, max_batch_size, "setup_kv_cache: max_batch_size")
        max_seq_len = optional(positive_int, max_seq_len, "setup_kv_cache: max_seq_len")
        weight = self.tok_embeddings.weight
        device = device if device is not None else weight.device
        dtype = dtype if dtype is not None else weight.dtype
        args = dataclasses.replace(
            self.params,
            max_batch_size=max_batch_size if max_batch_size is not None else self.params.max_batch_size,
            max_seq_len=max_seq_len if max_seq_len is not None else self.params.max_seq_len,
        )
        check_kv_cache(args, dtype, torch.device(device), model_parallel_world_size())
        caches = [KVCache(args.max_batch_size, args.max_seq_len, layer.attention.n_local_kv_heads,
                          layer.attention.head_dim, device=device, dtype=dtype) for layer in self.layers]
        rope = self.rope
        if args.max_seq_len != self.params.max_seq_len:
            rope = rope_table(args, args.max_seq_len)
        # Everything allocated: now change the model.
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.attention.kv_cache = cache
        self.params, self.rope = args, rope

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, *, last_only: bool = False,
                kv_len: int | None = None) -> torch.Tensor:
        """Logits for ``tokens`` [batch, seq] placed at positions start_pos, start_pos+1, ...

        The KV cache keeps every earlier position (written by earlier calls), so a prompt is
        processed once and each new token costs one call with seq = 1. A long input is processed
        ``prefill_chunk`` positions at a time, each chunk attending causally to everything cached
        before it. Returns [batch, seq, vocab] float32, or with ``last_only`` the last position's
        [batch, 1, vocab] (all generation needs, in O(chunk × vocab) memory).

        ``kv_len`` makes it the fixed-shape step of ``torch.compile`` / CUDA graphs
        (:mod:`llama3.decoding`): ``start_pos`` may then be a one-element tensor on the device, so
        one graph serves every position; attention spans the first ``kv_len`` cache positions, later
        ones masked out, and the last logits are returned. Nothing is read back from the device, so
        the position is not checked against ``kv_len``.

        Raises ValueError for misuse (:func:`llama3.validation.check_tokens` lists it).
        """
        if kv_len is not None:
            kv_len = check_kv_len(kv_len, self.params.max_seq_len)
            input_pos = torch.as_tensor(start_pos, device=tokens.device).reshape(-1)
            mask = torch.arange(kv_len, device=tokens.device)[None, :] <= input_pos[:, None]
            return self._logits(self._hidden(tokens, input_pos, kv_len, mask)[:, -1:])
        start_pos = check_tokens(tokens, start_pos, self.params)
        chunk = positive_int(self.prefill_chunk, "prefill_chunk")
        bsz, seqlen = tokens.shape
        logits = None if last_only else torch.empty(bsz, seqlen, self.vocab_size, device=tokens.device,
                                                    dtype=torch.float32)
        for begin in range(0, seqlen, chunk):
            end = min(begin + chunk, seqlen)
            input_pos = torch.arange(start_pos + begin, start_pos + end, device=tokens.device)
            h = self._hidden(tokens[:, begin:end], input_pos, start_pos + end, None)
            if logits is not None:
                logits[:, begin:end] = self._logits(h)
        return self._logits(h[:, -1:]) if logits is None else logits

    def _hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """The last layer's output for ``tokens`` at ``input_pos`` (un-normalised), writing their
        keys and values into the cache; attention over the first ``kv_len`` positions."""
        if self.rope.device != tokens.device:
            self.rope = self.rope.to(tokens.device)
        rope = self.rope[input_pos]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rope, input_pos, kv_len, mask)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

