#!/usr/bin/env bash
# Create .venv (if missing) and install llama3 into it.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh demo     plus Meta's llama-models wheel (--no-deps), for its tokenizer.model
#   bash scripts/setup.sh test     plus the test oracles: transformers, and the llama-models wheel
#                                  (its reference model, chat format and tokenizer.model)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Pin the CPU build of torch first: an unpinned "torch" would resolve to a multi-GB CUDA build.
# On a CUDA machine, install the torch build you want before running this script.
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
case "${1:-}" in
    test) pip install -q -e ".[test]" ;;
    *) pip install -q -e . ;;
esac
case "${1:-}" in
    test|demo) pip install -q --no-deps llama-models ;;
esac
