"""Same as ``llama3-convert`` (``python -m llama3.convert``): see llama3/convert.py."""
from llama3.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
