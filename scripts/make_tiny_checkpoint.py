"""Same as ``llama3-make-tiny-checkpoint`` (``python -m llama3.make_tiny_checkpoint``)."""
try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

from llama3.make_tiny_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
