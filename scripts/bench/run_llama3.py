"""llama3 under test: random weights of a named shape (or a checkpoint), the library's kernel choice,
and its own decode loop and decode step (``llama3.decoding``), timed step by step."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from llama3.decoding import SamplingParams, decode, make_decode_step, prepare_batch
from llama3.kernels import apply_kernels, choose_kernels
from llama3.model import ModelArgs, Transformer
from llama3.presets import PRESETS

from .probes import best_time, decode_bytes_per_step, peak_memory, sync

# name -> (weight dtype, quantize= of the chooser, fbgemm): fbgemm None = the library's choice
# (measured on this machine), False = torch's kernels only (LLAMA3_KERNELS=torch), True = FBGEMM.
PRECISIONS: dict[str, tuple[torch.dtype, str | None, bool | None]] = {
    "bf16": (torch.bfloat16, None, None), "fp16": (torch.float16, None, None),
    "int8": (torch.bfloat16, "int8", None), "w8a8": (torch.bfloat16, "w8a8", None),
    "int4": (torch.bfloat16, "int4", None), "fp8": (torch.bfloat16, "fp8", None),
    "bf16-torch": (torch.bfloat16, None, False), "fp16-torch": (torch.float16, None, False),
    "bf16-fbgemm": (torch.bfloat16, None, True), "fp16-fbgemm": (torch.float16, None, True),
    "int4-bf16-output": (torch.bfloat16, "int4", None)}
# Kernel overrides of a precision beyond the library's default: int4-bf16-output keeps the output
# projection in bf16 (torch's kernels), which quantize="int4" makes int4 like every other linear.
OVERRIDES = {"int4-bf16-output": "output=torch"}
# int4's group size here: 32 weights per scale, as llama.cpp's Q4_0 blocks (the comparison).
INT4_GROUP = 32

GREEDY = SamplingParams(temperature=0.0)
TOP_P = SamplingParams()  # the library's defaults: temperature 0.6, top-p 0.9


def build_model(shape: str | None, ckpt_dir: str | None, n_layers: int | None, device: torch.device,
                dtype: torch.dtype, max_batch_size: int, max_seq_len: int) -> Transformer:
    """Random weights of a named shape, or a checkpoint through llama3.checkpoint.load_model."""
    if ckpt_dir:
        from llama3.checkpoint import load_model  # only needed for real weights

        model = load_model(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                           device=device, dtype=dtype)
        return model.eval()
    params = dict(PRESETS[shape])
    if n_layers:
        params["n_layers"] = n_layers
    args = ModelArgs(**params, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    torch.manual_seed(0)  # the same weights every time: comparisons rebuild them
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the run dtype: no float32 copy
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prepare(model: Transformer, quantize: str | None, fbgemm: bool | None,
            override: str | None = None) -> str:
    """The linear layers' kernels, chosen and applied as ``Llama.build`` does
    (``llama3.kernels.choose_kernels`` — measured on this machine, cached — then ``apply_kernels``),
    for a float model or ``quantize`` (int8, w8a8, int4 with groups of ``INT4_GROUP``, fp8).
    ``override``: forced kernels (``LLAMA3_KERNELS`` syntax; fbgemm False: torch's everywhere).
    Returns the kernels' label for the tables (per family when they differ)."""
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    if fbgemm is False:
        override = "torch"
    plan = choose_kernels(model, device, dtype, quantize, override=override,
                          fbgemm=fbgemm or None, int4_group_size=INT4_GROUP if quantize == "int4" else None)
    apply_kernels(model, plan)
    labels = {family: choice.label() for family, choice in plan.families.items()}
    if len(set(labels.values())) == 1:
        return next(iter(labels.values()))
    short = {"attention": "attn", "feed-forward": "ffn", "output": "out"}
    return "; ".join(f"{short.get(family, family)} {label}" for family, label in labels.items())


def make_prompt(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random token ids, the same for the same (batch, length)."""
    g = torch.Generator().manual_seed(batch * 100003 + length)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def prefill(model: Transformer, prompt: torch.Tensor) -> None:
    """One prefill of ``prompt`` from position 0 (the logits of its last position only)."""
    model.forward(prompt, 0, last_only=True)


def timed_decode(model: Transformer, step: Any, prompt: torch.Tensor, n_tokens: int,
                 sampling: SamplingParams = GREEDY) -> tuple[list[float], list[int]]:
    """The library's decode loop (``llama3.decoding.decode``) with ``step``, after ``prompt``:
    the seconds of each of ``n_tokens`` steps (each one model step, the choice of the next token
    and the loop's bookkeeping; 2 untimed warm-up steps first) and row 0's tokens."""
    device = prompt.device
    batch = prepare_batch(prompt.tolist(), n_tokens + 3, model.params, 0, device, logprobs=False)
    start = prompt.shape[1]
    stamps = []
    for _ in decode(model, step, batch, sampling, stop_tokens=[]):
        sync(device)
        stamps.append(time.perf_counter())
    times = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:], strict=False)][2:]
    return times, batch.tokens[0, start:].tolist()


def decode_summary(row: dict[str, Any], batch: int, times: list[float]) -> float:
    """tokens/s of the median step (robust to other processes stealing a step), and the mean."""
    median = statistics.median(times)
    row[f"decode_b{batch}_tok_s"] = batch / median
    row[f"decode_b{batch}_mean_tok_s"] = batch * len(times) / sum(times)
    return batch / median


def run_ours(model: Transformer, step: Any, args: ModelArgs, dev: torch.device, dt: torch.dtype,
             prompt_lens: list[int], batch_sizes: list[int], decode_tokens: int, decode_context: int,
             repeats: int) -> dict[str, Any]:
    """Prefill tok/s per prompt length (with its peak memory) and decode tok/s per batch size."""
    row: dict[str, Any] = {}
    prefill(model, make_prompt(1, 8, args.vocab_size, dev))  # warm-up (kernel selection, allocator)
    for length in prompt_lens:
        prompt = make_prompt(1, length, args.vocab_size, dev)
        record: dict[str, float] = {}
        with peak_memory(dev, record):
            seconds = best_time(lambda p=prompt: prefill(model, p), dev, repeats)
        row[f"prefill_{length}_tok_s"] = length / seconds
        row[f"prefill_{length}_peak_mem_gb"] = record["peak_mem_gb"]
        print(f"  llama3 prefill {length}: {length / seconds:.1f} tok/s, peak memory "
              f"{record['peak_mem_gb']:.2f} GB", flush=True)
    for batch in batch_sizes:
        prompt = make_prompt(batch, decode_context, args.vocab_size, dev)
        # Best of `repeats` runs, by median step time: another process's burst spoils one run.
        runs = [timed_decode(model, step, prompt, decode_tokens)[0] for _ in range(repeats)]
        tok_s = decode_summary(row, batch, min(runs, key=statistics.median))
        mean_kv = decode_context + 2 + decode_tokens / 2
        w_bytes, kv_bytes = decode_bytes_per_step(model, args, batch, int(mean_kv), dt)
        row[f"decode_b{batch}_bytes_per_step"] = w_bytes + kv_bytes
        print(f"  llama3 decode b{batch}: {tok_s:.2f} tok/s ({(w_bytes + kv_bytes) / 1e9:.2f} GB read "
              f"per step)", flush=True)
    return row


def decode_at_max_seq_lens(shape: str | None, ckpt_dir: str | None, n_layers: int | None,
                           dev: torch.device, dt: torch.dtype, quantize: str | None, fbgemm: bool | None,
                           compile: bool, seq_lens: list[int], decode_context: int, decode_tokens: int,
                           repeats: int) -> dict[int, float]:
    """Batch-1 decode tok/s at a short position in models built for different context sizes."""
    by_seq_len: dict[int, float] = {}
    for msl in seq_lens:
        model = build_model(shape, ckpt_dir, n_layers, dev, dt, 1, msl)
        prepare(model, quantize, fbgemm)
        step = make_decode_step(model, compile)
        prompt = make_prompt(1, decode_context, model.params.vocab_size, dev)
        runs = [timed_decode(model, step, prompt, decode_tokens)[0] for _ in range(repeats)]
        by_seq_len[msl] = 1 / min(statistics.median(t) for t in runs)
        print(f"  llama3 decode b1 at position ~{decode_context}, max_seq_len {msl}: "
              f"{by_seq_len[msl]:.2f} tok/s", flush=True)
        del model, step
    return by_seq_len
