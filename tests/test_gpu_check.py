"""scripts/gpu_check.sh cannot rot: its CPU dry run (every stage, smallest sizes, compilation
disabled) passes here, the preflight first; its deadline logic skips and reports a stage that no
longer fits, a gated stage reports why it did not run ("not built", a failed preflight), and the
summary is rewritten as each stage ends; and the CUDA-only int8 formulation computes the
dequantized product."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STAGES = ["preflight", "tests", "bench_bf16_compile", "bench_bf16_eager_hf", "bench_int8_compile",
          "bench_fp8_compile", "bench_int4_compile", "kernels", "torchrun_e2e", "prefill_long"]
# Stages that wait for another engineer's module: "not built" until it exists and the kernel
# chooser offers its quantize mode.
OPTIONAL = {"bench_fp8_compile": ("llama3/kernels/fp8.py", "fp8"),
            "bench_int4_compile": ("llama3/kernels/int4.py", "int4")}


def _built(stage: str) -> bool:
    from llama3.kernels import QUANTIZE_MODES

    if stage not in OPTIONAL:
        return True
    path, mode = OPTIONAL[stage]
    return (REPO / path).is_file() and mode in QUANTIZE_MODES


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DEV": "cpu", "SIZE": "ci", "OUT": str(out), "PYTHON": sys.executable,
           "DEADLINE": "900", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert summary["complete"]
    for stage in summary["stages"]:
        assert stage["status"] == ("passed" if _built(stage["name"]) else "not built"), stage
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert {"gpu_check.log", "summary.json", "preflight.json", "tests.xml", "bench_bf16_compile.json",
            "bench_bf16_eager.json", "bench_int8_compile.json", "kernels.json"} <= set(files)
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["compile_ok"], preflight
    assert preflight["toolchain"]["c_compiler"], preflight
    assert set(preflight["attention"]) >= {"decode bfloat16", "chunk float32", "masked bfloat16"}
    assert "default" in preflight["growing_keys"]
    assert "pinned" in preflight["growing_keys"]
    figures = {s["name"]: s["figures"] for s in summary["stages"]}
    assert figures["bench_bf16_compile"]["compile decode_b1_tok_s"] > 0
    assert figures["bench_int8_compile"]["compile+int8 decode_b1_tok_s"] > 0
    assert figures["bench_bf16_eager_hf"]["transformers decode_b2_tok_s"] > 0
    assert summary["int8_vs_bf16_compiled"] > 0
    # The CUDA cases ran (on the CPU), none skipped.
    junit = (out / "tests.xml").read_text()
    assert 'skipped="0"' in junit
    assert 'failures="0"' in junit
    assert 'errors="0"' in junit
    assert "test_llama_compile_generates_what_eager_generates" in junit
    # The summary comes last: after its header line, only stage lines and their figures.
    last = proc.stdout[proc.stdout.rindex("# GPU check summary"):].splitlines()[1:]
    assert [line.split()[0] for line in last if not line.startswith(" ")][:len(STAGES)] == STAGES


def test_stages_past_the_deadline_are_skipped_timeouts_killed_failures_reported(tmp_path):
    gc = _gpu_check_module()
    py = sys.executable
    plan = [
        gc.Stage("ok", "passes", need_s=0, limit_s=30, commands=[[py, "-c", "print('hello')"]]),
        gc.Stage("fails", "exits 3", need_s=0, limit_s=30, commands=[[py, "-c", "raise SystemExit(3)"],
                                                                     [py, "-c", "print('never')"]]),
        gc.Stage("slow", "outlives its limit", need_s=0, limit_s=1.5,
                 commands=[[py, "-c", "import time; time.sleep(60)"]]),
        gc.Stage("big", "needs more than is left", need_s=1000, limit_s=2000, commands=[[py, "-c", "pass"]]),
        gc.Stage("fp8", "a module not yet written", need_s=0, limit_s=30,
                 commands=[[py, "-c", "print('ran')"]],
                 gate=gc._module_gate("kernels/no_such_kernel")),
        gc.Stage("unwired", "a module the chooser does not offer", need_s=0, limit_s=30,
                 commands=[[py, "-c", "print('ran')"]], gate=gc._module_gate("kernels/int8", "no_such_mode")),
        gc.Stage("compiled", "needs a working compiler", need_s=0, limit_s=30,
                 commands=[[py, "-c", "print('ran')"]], gate=gc._compile_gate),
    ]
    (tmp_path / "preflight.json").write_text(json.dumps({"compile_ok": False, "problems": ["no C compiler"]}))
    log = io.StringIO()
    seen = []
    results = gc.run_stages(plan, deadline_s=120, out=tmp_path, log=log, base_env=dict(os.environ),
                            on_result=lambda rs: seen.append([r.name for r in rs]))
    got = {r.name: r for r in results}
    assert [r.name for r in results] == ["ok", "fails", "slow", "big", "fp8", "unwired", "compiled"]
    assert seen[0] == ["ok"]
    assert seen[-1] == [r.name for r in results]  # the summary, stage by stage
    assert got["fp8"].status == "not built"
    assert "no_such_kernel.py" in got["fp8"].detail
    assert got["unwired"].status == "not built"
    assert "'no_such_mode' is not among" in got["unwired"].detail
    assert got["compiled"].status == "skipped"
    assert "preflight: no C compiler" in got["compiled"].detail
    assert "ran" not in log.getvalue()
    assert got["ok"].status == "passed"
    assert got["fails"].status == "failed"
    assert "exit 3" in got["fails"].detail
    assert "never" not in log.getvalue()  # a stage stops at its first failing command
    assert got["slow"].status == "timeout"
    assert got["slow"].seconds < 10  # killed, not waited for
    assert got["big"].status == "skipped"
    assert "needs 1000 s" in got["big"].detail
    text = gc.summarize(results, {"device": "cpu", "size": "ci", "seconds": 5.0, "deadline_s": 120.0})
    for name, status in (("ok", "passed"), ("fails", "failed"), ("slow", "timeout"), ("big", "skipped")):
        assert any(line.split()[:2] == [name, status] for line in text.splitlines()), text


def test_cuda_int8_decode_formulation_is_the_dequantized_product():
    """The multiply-and-sum that the compiled CUDA step uses for int8 weights (run here eagerly, as
    if compiling) equals x (q · scale)ᵀ, and larger batches take the dequantize-then-matmul path;
    Int8Kernel's product on CUDA is that one function."""
    import llama3.kernels.int8 as int8
    from llama3.kernels.int8 import quantize_per_channel
    from llama3.kernels.int8_cuda import FUSED_MAX_ROWS as CUDA_FUSED_MAX_ROWS
    from llama3.kernels.int8_cuda import int8_linear_cuda as cuda_int8_product

    assert int8.int8_linear_cuda is cuda_int8_product

    torch.manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None])
    want_w = q.float() * scale[:, None]
    for rows in (1, CUDA_FUSED_MAX_ROWS, CUDA_FUSED_MAX_ROWS + 1):
        x = torch.randn(rows, 1, 96)
        with mock.patch("torch.compiler.is_compiling", return_value=True):
            got = cuda_int8_product(x, q, scale)
        assert got.shape == (rows, 1, 48)
        torch.testing.assert_close(got, x @ want_w.T, rtol=1e-5, atol=1e-5)
