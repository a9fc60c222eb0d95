"""llama.cpp (llama-cpp-python) on the same weights: greedy decode and prefill, timed as ours are.

llama.cpp runs in a worker process of its own (``llamacpp_worker.py``: sharing torch's OpenMP
threads crashes ggml's AMX kernels); it times itself, so the pipe costs nothing measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from llama3.model import Transformer

from .gguf_writer import write_gguf

# Our precision -> the GGUF type with the same bytes per weight (w8a8 is the speed mode against Q8_0).
GGUF_FOR = {"bf16": "BF16", "fp16": "F16", "int8": "Q8_0", "w8a8": "Q8_0", "int4": "Q4_0"}
_WORKER = Path(__file__).with_name("llamacpp_worker.py")


class LlamaCpp:
    """llama.cpp holding ``model``'s (float) weights written as ``gguf_type`` (every matrix in that
    type), with as many threads as torch uses, in a worker process."""

    def __init__(self, model: Transformer, gguf_type: str, n_ctx: int) -> None:
        self.gguf_type = gguf_type
        self._tmp = tempfile.TemporaryDirectory()
        path = os.path.join(self._tmp.name, f"model-{gguf_type}.gguf")
        write_gguf(model, path, gguf_type)
        args = [sys.executable, str(_WORKER), path, str(n_ctx), str(torch.get_num_threads()),
                str(model.params.vocab_size)]
        self.note = ""
        self._start(args)
        try:  # one product as a smoke test: ggml's AMX int8 kernels die of SIGILL on some VMs
            self._ask(op="prefill", ids=[1, 2, 3])
        except RuntimeError as e:
            self.note = f"{e}; rerun without ggml's extra buffer types (no AMX, no repacking)"
            print(f"# llama.cpp {gguf_type}: {self.note}", flush=True)
            self._start([*args, "no-extra-bufts"])

    def _start(self, args: list[str]) -> None:
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # loaded

    def _read(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the llama.cpp worker ({self.gguf_type}) exited with {code}"
                               + (" (SIGILL)" if code == -4 else ""))
        return json.loads(line)

    def _ask(self, **request: Any) -> dict[str, Any]:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def prompt_logits(self, prompt: torch.Tensor) -> torch.Tensor:
        """Logits after ``prompt`` [1, n] (from position 0), float32."""
        return torch.tensor(self._ask(op="logits", ids=prompt[0].tolist())["logits"])

    def decode(self, prompt: torch.Tensor, n_tokens: int) -> tuple[list[float], list[int]]:
        """Greedy: seconds of each of ``n_tokens`` steps after ``prompt`` (2 warm-up steps dropped, as
        ours) and the tokens."""
        out = self._ask(op="decode", ids=prompt[0].tolist(), n=n_tokens)
        return out["times"], out["tokens"]

    def prefill(self, prompt: torch.Tensor) -> float:
        """Seconds to evaluate ``prompt`` [1, n] from position 0 (batches of 512 tokens)."""
        return self._ask(op="prefill", ids=prompt[0].tolist())["seconds"]

    def close(self) -> None:
        """Stop the worker."""
        if self._proc.poll() is None:
            self._proc.stdin.write(json.dumps({"op": "close"}) + "\n")
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        self._tmp.cleanup()
