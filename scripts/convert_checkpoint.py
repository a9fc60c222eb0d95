"""Same as ``llama3-convert`` (``python -m llama3.convert``): see llama3/convert.py."""
import _env  # noqa: F401  (outside the venv: a one-line hint, not a traceback)

from llama3.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
