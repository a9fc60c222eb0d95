"""Generating text with a Llama 3 model: batched decoding with the KV cache, sampling, streaming.

``Llama`` pairs a :class:`~llama3.model.Transformer` with a :class:`~llama3.tokenizer.Tokenizer`
and offers Meta's reference API (``build``, ``generate``, ``text_completion``, ``chat_completion``)
plus streaming (``stream``, ``stream_text_completion``, ``stream_chat_completion``).

How a batch is decoded (the reference's scheme, kept so results can be compared with it):

* prompts of different lengths share one ``[batch, total_len]`` token buffer;
* the first model call processes every row up to the *shortest* prompt's length (prefill);
* each later call feeds one position for every row. Where a row still has prompt there, the
  sampled token is thrown away and the prompt token is kept, so the KV cache of every position
  holds the row's true token exactly once;
* a row is finished at its first stop token (``<|eot_id|>``, ``<|eom_id|>``, ``<|end_of_text|>``),
  which is not part of the output, or when it has ``max_gen_len`` new tokens; the loop ends when
  every row is finished.

Differences from the reference, all in the caller's favour: prompt positions are known from the
prompt lengths (the reference compares with the pad id, so a prompt containing that id broke it);
with ``echo`` only the generated part is searched for stop tokens (the reference cut an echoed chat
prompt at its first ``<|eot_id|>``); bad input raises ``ValueError`` instead of failing an assert.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, overload

import torch

from .sampling import sample_next_token
from .tokenizer import ChatFormat, Dialog, Message, StreamDecoder, Tokenizer

__all__ = ["ChatPrediction", "CompletionPrediction", "Llama", "validate_dialog"]

_CHAT_ROLES = ("system", "user", "assistant", "ipython")
_PROMPT_ENDING_ROLES = ("user", "ipython")
_QUANTIZE_MODES = ("int8",)


class CompletionPrediction(TypedDict, total=False):
    """One result of :meth:`Llama.text_completion`; ``tokens``/``logprobs`` only with ``logprobs=True``."""

    generation: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    """One result of :meth:`Llama.chat_completion`; ``tokens``/``logprobs`` only with ``logprobs=True``."""

    generation: Message
    tokens: list[str]
    logprobs: list[float]


def validate_dialog(dialog: Dialog, index: int | None = None) -> None:
    """Raise ``ValueError`` unless ``dialog`` is a non-empty list of messages with known roles whose
    last message is one the assistant answers (``user`` or ``ipython``)."""
    where = f"dialog {index}" if index is not None else "dialog"
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise ValueError(f"{where} must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise ValueError(f"{where} is empty; it needs at least one message with role "
                         f"{' or '.join(_PROMPT_ENDING_ROLES)}")
    for j, message in enumerate(dialog):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in _CHAT_ROLES:
            raise ValueError(f"{where}, message {j}: unknown role {role!r}; roles are "
                             f"{', '.join(_CHAT_ROLES)}")
    last = dialog[-1]["role"]
    if last not in _PROMPT_ENDING_ROLES:
        raise ValueError(f"{where} ends with a message of role {last!r}; the last message must have role "
                         f"{' or '.join(_PROMPT_ENDING_ROLES)} for the assistant to answer it")


@dataclass
class _Batch:
    """Everything one generate/stream call decodes with; tensors live on the model's device."""

    tokens: torch.Tensor  # [bsz, total_len]: prompts, then generated tokens
    prompt_lens: list[int]
    ends: list[int]  # per row: one past the last position it may generate
    total_len: int
    min_prompt_len: int
    in_prompt: torch.Tensor  # [bsz, total_len] bool
    last_pos: torch.Tensor  # [bsz]: ends - 1
    token_logprobs: torch.Tensor | None  # [bsz, total_len] when logprobs are wanted


class Llama:
    """A Llama 3 model with its tokenizer, ready to generate.

    Args:
        model: a :class:`~llama3.model.Transformer` (or anything with its ``params``, ``forward``
            and ``forward_static``), on the device to run on.
        tokenizer: the Llama 3 :class:`~llama3.tokenizer.Tokenizer`.
        compile: run the one-token decoding steps through ``torch.compile(model.forward_static)``
            (``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA). The prompt prefill stays eager.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, compile: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        vocab_size = model.params.vocab_size
        n_words = getattr(tokenizer, "n_words", None)
        if n_words is not None and vocab_size < n_words:
            raise ValueError(f"the model's vocabulary ({vocab_size} tokens) is smaller than the "
                             f"tokenizer's ({n_words}); they do not belong together")
        self.device = _model_device(model)
        # Checking "all rows finished?" reads a flag back from the device, which stalls an
        # accelerator's queue; there we check every few steps (the extra steps cost little and are
        # cut from the output). On the CPU the read is free.
        self.stop_check_interval = 1 if self.device.type == "cpu" else 8
        self._decode_step = None
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_step = torch.compile(model.forward_static, mode=mode)

    # ------------------------------------------------------------------------------ building

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int = 2048,
        max_batch_size: int = 4,
        model_parallel_size: int | None = None,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        rope_scale_factor: float | None = None,
        compile: bool = False,
        quantize: str | None = None,
        verbose: bool = True,
    ) -> Llama:
        """Load a checkpoint (Meta or Hugging Face format) and its tokenizer.

        Args:
            ckpt_dir: the checkpoint directory.
            tokenizer_path: Meta's ``tokenizer.model``; by default ``ckpt_dir/tokenizer.model`` or
                ``ckpt_dir/original/tokenizer.model``.
            max_seq_len: context length to allocate the KV cache for (prompt + generation).
            max_batch_size: the most prompts one call may take.
            model_parallel_size: ranks to split the model across (default: every process of the
                ``torchrun`` job; 1 in a plain ``python`` process).
            seed: seeds torch on every rank alike, so sampling is reproducible and all model-parallel
                ranks draw the same tokens.
            device, dtype: where and in what precision to run (default: the best available device,
                its preferred dtype).
            rope_scale_factor: override the Llama 3.1 RoPE scaling factor (see ``ModelArgs``).
            compile: decode with ``torch.compile`` (see :class:`Llama`).
            quantize: ``"int8"`` for int8 weight-only linear layers (``llama3.quantize``).
            verbose: log loading progress.
        """
        if quantize is not None and quantize not in _QUANTIZE_MODES:
            raise ValueError(f"unknown quantize={quantize!r}; choose one of {', '.join(_QUANTIZE_MODES)} "
                             "or None")
        from .checkpoint import inspect_checkpoint, load_model, require_tokenizer

        # One look at the checkpoint (a Hub id becomes its local folder; a missing directory is
        # reported as such), then the tokenizer: explicit path if given, else tokenizer.model beside
        # the weights. Both fail before minutes of weight loading.
        info = inspect_checkpoint(ckpt_dir)
        tokenizer_path = require_tokenizer(info.root, tokenizer_path)
        tokenizer = Tokenizer(tokenizer_path)
        model = load_model(info, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
                           dtype=dtype, model_parallel_size=model_parallel_size,
                           rope_scale_factor=rope_scale_factor, verbose=verbose)
        if quantize == "int8":
            from .quantize import quantize_int8  # imported only when asked for

            quantize_int8(model)
        # Seeded after loading, so whatever the loader drew does not shift the sampling stream.
        torch.manual_seed(seed)
        return Llama(model, tokenizer, compile=compile)

    # ------------------------------------------------------------------------------ generation

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Continue each prompt (a list of token ids) by up to ``max_gen_len`` tokens.

        Args:
            prompt_tokens: one list of ids per sequence; lengths may differ.
            max_gen_len: the most new tokens per sequence (fewer if the context fills up).
            temperature: 0 for greedy decoding, else the softmax temperature.
            top_p: nucleus sampling threshold (used when ``temperature > 0``).
            logprobs: also return the log-probability of every returned token (from the model's
                raw logits, before temperature and top-p).
            echo: return the prompt tokens too, before the generated ones. With ``logprobs``, each
                prompt token gets the log-probability the model gave it (0.0 for the first).

        Returns:
            ``(tokens, logprobs)``: per sequence the new token ids (prompt first with ``echo``), cut
            before the first stop token; ``logprobs`` is ``None`` unless requested.

        Raises:
            ValueError: more prompts than ``max_batch_size``, a prompt longer than ``max_seq_len``, an
                empty prompt, an id outside the vocabulary, or a bad sampling parameter.
        """
        if len(prompt_tokens) == 0:
            return [], ([] if logprobs else None)
        batch = self._prepare(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        for _ in self._decode(batch, temperature, top_p, logprobs, echo, self.stop_check_interval):
            pass

        all_tokens = batch.tokens.tolist()
        all_logprobs = batch.token_logprobs.tolist() if logprobs else None
        out_tokens: list[list[int]] = []
        out_logprobs: list[list[float]] = []
        stop = set(self.tokenizer.stop_tokens)
        for i, row in enumerate(all_tokens):
            prompt_len, end = batch.prompt_lens[i], batch.ends[i]
            generated = row[prompt_len:end]
            cut = next((j for j, t in enumerate(generated) if t in stop), len(generated))
            start = 0 if echo else prompt_len
            stop_at = prompt_len + cut
            out_tokens.append(row[start:stop_at])
            if all_logprobs is not None:
                out_logprobs.append(all_logprobs[i][start:stop_at])
        return out_tokens, (out_logprobs if logprobs else None)

    def stream(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
    ) -> Iterator[list[str]]:
        """Generate like :meth:`generate`, yielding text as it is produced.

        Yields one list per decoding step that produced text, holding a text delta for every prompt
        (``""`` where a row had nothing new). A row's deltas concatenated equal the decoded text
        :meth:`generate` would return for it under the same seed; a multi-byte character split
        across tokens is held back until complete. ``max_gen_len`` defaults to what fits.
        """
        if len(prompt_tokens) == 0:
            return iter(())
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        # Validated here, not at the first next(): bad input fails where the call is made.
        batch = self._prepare(prompt_tokens, max_gen_len, temperature, top_p, False)
        return self._stream_batch(batch, temperature, top_p)

    def _stream_batch(self, batch: _Batch, temperature: float, top_p: float) -> Iterator[list[str]]:
        stop = set(self.tokenizer.stop_tokens)
        decoders = [StreamDecoder(self.tokenizer) for _ in batch.prompt_lens]
        finished = [end <= length for end, length in zip(batch.ends, batch.prompt_lens, strict=True)]
        for cur_pos in self._decode(batch, temperature, top_p, False, False, 1):
            column = batch.tokens[:, cur_pos].tolist()
            deltas = []
            for i, token in enumerate(column):
                if finished[i] or cur_pos < batch.prompt_lens[i]:
                    deltas.append("")
                    continue
                if token in stop:
                    finished[i] = True
                    deltas.append(decoders[i].flush())
                    continue
                text = decoders[i].push(token)
                if cur_pos >= batch.ends[i] - 1:
                    finished[i] = True
                    text += decoders[i].flush()
                deltas.append(text)
            if any(deltas):
                yield deltas
        tail = [decoder.flush() if not done else "" for decoder, done in zip(decoders, finished, strict=True)]
        if any(tail):
            yield tail

    # ------------------------------------------------------------------------------ text and chat

    def text_completion(
        self,
        prompts: Sequence[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each text prompt (encoded with ``<|begin_of_text|>``).

        Returns ``[{"generation": str}]``, plus ``"tokens"`` (each token's text) and ``"logprobs"``
        with ``logprobs=True``. ``max_gen_len`` defaults to whatever fits in ``max_seq_len``.
        """
        prompt_tokens = self._encode_prompts(prompts)
        tokens, token_logprobs = self.generate(prompt_tokens, self._default_gen_len(max_gen_len),
                                               temperature, top_p, logprobs, echo)
        results: list[CompletionPrediction] = []
        for i, ids in enumerate(tokens):
            result: CompletionPrediction = {"generation": self.tokenizer.decode(ids)}
            if token_logprobs is not None:
                result["tokens"] = [self.tokenizer.decode([t]) for t in ids]
                result["logprobs"] = token_logprobs[i]
            results.append(result)
        return results

    def chat_completion(
        self,
        dialogs: Sequence[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
    ) -> list[ChatPrediction]:
        """Answer each dialog (a list of ``{"role", "content"}`` messages ending with a user or
        ipython message) with an assistant message.

        Returns ``[{"generation": {"role": "assistant", "content": str}}]``, plus ``"tokens"`` and
        ``"logprobs"`` with ``logprobs=True``.
        """
        prompt_tokens = self._encode_dialogs(dialogs)
        tokens, token_logprobs = self.generate(prompt_tokens, self._default_gen_len(max_gen_len),
                                               temperature, top_p, logprobs)
        results: list[ChatPrediction] = []
        for i, ids in enumerate(tokens):
            result: ChatPrediction = {
                "generation": {"role": "assistant", "content": self.tokenizer.decode(ids)}
            }
            if token_logprobs is not None:
                result["tokens"] = [self.tokenizer.decode([t]) for t in ids]
                result["logprobs"] = token_logprobs[i]
            results.append(result)
        return results

    @overload
    def stream_text_completion(self, prompts: str, temperature: float = ..., top_p: float = ...,
                               max_gen_len: int | None = ...) -> Iterator[str]: ...

    @overload
    def stream_text_completion(self, prompts: Sequence[str], temperature: float = ..., top_p: float = ...,
                               max_gen_len: int | None = ...) -> Iterator[list[str]]: ...

    def stream_text_completion(self, prompts, temperature=0.6, top_p=0.9, max_gen_len=None):
        """Stream :meth:`text_completion`: for one prompt (a ``str``) yields text deltas; for a list
        of prompts yields lists of per-prompt deltas (see :meth:`stream`)."""
        if isinstance(prompts, str):
            return self._single(self.stream(self._encode_prompts([prompts]), max_gen_len, temperature, top_p))
        return self.stream(self._encode_prompts(prompts), max_gen_len, temperature, top_p)

    @overload
    def stream_chat_completion(self, dialogs: Dialog, temperature: float = ..., top_p: float = ...,
                               max_gen_len: int | None = ...) -> Iterator[str]: ...

    @overload
    def stream_chat_completion(self, dialogs: Sequence[Dialog], temperature: float = ..., top_p: float = ...,
                               max_gen_len: int | None = ...) -> Iterator[list[str]]: ...

    def stream_chat_completion(self, dialogs, temperature=0.6, top_p=0.9, max_gen_len=None):
        """Stream :meth:`chat_completion`: for one dialog (a list of messages) yields the assistant's
        text deltas; for a list of dialogs yields lists of per-dialog deltas (see :meth:`stream`)."""
        single = len(dialogs) > 0 and isinstance(dialogs[0], Mapping)
        if single:
            prompt = self._encode_dialogs([dialogs])
            return self._single(self.stream(prompt, max_gen_len, temperature, top_p))
        return self.stream(self._encode_dialogs(dialogs), max_gen_len, temperature, top_p)

    # ------------------------------------------------------------------------------ internals

    @staticmethod
    def _single(deltas: Iterator[list[str]]) -> Iterator[str]:
        for step in deltas:
            yield step[0]

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single string")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def _encode_dialogs(self, dialogs: Sequence[Dialog]) -> list[list[int]]:
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, i)
        return [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]

    def _default_gen_len(self, max_gen_len: int | None) -> int:
        # As in the reference: "as much as fits"; generate() bounds it by the room after the prompt.
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prepare(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float,
                 top_p: float, logprobs: bool) -> _Batch:
        params = self.model.params
        bsz = len(prompt_tokens)
        if bsz > params.max_batch_size:
            raise ValueError(f"{bsz} prompts exceed max_batch_size={params.max_batch_size}")
        if not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be a non-negative integer, got {max_gen_len!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        lens = [len(p) for p in prompt_tokens]
        for i, n in enumerate(lens):
            if n == 0:
                raise ValueError(f"prompt {i} is empty (a Llama 3 prompt starts with <|begin_of_text|>)")
            if n > params.max_seq_len:
                raise ValueError(f"prompt {i} has {n} tokens, more than max_seq_len={params.max_seq_len}")
        low = min(min(p) for p in prompt_tokens)
        high = max(max(p) for p in prompt_tokens)
        if low < 0 or high >= params.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{params.vocab_size - 1})")

        min_len, max_len = min(lens), max(lens)
        total_len = min(params.max_seq_len, max_len + max_gen_len)
        device = self.device
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long)
        for i, prompt in enumerate(prompt_tokens):
            tokens[i, : lens[i]] = torch.tensor(list(prompt), dtype=torch.long)
        ends = [min(n + max_gen_len, total_len) for n in lens]
        lens_t = torch.tensor(lens)
        in_prompt = torch.arange(total_len)[None, :] < lens_t[:, None]
        return _Batch(
            tokens=tokens.to(device),
            prompt_lens=lens,
            ends=ends,
            total_len=total_len,
            min_prompt_len=min_len,
            in_prompt=in_prompt.to(device),
            last_pos=(torch.tensor(ends) - 1).to(device),
            token_logprobs=torch.zeros(bsz, total_len, device=device) if logprobs else None,
        )

    @torch.no_grad()
    def _decode(self, batch: _Batch, temperature: float, top_p: float, logprobs: bool, echo: bool,
                check_every: int) -> Iterator[int]:
        """Fill ``batch.tokens`` (and ``token_logprobs``) in place, one position per step; yields the
        position just written. Stops when every row is finished."""
        tokens, in_prompt = batch.tokens, batch.in_prompt
        bsz = tokens.shape[0]
        min_len, total_len = batch.min_prompt_len, batch.total_len
        full_logits = logprobs and echo  # prompt logprobs need every prefill position
        if full_logits and min_len == total_len:
            # Nothing to generate and no prompt left to feed: score the prompts in one pass.
            logits = self.model.forward(tokens, 0)
            self._score(batch, logits[:, :-1], 1, total_len)
            return

        stop_ids = torch.tensor(self.tokenizer.stop_tokens, device=tokens.device)
        done = torch.zeros(bsz, dtype=torch.bool, device=tokens.device)
        step_tokens = input_pos = None
        if self._decode_step is not None:
            # Fixed buffers: a CUDA graph replays with the same input addresses every step.
            step_tokens = torch.empty(bsz, 1, dtype=torch.long, device=tokens.device)
            input_pos = torch.empty(1, dtype=torch.long, device=tokens.device)

        prev_pos = 0
        for cur_pos in range(min_len, total_len):
            if prev_pos == 0:
                logits = self.model.forward(tokens[:, :cur_pos], 0, last_only=not full_logits)
            elif self._decode_step is not None:
                step_tokens.copy_(tokens[:, prev_pos:cur_pos])
                input_pos.fill_(prev_pos)
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self._decode_step(step_tokens, input_pos)
            else:
                logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=True)

            next_token = sample_next_token(logits[:, -1], temperature, top_p)
            # Rows still inside their prompt keep the prompt token.
            next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                if logits.shape[1] > 1:
                    self._score(batch, logits, prev_pos + 1, cur_pos + 1)
                else:
                    self._score(batch, logits, cur_pos, cur_pos + 1)
            done |= ~in_prompt[:, cur_pos] & torch.isin(next_token, stop_ids)
            done |= batch.last_pos <= cur_pos
            prev_pos = cur_pos
            yield cur_pos
            if ((cur_pos - min_len + 1) % check_every == 0 or cur_pos == total_len - 1) and bool(done.all()):
                break

    @staticmethod
    def _score(batch: _Batch, logits: torch.Tensor, start: int, end: int) -> None:
        """log p(token at position t) for t in [start, end), from ``logits`` predicting exactly those."""
        target = batch.tokens[:, start:end, None]
        # log_softmax + gather rather than cross_entropy: the latter's float32 CPU kernel rounds
        # log-probabilities near 0 to exactly 0 over a 128K vocabulary.
        batch.token_logprobs[:, start:end] = torch.log_softmax(logits, dim=-1).gather(-1, target)[..., 0]


def _model_device(model: torch.nn.Module) -> torch.device:
    embedding: Any = getattr(model, "tok_embeddings", None)
    if embedding is not None and hasattr(embedding, "weight"):
        return embedding.weight.device
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")
