"""The GPU check's first stage (~30 s): can this machine run the rest, and what will attention do?

    python scripts/gpu_preflight.py --device cuda --out preflight.json

Reports, each check on its own (one failing never hides the others):

* device: GPU name, memory, compute capability; torch, CUDA, cuDNN, Triton and Python versions;
* toolchain: the C compiler inductor will call (``$CC``, else cc / gcc / clang) and Python's
  headers (``Python.h``), both needed by every compiled stage; whether ``python -m pip`` works
  (gpu_check.sh falls back to unzipping the wheels when it does not);
* compile: a tiny function through ``torch.compile`` (CUDA graphs on CUDA) and, on CUDA, a
  hand-captured ``torch.cuda.CUDAGraph``: both must give eager's numbers;
* attention: for each call site of the model (decode, prefill, chunk after a prefix, the masked
  fixed-shape step; Llama 3 8B head shapes), the SDPA kernel PyTorch picks by itself and the one
  the model's ``llama3.attention.attention`` runs under its pinned plan (both read from the aten
  op actually dispatched), and that the latter gives textbook attention;
* growing key length: eager decode attention over 48 consecutive key lengths, SDPA's own choice
  against ``attention()`` (pinned), mean and worst milliseconds per call (a per-shape plan build,
  as cuDNN's, shows as a worst call far above the mean).

``compile_ok`` in the JSON tells gpu_check.py whether the compiled stages can run at all; it
skips them with the reason otherwise. Exit status 0 unless the device itself is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama3.attention import (  # noqa: E402  (the checkout, not an installed copy)
    CALL_SITES,
    attention,
    describe,
    sdpa_plan,
)

ATTENTION_OPS = ("flash", "efficient", "cudnn", "math", "overrideable")


def _check(report: dict[str, Any], name: str, fn) -> Any:
    """Run one check; its result (or its error, first line) goes into ``report[name]``."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001  (a preflight reports every failure and goes on)
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        traceback.print_exc(limit=2)
    report[name] = result
    print(f"  {name:22s} {json.dumps(result)[:240]}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return result


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
                            if torch.backends.cudnn.is_available() else None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    else:
        info.update(name=platform.processor() or "cpu", cpus=os.cpu_count())
    return info


def toolchain() -> dict[str, Any]:
    cc = os.environ.get("CC")
    found = shutil.which(cc) if cc else next(
        (shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    version = None
    if found:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10)
        version = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else None
    include = sysconfig.get_paths().get("include", "")
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True,
                         timeout=30)
    return {"c_compiler": found, "c_compiler_version": version,
            "python_h": str(Path(include, "Python.h")) if Path(include, "Python.h").is_file() else None,
            "pip": pip.returncode == 0}


def tiny_compile(device: torch.device) -> dict[str, Any]:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * 2 + 1).sum(-1)

    x = torch.randn(64, 256, device=device)
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(f, mode=mode, dynamic=False)
    start = time.perf_counter()
    for _ in range(3):  # compile, warm up, record (CUDA graphs), replay
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        y = compiled(x).clone()
    seconds = time.perf_counter() - start
    ok = torch.allclose(y, f(x), rtol=1e-5, atol=1e-5)
    return {"ok": bool(ok), "seconds": round(seconds, 2), "mode": mode or "default"}


def cuda_graph(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "not CUDA"}
    x = torch.randn(1024, device=device)
    y = torch.empty_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y.copy_(x * 3)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(x * 3)
    x.fill_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    return {"ok": bool((y == 6.0).all())}


class _AttentionOps:
    """Records which attention kernels (``aten::_scaled_dot_product_*`` ops) run inside it, by the
    profiler: a dispatch mode would refuse the tensor subclass of the lower-right causal bias."""

    def __enter__(self) -> _AttentionOps:
        self.kernels: list[str] = []
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        for event in self._profile.events():
            name = event.name
            if name.startswith("aten::_scaled_dot_product_"):
                kind = next((k for k in ATTENTION_OPS if k in name), name)
                self.kernels.append(kind if "cpu" not in name else f"{kind}(cpu)")


def _site_inputs(site: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, hd: int,
                 kv_len: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """``attention()``'s arguments at ``site`` as the model passes them: q [1, heads, s, hd], the
    cache's keys and values [1, kv_heads, n, hd], the static step's mask (or None)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    k, v = rand(1, kv_heads, kv_len, hd), rand(1, kv_heads, kv_len, hd)
    if site == "decode":
        return rand(1, heads, 1, hd), k, v, None
    if site == "masked":
        return rand(1, heads, 1, hd), k, v, torch.arange(kv_len, device=device)[None, :] <= kv_len // 2
    if site == "prefill":
        return rand(1, heads, chunk, hd), k[:, :, :chunk], v[:, :, :chunk], None
    return rand(1, heads, chunk, hd), k, v, None


def _unpinned_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """The site through SDPA with torch's own kernel choice (what ran before the pinning)."""
    from torch.nn.attention.bias import causal_lower_right

    s, n = q.shape[2], k.shape[2]
    if s == 1:  # decode and the masked step: the group's query heads folded into rows
        rows = q.reshape(1, k.shape[1], -1, q.shape[-1])
        return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask)
    if s == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(s, n), enable_gqa=True)


def _textbook(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    s, n = q.shape[2], k.shape[2]
    visible = mask if mask is not None else torch.ones(s, n, dtype=torch.bool, device=q.device).tril(n - s)
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                          v.float().repeat_interleave(rep, 1), attn_mask=visible)


def attention_sites(device: torch.device, shape: dict[str, int]) -> dict[str, Any]:
    """Per call site and dtype: SDPA's own kernel, the kernel ``attention()`` runs (its plan), and
    its largest difference from textbook attention."""
    out: dict[str, Any] = {}
    for dtype in (torch.bfloat16, torch.float32):
        for site in CALL_SITES:
            key = f"{site} {str(dtype).removeprefix('torch.')}"
            q, k, v, mask = _site_inputs(site, device, dtype, **shape)
            row: dict[str, Any] = {}
            try:
                with _AttentionOps() as ops:
                    _unpinned_sdpa(q, k, v, mask)
                row["default"] = "+".join(ops.kernels) or "none recorded"
            except Exception as e:  # noqa: BLE001
                row["default"] = f"error: {str(e).splitlines()[0][:120]}"
            row["plan"] = describe(sdpa_plan(site, dtype, shape["hd"], device_type=device.type))
            try:
                with _AttentionOps() as ops:
                    got = attention(q, k, v, mask=mask)
                row["pinned"] = "+".join(ops.kernels) or "none recorded"
                row["max_abs_err"] = float((got.float() - _textbook(q, k, v, mask)).abs().max())
            except Exception as e:  # noqa: BLE001
                row["pinned"] = f"error: {str(e).splitlines()[0][:120]}"
            out[key] = row
            print(f"    {key:22s} default {row['default']:12s} pinned {row['pinned']:12s} | {row['plan']}",
                  flush=True)
    return out


def growing_keys(device: torch.device, shape: dict[str, int], steps: int = 48) -> dict[str, Any]:
    """Eager decode attention at key lengths L, L+1, ...: ms per call, SDPA's choice vs attention()."""
    heads, kv_heads, hd, base = shape["heads"], shape["kv_heads"], shape["hd"], shape["kv_len"]
    dtype = torch.bfloat16
    k = torch.randn(1, kv_heads, base + 2 * steps, hd, device=device, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(1, heads, 1, hd, device=device, dtype=dtype)
    result = {}
    def pinned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        return attention(q, k, v, mask=mask)

    for label, fn, offset in (("default", _unpinned_sdpa, 0), ("pinned", pinned, steps)):
        times = []
        for _ in range(3):  # warm-up at one fixed length: first-call costs out of the figures
            fn(q, k[:, :, :base - 1], v[:, :, :base - 1], None)
        for i in range(steps):
            n = base + offset + i  # fresh lengths for each: no plan cached from the other
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn(q, k[:, :, :n], v[:, :, :n], None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        result[label] = {"mean_ms": round(statistics.mean(times), 4),
                         "median_ms": round(statistics.median(times), 4), "max_ms": round(max(times), 4)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="JSON file for the report")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("preflight: torch sees no CUDA device", flush=True)
        return 2
    cuda = device.type == "cuda"
    # Llama 3 8B attention on the GPU; a tiny one for the CPU dry run.
    shape = (dict(heads=32, kv_heads=8, hd=128, kv_len=1024, chunk=256) if cuda
             else dict(heads=8, kv_heads=2, hd=32, kv_len=128, chunk=32))
    report: dict[str, Any] = {"device_type": device.type}
    print(f"# preflight on {device}", flush=True)
    _check(report, "device", lambda: device_info(device))
    tools = _check(report, "toolchain", toolchain)
    compiled = _check(report, "compile", lambda: tiny_compile(device))
    graph = _check(report, "cuda_graph", lambda: cuda_graph(device))
    _check(report, "attention", lambda: attention_sites(device, shape))
    growing_shape = {k: shape[k] for k in ("heads", "kv_heads", "hd", "kv_len")}
    _check(report, "growing_keys", lambda: growing_keys(device, growing_shape))
    problems = []
    if not tools.get("c_compiler"):
        problems.append("no C compiler (set CC or install gcc)")
    if not tools.get("python_h"):
        problems.append("no Python.h (install the python3-dev headers)")
    if not compiled.get("ok"):
        problems.append(f"torch.compile failed: {compiled.get('error', 'wrong result')}")
    if cuda and not graph.get("ok"):
        problems.append(f"CUDA graph capture failed: {graph.get('error', 'wrong result')}")
    report["compile_ok"] = not problems
    report["problems"] = problems
    print(f"# preflight: {'compiled stages can run' if not problems else '; '.join(problems)}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
