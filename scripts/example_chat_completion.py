"""Answer a few dialogs with a Llama 3 instruct model.

    python scripts/example_chat_completion.py CKPT_DIR [--tokenizer_path PATH]
    torchrun --nproc_per_node N scripts/example_chat_completion.py CKPT_DIR

Every rank runs the model; only rank 0 prints. ``max_gen_len`` defaults to whatever fits in
``max_seq_len``.
"""

from __future__ import annotations

import os

import fire

from llama3.generation import Llama
from llama3.tokenizer import Dialog

DIALOGS: list[Dialog] = [
    [{"role": "user", "content": "How do I keep basil alive on a windowsill?"}],
    [
        {"role": "user", "content": "Suggest a name for a grey cat."},
        {"role": "assistant", "content": "How about Ash, Smokey or Pebble?"},
        {"role": "user", "content": "Why would the second one suit her?"},
    ],
    [
        {"role": "system", "content": "Answer in exactly one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "system", "content": "You are a patient maths tutor."},
        {"role": "user", "content": "What is 17 times 23? Show the steps."},
    ],
]


def main(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: int | None = None,
    model_parallel_size: int | None = None,
    seed: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    rope_scale_factor: float | None = None,
    compile: bool = False,
    quantize: str | None = None,
) -> None:
    """Answer each example dialog and print the conversation."""
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed,
                            device=device, dtype=dtype, rope_scale_factor=rope_scale_factor,
                            compile=compile, quantize=quantize)
    dialogs = DIALOGS[:max_batch_size]
    results = generator.chat_completion(dialogs, temperature=temperature, top_p=top_p,
                                        max_gen_len=max_gen_len)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for dialog, result in zip(dialogs, results, strict=True):
        for message in dialog:
            print(f"{message['role'].capitalize()}: {message['content']}\n")
        answer = result["generation"]
        print(f"> {answer['role'].capitalize()}: {answer['content']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
