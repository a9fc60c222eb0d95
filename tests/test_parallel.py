"""Model parallelism and resharding: a checkpoint saved with M shards, loaded on N ranks under
torchrun (gloo, CPU), gives the logits of the same weights in one plain process; each rank holds
only its own slice while loading; the compiled decoding step is one graph on every rank (the
layers' collectives are functional collectives, which torch.compile traces) and decodes eager's
tokens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.checkpoint import load_model, random_state_dict, save_hf_checkpoint, save_meta_checkpoint

# torchrun jobs: slow, and on one xdist worker (the module's fixtures run them once per worker).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
CONFIGS = {
    # n_kv_heads 2: split across 2 ranks, replicated across 4.
    "gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32,
                ffn_dim_multiplier=1.3, use_scaled_rope=True),
    # One KV head: every rank keeps a copy; tied embedding and output.
    "one_kv": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=32,
                   tie_word_embeddings=True),
}
# (config, layout, shards saved)
CHECKPOINTS = [("gqa", "meta", 1), ("gqa", "meta", 2), ("gqa", "meta", 4), ("gqa", "hf", 1),
               ("one_kv", "meta", 1), ("one_kv", "meta", 2), ("one_kv", "meta", 4)]
RUNS = {2: CHECKPOINTS, 4: [c for c in CHECKPOINTS if c != ("gqa", "hf", 1)]}
COMPILE_RUN = (2, ("gqa", "meta", 2))  # ranks, checkpoint: the compiled decode check

# Memory: a model big enough (57M parameters, 227 MB in float32) that one rank's quarter stands
# out from the process's own memory; saved in 8 shards (70B-style) and in 1 (8B-style), loaded on 4.
BIG = dict(dim=1024, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=16384, multiple_of=256)
MEMORY_RUN = (4, [("big", "meta", 8), ("big", "meta", 1)])
# A rank may hold its slice in float32 plus transient copies of single tensors while converting
# (the largest, the embedding's quarter, is 16 MB) and allocator slack.
MEMORY_SLACK = 1.25
MEMORY_EXTRA = 48 * 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(name: str, sd: dict, tokens: torch.Tensor) -> dict:
    args = ModelArgs(**CONFIGS[name], max_seq_len=tokens.shape[1] + 4, max_batch_size=tokens.shape[0])
    model = Transformer(args)
    model.load_state_dict(sd, strict=True)
    return {"prefill": model(tokens[:, :-1], 0), "step": model(tokens[:, -1:], tokens.shape[1] - 1)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    dirs, refs = {}, {}
    for i, name in enumerate(CONFIGS):
        args = ModelArgs(**CONFIGS[name])
        sd = random_state_dict(args, seed=i, std=0.1)
        refs[name] = _reference(name, sd, tokens)
        for config, layout, shards in CHECKPOINTS:
            if config == name:
                d = root / f"{config}-{layout}-{shards}"
                if layout == "meta":
                    save_meta_checkpoint(sd, args, d, num_shards=shards)
                else:
                    save_hf_checkpoint(sd, args, d)
                dirs[(config, layout, shards)] = d
    big = ModelArgs(**BIG)
    sd = random_state_dict(big, seed=0, dtype=torch.bfloat16)
    refs["big_fp32_bytes"] = sum(t.numel() for t in sd.values()) * 4  # the whole model as loaded
    for ckpt in MEMORY_RUN[1]:
        dirs[ckpt] = root / f"big-meta-{ckpt[2]}"
        save_meta_checkpoint(sd, big, dirs[ckpt], num_shards=ckpt[2])
    del sd
    return root, tokens, dirs, refs


def _torchrun(setup, nproc: int) -> dict:
    """One torchrun job of ``nproc`` ranks running every check that uses that many ranks."""
    root, _, dirs, _ = setup
    out = root / f"out{nproc}"
    out.mkdir(exist_ok=True)
    jobs: list[dict] = []
    if MEMORY_RUN[0] == nproc:  # first, before anything else has used memory
        jobs += [{"kind": "memory", "ckpt": str(dirs[c]), "out": str(out / f"mem{i}-{{rank}}.pt")}
                 for i, c in enumerate(MEMORY_RUN[1])]
    jobs += [{"kind": "logits", "ckpt": str(dirs[c]), "out": str(out / f"{i}.pt")}
             for i, c in enumerate(RUNS[nproc])]
    if COMPILE_RUN[0] == nproc:
        jobs.append({"kind": "compile", "ckpt": str(dirs[COMPILE_RUN[1]]), "out": str(out / "compile.pt")})
        jobs.append({"kind": "int8", "ckpt": str(dirs[COMPILE_RUN[1]]), "out": str(out / "int8.pt")})
        jobs.append({"kind": "fbgemm", "ckpt": str(dirs[COMPILE_RUN[1]]), "out": str(out / "fbgemm.pt")})
    (out / "jobs.json").write_text(json.dumps({"tokens": str(root / "tokens.pt"), "jobs": jobs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(REPO / "tests" / "_mp_worker.py"), str(out / "jobs.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def load(name: str):
        return torch.load(out / name, weights_only=True)

    results = {"logits": [load(f"{i}.pt") for i in range(len(RUNS[nproc]))]}
    if MEMORY_RUN[0] == nproc:
        results["memory"] = [[load(f"mem{i}-{r}.pt") for r in range(nproc)]
                             for i in range(len(MEMORY_RUN[1]))]
    if COMPILE_RUN[0] == nproc:
        results["compile"] = load("compile.pt")
        results["int8"] = load("int8.pt")
        results["fbgemm"] = load("fbgemm.pt")
    return results


@pytest.fixture(scope="module")
def results(setup):
    return {n: _torchrun(setup, n) for n in RUNS}


def _assert_close(got: dict, want: dict) -> None:
    for key in ("prefill", "step"):
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=0)


@pytest.mark.parametrize("ckpt", [c for c in CHECKPOINTS if c[1] == "meta" and c[2] > 1],
                         ids=lambda c: f"{c[0]}-{c[2]}to1")
def test_merge_shards_on_one_process(setup, ckpt):
    _, tokens, dirs, refs = setup
    model = load_model(dirs[ckpt], max_seq_len=tokens.shape[1] + 4, max_batch_size=2,
                       device="cpu", dtype=torch.float32, verbose=False)
    got = {"prefill": model(tokens[:, :-1], 0), "step": model(tokens[:, -1:], tokens.shape[1] - 1)}
    _assert_close(got, refs[ckpt[0]])


@pytest.mark.parametrize("nproc", sorted(RUNS))
def test_model_parallel_logits_match_one_process(setup, results, nproc):
    _, _, _, refs = setup
    for ckpt, got in zip(RUNS[nproc], results[nproc]["logits"], strict=True):
        assert got["world"] == nproc
        try:
            _assert_close(got, refs[ckpt[0]])
        except AssertionError as e:
            raise AssertionError(f"{ckpt} on {nproc} ranks: {e}") from None


@pytest.mark.parametrize("nproc", sorted(RUNS))
def test_kv_heads_replicated_when_more_ranks_than_heads(results, nproc):
    for ckpt, got in zip(RUNS[nproc], results[nproc]["logits"], strict=True):
        n_kv = CONFIGS[ckpt[0]]["n_kv_heads"]
        assert got["local_heads"] == max(n_kv, nproc) // nproc


def test_compiled_decode_is_one_graph_and_decodes_the_eager_tokens(results):
    nproc, ckpt = COMPILE_RUN
    got = results[nproc]["compile"]
    assert got["graph_breaks"] == 0, f"{ckpt} on {nproc} ranks: graph breaks {got['break_reasons']}"
    assert got["graphs"] == 1
    assert got["compiled"].shape == got["eager"].shape
    assert torch.equal(got["compiled"], got["eager"])


@pytest.mark.parametrize("index", range(len(MEMORY_RUN[1])),
                         ids=[f"{c[2]}shards-to-{MEMORY_RUN[0]}ranks" for c in MEMORY_RUN[1]])
def test_each_rank_loads_only_its_slice(setup, results, index):
    nproc, ckpts = MEMORY_RUN
    full = setup[3]["big_fp32_bytes"]
    for got in results[nproc]["memory"][index]:
        bound = MEMORY_SLACK * got["slice_bytes"] + MEMORY_EXTRA
        assert got["slice_bytes"] < 0.3 * full  # a quarter of the model, plus norms and cache
        assert bound < 0.75 * full  # the check could catch a rank holding the whole model
        assert got["growth"] <= bound, (
            f"{ckpts[index]} on {nproc} ranks, rank {got['rank']}: peak anonymous memory grew by "
            f"{got['growth'] / 2**20:.0f} MiB while loading a {got['slice_bytes'] / 2**20:.0f} MiB slice "
            f"(bound {bound / 2**20:.0f} MiB; whole model {full / 2**20:.0f} MiB)")


def test_int8_model_parallel_logits_stay_close_to_the_float_model(setup, results):
    """int8 layers communicate through the same collectives: on 2 ranks (each quantizing its own
    slice, so row-parallel scales differ from one process's) the logits stay within the int8
    tolerance of tests/test_fast_paths.py of the float model's, and a lost collective (a rank's
    partial sum or half the vocabulary missing) would be far outside it."""
    nproc, ckpt = COMPILE_RUN
    got, want = results[nproc]["int8"], setup[3][ckpt[0]]
    for key in ("prefill", "step"):
        error = got[key] - want[key]
        assert got[key].shape == want[key].shape
        assert error.abs().max() <= 0.05 * want[key].abs().max()
        assert error.norm() <= 0.04 * want[key].norm()


def test_fbgemm_packed_model_parallel_logits_match_the_float_model(setup, results):
    """Packed float16 layers (llama3/kernels/fbgemm.py) keep fairscale's split: on 2 ranks, each packing
    its own slice, the logits equal the float32 model's up to float16 rounding (1e-2 of their
    largest); a lost all-reduce or half the vocabulary missing would be far outside."""
    nproc, ckpt = COMPILE_RUN
    got, want = results[nproc]["fbgemm"], setup[3][ckpt[0]]
    n_layers = CONFIGS[ckpt[0]]["n_layers"]
    assert got["packed"] == 7 * n_layers + 1  # every linear layer of this rank
    for key in ("prefill", "step"):
        assert got[key].shape == want[key].shape
        assert (got[key].float() - want[key]).abs().max() <= 1e-2 * want[key].abs().max()


@pytest.mark.parametrize("rank", [0, 1])
def test_reliability_leftover_torchrun_variables_fail_fast(rank):
    # WORLD_SIZE/RANK/MASTER_ADDR left in the shell by an earlier job, no torchrun: a plain process
    # must not wait forever for ranks that never come; it fails in bounded time naming the variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               LLAMA3_RENDEZVOUS_TIMEOUT="2", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = "from llama3.distributed import init_model_parallel; init_model_parallel()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ModelParallelError" in proc.stderr
    assert "WORLD_SIZE=2" in proc.stderr
    assert "torchrun" in proc.stderr


def test_reliability_leftover_single_rank_variables_need_no_rendezvous():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.update(WORLD_SIZE="1", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = "from llama3.distributed import init_model_parallel; print(init_model_parallel())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1", proc.stderr
