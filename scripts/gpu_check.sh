#!/usr/bin/env bash
# The GPU device check: everything that needs a GPU, in stages under one deadline (500 s of stages,
# so the whole command fits in 9 minutes), made for a lent machine with one GPU (H100 / H200),
# torch + CUDA, transformers, safetensors, tiktoken and pytest, and no network.
#
# 1. Once, on a machine with the package index and this project's environment:
#        bash scripts/gpu_prep.sh          # wheels the GPU machine lacks -> .whl/ (ignored by git)
# 2. On the GPU machine, from the repository root, with .whl/ carried along:
#        bash scripts/gpu_check.sh         # results in $OUT (default gpu_results/), at most 8 files
#    The wheels are installed into a private path (/tmp/site, put on PYTHONPATH) with pip, or, where
#    `python -m pip` is missing, unpacked there directly (they are pure-Python wheels); the package
#    runs from this checkout.
# Dry run on a CPU (every stage, tiny shape, real compilation: several minutes on 2 cores;
# tests/test_gpu_check.py runs it at SIZE=ci, compilation disabled):
#        DEV=cpu bash scripts/gpu_check.sh
#
# Stages: the preflight first, then in order of value (each with its own time limit; one that no
# longer fits before the deadline is skipped and reported; summary.json is rewritten as each ends):
#   preflight           ~30 s: GPU name and memory, torch / CUDA / cuDNN / Triton versions, C compiler
#                       and Python headers, a tiny torch.compile + CUDA graph, which SDPA kernel each
#                       attention call site gets (SDPA's own choice and the pinned plan), the cost of
#                       a growing key length. Compiling stages are skipped, with its reason, if it
#                       finds compiling cannot work.
#   tests               the CUDA cases only: tests/test_cuda.py and test_fast_paths.py -k cuda
#                       (CUDA-graph decode = eager, compile=True generate = eager, int8 under CUDA
#                       graphs, bf16 logits = transformers' (asserted), sampling without host syncs,
#                       pinned attention plans, the CUDA int8 kernel)
#   bench_bf16_compile  scripts/benchmark.py, Llama 3 8B shape, bf16, compiled decode, batch 1;
#                       eager prefill of 2K and 32K tokens
#   bench_bf16_eager_hf the same eager, batch 1 and 8, against transformers on the same weights
#   bench_int8_compile  int8 weight-only, compiled decode, batch 1
#   bench_fp8_compile   fp8 row-wise, compiled decode ("not built" until llama3/kernels/fp8.py imports
#                       and the kernel chooser offers quantize="fp8")
#   bench_int4_compile  int4 weight-only (likewise llama3/kernels/int4.py, quantize="int4")
#   kernels             scripts/gpu_kernels.py: prefill attention kernels and decode attention
#   torchrun_e2e        torchrun on a tiny checkpoint: greedy text eager and compile=True agree
#   prefill_long        a 128K-token eager prefill of the 8B shape: fits and runs
# Files in $OUT: gpu_check.log (everything printed), summary.json, preflight.json, tests.xml,
# bench_bf16_compile.json, bench_bf16_eager.json, bench_int8_compile.json, kernels.json (the fp8,
# int4 and long-prefill figures are in summary.json).
#
# Settings (environment): DEV=cuda|cpu, SIZE=full|tiny|ci (default full on cuda, tiny on cpu),
# DEADLINE (seconds for all stages: 500 on cuda, 1200 for the slower CPU dry run), STAGES=name,name
# (a subset, e.g. STAGES=preflight,bench_bf16_compile), OUT, PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEV=${DEV:-cuda}
if [ "$DEV" = cpu ]; then DEADLINE=${DEADLINE:-1200}; else DEADLINE=${DEADLINE:-500}; fi
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"

missing=$("$PYTHON" -c "import importlib.util as u; print(' '.join(m for m in ('fairscale', 'fire', 'llama_models') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing .whl/*.whl (for: $missing) into /tmp/site"
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
        else  # no pip: a pure-Python wheel is a zip of what site-packages would hold
            echo "no '$PYTHON -m pip': unpacking the wheels into /tmp/site"
            "$PYTHON" -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in sorted(glob.glob('.whl/*.whl'))]" \
                || { echo "gpu_check: unpacking .whl/ failed" >&2; exit 2; }
        fi
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: $missing not importable and no .whl/ here: run 'bash scripts/gpu_prep.sh' on a" \
             "machine with the package index and bring .whl/ along" >&2
        exit 2
    fi
fi
if [ "$DEV" = cuda ]; then
    "$PYTHON" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device (DEV=cpu for the dry run)')" || exit 2
fi
exec "$PYTHON" scripts/gpu_check.py --device "$DEV" ${SIZE:+--size "$SIZE"} --deadline "$DEADLINE" \
    --out "$OUT" ${STAGES:+--stages "$STAGES"}
