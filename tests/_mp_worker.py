"""Run under torchrun by tests/test_parallel.py: load each checkpoint directory on this job's
model-parallel ranks and save the logits of a fixed batch (rank 0 writes them).

    python -m torch.distributed.run --nproc_per_node N tests/_mp_worker.py OUT_DIR TOKENS CKPT...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llama3.checkpoint import load_model


def main(out_dir: str, tokens_path: str, *ckpt_dirs: str) -> None:
    tokens = torch.load(tokens_path, weights_only=True)
    for i, ckpt in enumerate(ckpt_dirs):
        model = load_model(ckpt, max_seq_len=tokens.shape[1] + 4, max_batch_size=tokens.shape[0],
                           device="cpu", dtype="float32", verbose=False)
        prefill = model(tokens[:, :-1], 0)
        step = model(tokens[:, -1:], tokens.shape[1] - 1)  # one decode step through the KV cache
        if dist.get_rank() == 0:
            torch.save({"prefill": prefill, "step": step,
                        "world": dist.get_world_size(),
                        "local_heads": model.layers[0].attention.n_local_kv_heads},
                       Path(out_dir) / f"{i}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
