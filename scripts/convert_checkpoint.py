"""Same as ``llama3-convert`` (``python -m llama3.convert``): see llama3/convert.py."""
try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

from llama3.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
