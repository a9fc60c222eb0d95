"""Complete a few text prompts with a pretrained (base) Llama 3 model.

    python scripts/example_text_completion.py CKPT_DIR [--tokenizer_path PATH]
    torchrun --nproc_per_node N scripts/example_text_completion.py CKPT_DIR

Every rank runs the model; only rank 0 prints.
"""

from __future__ import annotations

try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

from llama3.programs import quiet_interrupts, run_program

if __name__ == "__main__":
    quiet_interrupts()  # first: Ctrl-C while the imports below run ends quietly (status 130)

from llama3.cli import build_llama, fire_strict
from llama3.progress import is_rank_zero

PROMPTS = [
    # Plain continuation
    "The three most useful things to know about a new city are",
    "A good cup of tea starts with",
    # Few-shot: the examples show the model what to produce
    """Capitals of countries:

    Japan: Tokyo
    Kenya: Nairobi
    Peru: Lima
    Norway:""",
    """Plural forms:

    mouse -> mice
    child -> children
    cactus -> cacti
    goose ->""",
]


def main(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_batch_size: int = 4,
    max_gen_len: int = 64,
    model_parallel_size: int | None = None,
    seed: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    rope_scale_factor: float | None = None,
    compile: bool = False,
    warm_up: bool = False,
    quantize: str | None = None,
    prefill_chunk: int | None = None,
) -> None:
    """Generate a continuation of each example prompt and print it.

    Args:
        ckpt_dir: checkpoint directory (Meta or Hugging Face format).
        tokenizer_path: Meta's tokenizer.model (default: found beside the checkpoint).
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus (top-p) sampling threshold, in (0, 1].
        max_seq_len: context length (prompt + answer) to allocate the KV cache for.
        max_batch_size: how many of the example prompts to run, as one batch.
        max_gen_len: the most new tokens per answer.
        model_parallel_size: ranks to split the model across (default: every torchrun process).
        seed: random seed, the same on every rank.
        device: cuda, mps or cpu (default: the best available).
        dtype: bfloat16, float16 or float32 (default: the device's preferred one).
        rope_scale_factor: override the Llama 3.1+ RoPE scaling factor (32 for Llama 3.2).
        compile: decode with torch.compile.
        warm_up: with --compile, compile every context-length bucket at start-up (logged, with times).
        quantize: "int8", "w8a8" (CPU), "fp8" or "int4" to quantize a bf16 checkpoint at load
            (a quantized checkpoint is recognised by itself).
        prefill_chunk: process prompts in chunks of this many tokens (default: the library's).
    """
    generator, temperature, top_p = build_llama(
        ckpt_dir, tokenizer_path, temperature=temperature, top_p=top_p, max_seq_len=max_seq_len,
        max_batch_size=max_batch_size, model_parallel_size=model_parallel_size, seed=seed, device=device,
        dtype=dtype, rope_scale_factor=rope_scale_factor, compile=compile, warm_up=warm_up, quantize=quantize,
        prefill_chunk=prefill_chunk)
    prompts = PROMPTS[:max_batch_size]
    results = generator.text_completion(prompts, temperature=temperature, top_p=top_p,
                                        max_gen_len=max_gen_len)
    if not is_rank_zero():
        return
    for prompt, result in zip(prompts, results, strict=True):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    run_program(lambda: fire_strict(main))
