"""Which linear-layer kernel is fastest on this CPU, for one row (decode) and for a prefill chunk?

A measurement, not a code path. Every candidate computes y = x Wᵀ for the linear layers of a Llama
shape (default: Llama 3.2 1B: dim 2048, hidden 8192, 512-wide keys/values, vocabulary 128256),
from the same random bfloat16 weights:

* decode: one row through the matrices of ``--layers`` transformer layers plus the output
  projection (far more bytes than any cache), reported as GB/s of the candidate's own weight
  bytes, and as the tok/s a model of that shape would reach if its linear layers were all it did
  (4-layer benchmark shape and the full model);
* prefill: ``--rows`` rows through one layer's matrices (the output projection is computed for
  the last row only in a prefill), reported as tokens/s for the full model's layers.

Rounds are interleaved (every candidate once per round), and each figure is the median over
rounds: other processes on a shared machine slow down one round, not one candidate.

    python scripts/bench/kernels.py --threads 2            # ~2 minutes on two cores
    python scripts/bench/kernels.py --threads 2 --compile  # adds the compiled GEMV (compiles first)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: the package beside scripts/ first, then bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_summary  # noqa: E402
from llama3.kernels import w8a8  # noqa: E402

Kernel = Callable[[torch.Tensor], torch.Tensor]
Factory = Callable[[torch.Tensor], tuple[Kernel, int]]  # bf16 weight -> (x -> y, weight bytes)


def _torch_default(w: torch.Tensor) -> tuple[Kernel, int]:
    return (lambda x: F.linear(x, w)), w.nbytes


def _torch_mv(w: torch.Tensor) -> tuple[Kernel, int]:
    return (lambda x: torch.mv(w, x[0])[None] if x.shape[0] == 1 else F.linear(x, w)), w.nbytes


def _no_onednn(w: torch.Tensor) -> tuple[Kernel, int]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.backends.mkldnn.flags(enabled=False):
            return torch.mv(w, x[0])[None] if x.shape[0] == 1 else F.linear(x, w)
    return run, w.nbytes


def _float16(factory: Factory) -> Factory:
    """``factory`` on the weight converted to float16, its input converted too (a float16 model)."""
    def build(w: torch.Tensor) -> tuple[Kernel, int]:
        run, nbytes = factory(w.half())
        return (lambda x: run(x.half())), nbytes
    return build


def _fbgemm_fp16(w: torch.Tensor) -> tuple[Kernel, int]:
    packs = [torch.ops.quantized.linear_prepack_fp16(rows, None) for rows in w.split(16384)]

    def run(x: torch.Tensor) -> torch.Tensor:
        rows = x.float()
        parts = [torch.ops.quantized.linear_dynamic_fp16(rows, p) for p in packs]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).to(x.dtype)
    return run, w.nbytes


_FUSED = None


def _compiled_gemv(w: torch.Tensor) -> tuple[Kernel, int]:
    global _FUSED
    if _FUSED is None:
        _FUSED = torch.compile(lambda row, weight: (row * weight.float()).sum(-1), dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return F.linear(x, w)
        return _FUSED(x.float(), w)[None].to(x.dtype)
    return run, w.nbytes


def _int8_weight_only(w: torch.Tensor) -> tuple[Kernel, int]:
    q, scale = w8a8.quantize_weight(w)
    scale = scale.to(w.dtype)
    return (lambda x: torch._weight_int8pack_mm(x, q, scale)), q.nbytes + scale.nbytes


def _int4(w: torch.Tensor, group: int = 32) -> tuple[Kernel, int]:
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    low, high = wg.amin(-1), wg.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((wg - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    # the kernel dequantizes (q - 8) * scale + zero: the zero is the value of q = 8
    sz = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)), (
        packed.nbytes + sz.nbytes)


def _engine_dynamic(engine: str, reduce_range: bool) -> Factory:
    def factory(w: torch.Tensor) -> tuple[Kernel, int]:
        q, scale = w8a8.quantize_weight(w)
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            zero = torch.zeros_like(scale, dtype=torch.long)
            wq = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            packed = torch.ops.quantized.linear_prepack(wq, None)
        finally:
            torch.backends.quantized.engine = previous
        return (lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed, reduce_range).to(x.dtype)), (
            q.nbytes + scale.nbytes)
    return factory


def _library_w8a8(kernel: str) -> Factory:
    def factory(w: torch.Tensor) -> tuple[Kernel, int]:
        weight = w8a8.W8A8Weight.from_float(w, kernel=kernel)
        return weight.forward, weight.nbytes
    return factory


CANDIDATES: dict[str, Factory] = {
    "bf16 F.linear (oneDNN)": _torch_default,
    "bf16 torch.mv": _torch_mv,
    "bf16 torch, oneDNN off": _no_onednn,
    "FBGEMM fp16 packed": _fbgemm_fp16,
    "fp16 F.linear (oneDNN)": _float16(_torch_default),
    "fp16 torch.mv": _float16(_torch_mv),
    "fp16 torch, oneDNN off": _float16(_no_onednn),
    "int8 weight-only (_weight_int8pack_mm)": _int8_weight_only,
    "int4 g32 (_weight_int4pack_mm_for_cpu)": _int4,
    "w8a8 FBGEMM linear_dynamic (7-bit act, per tensor)": _engine_dynamic("fbgemm", True),
    "w8a8 oneDNN linear_dynamic (u8 act, per tensor)": _engine_dynamic("onednn", False),
    "w8a8 llama3 onednn (u8 act per row)": _library_w8a8("onednn"),
    "w8a8 llama3 int_mm (s8 act per row)": _library_w8a8("int_mm"),
}


def layer_shapes(dim: int, hidden: int, kv_dim: int) -> list[tuple[int, int]]:
    """(out, in) of one transformer layer's linear layers: q, k, v, o, w1, w3, w2."""
    return [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden)]


def _elapsed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--kv_dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--layers", type=int, default=4, help="layers' matrices in the decode probe")
    p.add_argument("--model_layers", type=int, default=16, help="layers of the full model (tok/s)")
    p.add_argument("--rows", type=int, default=512, help="rows of the prefill probe")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="add the compiled GEMV (torch.compile)")
    p.add_argument("--only", default="", help="comma-separated substrings of candidate names")
    p.add_argument("--out", default="", help="append the markdown table to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    candidates = dict(CANDIDATES)
    if a.compile:
        candidates["compiled GEMV (inductor)"] = _compiled_gemv
    if a.only:
        wanted = [s.strip() for s in a.only.split(",")]
        candidates = {k: v for k, v in candidates.items() if any(s in k for s in wanted)}

    g = torch.Generator().manual_seed(0)
    layer = layer_shapes(a.dim, a.hidden, a.kv_dim)
    shapes = layer * a.layers + [(a.vocab, a.dim)]
    weights = [(torch.randn(o, i, generator=g) / i**0.5).to(torch.bfloat16) for o, i in shapes]
    xs = {i: torch.randn(1, i, generator=g).to(torch.bfloat16) for i in {a.dim, a.hidden}}
    xp = {i: torch.randn(a.rows, i, generator=g).to(torch.bfloat16) for i in {a.dim, a.hidden}}
    header = cpu_summary(a.threads)
    print(header, flush=True)

    results: dict[str, dict[str, list[float]]] = {}
    nbytes: dict[str, tuple[int, int]] = {}
    built: dict[str, list[Kernel]] = {}
    for name, factory in candidates.items():  # build all (memory: ~3 GB for the default shapes)
        kernels, sizes = [], []
        for w in weights:
            fn, size = factory(w)
            kernels.append(fn)
            sizes.append(size)
        built[name] = kernels
        nbytes[name] = (sum(sizes[:-1]) // a.layers, sizes[-1])  # per layer, output
        for k, (_o, i) in zip(kernels, shapes, strict=True):  # warm up (and compile)
            k(xs[i])
        for k, (_o, i) in zip(kernels[:7], layer, strict=True):
            k(xp[i])
        results[name] = {"layers": [], "output": [], "prefill": []}
        print(f"  built {name}", flush=True)
    del weights
    gc.collect()

    for r in range(a.rounds):
        for name, kernels in built.items():
            res = results[name]
            res["layers"].append(_elapsed(lambda ks=kernels: [k(xs[i]) for k, (_o, i) in
                                                                    zip(ks[:-1], shapes[:-1], strict=True)]))
            res["output"].append(_elapsed(lambda ks=kernels: ks[-1](xs[a.dim])))
            res["prefill"].append(_elapsed(lambda ks=kernels: [k(xp[i]) for k, (_o, i) in
                                                                     zip(ks[:7], layer, strict=True)]))
        print(f"  round {r + 1}/{a.rounds} done", flush=True)

    lines = [header, "",
             f"Linear layers only, {a.threads} threads; shape dim {a.dim}, hidden {a.hidden}, kv {a.kv_dim}, "
             f"vocab {a.vocab}; median of {a.rounds} interleaved rounds.",
             "",
             "| kernel | decode layers GB/s | decode output GB/s | decode tok/s, 4-layer 1B | decode tok/s, "
             f"{a.model_layers}-layer | prefill {a.rows} rows tok/s, {a.model_layers} layers |",
             "|---|---|---|---|---|---|"]
    table = {}
    for name, res in results.items():
        t_layer = statistics.median(res["layers"]) / a.layers
        t_out = statistics.median(res["output"])
        t_pre = statistics.median(res["prefill"])
        b_layer, b_out = nbytes[name]
        row = dict(layer_gb_s=b_layer / t_layer / 1e9, output_gb_s=b_out / t_out / 1e9,
                   tok_s_4=1 / (4 * t_layer + t_out), tok_s_full=1 / (a.model_layers * t_layer + t_out),
                   prefill_tok_s=a.rows / (a.model_layers * t_pre))
        table[name] = row
        lines.append(f"| {name} | {row['layer_gb_s']:.1f} | {row['output_gb_s']:.1f} | "
                     f"{row['tok_s_4']:.1f} | {row['tok_s_full']:.1f} | {row['prefill_tok_s']:.0f} |")
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n\n")
    return table


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
