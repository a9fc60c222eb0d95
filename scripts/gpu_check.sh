#!/usr/bin/env bash
# The GPU device check: everything that needs a GPU, in stages under one ~7-minute deadline, made
# for a lent machine with one GPU (e.g. an H200), torch + CUDA, transformers, safetensors, tiktoken
# and pytest, and no network.
#
# 1. Once, on a machine with the package index and this project's environment:
#        bash scripts/gpu_prep.sh          # wheels the GPU machine lacks -> .whl/ (ignored by git)
# 2. On the GPU machine, from the repository root, with .whl/ carried along:
#        bash scripts/gpu_check.sh         # results in $OUT (default gpu_results/), at most 8 files
#    The wheels are installed into a private path (/tmp/site, put on PYTHONPATH); the package runs
#    from this checkout.
# Dry run on a CPU (every stage, tiny shape, real compilation: 4-7 minutes on 2 cores;
# tests/test_gpu_check.py runs it at SIZE=ci, compilation disabled, one run in the e2e stage):
#        DEV=cpu bash scripts/gpu_check.sh
#
# Stages, in order of value (each with its own timeout; one that no longer fits before the
# deadline is skipped and reported), summary printed last:
#   tests               tests/test_cuda.py (CUDA-graph decode = eager tokens in fp32,
#                       Llama(compile=True).generate = eager, int8 under CUDA graphs, no skipped
#                       CUDA graphs) and tests/test_fast_paths.py with their CUDA cases
#   bench_bf16_compile  scripts/benchmark.py, Llama 3 8B shape, bf16, compiled decode, batch 1
#   bench_bf16_eager_hf the same eager, batch 1 and 8, against transformers on the same weights
#   bench_int8_compile  int8 weight-only, compiled decode, batch 1
#   torchrun_e2e        torchrun on a tiny checkpoint: greedy text eager and compile=True agree
#   kernels             scripts/gpu_kernels.py: prefill attention kernels and decode attention
# Files in $OUT: gpu_check.log (everything printed), summary.json, tests.xml,
# bench_bf16_compile.json, bench_bf16_eager.json, bench_int8_compile.json, kernels.json.
#
# Settings (environment): DEV=cuda|cpu, SIZE=full|tiny|ci (default full on cuda, tiny on cpu),
# DEADLINE (seconds for all stages: 420 on cuda, 1200 for the slower CPU dry run), STAGES=name,name
# (a subset), OUT, PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEV=${DEV:-cuda}
if [ "$DEV" = cpu ]; then DEADLINE=${DEADLINE:-1200}; else DEADLINE=${DEADLINE:-420}; fi
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"

missing=$("$PYTHON" -c "import importlib.util as u; print(' '.join(m for m in ('fairscale', 'fire', 'llama_models') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing .whl/*.whl (for: $missing) into /tmp/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
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
