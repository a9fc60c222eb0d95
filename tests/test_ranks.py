"""Every rank agrees, and every rank exits 0 (issue 24), on 2-rank gloo jobs under torchrun.

* Ranks given different checkpoints, tokenizers, prompts, sampling settings or seeds raise
  RanksDisagreeError on every rank, naming the rank and what differs, before any token; ranks
  given the same all generate the same tokens (the oracle: a one-process run).
* A finished job exits 0 on every rank, every time (it used to abort at interpreter exit in
  about a third of runs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3.checkpoint import write_random_checkpoint
from llama3.generation import Llama
from llama3.presets import preset_args

REPO = Path(__file__).resolve().parents[1]
PROMPT = [128000, 9906, 11, 1917, 0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, llama3_tokenizer_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        out[name] = write_random_checkpoint(root / name, "test-chat", seed=seed, dtype=torch.float32,
                                            num_shards=2)
        (out[name] / "tokenizer.model").symlink_to(llama3_tokenizer_path)
    return out


def _run(tmp_path: Path, **per_rank) -> tuple[subprocess.CompletedProcess, list[dict]]:
    spec = {"seed": [1, 1], "temperature": [0.0, 0.0], "prompt": [PROMPT, PROMPT], **per_rank,
            "out": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(REPO / "tests" / "_ranks_worker.py"),
           str(tmp_path / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)
               if (tmp_path / f"rank{r}.json").exists()]
    return proc, results


def _disagree(results: list[dict], *words: str) -> None:
    assert len(results) == 2, results
    for result in results:
        assert result.get("error") == "RanksDisagreeError", result
        assert "tokens" not in result
        assert "rank 1 differs from rank 0" in result["message"], result["message"]
        for word in words:
            assert word in result["message"], (word, result["message"])
    assert results[0]["message"] == results[1]["message"]


def test_same_inputs_generate_what_one_process_generates(tmp_path: Path, ckpts) -> None:
    tok = str(ckpts["a"] / "tokenizer.model")
    proc, results = _run(tmp_path, ckpt=[str(ckpts["a"])] * 2, tokenizer=[tok, tok])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = Llama.build(ckpts["a"], max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32",
                      verbose=False)
    want, _ = one.generate([PROMPT], max_gen_len=4, temperature=0.0)
    assert [r["tokens"] for r in results] == [want, want]


def test_different_checkpoints_are_refused_on_every_rank(tmp_path: Path, ckpts) -> None:
    tok = str(ckpts["a"] / "tokenizer.model")
    _, results = _run(tmp_path, ckpt=[str(ckpts["a"]), str(ckpts["b"])], tokenizer=[tok, tok])
    _disagree(results, "what was loaded", "weight files")


def test_different_shapes_are_refused_naming_the_parameter(tmp_path: Path, ckpts,
                                                           llama3_tokenizer_path) -> None:
    other = write_random_checkpoint(tmp_path / "deep", preset_args("test-chat", n_layers=3),
                                    dtype=torch.float32, num_shards=2)
    (other / "tokenizer.model").symlink_to(llama3_tokenizer_path)
    tok = str(llama3_tokenizer_path)
    _, results = _run(tmp_path, ckpt=[str(ckpts["a"]), str(other)], tokenizer=[tok, tok])
    _disagree(results, "model parameters", "n_layers")


def test_different_tokenizer_files_are_refused(tmp_path: Path, ckpts, llama3_tokenizer_path) -> None:
    copy = tmp_path / "tokenizer.model"
    data = llama3_tokenizer_path.read_bytes().splitlines(keepends=True)
    data[100], data[101] = data[101], data[100]  # same size, same vocabulary size, different ranks
    copy.write_bytes(b"".join(data))
    _, results = _run(tmp_path, ckpt=[str(ckpts["a"])] * 2, tokenizer=[str(llama3_tokenizer_path), str(copy)])
    _disagree(results, "tokenizer file")


@pytest.mark.parametrize(("field", "values", "word"), [
    ("prompt", [PROMPT, PROMPT[:-1] + [1]], "prompt token ids"),
    ("prompt", [PROMPT, PROMPT + [2, 3]], "prompt lengths"),
    ("temperature", [0.0, 0.7], "temperature"),
    ("seed", [1, 2], "random state"),
])
def test_different_call_inputs_are_refused_before_any_token(tmp_path: Path, ckpts, field, values,
                                                             word) -> None:
    tok = str(ckpts["a"] / "tokenizer.model")
    _, results = _run(tmp_path, ckpt=[str(ckpts["a"])] * 2, tokenizer=[tok, tok], **{field: values})
    _disagree(results, "the inputs of this call", word)
    assert all(r["stage"] == "loaded" for r in results)


@pytest.mark.slow
def test_a_finished_job_exits_0_on_every_rank_every_time(tmp_path: Path, ckpts) -> None:
    tok = str(ckpts["a"] / "tokenizer.model")
    for attempt in range(8):
        run_dir = tmp_path / str(attempt)
        run_dir.mkdir()
        proc, results = _run(run_dir, ckpt=[str(ckpts["a"])] * 2, tokenizer=[tok, tok])
        assert proc.returncode == 0, (attempt, proc.stderr[-3000:])
        assert "terminate called" not in proc.stderr
        assert "FAILED" not in proc.stderr
        assert [r["stage"] for r in results] == ["generated", "generated"]
