"""Attention kernel timings at several lengths: which scaled_dot_product_attention kernel prefill
and decode get, and what each costs. A stage of scripts/gpu_check.sh; runs on CPU too (dry run).

    python scripts/gpu_kernels.py --device cuda --lengths 512,2048,8192,32768 --out kernels.json

Prefill (batch 1, a causal prompt of L tokens, Llama 3 8B attention: 32 query heads, 8 KV heads,
head_dim 128; on CPU a tiny 8/2/32 so the dry run is quick):

* ``prefill_masked_folded``: the layout model.py uses, query heads of a KV group folded into rows,
  with an explicit boolean mask (n_rep·L × L): no flash kernel can take it (up to 8,192 tokens:
  beyond, its memory grows out of proportion);
* ``prefill_causal_gqa``: ``is_causal=True, enable_gqa=True`` on the unfolded heads, no mask;
* ``prefill_<backend>``: the same, restricted to one SDPA backend (flash, efficient, cudnn; CUDA
  only) to show which kernels exist for it and what each costs. A backend that refuses the
  inputs is recorded with its error, not timed.

Decode (one query token per sequence, ``--decode_batch`` sequences, a cache filled to L positions):

* ``decode_whole_cache``: attention over a cache of max(lengths) positions with the unfilled part
  masked out (what a fixed-shape step does without length buckets);
* ``decode_filled``: attention over the L filled positions only, no mask.

Decode linear layers (one row, batch-1 decoding; 8B's w1 4096→14336 and w2 14336→4096 on CUDA):

* ``linear_bf16``: ``F.linear`` on the bf16 weight (cuBLAS);
* ``linear_int8_eager``: llama3/kernels/int8_cuda.py eagerly (``torch._weight_int8pack_mm``);
* ``linear_int8_compiled``: the same under ``torch.compile`` (materialised input, fused int8 GEMV);
* ``linear_int8_tuned``: compiled with coordinate-descent tuning of the reduction.

``length`` is the output features there; ``gb_s`` the weight bytes read per second (the roofline
is the HBM bandwidth the benchmark's probe measures).

Times are the median of ``--repeats`` calls after warm-up (CUDA: synchronised wall clock); TFLOP/s
counts the causal half of the score and value products.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's llama3

GQA_CAUSAL = dict(is_causal=True, enable_gqa=True)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def run(device: torch.device, dtype: torch.dtype, lengths: list[int], heads: int, kv_heads: int,
        head_dim: int, decode_batch: int, repeats: int, max_masked: int = 8192) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    rows: list[dict] = []
    n_rep = heads // kv_heads
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def record(case: str, length: int, fn: Callable[[], object], flops: float | None) -> None:
        try:
            ms = _time(fn, device, repeats)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # a kernel that refuses these inputs
            rows.append({"case": case, "length": length, "ms": float("nan"), "error": str(e).splitlines()[0]})
            print(f"  {case:24s} L={length:6d}  not available: {str(e).splitlines()[0][:90]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        row = {"case": case, "length": length, "ms": ms}
        if flops:
            row["tflop_s"] = flops / (ms * 1e-3) / 1e12
        rows.append(row)
        extra = f"  {row['tflop_s']:.1f} TFLOP/s" if flops else ""
        print(f"  {case:24s} L={length:6d}  {ms:9.3f} ms{extra}", flush=True)

    for length in lengths:
        q, k, v = randn(1, heads, length, head_dim), randn(1, kv_heads, length, head_dim), randn(
            1, kv_heads, length, head_dim)
        flops = 2 * 2 * heads * length * length * head_dim / 2  # QKᵀ and PV, causal half
        # model.py's layout: the n_rep query heads of a KV head stacked as rows, one mask for all.
        folded = q.view(1, kv_heads, n_rep * length, head_dim)
        if length <= max_masked:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            mask = causal.repeat(n_rep, 1)
            record("prefill_masked_folded", length,
                   lambda folded=folded, k=k, v=v, mask=mask: F.scaled_dot_product_attention(
                       folded, k, v, attn_mask=mask), flops)
            del mask, causal
        else:  # its mask and score matrix grow with the square of the length
            rows.append({"case": "prefill_masked_folded", "length": length, "ms": float("nan"),
                         "error": f"not run above {max_masked} tokens (quadratic memory)"})
        record("prefill_causal_gqa", length,
               lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, **GQA_CAUSAL), flops)
        if device.type == "cuda":
            for name, backend in _backends().items():
                def fn(q=q, k=k, v=v, backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, **GQA_CAUSAL)
                record(f"prefill_{name}", length, fn, flops)
        del q, k, v, folded

    cache_len = max(lengths)
    keys = randn(decode_batch, kv_heads, cache_len, head_dim)
    values = randn(decode_batch, kv_heads, cache_len, head_dim)
    q = randn(decode_batch, kv_heads, n_rep, head_dim)  # one token: its query heads as rows, as model.py
    for length in lengths:
        mask = (torch.arange(cache_len, device=device) < length)[None, :].expand(n_rep, cache_len)
        record("decode_whole_cache", length,
               lambda mask=mask: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), None)
        k, v = keys[:, :, :length], values[:, :, :length]
        record("decode_filled", length, lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v), None)
    return rows


def _linear_cases(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> dict:
    """case -> (callable, weight bytes it reads) for one layer shape."""
    from llama3.kernels.int8_cuda import int8_linear_cuda

    def int8() -> torch.Tensor:
        return int8_linear_cuda(x, q, scale)

    tuned = torch.compile(int8, options={"coordinate_descent_tuning": True})
    return {"linear_bf16": (lambda: F.linear(x, w), w.numel() * w.element_size()),
            "linear_int8_eager": (int8, q.numel()),
            "linear_int8_compiled": (torch.compile(int8), q.numel()),
            "linear_int8_tuned": (tuned, q.numel())}


def linear_rows(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]],
                repeats: int) -> list[dict]:
    """Batch-1 decode linear layers: bf16 against the int8 kernel, eager / compiled / tuned."""
    from llama3.kernels.int8 import quantize_per_channel

    rows: list[dict] = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for n_in, n_out in shapes:
        w = torch.randn(n_out, n_in, generator=g).to(device=device, dtype=dtype)
        q, scale = quantize_per_channel(w)
        x = torch.randn(1, 1, n_in, generator=g).to(device=device, dtype=dtype)
        torch._dynamo.reset()
        for case, (fn, nbytes) in _linear_cases(x, w, q, scale).items():
            row: dict = {"case": case, "length": n_out, "in": n_in}
            try:
                ms = _time(fn, device, repeats)
            except Exception as e:  # noqa: BLE001  (one kernel failing must not hide the others)
                rows.append({**row, "ms": float("nan"), "error": str(e).splitlines()[0]})
                print(f"  {case:24s} {n_in}->{n_out}  failed: {str(e).splitlines()[0][:90]}", flush=True)
                continue
            rows.append({**row, "ms": ms, "gb_s": nbytes / (ms * 1e-3) / 1e9})
            print(f"  {case:24s} {n_in:6d}->{n_out:6d}  {ms:9.4f} ms  {rows[-1]['gb_s']:8.1f} GB/s",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--lengths", default="512,2048,8192,32768")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--kv_heads", type=int, default=None, help="KV heads (default 8 on CUDA, 2 on CPU)")
    parser.add_argument("--head_dim", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    parser.add_argument("--decode_batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    heads = args.heads or (32 if cuda else 8)
    kv_heads = args.kv_heads or (8 if cuda else 2)
    head_dim = args.head_dim or (128 if cuda else 32)
    repeats = args.repeats or (10 if cuda else 3)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"# attention kernels on {name}, {dtype}, heads {heads}/{kv_heads}, head_dim {head_dim}",
          flush=True)
    rows = run(device, dtype, lengths, heads, kv_heads, head_dim, args.decode_batch, repeats)
    shapes = [(4096, 14336), (14336, 4096)] if cuda else [(256, 512)]
    rows += linear_rows(device, dtype if dtype != torch.float32 else torch.bfloat16, shapes, repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "heads": heads, "kv_heads": kv_heads,
                       "head_dim": head_dim, "rows": rows}, f, indent=2)
    failed = [r for r in rows if r["case"] in ("prefill_causal_gqa", "decode_filled") and "error" in r]
    if failed:
        raise SystemExit(f"the default kernels failed: {failed}")


if __name__ == "__main__":
    main()
