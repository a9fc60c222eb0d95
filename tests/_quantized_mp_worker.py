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
from llama3.checkpoint import inspect_checkpoint, read_model_args
from llama3.checkpoint.quantized import detect_quantization, read_quantized_rank
from llama3.distributed import init_model_parallel, model_parallel_rank, model_parallel_world_size
from llama3.kernels._seam_standin import swap_layers
from llama3.kernels.fp8 import Fp8RowwiseLinear
from llama3.kernels.int4 import Int8DynActInt4Linear


def build_quantized(ckpt: str | Path, *, max_seq_len: int = 64, max_batch_size: int = 2,
                    dtype: torch.dtype = torch.float32) -> Transformer:
    """What load_model does for a quantized checkpoint once the seam is merged (TEMP, for tests):
    the layers of the format swapped to its kernel on the meta device, this rank's tensors
    assigned."""
    info = inspect_checkpoint(ckpt)
    args = read_model_args(info, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    fmt = detect_quantization(info)
    with torch.device("meta"):
        model = Transformer(args)
    kernel = Int8DynActInt4Linear if fmt.kernel == "int4-int8act" else Fp8RowwiseLinear
    swap_layers(model, fmt.quantized_layers(args), kernel, empty=True, **fmt.kernel_settings(dtype))
    sd = read_quantized_rank(info, args, fmt, model_parallel_rank(), model_parallel_world_size(), dtype=dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.setup_kv_cache(device="cpu", dtype=dtype)
    return model.eval()


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
