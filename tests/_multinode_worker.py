"""Run under two torchrun launches acting as two nodes by tests/test_multinode.py (gloo, CPU):

    python -m torch.distributed.run --nnodes 2 --node_rank K --nproc_per_node 2 \
        --master_addr 127.0.0.1 --master_port PORT tests/_multinode_worker.py JOBS.json

JOBS.json: ``{"tokens": FILE, "steps": N, "jobs": [{"ckpt": DIR, "out": FILE}, ...]}``. Each job
loads the checkpoint on this job's model-parallel ranks, greedy-decodes N tokens after the prompt
and rank 0 saves the prompt's logits, the tokens, the world size and the node of every rank.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from llama3.checkpoint import load_model
from llama3.distributed import init_model_parallel


@torch.no_grad()
def greedy(ckpt: str, tokens: torch.Tensor, steps: int, model_parallel_size: int | None = None) -> dict:
    """Prompt logits and ``steps`` greedy tokens of the checkpoint on this job's ranks (also used
    by the test in one process, as the reference)."""
    model = load_model(ckpt, max_seq_len=tokens.shape[1] + steps, max_batch_size=tokens.shape[0],
                       device="cpu", dtype="float32", model_parallel_size=model_parallel_size, verbose=False)
    logits = model(tokens, 0)
    out, pos = [logits[:, -1].argmax(-1)], tokens.shape[1]
    for _ in range(steps - 1):
        out.append(model(out[-1][:, None], pos)[:, -1].argmax(-1))
        pos += 1
    return {"prefill": logits, "tokens": torch.stack(out, 1)}


def main(jobs_path: str) -> None:
    with open(jobs_path) as f:
        spec = json.load(f)
    init_model_parallel(backend="gloo")
    tokens = torch.load(spec["tokens"], weights_only=True)
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, os.environ.get("GROUP_RANK"))  # torchrun's node rank of each process
    for job in spec["jobs"]:
        result = greedy(job["ckpt"], tokens, spec["steps"])
        if dist.get_rank() == 0:
            torch.save({**result, "world": dist.get_world_size(), "nodes": nodes}, job["out"])
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
