"""Are llama3's dependencies importable here? Checked when this module is imported, which
``llama3/__init__.py`` does first.

Run with a Python outside the project's virtual environment (``python -m llama3.chat`` after a
new shell without ``source .venv/bin/activate``), the first import of torch or tiktoken would
fail with a bare ``ModuleNotFoundError``. This says instead, in one line, how to get a Python that
has them: as a program (``python -m llama3....``) on stderr with exit status 2, as a library as
the ``ModuleNotFoundError``'s message.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["REQUIRED", "check_dependencies", "missing_hint"]

# Imported by the package itself (the scripts' ``fire`` is checked where it is used).
REQUIRED = ("torch", "tiktoken", "safetensors")


def missing_hint(names: list[str] | tuple[str, ...]) -> str:
    """One line: what is missing from this Python and how to get a Python that has it."""
    return (f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not installed in this Python "
            f"({sys.executable}): activate the project's environment with `source .venv/bin/activate` "
            "(made by `bash scripts/setup.sh`), or install the package here with `pip install -e .`")


def check_dependencies() -> None:
    """Raise a one-line ModuleNotFoundError (or, under ``python -m``, print it and exit with status 2)
    when a required module cannot be found."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    message = missing_hint(missing)
    # While ``python -m llama3.x`` imports the package, runpy has set sys.argv[0] to "-m".
    if sys.argv[:1] == ["-m"]:
        print(f"llama3: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ModuleNotFoundError(message, name=missing[0])


check_dependencies()
