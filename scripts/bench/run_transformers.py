"""Hugging Face transformers on the same weights: ``LlamaForCausalLM.generate`` as users run it."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from llama3.checkpoint import meta_to_hf_state_dict, model_args_to_hf_config
from llama3.model import ModelArgs, Transformer

from .probes import best_time, sync
from .run_llama3 import decode_summary, make_prompt


def build_hf_model(model: Transformer, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with ``model``'s weights."""
    import transformers

    args = model.params
    # Our own config writer; no token ids (generation must not stop early), positions for any length.
    config = transformers.LlamaConfig(**{
        **model_args_to_hf_config(args, dtype), "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0,
        "max_position_embeddings": max(args.max_seq_len, 131072), "attn_implementation": "sdpa",
    })
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), args), strict=False)
    missing = [k for k in missing if not (args.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion: missing {missing}, unexpected {unexpected}")
    if args.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def logit_diff(model: Transformer, hf: torch.nn.Module, device: torch.device) -> float:
    """Both models hold the same weights: their logits agree to the dtype's rounding."""
    prompt = make_prompt(1, 8, model.params.vocab_size, device)
    with torch.inference_mode():
        theirs = hf(prompt).logits.float()
        return (model.forward(prompt, 0) - theirs).abs().max().item()


def hf_generate(hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens; returns the seconds between
    consecutive tokens (a logits processor, called once per generated token, takes the times)."""
    import transformers

    stamps: list[float] = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            sync(scores.device)
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                    logits_processor=transformers.LogitsProcessorList([Clock()]))
    return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:], strict=False)]


def run_hf(hf: torch.nn.Module, args: ModelArgs, dev: torch.device, prompt_lens: list[int],
           batch_sizes: list[int], decode_tokens: int, decode_context: int, repeats: int) -> dict[str, Any]:
    """Prefill and decode tok/s of transformers, the keys as :func:`run_llama3.run_ours`'s."""
    row: dict[str, Any] = {}
    hf_generate(hf, make_prompt(1, 8, args.vocab_size, dev), 1)
    for length in prompt_lens:
        prompt = make_prompt(1, length, args.vocab_size, dev)
        seconds = best_time(lambda p=prompt: hf_generate(hf, p, 1), dev, repeats)
        row[f"prefill_{length}_tok_s"] = length / seconds
        print(f"  transformers prefill {length}: {length / seconds:.1f} tok/s", flush=True)
    for batch in batch_sizes:
        prompt = make_prompt(batch, decode_context, args.vocab_size, dev)
        hf_generate(hf, prompt, 3)  # warm-up
        # The same 2 warm-up steps dropped as ours, and the best of `repeats` runs.
        runs = [hf_generate(hf, prompt, decode_tokens + 3)[2:] for _ in range(repeats)]
        tok_s = decode_summary(row, batch, min(runs, key=statistics.median))
        print(f"  transformers decode b{batch}: {tok_s:.2f} tok/s", flush=True)
    return row
