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
# worksteal: idle workers take queued tests from busy ones, so a few long tests don't leave a core idle.
python -m pytest -n "${PYTEST_WORKERS:-auto}" --dist worksteal --durations=10 "$@"
