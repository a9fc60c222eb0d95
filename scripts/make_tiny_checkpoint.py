"""Same as ``llama3-make-tiny-checkpoint`` (``python -m llama3.make_tiny_checkpoint``)."""
from llama3.programs import run_module

if __name__ == "__main__":
    run_module("llama3.make_tiny_checkpoint")  # Ctrl-C quiet (status 130) from the first import on
