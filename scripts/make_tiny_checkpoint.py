"""Same as ``llama3-make-tiny-checkpoint`` (``python -m llama3.make_tiny_checkpoint``)."""
import _env  # noqa: F401  (outside the venv: a one-line hint, not a traceback)

from llama3.make_tiny_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
