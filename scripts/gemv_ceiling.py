"""How fast can a bfloat16 GEMV stream weights on this CPU at all? A measurement, not a code path.

Batch-1 decoding is a chain of GEMVs (y = W x), so its speed limit is the rate at which a GEMV
kernel can stream W. This script times, on the same ~1 GB of bfloat16 weights, with 1 thread and
with all threads:

* ``read``: a float32 sum over a buffer of the same size (the benchmark's read-bandwidth probe);
* ``torch.mv``: the eager kernel llama3 uses for one bfloat16 row;
* ``inductor``: the compiled multiply-and-sum llama3 uses under ``torch.compile`` with torch's kernels;
* ``FBGEMM fp16``: the packed float16 GEMM llama3 uses by default on such CPUs (``llama3.kernels.fbgemm``);
* ``hand AVX2``: a hand-written C++ kernel (4 float32 accumulators, bf16 -> fp32 by shifting,
  FMA), built here with ``torch.utils.cpp_extension`` (needs g++; x86 with AVX2 + FMA only).
  It is *not* part of llama3, which stays pure PyTorch: it is the yardstick for what the
  hardware allows a simple kernel, the way llama.cpp's kernels are.

If the hand kernel's rate doubles from 1 to 2 threads while the read bandwidth does not, the GEMV
is limited by the core's arithmetic (converting and multiplying), not by memory; the README's
"CPU decode" section reports what this gave on the project machine.

    python scripts/gemv_ceiling.py                # ~1 minute (the C++ build is cached)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.cpp_extension import load_inline

_KERNEL = r"""
#include <torch/extension.h>
#include <immintrin.h>

// bf16 -> fp32 is a 16-bit left shift of the bit pattern.
static inline __m256 load_bf16(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {  // x fp32 [K], w bf16 [N, K], K % 32 == 0
  const int64_t n = w.size(0), k = w.size(1);
  auto y = torch::empty({n}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const uint16_t* row = wp + i * k;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // 4 chains hide FMA latency
      for (int64_t j = 0; j < k; j += 32) {
        a0 = _mm256_fmadd_ps(load_bf16(row + j), _mm256_loadu_ps(xp + j), a0);
        a1 = _mm256_fmadd_ps(load_bf16(row + j + 8), _mm256_loadu_ps(xp + j + 8), a1);
        a2 = _mm256_fmadd_ps(load_bf16(row + j + 16), _mm256_loadu_ps(xp + j + 16), a2);
        a3 = _mm256_fmadd_ps(load_bf16(row + j + 24), _mm256_loadu_ps(xp + j + 24), a3);
      }
      __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      float lanes[8];
      _mm256_storeu_ps(lanes, s);
      yp[i] = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
    }
  });
  return y;
}
"""

ROWS, COLS, MATRICES = 8192, 2048, 32  # 32 x 32 MiB of bfloat16: far beyond any cache


def _rate(fn: Callable[[], object], nbytes: int, rounds: int = 7) -> float:
    """Median GB/s over ``rounds`` timed calls (after two warm-ups)."""
    fn()
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    hand = load_inline("llama3_gemv_ceiling", cpp_sources=_KERNEL, functions=["gemv_bf16"],
                       extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16) for _ in range(MATRICES)]
    x = torch.randn(COLS, generator=g)
    exact = weights[0].float() @ x
    if not torch.allclose(hand.gemv_bf16(x, weights[0]), exact, rtol=1e-4, atol=1e-3):
        raise RuntimeError("the hand-written kernel disagrees with torch: its figures would mean nothing")
    nbytes = sum(w.nbytes for w in weights)
    buffer = torch.ones(nbytes // 4)
    x_bf16 = x.to(torch.bfloat16)
    fused = torch.compile(lambda row, w: (row * w.float()).sum(-1))
    packs = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in weights]
    x_row = x[None]
    probes = {
        "read (float32 sum)": lambda: buffer.sum(),
        "torch.mv (eager)": lambda: [torch.mv(w, x_bf16) for w in weights],
        "inductor (compiled)": lambda: [fused(x, w) for w in weights],
        "FBGEMM fp16 (llama3's default)": lambda: [torch.ops.quantized.linear_dynamic_fp16(x_row, p)
                                                   for p in packs],
        "hand AVX2 (yardstick)": lambda: [hand.gemv_bf16(x, w) for w in weights],
    }
    all_threads = torch.get_num_threads()
    rows = {}
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        for name, fn in probes.items():
            rows.setdefault(name, {})[threads] = _rate(fn, nbytes)
    torch.set_num_threads(all_threads)
    columns = sorted({1, all_threads})
    print(f"bfloat16 GEMV over {nbytes / 1e9:.2f} GB of weights, GB/s (median of 7):")
    print("| kernel | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in columns)
          + " | % of read |")
    print("|---|" + "---|" * (len(columns) + 1))
    read = rows["read (float32 sum)"][all_threads]
    for name, by_threads in rows.items():
        cells = " | ".join(f"{by_threads[t]:.1f}" for t in columns)
        print(f"| {name} | {cells} | {100 * by_threads[all_threads] / read:.0f} % |")


if __name__ == "__main__":
    main()
