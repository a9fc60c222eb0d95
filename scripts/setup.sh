#!/usr/bin/env bash
# Create .venv (if missing) and install llama3 into it.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh test     plus the test oracles: transformers, and Meta's llama-models
#                                  wheel (--no-deps: its reference model and tokenizer.model)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Pin the CPU build of torch first: an unpinned "torch" would resolve to a multi-GB CUDA build.
# On a CUDA machine, install the torch build you want before running this script.
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "${1:-}" = "test" ]; then
    pip install -q -e ".[test]"
    pip install -q --no-deps llama-models
else
    pip install -q -e .
fi
