#!/usr/bin/env bash
# Set up .venv with the test extras, then lint and run the whole test suite (CPU only), on parallel
# workers (pytest-xdist; one per core, PYTEST_WORKERS=N to choose, 0 for none). A line is printed
# as each test file finishes. Extra arguments go to pytest, e.g. `-m "not slow"` for a quick local
# pass without the few long tests (CI runs everything). CPU-only torch: `bash scripts/setup.sh --cpu test` first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check llama3 scripts tests
# loadgroup: tests balanced over the workers, except that an xdist_group (the torchrun jobs) stays on one.
python -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadgroup --durations=10 "$@"
