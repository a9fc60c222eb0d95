"""What the two formats share: ``CheckpointInfo`` (what was found, and the reader that reads it),
safe file access, and typed access to config values with messages naming file, key and type."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import InvalidArgumentError
from ..files import read_text
from ..model import ModelArgs
from ..validation import finite_float, positive_int, strict_bool
from .errors import CheckpointError, CheckpointFormatError, ConfigValueError, NotARegularFileError

__all__ = ["CheckpointInfo", "FormatReader", "regular_file", "read_json", "ConfigReader", "file_mode",
           "build_args", "validate_overrides", "atomic_directory", "check_output_dir"]

Convert = Callable[[torch.Tensor], torch.Tensor]


class FormatReader(Protocol):
    """One checkpoint format: finds itself in a directory, maps its config, reads a rank's slice."""

    name: str  # "meta" or "hf"
    title: str  # for messages: "Meta", "Hugging Face"

    def detect(self, root: Path) -> CheckpointInfo | None: ...

    def num_shards(self, info: CheckpointInfo) -> int: ...

    def model_args(self, info: CheckpointInfo, overrides: dict[str, Any]) -> ModelArgs: ...

    def read_rank(self, info: CheckpointInfo, args: ModelArgs, rank: int, world: int,
                  convert: Convert) -> dict[str, torch.Tensor]: ...


@dataclass
class CheckpointInfo:
    """What ``inspect_checkpoint`` found: the format's reader, the directory holding the weights,
    the weight files and the config, as read. The format is decided here, once."""

    reader: FormatReader
    path: Path  # directory holding the weight files (may be ckpt_dir/original)
    files: list[Path]  # Meta: shards in rank order; HF: safetensors files
    config: dict[str, Any]  # params.json or config.json, as read
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # the directory asked for (``path`` or its parent for original/)

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = self.path

    @property
    def format(self) -> str:
        """``"meta"`` or ``"hf"``."""
        return self.reader.name

    @property
    def num_shards(self) -> int:
        """Model-parallel shards (Meta); an HF checkpoint is one logical shard however many files."""
        return self.reader.num_shards(self)

    def describe(self) -> str:
        """E.g. "Hugging Face checkpoint /x (3 files)" or "Meta checkpoint /y (8 shards)"."""
        n = len(self.files)
        what = "shard" if self.format == "meta" else "file"
        return f"{self.reader.title} checkpoint {self.path} ({n} {what}{'s' if n != 1 else ''})"


def regular_file(path: Path, what: str = "file") -> Path:
    """``path`` if it is a regular file (after symlinks). A named pipe or device is refused before
    anything opens it, so the loader never blocks on one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CheckpointFormatError(f"cannot stat {what} {path}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or special file")
        raise NotARegularFileError(f"{path} is {kind}, not a regular file; a checkpoint's {what} must be "
                                   "an ordinary file (remove or replace it)")
    return path


def exists_at_all(path: Path) -> bool:
    """True for anything at ``path`` (a pipe too), unlike ``Path.is_file``."""
    return os.path.lexists(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file; errors name the file."""
    regular_file(path, path.name)
    try:
        data = json.loads(read_text(path, path.name))  # size-limited: never a MemoryError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


class ConfigReader:
    """Typed access to one config file's values; errors name the file, key and expected type."""

    def __init__(self, data: dict[str, Any], path: Path | str) -> None:
        self.data = data
        self.path = path

    def _bad(self, key: str, expected: str, value: Any) -> ConfigValueError:
        return ConfigValueError(f"{self.path}: {key!r} must be {expected}, got {value!r} "
                                f"({type(value).__name__}); fix the file")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def int(self, key: str, default: Any = ..., *, data: dict[str, Any] | None = None) -> int:
        """A positive integer (JSON 4096 or 4096.0)."""
        value = self._get(key, default, data)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):  # numbers only: JSON has no other integer types
            raise self._bad(key, "a positive integer", value)
        try:
            return positive_int(value, key)
        except InvalidArgumentError:
            raise self._bad(key, "a positive integer", value) from None

    def float(self, key: str, default: Any = ..., *, data: dict[str, Any] | None = None,
              positive: bool = True) -> float:
        """A finite number (> 0 when ``positive``); NaN and Infinity are refused."""
        value = self._get(key, default, data)
        if not isinstance(value, (int, float)):  # finite_float would also take "8" via float()
            raise self._bad(key, "a finite number > 0" if positive else "a finite number", value)
        try:
            return finite_float(value, key, positive=positive)
        except InvalidArgumentError:
            raise self._bad(key, "a finite number > 0" if positive else "a finite number", value) from None

    def bool(self, key: str, default: Any = ..., *, data: dict[str, Any] | None = None) -> bool:
        """A JSON true/false; the string "false" is refused (it would be truthy)."""
        value = self._get(key, default, data)
        try:
            return strict_bool(value, key)
        except InvalidArgumentError:
            raise self._bad(key, "true or false (a JSON boolean, not a string)", value) from None

    def _get(self, key: str, default: Any, data: dict[str, Any] | None) -> Any:
        source = self.data if data is None else data
        if source.get(key) is None:
            if default is ...:
                raise CheckpointFormatError(f"{self.path} lacks {key!r}; is this a Llama checkpoint?")
            return default
        return source[key]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits a new file gets from this process's umask (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Permission bits a new directory gets from this process's umask (0o755 under umask 022)."""
    return 0o777 & ~_umask()


def validate_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The caller's overrides (``None`` dropped), checked as arguments: a bad value is the
    caller's mistake, not the checkpoint's."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    for key in ("max_seq_len", "max_batch_size"):
        if key in clean:
            clean[key] = positive_int(clean[key], f"argument {key}")
    if "rope_scale_factor" in clean:
        clean["rope_scale_factor"] = finite_float(clean["rope_scale_factor"], "argument rope_scale_factor",
                                                  positive=True)
    return clean


def build_args(params: dict[str, Any], overrides: dict[str, Any], source: Path | str) -> ModelArgs:
    """ModelArgs from checked config values, then with the caller's overrides; an error without the
    overrides is the file's, one that only the overrides cause is the caller's."""
    try:
        base = ModelArgs(**params)
    except (TypeError, ValueError) as e:
        raise ConfigValueError(f"{source}: {e}") from e
    if not overrides:
        return base
    try:
        return ModelArgs(**{**params, **overrides})
    except (TypeError, ValueError) as e:
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise InvalidArgumentError(f"the arguments {given} do not fit this checkpoint: {e}") from e


def check_output_dir(dst: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite``: nothing is ever mixed into
    an existing checkpoint."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"output {dst} is a file, not a directory; choose a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {dst} is not empty; choose a new directory, or pass "
                              "overwrite=True (--overwrite) to replace its contents")


@contextlib.contextmanager
def atomic_directory(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yields a temporary directory beside ``dst``; when the block
    succeeds it replaces ``dst`` (whose old contents are removed only then), when it fails it is
    deleted and ``dst`` is untouched. A half-written checkpoint is never left under ``dst``."""
    dst = Path(dst).expanduser()
    check_output_dir(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(dir_mode())  # mkdtemp makes it 0700
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
