"""Same as ``llama3-make-tiny-checkpoint`` (``python -m llama3.make_tiny_checkpoint``)."""
try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

from llama3.programs import run_module

if __name__ == "__main__":
    run_module("llama3.make_tiny_checkpoint")  # Ctrl-C quiet (status 130) from the first import on
