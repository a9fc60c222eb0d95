"""Quantized checkpoints on model-parallel ranks: run under torchrun by
tests/test_quantized_formats.py (gloo, CPU), and imported by it for :func:`build_quantized`.

    python -m torch.distributed.run --nproc_per_node N tests/_quantized_mp_worker.py JOBS.json

JOBS.json: ``{"tokens": FILE, "jobs": [{"ckpt": DIR, "out": FILE}, ...]}``; each job builds the
quantized model on this rank and rank 0 saves the logits of the prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llama3 import Transformer
from llama3.checkpoint import load_model
from llama3.distributed import init_model_parallel, model_parallel_rank


def build_quantized(ckpt: str | Path, *, max_seq_len: int = 64, max_batch_size: int = 2,
                    dtype: torch.dtype = torch.float32) -> Transformer:
    """The quantized checkpoint ``ckpt`` loaded on this rank by ``load_model`` (which recognises
    the format, swaps its layers to the kernel on the meta device and assigns this rank's tensors)."""
    return load_model(ckpt, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device="cpu", dtype=dtype,
                      verbose=False)


def main(jobs_file: str) -> None:
    spec = json.loads(Path(jobs_file).read_text())
    tokens = torch.load(spec["tokens"], weights_only=True)
    init_model_parallel(backend="gloo")
    for job in spec["jobs"]:
        model = build_quantized(job["ckpt"], max_batch_size=tokens.shape[0])
        with torch.no_grad():
            logits = model(tokens, 0)
        if model_parallel_rank() == 0:
            torch.save(logits, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
