"""Batched decoding with the KV cache: the decode step, sampling settings, the decode loop.

A batch of prompts of different lengths shares one ``[batch, total_len]`` token buffer
(:class:`Batch`). :func:`decode` fills it: the first model call processes every row up to the
*shortest* prompt's length (prefill, chunked inside the model), each later call feeds one position
for every row through the decode step. Where a row still has prompt there, the sampled token is
thrown away and the prompt token kept, so the KV cache of every position holds the row's true
token exactly once (Meta's reference scheme, kept so results can be compared with it).

A row is finished at its first stop token (not part of the output) or at its length limit. The
loop keeps one number per row, ``Batch.end`` (one past its last output position), lowered when a
stop token is sampled: ``generate`` cuts there and streaming reads it. Non-finite logits are
detected in the same device read as "all rows finished?" and raise :class:`NonFiniteLogitsError`.

The decode step, ``step(tokens [bsz, 1], pos) -> logits [bsz, 1, vocab]``, comes from
:func:`make_decode_step`, for :class:`~llama3.generation.Llama`, the benchmark and the tests alike:

* eager (``compile=False``): ``model.forward(tokens, pos, last_only=True)`` in inference mode,
  which attends over exactly the ``pos + 1`` filled cache positions;
* static (``compile=True``): ``model.forward(tokens, input_pos, kv_len=bucket)`` under
  ``torch.compile`` (on CUDA with :func:`cuda_decode_compile_options`: CUDA graphs), the position a
  device tensor. Its shapes must be fixed, so it attends over a *bucket* of cache positions: the
  smallest of 256, 512, 1024, ... (capped at ``max_seq_len``) that holds ``pos + 1``. Each bucket is one
  compiled graph, so a short chat in a model built for 128K tokens costs a short chat's decode,
  not a 128K one. A bucket compiles the first time it is reached (logged; ~30-90 s for 8B on a
  GPU), or all of them up front with :func:`llama3.warmup.warm_up_decode_step`.
"""

from __future__ import annotations

import bisect
import logging
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LlamaError
from .progress import Progress
from .sampling import sample_next_token
from .validation import check_tokens, non_negative_int, positive_int

__all__ = ["Batch", "DecodeStep", "NonFiniteLogitsError", "SamplingParams", "cuda_decode_compile_options",
           "decode", "forward_logprobs", "kv_buckets", "make_decode_step", "model_device", "prepare_batch"]

logger = logging.getLogger(__name__)


class NonFiniteLogitsError(LlamaError, RuntimeError):
    """The model produced NaN or infinite logits."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen, validated once.

    ``temperature`` 0 is greedy decoding; above 0 the logits are divided by it and a token is drawn
    from the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling).
    Raises ``ValueError`` for a non-number, NaN, infinity, a negative temperature, or ``top_p``
    outside (0, 1].
    """

    temperature: float = 0.6
    top_p: float = 0.9

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


DecodeStep = Callable[[torch.Tensor, int], torch.Tensor]
"""``step(tokens [bsz, 1], pos) -> logits [bsz, 1, vocab]``: feed the token at position ``pos``."""

SMALLEST_BUCKET = 256
# Inductor's coordinate-descent tuning of the CUDA decode step's reductions (the int8 GEMV above
# all): more bandwidth per GEMV, paid in compile time per kv-length bucket. Off until the GPU
# check's `kernels` stage (linear_int8_compiled vs linear_int8_tuned) has measured both sides.
TUNE_CUDA_REDUCTIONS = False


def kv_buckets(max_seq_len: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """Cache lengths the static step attends over: powers of two from ``smallest``, then ``max_seq_len``."""
    buckets = []
    size = smallest
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return buckets + [max_seq_len]


def make_decode_step(model: torch.nn.Module, compile: bool, *, static: bool | None = None) -> DecodeStep:
    """The decoding step of ``model`` (a :class:`~llama3.model.Transformer`).

    Args:
        model: the model, on its device, its KV cache allocated.
        compile: run the fixed-shape step (``model.forward`` with ``kv_len``) through
            ``torch.compile`` (on CUDA with :func:`cuda_decode_compile_options`: CUDA graphs); the
            first step of each (batch size, bucket) compiles, which is logged.
        static: use the fixed-shape path (default: ``compile``). ``static=True``
            without ``compile`` runs that path eagerly: slower, but the same numbers as compiled,
            which tests use to check it.
    """
    static = compile if static is None else static
    if compile and not static:
        raise ValueError("compile=True needs the static decode step (static=True or None)")
    if not static:
        @torch.inference_mode()
        def eager_step(tokens: torch.Tensor, pos: int) -> torch.Tensor:
            return model.forward(tokens, pos, last_only=True)

        return eager_step
    return _StaticStep(model, compile)


def cuda_decode_compile_options(cudagraphs: bool = True, tune_reductions: bool = True) -> dict[str, Any]:
    """``torch.compile(..., options=...)`` for the CUDA decode step: what ``mode="reduce-overhead"``
    sets (CUDA graphs), plus inductor's coordinate-descent tuning of each kernel's block sizes.

    A decode step is a chain of GEMVs and small reductions (the int8 kernel's multiply-and-sum, the
    norms); inductor's default reduction configs may leave memory bandwidth unused there, and the
    tuner searches block sizes per kernel once, at compile time (gpt-fast decodes that way). The
    decode step uses it only when :data:`TUNE_CUDA_REDUCTIONS` is set. ``mode``
    and ``options`` cannot both be given, hence one dict."""
    options: dict[str, Any] = dict(torch._inductor.list_mode_options("reduce-overhead")) if cudagraphs else {}
    if tune_reductions:
        options["coordinate_descent_tuning"] = True
    return options


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model`` runs on (its token embedding's)."""
    embedding: Any = getattr(model, "tok_embeddings", None)
    if embedding is not None and hasattr(embedding, "weight"):
        return embedding.weight.device
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class _StaticStep:
    """``model.forward(tokens, input_pos, kv_len=bucket)`` over the kv-length bucket that holds
    ``pos + 1``, with fixed input buffers. Under no_grad, not inference_mode: torch.compile cannot
    yet trace a function that enters inference mode itself (it fails on inputs made outside it)."""

    def __init__(self, model: torch.nn.Module, compile: bool) -> None:
        self.buckets = kv_buckets(model.params.max_seq_len)
        self.device = model_device(model)
        self.compiled = compile
        forward = model.forward
        if compile:
            # kv_len is a Python int and dynamic=False keeps it (and the batch size) static: one
            # graph per value. Dynamo's default of 8 graphs per function would fall back to eager.
            _allow_graphs(len(self.buckets) * model.params.max_batch_size)
            options = (cuda_decode_compile_options(tune_reductions=TUNE_CUDA_REDUCTIONS)
                       if self.device.type == "cuda" else None)
            forward = torch.compile(forward, options=options, dynamic=False)
        self.forward = forward
        # Fixed buffers: a CUDA graph replays on the same input addresses.
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._tokens: dict[int, torch.Tensor] = {}
        self._seen: set[tuple[int, int]] = set()

    def bucket(self, pos: int) -> int:
        """The kv length attended over when feeding position ``pos``."""
        i = bisect.bisect_left(self.buckets, pos + 1)
        if i == len(self.buckets):
            raise ValueError(f"position {pos} is outside the KV cache (max_seq_len={self.buckets[-1]})")
        return self.buckets[i]

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        kv_len = self.bucket(pos)
        bsz = tokens.shape[0]
        buffer = self._tokens.get(bsz)
        if buffer is None:
            buffer = self._tokens[bsz] = torch.empty(bsz, 1, dtype=torch.long, device=self.device)
        buffer.copy_(tokens)
        self._pos.fill_(pos)
        if self.device.type == "cuda" and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        key = (bsz, kv_len)
        if not self.compiled or key in self._seen:
            with torch.no_grad():
                return self.forward(buffer, self._pos, kv_len=kv_len)
        self._seen.add(key)
        logger.info("compiling decode step for kv_len<=%d, batch %d (first time only, ~30-90 s for 8B on "
                    "GPU; warm_up=True / --warm-up compiles every bucket at start-up)", kv_len, bsz)
        with Progress(f"compiling the decode step (batch {bsz}, kv length {kv_len})", logger=logger), \
                torch.no_grad():
            return self.forward(buffer, self._pos, kv_len=kv_len)


def _allow_graphs(n: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < n:
        setattr(config, name, n)


@torch.inference_mode()
def forward_logprobs(model: torch.nn.Module, tokens: torch.Tensor, start_pos: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of ``tokens``, one prefill chunk at a time through
    ``model.forward`` (which it replaces: it fills the KV cache the same way).

    Returns ``(logprobs, last_logits)``: logprobs [batch, seq-1] float32 with
    ``logprobs[:, i] = log p(tokens[:, i+1] | everything up to tokens[:, i])``, and the logits of
    the last position [batch, 1, vocab] float32 (to sample what follows). Never holds more than one
    chunk of logits: O(prefill_chunk × vocab) memory whatever the length.
    """
    start_pos = check_tokens(tokens, start_pos, model.params)
    chunk = positive_int(model.prefill_chunk, "prefill_chunk")
    bsz, seqlen = tokens.shape
    logprobs = torch.empty(bsz, seqlen - 1, device=tokens.device, dtype=torch.float32)
    for begin in range(0, seqlen, chunk):
        end = min(begin + chunk, seqlen)
        logits = model.forward(tokens[:, begin:end], start_pos + begin)
        targets = tokens[:, begin + 1:end + 1].long()  # the next token of each position, if any
        n = targets.shape[1]
        # log_softmax + gather, as generation scores tokens (cross_entropy's float32 CPU kernel
        # rounds log-probabilities near 0 to exactly 0 over a 128K vocabulary).
        logprobs[:, begin:begin + n] = torch.log_softmax(logits[:, :n], dim=-1).gather(
            -1, targets[..., None])[..., 0]
    return logprobs, logits[:, -1:].clone()


# --- the batch and the loop ----------------------------------------------------------------------


@dataclass
class Batch:
    """One batch's decoding state; tensors live on the model's device."""

    tokens: torch.Tensor  # [bsz, total_len]: prompts, then generated tokens
    prompt_lens: list[int]
    max_gen_len: int
    # [bsz]: one past each row's last output position. Starts at the row's length limit and is
    # lowered to the position of the first stop token the row samples: the one record of "finished".
    end: torch.Tensor
    token_logprobs: torch.Tensor | None  # [bsz, total_len] when logprobs are wanted

    def limit(self, row: int) -> int:
        """One past the last position row ``row`` may generate (``max_gen_len`` or the buffer's end)."""
        return min(self.prompt_lens[row] + self.max_gen_len, self.tokens.shape[1])


def prepare_batch(prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, params: Any, pad_id: int,
                  device: torch.device, logprobs: bool) -> Batch:
    """Validate ``prompt_tokens`` against ``params`` (the model's ``ModelArgs``) and lay them out
    in a :class:`Batch` on ``device``; ``ValueError`` names the bad prompt and position."""
    bsz = len(prompt_tokens)
    if bsz > params.max_batch_size:
        raise ValueError(f"{bsz} prompts exceed max_batch_size={params.max_batch_size}")
    max_gen_len = non_negative_int(max_gen_len, "max_gen_len")
    rows = [_token_ids(prompt, i, params.vocab_size) for i, prompt in enumerate(prompt_tokens)]
    lens = [len(row) for row in rows]
    for i, n in enumerate(lens):
        if n > params.max_seq_len:
            raise ValueError(f"prompt {i} has {n} tokens, more than max_seq_len={params.max_seq_len}")

    total_len = min(params.max_seq_len, max(lens) + max_gen_len)
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : lens[i]] = row
    limits = [min(n + max_gen_len, total_len) for n in lens]
    return Batch(
        tokens=tokens.to(device),
        prompt_lens=lens,
        max_gen_len=max_gen_len,
        end=torch.tensor(limits, device=device),
        token_logprobs=torch.zeros(bsz, total_len, device=device) if logprobs else None,
    )


def _is_int(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not (value.is_floating_point() or value.is_complex()
                                        or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_ids(prompt: Any, index: int, vocab_size: int) -> torch.Tensor:
    """Prompt ``index`` as a 1-D int64 tensor; ``ValueError`` naming the prompt and position unless
    every id is an integer (Python, numpy or torch) in ``0 .. vocab_size - 1``."""
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
        raise ValueError(f"prompt {index} must be a list of token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"prompt {index} is empty (a Llama 3 prompt starts with <|begin_of_text|>)")
    try:
        ids = torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        ids = None
    integral = ids is not None and ids.ndim == 1 and not (
        ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
    if not integral:
        # The slow path finds the culprit (or converts a list of torch / numpy integer scalars).
        for j, value in enumerate(prompt):
            if not _is_int(value):
                raise ValueError(f"prompt {index}, position {j}: token id {value!r} is not an integer "
                                 f"({type(value).__name__}); token ids must be ints")
        ids = torch.tensor([int(value) for value in prompt])
    ids = ids.to(device="cpu", dtype=torch.long)
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if len(bad):
        j = int(bad[0, 0])
        raise ValueError(f"prompt {index}, position {j}: token id {int(ids[j])} is outside the vocabulary "
                         f"(0..{vocab_size - 1})")
    return ids


def _raise_if_non_finite(non_finite: bool, pos: int) -> None:
    if non_finite:
        raise NonFiniteLogitsError(
            f"the model produced NaN or infinite logits (by position {pos}); no output is returned. This "
            "usually means float16 overflow (run in bfloat16 or float32: dtype=...) or non-finite / "
            "corrupt weights in the checkpoint (check or re-download the files)")


@torch.no_grad()
def decode(model: torch.nn.Module, step: DecodeStep, batch: Batch, sampling: SamplingParams,
           stop_tokens: Sequence[int], *, logprobs: bool = False, echo: bool = False,
           check_every: int = 1) -> Iterator[int]:
    """Fill ``batch.tokens`` (and ``token_logprobs``), one position per step, lowering
    ``batch.end`` where a row samples a stop token; yields the position just written. Stops when
    every row is finished; raises :class:`NonFiniteLogitsError` on NaN/inf logits.

    ``logprobs`` fills ``batch.token_logprobs`` (with ``echo`` the prompt's too); the finished /
    non-finite flags are read from the device every ``check_every`` steps."""
    tokens, end = batch.tokens, batch.end
    min_len, total_len = min(batch.prompt_lens), tokens.shape[1]
    device = tokens.device
    prompt_lens = torch.tensor(batch.prompt_lens, device=device)
    stop_ids = torch.tensor(stop_tokens, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite logits so far
    if logprobs and echo:
        # Every prompt position's log-probability, computed chunk by chunk inside the model.
        prompt_logprobs, logits = forward_logprobs(model, tokens[:, :min_len], 0)
        batch.token_logprobs[:, 1:min_len] = prompt_logprobs
        if min_len == total_len:  # nothing to generate and no prompt left to feed
            _raise_if_non_finite(bool(~torch.isfinite(prompt_logprobs).all()), min_len - 1)
            return
    else:
        with torch.inference_mode():
            logits = model.forward(tokens[:, :min_len], 0, last_only=True)

    for cur_pos in range(min_len, total_len):
        if cur_pos > min_len:
            logits = step(tokens[:, cur_pos - 1 : cur_pos], cur_pos - 1)
        logits = logits[:, -1]
        # A row's logits are unusable when its largest is not finite: NaN anywhere makes the max
        # NaN, +inf makes it inf, all -inf leaves no distribution.
        if sampling.temperature > 0:
            finite = torch.isfinite(logits.amax(dim=-1))
            logits = torch.where(finite[:, None], logits, 0.0)  # a defined draw until the check raises
            next_token = sample_next_token(logits, sampling.temperature, sampling.top_p)
        else:
            next_token = sample_next_token(logits, 0.0, sampling.top_p)
            # argmax picks NaN or +inf when present, so the chosen logit is that max, for free.
            finite = torch.isfinite(logits.gather(-1, next_token[:, None])[:, 0])
        bad |= ~finite.all()
        in_prompt = cur_pos < prompt_lens
        next_token = torch.where(in_prompt, tokens[:, cur_pos], next_token)  # prompt tokens stay
        tokens[:, cur_pos] = next_token
        if logprobs:
            # log_softmax + gather rather than cross_entropy: the latter's float32 CPU kernel
            # rounds log-probabilities near 0 to exactly 0 over a 128K vocabulary.
            batch.token_logprobs[:, cur_pos] = torch.log_softmax(logits, dim=-1).gather(
                -1, next_token[:, None])[:, 0]
        stops = ~in_prompt & torch.isin(next_token, stop_ids) & (end > cur_pos)
        end.masked_fill_(stops, cur_pos)
        if (cur_pos - min_len + 1) % check_every == 0 or cur_pos == total_len - 1:
            # One read back from the device per check: "all finished?" and "anything non-finite?".
            done, non_finite = torch.stack([(end <= cur_pos + 1).all(), bad]).tolist()
            _raise_if_non_finite(non_finite, cur_pos)
            yield cur_pos
            if done:
                return
        else:
            yield cur_pos
