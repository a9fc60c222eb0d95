"""Complete a few text prompts with a pretrained (base) Llama 3 model.

    python scripts/example_text_completion.py CKPT_DIR [--tokenizer_path PATH]
    torchrun --nproc_per_node N scripts/example_text_completion.py CKPT_DIR

Every rank runs the model; only rank 0 prints.
"""

from __future__ import annotations

import os

import fire

from llama3.generation import Llama

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
    quantize: str | None = None,
) -> None:
    """Generate a continuation of each example prompt and print it."""
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed,
                            device=device, dtype=dtype, rope_scale_factor=rope_scale_factor,
                            compile=compile, quantize=quantize)
    prompts = PROMPTS[:max_batch_size]
    results = generator.text_completion(prompts, temperature=temperature, top_p=top_p,
                                        max_gen_len=max_gen_len)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for prompt, result in zip(prompts, results, strict=True):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
