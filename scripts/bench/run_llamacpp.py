"""llama.cpp (llama-cpp-python) on the same weights: greedy decode and prefill, timed as ours are."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import torch

from llama3.model import Transformer

from .gguf_writer import write_gguf

# Our precision -> the GGUF type with the same bytes per weight (w8a8 is the speed mode against Q8_0).
GGUF_FOR = {"bf16": "BF16", "fp16": "F16", "int8": "Q8_0", "w8a8": "Q8_0", "int4": "Q4_0"}


def run_llamacpp(model: Transformer, gguf_type: str, prompt: torch.Tensor, decode_tokens: int,
                 repeats: int, prefill_len: int = 0) -> dict[str, Any]:
    """llama.cpp on ``model``'s (float) weights written as ``gguf_type``: greedy decode tok/s (median
    step of the best of ``repeats`` runs after 2 warm-up steps, as ours), its first greedy tokens,
    the prompt logits' distance to ours, and (``prefill_len`` > 0) prefill tok/s of that many
    tokens (best of ``repeats``, in one batch of up to 512 tokens as llama.cpp's default)."""
    import numpy as np
    from llama_cpp import Llama as LlamaCpp

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"model-{gguf_type}.gguf")
        write_gguf(model, path, gguf_type)
        n_ctx = max(model.params.max_seq_len, prefill_len + 8)
        llm = LlamaCpp(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                       n_threads_batch=threads, verbose=False)
        vocab = model.params.vocab_size

        def last_logits() -> np.ndarray:  # the last evaluated position's (no copy of all rows)
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

        ids = prompt[0].tolist()
        llm.eval(ids)  # the same weights give the same logits, to the precision's rounding
        theirs = torch.tensor(last_logits(), dtype=torch.float32)
        with torch.inference_mode():
            ours = model.forward(prompt, 0, last_only=True)[0, -1].float()
        result: dict[str, Any] = dict(gguf_type=gguf_type,
                                      logit_diff_in_std=float((ours - theirs).abs().max() / ours.std()))
        best, tokens = None, []
        for _ in range(repeats):
            llm.reset()
            llm.eval(ids)
            token = int(np.argmax(last_logits()))
            out, times = [token], []
            for i in range(decode_tokens + 2):
                start = time.perf_counter()
                llm.eval([token])
                token = int(np.argmax(last_logits()))
                if i >= 2:
                    times.append(time.perf_counter() - start)
                out.append(token)
            tokens = out
            median = statistics.median(times)
            best = median if best is None else min(best, median)
        result.update(tok_s=1 / best, tokens=tokens)
        if prefill_len:
            g = torch.Generator().manual_seed(prefill_len)
            long_prompt = torch.randint(0, vocab, (prefill_len,), generator=g).tolist()
            seconds = []
            for _ in range(repeats + 1):  # the first run warms up
                llm.reset()
                start = time.perf_counter()
                llm.eval(long_prompt)
                seconds.append(time.perf_counter() - start)
            result["prefill_tok_s"] = prefill_len / min(seconds[1:])
        llm.close()
    return result
