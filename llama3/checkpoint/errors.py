"""The exceptions of ``llama3.checkpoint``: one class per kind of problem, each message naming the
file, the tensor or key, and the numbers involved, and saying what to do."""

from __future__ import annotations

from ..errors import LlamaError

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "ConfigValueError",
    "ParamsMismatchError",
    "TensorDtypeError",
    "TiedWeightsMismatchError",
    "KVReplicaMismatchError",
    "ShardFilesError",
    "ShardMismatchError",
    "NotARegularFileError",
    "UnsafePathError",
    "UnsafeCheckpointError",
    "ConversionOverflowError",
    "HubError",
]


class CheckpointError(LlamaError):
    """Base class of every problem with a checkpoint directory or file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory (or Hub repository) does not exist or cannot be reached."""


class HubError(CheckpointNotFoundError):
    """A Hugging Face Hub id could not be resolved to a local folder (gated, offline, not found)."""


class CheckpointFormatError(CheckpointError, ValueError):
    """The directory or a file in it is not a checkpoint this package can read."""


class ConfigValueError(CheckpointFormatError):
    """A value in params.json / config.json has the wrong type or an impossible value."""


class ParamsMismatchError(CheckpointFormatError):
    """params.json / config.json disagrees with the tensors actually stored."""


class TensorDtypeError(ParamsMismatchError):
    """A tensor that must hold floating-point weights holds integers, booleans or complex numbers."""


class TiedWeightsMismatchError(ParamsMismatchError):
    """The config ties the output projection to the embedding, but a stored output weight differs."""


class KVReplicaMismatchError(CheckpointFormatError):
    """Shards that must hold identical copies of a key/value head hold different values."""


class ShardFilesError(CheckpointFormatError):
    """The shard files are not consolidated.00.pth ... consolidated.(N-1).pth, or one is missing."""


class ShardMismatchError(CheckpointError, ValueError):
    """The checkpoint's shard count cannot be mapped onto the model-parallel world size."""


class NotARegularFileError(CheckpointFormatError):
    """A name the loader would read is a named pipe, device or directory, not a regular file."""


class UnsafePathError(CheckpointFormatError):
    """An index file points outside the checkpoint directory."""


class UnsafeCheckpointError(CheckpointError):
    """A .pth file holds a pickle that would import or call code; it was refused, not run."""


class ConversionOverflowError(CheckpointError, ValueError):
    """A weight does not fit the requested target dtype (it would become inf)."""
