"""Generating text with a Llama 3 model: ``Llama`` and its text, chat and streaming API.

``Llama`` pairs a :class:`~llama3.model.Transformer` with a :class:`~llama3.tokenizer.Tokenizer`
and offers Meta's reference API (``build``, ``generate``, ``text_completion``, ``chat_completion``)
plus streaming (``stream``, ``stream_text_completion``, ``stream_chat_completion``).

Decoding itself (the token buffer, prefill then one position per step, where a row finishes, the
decode step and its kv-length buckets, NaN/inf detection) is in :mod:`llama3.decoding`; loading
for ``Llama.build`` (every check before the weights, the kernel choice) in :mod:`llama3.loading`.

One ``Llama`` owns one KV cache, so calls on it are serialised by a lock; a stream overtaken by
another call raises :class:`ConcurrentUseError` at its next step (see the README, "Errors").

Differences from the reference, all in the caller's favour: prompt positions are known from the
prompt lengths (the reference compares with the pad id, so a prompt containing that id broke it);
with ``echo`` only the generated part is searched for stop tokens (the reference cut an echoed chat
prompt at its first ``<|eot_id|>``); bad input raises ``ValueError`` instead of failing an assert.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

import torch

from .call_lock import CallLock, ReentrantCallError  # noqa: F401 - ReentrantCallError re-exported
from .chat_format import ChatFormat, Dialog, validate_dialog
from .consistency import check_call_agrees
from .decoding import (
    Batch,
    DecodeStep,
    NonFiniteLogitsError,
    SamplingParams,
    decode,
    make_decode_step,
    model_device,
    prepare_batch,
)
from .errors import LlamaError
from .loading import check_vocabulary, load_for_generation
from .memory import NotEnoughMemoryError
from .model import PREFILL_CHUNK
from .predictions import ChatPrediction, CompletionPrediction
from .progress import Progress
from .tokenizer import StreamDecoder, Tokenizer
from .validation import strict_bool
from .warmup import warm_up_decode_step

__all__ = [
    "ChatPrediction", "CompletionPrediction", "ConcurrentUseError", "DecodeStep", "Llama",
    "NonFiniteLogitsError", "NotEnoughMemoryError", "SamplingParams", "make_decode_step", "validate_dialog",
]

logger = logging.getLogger(__name__)


class ConcurrentUseError(LlamaError, RuntimeError):
    """A stream was overtaken: another call used the ``Llama``'s KV cache since its last step."""


class Llama:
    """A Llama 3 model with its tokenizer, ready to generate.

    Args:
        model: a :class:`~llama3.model.Transformer` (or anything with its ``params``, ``forward``
            with its fixed-shape ``kv_len`` call), on the device to run on.
        tokenizer: the Llama 3 :class:`~llama3.tokenizer.Tokenizer`; its vocabulary must be the model's.
        compile: decode through ``make_decode_step(model, compile=True)``: ``torch.compile`` of the
            fixed-shape step ``model(tokens, input_pos, kv_len=...)`` (CUDA graphs on CUDA). The
            prompt prefill stays eager.
        decode_step: the one-token step to decode with (see :func:`~llama3.decoding.make_decode_step`);
            default ``make_decode_step(model, compile)``.

    Calls are serialised: one ``Llama`` holds one KV cache (see the README, "Errors").
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, compile: bool = False,
                 decode_step: DecodeStep | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        compile = strict_bool(compile, "compile")
        check_vocabulary(getattr(tokenizer, "n_words", None), model.params.vocab_size)
        if compile and decode_step is not None:
            raise ValueError("pass compile=True or a decode_step, not both")
        self.device = model_device(model)
        self.decode_step = decode_step if decode_step is not None else make_decode_step(model, compile)
        # Checking "all rows finished?" reads a flag back from the device, which stalls an
        # accelerator's queue; there we check every few steps (the extra steps cost little and are
        # cut from the output). On the CPU the read is free.
        self.stop_check_interval = 1 if self.device.type == "cpu" else 8
        self._lock = CallLock()  # re-entry raises ReentrantCallError instead of deadlocking
        self._cache_owner: object | None = None  # the call whose tokens the KV cache holds
        # New tokens per row of the latest generate/stream call, so far (stop tokens not counted):
        # what a timing report counts (a stream yields text, whose re-encoding may differ).
        self.last_new_tokens: list[int] = []

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
        warm_up: bool = False,
        quantize: str | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        verbose: bool = True,
        fbgemm: bool | None = None,
        int4_group_size: int | None = None,
    ) -> Llama:
        """Load a checkpoint (Meta or Hugging Face format) and its tokenizer.

        Before any weight is read, checks that the tokenizer belongs to the model and that weights
        plus KV cache fit in the device's free memory (logging the cache size).

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
            compile: decode with ``torch.compile`` (see :class:`Llama`). Each kv-length bucket
                (256, 512, ... up to ``max_seq_len``) compiles the first time a conversation
                reaches it (~30-90 s each for 8B on a GPU), which is logged.
            warm_up: with ``compile``, compile every bucket now, for batch size
                ``max_batch_size``, each compile logged with its time (:mod:`llama3.warmup`):
                minutes at start-up instead of pauses mid-answer.
            quantize: quantize a float checkpoint's linear layers at load: ``"int8"`` (int8
                weight-only, ``llama3.kernels.int8``), ``"w8a8"`` (int8 weights and int8 dynamic
                activations, CPU, the speed mode: ``llama3.kernels.w8a8``), ``"fp8"`` (Meta's
                fp8_mixed: row-wise float8 feed-forward of every layer but the first and last,
                ``llama3.kernels.fp8``) or ``"int4"`` (group-wise int4 weight-only, every linear,
                ``llama3.kernels.int4``).
                A checkpoint shipped quantized (Meta fp8_mixed / INT4_EO8, Hugging Face
                fbgemm_fp8) is recognised by itself; ``quantize=`` on it is refused.
            prefill_chunk: prompts are processed this many tokens at a time (bounds the memory of
                long prompts).
            verbose: log progress (loading, cache size, compile warm-up, long generations) to stderr.
            fbgemm: hold the linear layers' weights packed for FBGEMM's float16 kernels
                (``llama3.kernels.fbgemm``). ``None`` (default): where it measures fastest on this
                machine (``llama3.kernels.choose_kernels``, cached per machine); ``False``: never.
            int4_group_size: weights per int4 scale with ``quantize="int4"``: 32, 64, 128 or 256
                (default 128, or 64/32 for a model whose widths 128 does not divide).

        Raises:
            NotEnoughMemoryError: weights + KV cache exceed the device's free memory.
            ValueError: a bad argument, or a tokenizer whose vocabulary is not the model's.
        """
        model, tokenizer = load_for_generation(
            ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed, device=device,
            dtype=dtype, rope_scale_factor=rope_scale_factor, compile=compile, warm_up=warm_up,
            quantize=quantize, prefill_chunk=prefill_chunk, verbose=verbose, fbgemm=fbgemm,
            int4_group_size=int4_group_size)
        llama = Llama(model, tokenizer, compile=compile)
        if warm_up:
            warm_up_decode_step(llama.decode_step, batch_sizes=(max_batch_size,))
        return llama

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
            prompt_tokens: one list of integer ids per sequence; lengths may differ.
            max_gen_len: the most new tokens per sequence (fewer if the context fills up).
            temperature: 0 for greedy decoding, else the softmax temperature (see :class:`SamplingParams`).
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
                empty prompt, a non-integer id or one outside the vocabulary, or a bad sampling parameter.
            NonFiniteLogitsError: the model produced NaN or infinite logits.
        """
        tokens, token_logprobs, _ = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                                                   echo)
        return tokens, token_logprobs

    def _generate(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float,
                  top_p: float, logprobs: bool, echo: bool = False
                  ) -> tuple[list[list[int]], list[list[float]] | None, list[int | None]]:
        """:meth:`generate`, plus each row's stop token (``None`` where it ran out of length)."""
        check_call_agrees(prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
                          logprobs=logprobs, echo=echo)  # before validation: every rank takes part
        if len(prompt_tokens) == 0:
            return [], ([] if logprobs else None), []
        sampling = SamplingParams(temperature, top_p)
        batch = self._prepare(prompt_tokens, max_gen_len, logprobs)
        # Progress counts the new tokens every answer has (those of the longest prompt's row), from
        # the first of them: "12 of 32 new tokens", and its tok/s per answer, whatever the prompts.
        longest = max(batch.prompt_lens)
        with self._lock:
            self._cache_owner = object()  # overtakes any stream in progress
            progress = None
            for cur_pos in decode(self.model, self.decode_step, batch, sampling, self.tokenizer.stop_tokens,
                                  logprobs=logprobs, echo=echo, check_every=self.stop_check_interval):
                if cur_pos >= longest:
                    if progress is None:
                        progress = Progress(f"generating (batch of {len(batch.prompt_lens)})",
                                            total=batch.tokens.shape[1] - longest, unit="new tokens",
                                            rate_unit="tok/s per answer", logger=logger, final=False)
                    progress.update()
            if progress is not None:
                progress.close()
            all_tokens = batch.tokens.tolist()
            ends = batch.end.tolist()
            self.last_new_tokens = [end - n for end, n in zip(ends, batch.prompt_lens, strict=True)]
            all_logprobs = batch.token_logprobs.tolist() if logprobs else None

        out_tokens, out_logprobs, stop_tokens = [], [], []
        for i, row in enumerate(all_tokens):
            start = 0 if echo else batch.prompt_lens[i]
            out_tokens.append(row[start : ends[i]])
            if all_logprobs is not None:
                out_logprobs.append(all_logprobs[i][start : ends[i]])
            stop_tokens.append(row[ends[i]] if ends[i] < batch.limit(i) else None)
        return out_tokens, (out_logprobs if logprobs else None), stop_tokens

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

        A stream holds the ``Llama``'s KV cache between its steps; another call on the same
        ``Llama`` (another stream, ``generate``...) overtakes it, and its next step raises
        :class:`ConcurrentUseError`.
        """
        check_call_agrees(prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
                          stream=True)
        if len(prompt_tokens) == 0:
            return iter(())
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        # Validated here, not at the first next(): bad input fails where the call is made.
        sampling = SamplingParams(temperature, top_p)
        batch = self._prepare(prompt_tokens, max_gen_len, False)
        return self._stream_batch(batch, sampling)

    def _stream_batch(self, batch: Batch, sampling: SamplingParams) -> Iterator[list[str]]:
        decoders = [StreamDecoder(self.tokenizer) for _ in batch.prompt_lens]
        interval = self.stop_check_interval
        steps = decode(self.model, self.decode_step, batch, sampling, self.tokenizer.stop_tokens,
                       check_every=interval)
        me = object()
        first = True
        lo = hi = -1  # positions decoded but not yet read back from the device: lo..hi
        self.last_new_tokens = [0] * len(batch.prompt_lens)
        finished = False
        while not finished:
            with self._lock:
                if first:
                    self._cache_owner, first = me, False
                elif self._cache_owner is not me:
                    steps.close()
                    raise ConcurrentUseError(
                        "this stream was overtaken: another call on the same Llama used its KV cache "
                        "since the stream's last step, so the stream cannot continue. One Llama decodes "
                        "one call at a time: finish (or close) a stream before the next call, or use "
                        "one Llama per concurrent conversation")
                cur_pos = next(steps, None)
                if cur_pos is None:
                    finished = True
                else:
                    lo, hi = (cur_pos if lo < 0 else lo), cur_pos
                    if hi - lo + 1 < interval:
                        continue  # an accelerator reads tokens back every few steps, not every step
                if lo < 0:
                    return
                # One read back per `interval` steps: the new columns and each row's end, together.
                rows = torch.cat([batch.tokens[:, lo : hi + 1], batch.end[:, None]], dim=1).tolist()
            deltas = []
            for i, (*row, end) in enumerate(rows):
                # Output positions of row i: prompt_len .. end - 1; after the last one, flush (a
                # finished row keeps flushing "", which is harmless).
                text = ""
                for pos, token in enumerate(row, start=lo):
                    if batch.prompt_lens[i] <= pos < end:
                        text += decoders[i].push(token)
                    if pos + 1 >= end:
                        text += decoders[i].flush()
                deltas.append(text)
            self.last_new_tokens = [max(0, min(hi + 1, row[-1]) - n)
                                    for row, n in zip(rows, batch.prompt_lens, strict=True)]
            lo = hi = -1
            if any(deltas):
                yield deltas

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

        Returns ``[{"generation": message}]`` where ``message`` is what
        ``ChatFormat.decode_assistant_message`` makes of the reply: ``role`` ``"assistant"``,
        ``content``, ``tool_calls`` and ``stop_reason`` (``"end_of_turn"``, ``"end_of_message"``
        or ``"out_of_tokens"``); a plain dict that can go back into the dialog as it is. With
        ``logprobs=True`` also ``"tokens"`` and ``"logprobs"``.
        """
        prompt_tokens = self._encode_dialogs(dialogs)
        tokens, token_logprobs, stop_tokens = self._generate(
            prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p, logprobs)
        results: list[ChatPrediction] = []
        for i, ids in enumerate(tokens):
            # generate cut the stop token; handing it back lets the chat format name the stop reason.
            reply = ids if stop_tokens[i] is None else ids + [stop_tokens[i]]
            message = self.formatter.decode_assistant_message(reply)
            result: ChatPrediction = {"generation": message}
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

    def _prepare(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, logprobs: bool) -> Batch:
        return prepare_batch(prompt_tokens, max_gen_len, self.model.params, self.tokenizer.pad_id,
                             self.device, logprobs)

