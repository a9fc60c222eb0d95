"""Two nodes: two torchrun launches (``--nnodes 2 --node_rank 0/1``, a shared static rendezvous)
of 2 gloo ranks each load a 4-shard checkpoint, as Meta's MP16 405B runs on 2 × 8 GPUs, and give
the greedy tokens (and prompt logits) of one process. Also with fewer KV heads than shards, each
shard holding a copy of its KV head as Meta's MP16 405B does (8 KV heads on 16 shards)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _multinode_worker import greedy

from llama3 import ModelArgs
from llama3.checkpoint import random_state_dict, save_meta_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]

REPO = Path(__file__).resolve().parent.parent
BASE = dict(dim=64, n_layers=2, n_heads=8, vocab_size=256, multiple_of=64, norm_eps=1e-5, rope_theta=500000.0,
            use_scaled_rope=False, max_batch_size=2, max_seq_len=64)
CHECKPOINTS = {"mp4": 4, "mp4-kv-copies": 2}  # name -> n_kv_heads (4 shards each)
STEPS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    ckpts = {}
    for name, kv in CHECKPOINTS.items():
        args = ModelArgs(**BASE, n_kv_heads=kv)
        ckpts[name] = root / name
        save_meta_checkpoint(random_state_dict(args, seed=1, std=0.1), args, ckpts[name], num_shards=4)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.save(tokens, root / "tokens.pt")
    jobs = [{"ckpt": str(d), "out": str(root / f"{k}.pt")} for k, d in ckpts.items()]
    (root / "jobs.json").write_text(json.dumps({"tokens": str(root / "tokens.pt"), "steps": STEPS,
                                                "jobs": jobs}))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(REPO / "tests" / "_multinode_worker.py"), str(root / "jobs.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for node in (0, 1)]
    outputs = []
    try:
        for proc in launches:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in launches:
            if proc.poll() is None:
                proc.kill()
    for proc, text in zip(launches, outputs, strict=True):
        assert proc.returncode == 0, text[-4000:]
    return tokens, ckpts, {k: torch.load(root / f"{k}.pt", weights_only=True) for k in ckpts}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_two_nodes_give_the_tokens_of_one_process(two_nodes, name):
    tokens, ckpts, results = two_nodes
    got = results[name]
    assert got["world"] == 4
    assert got["nodes"] == ["0", "0", "1", "1"]  # ranks 0-1 on the first launch, 2-3 on the second
    want = greedy(str(ckpts[name]), tokens, STEPS, model_parallel_size=1)
    assert torch.equal(got["tokens"], want["tokens"])
    # Same weights, summed in another order across ranks: float32 rounding only.
    torch.testing.assert_close(got["prefill"], want["prefill"], rtol=1e-4, atol=1e-5)
