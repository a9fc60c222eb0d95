#!/usr/bin/env bash
# Create .venv (if missing) and install llama3 into it (editable), saying what it installs.
#   bash scripts/setup.sh [--cpu]          runtime only
#   bash scripts/setup.sh [--cpu] demo     plus Meta's llama-models wheel (--no-deps), for its tokenizer.model
#   bash scripts/setup.sh [--cpu] test     plus the test oracles: transformers, and the llama-models wheel
#                                          (its reference model, chat format and tokenizer.model)
# torch: a torch already in .venv is kept. Otherwise torch==$TORCH_VERSION (default 2.13.0) is
# installed from your package index: on Linux x86_64 PyPI serves the CUDA build (several GB with
# its nvidia-* libraries). --cpu (or TORCH_INDEX_URL=...) takes it from PyTorch's CPU-only index
# instead (a few hundred MB). Afterwards: `source .venv/bin/activate` in every new shell.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
extra=""
for arg in "$@"; do
    case "$arg" in
        --cpu) TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu} ;;
        demo|test) extra=$arg ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (use: [--cpu] [demo|test])" >&2; exit 2 ;;
    esac
done
[ -x .venv/bin/python ] || { echo "setup: creating .venv with $("$PYTHON" --version)"; "$PYTHON" -m venv .venv; }
. .venv/bin/activate
pip install -q --upgrade pip
if have=$(python -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "setup: torch $have is already in .venv: kept"
elif [ -n "$TORCH_INDEX_URL" ]; then
    echo "setup: installing torch==$TORCH_VERSION from $TORCH_INDEX_URL"
    pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
else
    echo "setup: installing torch==$TORCH_VERSION from your package index (on Linux x86_64 PyPI's is the"
    echo "       CUDA build, several GB; a local wheel cache may hold another). CPU only: --cpu"
    pip install -q "torch==$TORCH_VERSION"
fi
python -W ignore -c "import torch; print('setup: torch', torch.__version__, '(CUDA ' + str(torch.version.cuda) + ')' if torch.version.cuda else '(CPU only)')"
case "$extra" in
    test) echo "setup: installing llama3 (editable) + test extras"; pip install -q -e ".[test]" ;;
    *) echo "setup: installing llama3 (editable)"; pip install -q -e . ;;
esac
case "$extra" in
    test|demo) echo "setup: installing llama-models --no-deps (for tokenizer.model)"; pip install -q --no-deps llama-models ;;
esac
echo "setup: done. In every new shell: source .venv/bin/activate"
