"""What the package's command-line programs share: one flag convention and one way to fail.

* :func:`make_parser` builds an ``argparse`` parser in which every ``--dashed-flag`` also answers to
  its ``--underscore_flag`` spelling (Meta's examples use underscores), abbreviations are refused
  (a misspelled flag is an error, not a guess), and a usage error is one line on stderr, exit 2.
* :func:`run_main` runs a program's body and turns user errors (:class:`UsageError`, a missing
  path, a bad checkpoint, a rejected argument) into one line on stderr and exit status 2 instead
  of a traceback. Set ``LLAMA3_TRACEBACK=1`` to see the traceback anyway.
* :func:`check_sampling` validates ``--temperature`` / ``--top-p`` before a model is loaded.
* :func:`fire_strict` runs a function with ``fire`` (the ``scripts/example_*.py`` stay on fire, as
  Meta's do) after checking the command line against its signature: fire itself would run the
  function first and only then complain about a flag it could not use, or take it silently when
  the function has ``**kwargs``.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import LlamaError
from .programs import EXIT_INTERRUPTED, interrupts_raise, quiet_interrupts

__all__ = ["UsageError", "make_parser", "run_main", "check_sampling", "require_dir", "fire_strict"]

EXIT_USAGE = 2


class UsageError(LlamaError):
    """A mistake in how a program was called: reported as one line, exit status 2."""


# --- argparse ---------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``--max-seq-len`` and not its ``--max_seq_len`` twin, and defaults only where set."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.option_strings:
            names = action.option_strings
            shown = [s for s in names if not ("_" in s and s.replace("_", "-") in names)]
            action = argparse.Action(shown, action.dest, nargs=action.nargs, metavar=action.metavar,
                                     choices=action.choices, help=action.help)
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _with_twins(names: Sequence[str]) -> list[str]:
    """``names`` plus the ``--underscore_name`` spelling of every ``--dashed-name``."""
    spelled = list(names)
    for name in names:
        if name.startswith("--") and "-" in name[2:]:
            twin = "--" + name[2:].replace("-", "_")
            if twin not in spelled:
                spelled.append(twin)
    return spelled


class _Parser(argparse.ArgumentParser):
    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        """As argparse's, plus the ``--underscore_name`` spelling of every ``--dashed-name``."""
        return super().add_argument(*_with_twins(names), **kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *names, **kw: add(*_with_twins(names), **kw)  # type: ignore[method-assign]
        return group

    def error(self, message: str) -> NoReturn:
        """One line, not the usage block: ``prog: error: ... (see prog --help)``."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` following the package's convention (see the module docstring); for
    sub-commands use :func:`add_subparsers`."""
    kwargs.setdefault("formatter_class", _HelpFormatter)
    parser = _Parser(prog=prog, description=description, allow_abbrev=False, **kwargs)
    return parser


def add_subparsers(parser: argparse.ArgumentParser, **kwargs: Any) -> Any:
    """``parser.add_subparsers`` whose sub-commands follow the convention too."""
    return parser.add_subparsers(parser_class=_Parser, **kwargs)


# --- errors -----------------------------------------------------------------------------------


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Every LlamaError is a refusal with a message for a person (NotEnoughMemoryError included).
    types: list[type[BaseException]] = [LlamaError, FileNotFoundError, NotADirectoryError,
                                        IsADirectoryError, PermissionError, ValueError]
    from .checkpoint import CheckpointError
    from .distributed import ModelParallelError

    return (*types, CheckpointError, ModelParallelError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def run_main(body: Callable[[], int | None], prog: str) -> int:
    """Run ``body()``; a user error becomes ``prog: error: <message>`` on stderr and exit status 2.

    User errors: :class:`UsageError`, missing or unreadable paths (``OSError`` subclasses for
    paths), ``ValueError`` (the library's "bad argument" error, which names the argument) and
    ``CheckpointError``. Anything else is a bug and keeps its traceback.
    """
    own_interrupts = interrupts_raise()  # a program started by llama3.programs: Ctrl-C raises again
    try:
        return int(body() or 0)
    except SystemExit as exc:  # argparse: --help (0) or a usage error, already reported (2)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        sys.stderr.write(f"{exc.code}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except _user_error_types() as exc:
        if os.environ.get("LLAMA3_TRACEBACK"):
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return EXIT_USAGE
    finally:
        if own_interrupts:
            quiet_interrupts()  # what is left is shutdown: Ctrl-C there ends quietly too


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def require_dir(path: str | os.PathLike[str], what: str = "checkpoint directory") -> Path | str:
    """``path`` as a Path, or a :class:`UsageError` saying that it is missing or not a directory.

    A string shaped like a Hugging Face Hub repo id (``owner/name``) that is not a local path is
    returned unchanged, for the loader to resolve.
    """
    p = Path(path).expanduser()
    if not p.exists():
        if isinstance(path, str) and _HUB_ID.fullmatch(path):
            return path
        raise UsageError(f"{what} {str(path)!r} does not exist")
    if not p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is not a directory")
    return p


def check_sampling(temperature: Any, top_p: Any) -> tuple[float, float]:
    """Validate ``--temperature`` and ``--top-p`` (before any model is loaded); return them as floats.

    Raises :class:`UsageError` naming the flag.
    """
    values = []
    for flag, value in (("--temperature", temperature), ("--top_p", top_p)):
        if isinstance(value, bool):
            raise UsageError(f"{flag} must be a number, got {value!r}")
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise UsageError(f"{flag} must be a number, got {value!r}") from None
    temperature, top_p = values
    from .decoding import SamplingParams

    try:
        SamplingParams(temperature=temperature, top_p=top_p)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return temperature, top_p


def build_llama(ckpt_dir: str, tokenizer_path: str | None, *, temperature: Any, top_p: Any,
                prefill_chunk: int | None = None, **build_args: Any) -> tuple[Any, float, float]:
    """What an example script does before generating: check the sampling values and the checkpoint
    path (before minutes of loading), turn on progress logging, and ``Llama.build`` the model.

    ``build_args`` go to :meth:`~llama3.generation.Llama.build`; ``prefill_chunk=None`` keeps the
    library's default. Returns ``(llama, temperature, top_p)`` with the sampling values as floats.
    """
    temperature, top_p = check_sampling(temperature, top_p)
    ckpt = require_dir(ckpt_dir)
    from .generation import Llama
    from .progress import configure_logging

    configure_logging(True)  # loading progress on stderr (rank 0)
    if prefill_chunk is not None:
        build_args["prefill_chunk"] = prefill_chunk
    return Llama.build(ckpt, tokenizer_path, **build_args), temperature, top_p


# --- fire -------------------------------------------------------------------------------------

_FIRE_FLAGS = {"help"}


def _check_fire_argv(fn: Callable[..., Any], argv: Sequence[str]) -> None:
    """Refuse what fire would accept silently or only complain about after running ``fn``:
    unknown or misspelled flags, short flags, too many or too few positional arguments."""
    sig = inspect.signature(fn)
    params = {name: p for name, p in sig.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    flags = {name.replace("_", "-") for name in params}
    booleans = {name for name, p in params.items() if isinstance(p.default, bool)}
    given: set[str] = set()
    positional: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            break  # what follows is for fire itself (-- --help, -- --trace ...)
        if token.startswith("--"):
            name, has_value, value = token[2:].partition("=")
            key = name.replace("-", "_")
            if key in params:
                given.add(key)
                if key not in booleans:
                    if not has_value:
                        value = argv[i] if i < len(argv) else None
                        i += 1  # the next token is its value
                    _check_value(key, params[key], value)
                elif has_value and value not in ("True", "False"):
                    # fire passes anything else ("no", "false") on as a string, and a string is truthy
                    raise UsageError(f"--{name} is an on/off flag: give --{name}, --no{name} or "
                                     f"--{name}=True/False, not {value!r}")
                continue
            if key.startswith("no") and key[2:] in booleans:
                given.add(key[2:])
                continue
            if key in _FIRE_FLAGS:
                continue
            close = difflib.get_close_matches(name.replace("_", "-"), sorted(flags), n=1)
            hint = f"; did you mean --{close[0].replace('-', '_')}?" if close else ""
            raise UsageError(f"unknown flag --{name}{hint}")
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            if token == "-h":
                continue
            short = [name for name in params if name.startswith(token[1:])] if len(token) == 2 else []
            if len(short) != 1:
                raise UsageError(f"unknown flag {token} (use the long --name form)")
            given.add(short[0])  # fire's one-letter spelling of a flag whose first letter is unique
            if short[0] not in booleans:
                _check_value(short[0], params[short[0]], argv[i] if i < len(argv) else None)
                i += 1
            continue
        positional.append(token)
    free = [name for name in params if name not in given]
    if len(positional) > len(free):
        raise UsageError(f"unexpected argument {positional[len(free)]!r}")
    missing = [name for name in free[len(positional):] if params[name].default is inspect.Parameter.empty]
    if missing and not {"-h", "--help"} & set(argv):
        raise UsageError(f"missing argument {missing[0].upper()}")


def _check_value(name: str, param: inspect.Parameter, value: str | None) -> None:
    """A flag declared ``int`` or ``float`` must get a number (fire would pass the string on)."""
    if value is None:
        raise UsageError(f"--{name} needs a value")
    annotation = str(param.annotation)
    kind = float if "float" in annotation else int if "int" in annotation else None
    if kind is None or (value == "None" and "None" in annotation):
        return
    try:
        kind(value)
    except ValueError:
        raise UsageError(f"--{name} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}") from None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def fire_strict(fn: Callable[..., Any], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``fn`` as a fire CLI, refusing unknown flags and reporting user errors in one line.

    ``--help`` prints the flags with the descriptions from ``fn``'s docstring (its ``Args:``
    section) straight to stdout, never through a pager.
    """
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name

    def body() -> int:
        _check_fire_argv(fn, argv)
        os.environ["PAGER"] = "cat"  # fire pages --help through $PAGER (less) on a terminal
        try:
            fire.Fire(fn, command=argv, name=prog)
        except fire.core.FireExit as exc:
            return int(exc.code or 0)
        return 0

    return run_main(body, prog)
