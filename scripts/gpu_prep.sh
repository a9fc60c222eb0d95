#!/usr/bin/env bash
# Prepare scripts/gpu_check.sh for a machine without network: put the wheels it needs and that
# such a machine may lack into .whl/ (ignored by git; carried to the machine as a path, e.g. the
# device tool's `carry: [".whl"]`). Run once, from any directory, on a machine with the package
# index and this project's environment:
#
#   bash scripts/gpu_prep.sh               # PYTHON=/path/to/venv/bin/python to pick the environment
#
# Wheels (versions as installed in that environment, so the GPU run uses what CI tests):
#   fairscale    pure-Python sdist, built into a py3-none-any wheel here (pip wheel --no-deps)
#   fire, termcolor   the example scripts' and benchmark's CLI (fire needs termcolor)
#   llama-models Meta's reference package: its tokenizer.model lets the tests and the end-to-end
#                stage use the real Llama 3 tokenizer (never committed: it stays in .whl/)
# All are pure Python, so the Python version of the two machines need not match. torch,
# transformers, safetensors, tiktoken and pytest are expected on the GPU machine already.
# gpu_check.sh installs .whl/*.whl with `pip install --no-index --no-deps --target /tmp/site`
# (a private path on PYTHONPATH; nothing of the machine's own environment changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHL=.whl
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
specs=()
for pkg in fairscale fire termcolor llama-models; do
    if v=$(version "$pkg" 2>/dev/null); then specs+=("$pkg==$v"); else
        echo "gpu_prep: $pkg is not installed in $PYTHON's environment; pip install it first" >&2; exit 2
    fi
done
rm -rf "$WHL"
mkdir -p "$WHL"
# pip wheel takes a published wheel where there is one and builds the sdist otherwise (fairscale).
# Without pip in that environment: a pip on PATH (any Python 3 builds these pure-Python wheels).
if "$PYTHON" -m pip --version >/dev/null 2>&1; then pip=("$PYTHON" -m pip)
elif command -v pip3 >/dev/null; then pip=(pip3)
elif command -v pip >/dev/null; then pip=(pip)
else echo "gpu_prep: no pip for $PYTHON and none on PATH; install pip (python -m ensurepip)" >&2; exit 2; fi
"${pip[@]}" wheel -q --no-deps --wheel-dir "$WHL" "${specs[@]}"
ls -l "$WHL"
du -sh "$WHL"
