"""Loading a checkpoint for generation: what :meth:`llama3.generation.Llama.build` does before it
wraps the model.

Everything that can fail without the weights fails first (the arguments, the checkpoint's folder,
the tokenizer and whether its vocabulary is the model's, the kernel plan and whether weights plus
KV cache fit the device); then the weights are loaded, the kernels swapped in and torch seeded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .consistency import check_load_agrees
from .errors import InvalidArgumentError
from .kernels import QUANTIZE_MODES, apply_kernels, choose_kernels, quantized_alternatives
from .memory import check_fits
from .progress import configure_logging
from .tokenizer import Tokenizer, require_tokenizer
from .validation import optional, positive_int, strict_bool

__all__ = ["check_vocabulary", "load_for_generation"]

logger = logging.getLogger(__name__)


def load_for_generation(
    ckpt_dir: str | Path,
    tokenizer_path: str | Path | None,
    max_seq_len: int,
    max_batch_size: int,
    model_parallel_size: int | None,
    seed: int,
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    rope_scale_factor: float | None,
    compile: bool,
    warm_up: bool,
    quantize: str | None,
    prefill_chunk: int,
    verbose: bool,
    fbgemm: bool | None,
    int4_group_size: int | None,
) -> tuple[torch.nn.Module, Tokenizer]:
    """The model (kernels chosen and swapped in, on its device) and its tokenizer, for
    :meth:`llama3.generation.Llama.build`, whose arguments these are, every one passed (the
    defaults live there only; ``compile`` and ``warm_up`` are only checked here: the decode step is
    the ``Llama``'s).

    Raises:
        NotEnoughMemoryError: weights + KV cache exceed the device's free memory.
        ValueError: a bad argument, or a tokenizer whose vocabulary is not the model's.
    """
    compile, verbose = strict_bool(compile, "compile"), strict_bool(verbose, "verbose")  # "no" is truthy
    fbgemm = optional(strict_bool, fbgemm, "fbgemm")
    model_parallel_size = optional(positive_int, model_parallel_size, "model_parallel_size")
    configure_logging(verbose)
    if fbgemm and quantize is not None:
        raise InvalidArgumentError("fbgemm=True packs bfloat16/float16 weights; it does not combine "
                                   "with quantize")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise InvalidArgumentError(f"unknown quantize={quantize!r}; choose one of "
                                   f"{', '.join(QUANTIZE_MODES)} or None")
    prefill_chunk = positive_int(prefill_chunk, "prefill_chunk")
    if strict_bool(warm_up, "warm_up") and not compile:
        raise InvalidArgumentError("warm_up=True compiles the decode step ahead of time: pass "
                                   "compile=True too (--compile with --warm-up)")
    from .checkpoint import detect_quantization, inspect_checkpoint, load_model, read_model_args
    from .distributed import select_device, select_dtype

    # One look at the checkpoint (a Hub id becomes its local folder; a missing directory is
    # reported as such), then the tokenizer (explicit path, else tokenizer.model beside the
    # weights), the shape and the memory it needs: all fail before minutes of weight loading.
    info = inspect_checkpoint(ckpt_dir)
    tokenizer_file = require_tokenizer(info.root, tokenizer_path)
    tokenizer = Tokenizer(tokenizer_file)
    args = read_model_args(info, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                           rope_scale_factor=rope_scale_factor)
    check_vocabulary(tokenizer.n_words, args.vocab_size, tokenizer_path=tokenizer_file)
    target = select_device(device)
    world = model_parallel_size or int(os.environ.get("WORLD_SIZE", "1"))
    run_dtype = select_dtype(target, dtype)
    # Which kernel computes each linear layer (logged with the reason); the weights' formats
    # decide how many bytes they take.
    stored = detect_quantization(info)  # a checkpoint shipped quantized: its layers keep their format
    plan = choose_kernels(args, target, run_dtype, quantize, fbgemm=fbgemm,
                          int4_group_size=int4_group_size, stored=stored)
    plan = check_fits(args, run_dtype, target, world, plan, alternatives=None if quantize or stored
                      else quantized_alternatives(args, target, run_dtype))

    model = load_model(info, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
                       dtype=dtype, model_parallel_size=model_parallel_size,
                       rope_scale_factor=rope_scale_factor, verbose=verbose)
    check_load_agrees(info, args, tokenizer_file)  # every rank loaded the same (llama3.consistency)
    model.prefill_chunk = prefill_chunk
    apply_kernels(model, plan)
    # Seeded after loading, so whatever the loader drew does not shift the sampling stream.
    torch.manual_seed(seed)
    if target.type == "cuda" and not compile:
        logger.info("Decoding eagerly (the readable default); on CUDA, compile=True (--compile) is "
                    "the fast path: the decode step replayed as CUDA graphs")
    return model, tokenizer


def check_vocabulary(n_words: int | None, vocab_size: int, tokenizer_path: Any = None) -> None:
    """Refuse (``ValueError``) a tokenizer of ``n_words`` tokens for a model of ``vocab_size``."""
    if n_words is None or n_words == vocab_size:
        return
    which = f"the tokenizer {tokenizer_path}" if tokenizer_path else "the tokenizer"
    hint = (" A smaller count usually means an incomplete tokenizer.model (the Llama 3 one has 128,000 "
            "ranks + 256 special tokens): get the file again." if n_words < vocab_size else "")
    raise ValueError(f"{which} has {n_words} tokens but the model's vocabulary has {vocab_size}; they do "
                     f"not belong together.{hint}")
