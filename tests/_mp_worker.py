"""Run under torchrun by tests/test_parallel.py: the jobs of a JSON file, on this job's model-parallel
ranks (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node N tests/_mp_worker.py JOBS.json

Each job is ``{"kind": ..., "ckpt": DIR, "out": FILE}``; FILE gets ``{rank}`` filled in where a
job's result is per rank. Kinds:

* ``memory``: load the checkpoint; record this rank's peak anonymous memory (RssAnon, sampled
  every millisecond) above what it was before, and the bytes of its own slice (every rank);
* ``logits``: load it; save the logits of a prompt and of one decoding step (rank 0);
* ``int8``: the same after swapping to ``Int8Kernel`` (each rank quantizes its slice);
* ``fbgemm``: the same in float16 after swapping to ``FbgemmFp16Kernel`` (each rank packs its slice);
* ``compile``: load it; greedy-decode with eager ``forward`` and with
  ``torch.compile(model.forward)`` (the fixed-shape call, with ``kv_len``); save both token
  sequences and the graph breaks and
  graphs dynamo counted (rank 0; breaks summed over ranks). The backend is
  ``$LLAMA3_TEST_COMPILE_BACKEND`` (default ``aot_eager``: dynamo's tracing and functionalisation,
  which is where collectives break graphs, without inductor's minutes of C++ compilation on CPU).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from llama3.checkpoint import load_model
from llama3.distributed import init_model_parallel

DECODE_STEPS = 6


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
    except (OSError, AttributeError):
        pass


class PeakAnon:
    """Highest RssAnon seen while the block runs, sampled from a thread."""

    def __enter__(self) -> PeakAnon:
        _release_free_memory()  # memory an earlier job freed must not hide this one's growth
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def _load(ckpt: str, tokens: torch.Tensor, extra: int = 4):
    return load_model(ckpt, max_seq_len=tokens.shape[1] + extra, max_batch_size=tokens.shape[0],
                      device="cpu", dtype="float32", verbose=False)


def memory(job: dict, tokens: torch.Tensor) -> dict:
    with PeakAnon() as peak:
        model = _load(job["ckpt"], tokens)
    slice_bytes = sum(t.numel() * t.element_size()
                      for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    return {"growth": peak.peak - peak.base, "slice_bytes": slice_bytes, "rank": dist.get_rank()}


def logits(job: dict, tokens: torch.Tensor) -> dict:
    return logits_of(_load(job["ckpt"], tokens), tokens)


def logits_of(model, tokens: torch.Tensor) -> dict:
    prefill = model(tokens[:, :-1], 0)
    step = model(tokens[:, -1:], tokens.shape[1] - 1)  # one decoding step through the KV cache
    return {"prefill": prefill, "step": step, "world": dist.get_world_size(),
            "local_heads": model.layers[0].attention.n_local_kv_heads}


def compiled(job: dict, tokens: torch.Tensor) -> dict:
    from torch._dynamo.utils import counters

    model = _load(job["ckpt"], tokens, extra=DECODE_STEPS + 1)

    def greedy(step) -> torch.Tensor:
        token = model.forward(tokens, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out = [token]
        for pos in range(tokens.shape[1], tokens.shape[1] + DECODE_STEPS):
            token = step(token, pos)[:, -1].argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, dim=1)

    eager = greedy(lambda token, pos: model.forward(token, pos, last_only=True))
    torch._dynamo.reset()
    counters.clear()
    backend = os.environ.get("LLAMA3_TEST_COMPILE_BACKEND", "aot_eager")
    step = torch.compile(model.forward, backend=backend)
    got = greedy(lambda token, pos: step(token, torch.tensor([pos]), kv_len=model.params.max_seq_len))
    breaks = torch.tensor([sum(counters["graph_break"].values())])
    dist.all_reduce(breaks)
    return {"eager": eager, "compiled": got, "graph_breaks": int(breaks),
            "break_reasons": sorted(counters["graph_break"]), "graphs": counters["stats"]["unique_graphs"],
            "backend": backend}


def int8_logits(job: dict, tokens: torch.Tensor) -> dict:
    from llama3.kernels import Int8Kernel, swap_linears

    model = _load(job["ckpt"], tokens)
    swap_linears(model, Int8Kernel)  # each rank quantizes its own slice
    return logits_of(model, tokens)


def fbgemm_logits(job: dict, tokens: torch.Tensor) -> dict:
    from llama3.kernels import FbgemmFp16Kernel, swap_linears

    model = load_model(job["ckpt"], max_seq_len=tokens.shape[1] + 4, max_batch_size=tokens.shape[0],
                       device="cpu", dtype="float16", verbose=False)
    packed = swap_linears(model, FbgemmFp16Kernel)  # each rank packs its own slice
    return {**logits_of(model, tokens), "packed": packed}


KINDS = {"memory": memory, "logits": logits, "compile": compiled, "int8": int8_logits,
         "fbgemm": fbgemm_logits}


def main(jobs_path: str) -> None:
    with open(jobs_path) as f:
        spec = json.load(f)
    # gloo even where CUDA is present (the GPU check runs these tests too): the tensors are on the CPU.
    init_model_parallel(backend="gloo")
    tokens = torch.load(spec["tokens"], weights_only=True)
    rank = dist.get_rank()
    for job in spec["jobs"]:
        result = KINDS[job["kind"]](job, tokens)
        if "{rank}" in job["out"] or rank == 0:
            torch.save(result, job["out"].format(rank=rank))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
