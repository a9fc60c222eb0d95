#!/usr/bin/env bash
# Set up .venv with the test extras, then lint and run the whole test suite (CPU only).
# Extra arguments go to pytest. CPU-only torch: `bash scripts/setup.sh --cpu test` first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check llama3 scripts tests
python -m pytest -q "$@"
