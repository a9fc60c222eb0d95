#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 10 minutes (a lent H100/H200-class GPU):
#   1. the fast-path tests (they add CUDA cases when a GPU is present) and the model tests;
#   2. the Llama 3 8B shape (random weights, bf16) benchmark: eager against transformers,
#      int8 weight-only, torch.compile (CUDA graphs), and int8 + compile.
# Results land in $OUT (default gpu_results/) as JSON plus the printed tables in gpu_check.log.
#
#   bash scripts/gpu_check.sh            # from the repository root or anywhere
#
# Needs torch with CUDA, fairscale, fire, transformers and pytest importable by $PYTHON; the
# package is used from this checkout (PYTHONPATH), nothing is installed or downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
status=0

run() {  # run LIMIT_SECONDS CMD...: log it, keep going on failure, remember that it failed
    local limit=$1; shift
    echo "+ $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "!! exit $rc: $*" | tee -a "$LOG"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG" || exit 1
import importlib, sys
import torch
missing = [m for m in ("fairscale", "fire", "transformers", "pytest") if importlib.util.find_spec(m) is None]
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if missing or not torch.cuda.is_available():
    sys.exit(f"cannot run: missing {missing}, cuda available={torch.cuda.is_available()}")
EOF

BENCH=("$PYTHON" scripts/benchmark.py --shape llama-3-8b --device cuda --dtype bf16
       --prompt_lens 512,2048 --batch_sizes 1,8 --decode_tokens 128 --decode_context 512)
run 100 "$PYTHON" -m pytest -q tests/test_fast_paths.py tests/test_model.py
run 150 "${BENCH[@]}" --compare hf --out "$OUT/8b_bf16_eager.json"
run 80  "${BENCH[@]}" --quantize int8 --out "$OUT/8b_int8_eager.json"
run 110 "${BENCH[@]}" --compile --out "$OUT/8b_bf16_compile.json"
run 110 "${BENCH[@]}" --quantize int8 --compile --out "$OUT/8b_int8_compile.json"
exit $status
