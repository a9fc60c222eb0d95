"""Imported by the scripts before anything outside the standard library: run with a Python that
lacks llama3 or its dependencies (a new shell without ``source .venv/bin/activate``), a script
says so in one line and exits with status 2, instead of a ModuleNotFoundError traceback."""

import importlib.util
import os
import sys

NEEDED = ("llama3", "torch", "tiktoken", "safetensors", "fire")

missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if missing:
    script = os.path.basename(sys.argv[0]) or "this script"
    verb = "is" if len(missing) == 1 else "are"
    print(f"{script}: {', '.join(missing)} {verb} not installed in this Python ({sys.executable}): "
          "activate the project's environment with `source .venv/bin/activate` (made by "
          "`bash scripts/setup.sh`), or install the package here with `pip install -e .`", file=sys.stderr)
    raise SystemExit(2)
