"""Same as ``llama3-convert`` (``python -m llama3.convert``): see llama3/convert.py."""
from llama3.programs import run_module

if __name__ == "__main__":
    run_module("llama3.convert")  # Ctrl-C quiet (status 130) from the first import on
