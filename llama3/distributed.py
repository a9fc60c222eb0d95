"""Process group, fairscale model parallelism, device and dtype choice.

Everything that depends on *where* the model runs lives here, so that ``model.py`` only says *what*
it computes. Two ways in:

* under ``torchrun``: the process group comes from its environment (NCCL on CUDA, gloo on CPU);
* a plain ``python`` process: a one-process gloo group on an in-memory store, so nothing has to be
  set in the environment and no port is opened.

The three model-parallel layers are fairscale's own classes, so parameters are laid out (and
trained) exactly as fairscale does. They are re-built here so that they honour
``torch.device("meta")`` (fairscale allocates its weights with the legacy ``torch.Tensor(...)``
constructor, which ignores the device context, so a 70B model would be materialised on the CPU
before any weight is loaded), and so that inference (no gradients) communicates through
torch.distributed's functional collectives, which ``torch.compile`` traces without graph breaks.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings as fs_mappings

from .errors import LlamaError
from .teardown import tear_down_at_exit

logger = logging.getLogger(__name__)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "all_reduce_sum",
    "gather_last_dim",
    "init_model_parallel",
    "model_parallel_rank",
    "model_parallel_world_size",
    "select_device",
    "select_dtype",
]


class ModelParallelError(LlamaError, RuntimeError):
    """The requested model-parallel layout cannot be set up in this process group."""


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun (torch.distributed.run) for its workers


def _join_process_group(backend: str) -> None:
    """Join the job described by WORLD_SIZE / RANK / MASTER_ADDR / MASTER_PORT.

    Under torchrun the other ranks exist, and PyTorch's default timeouts apply. Without torchrun
    the variables may be leftovers of an earlier job in this shell: then the rendezvous waits at
    most ``LLAMA3_RENDEZVOUS_TIMEOUT`` seconds (default 60) and fails with a message naming them,
    instead of waiting for ranks that never come.
    """
    if _launched_by_torchrun():
        dist.init_process_group(backend)
        return
    seconds = float(os.environ.get("LLAMA3_RENDEZVOUS_TIMEOUT", "60"))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:  # a store timeout, a refused connection, a bad port
        found = ", ".join(f"{name}={os.environ[name]}" for name in
                          ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if name in os.environ)
        raise ModelParallelError(
            f"this process was not started by torchrun, but {found} say it is one rank of a "
            f"{os.environ['WORLD_SIZE']}-process job, and the other ranks did not join within {seconds:g} s "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). For a single process, "
            "unset WORLD_SIZE, RANK and MASTER_ADDR (leftovers of an earlier job?); for several, launch "
            "with torchrun --nproc_per_node N") from None


def init_model_parallel(model_parallel_size: int | None = None, *, backend: str | None = None) -> int:
    """Make sure ``torch.distributed`` and fairscale's model-parallel groups exist.

    Safe to call many times. Without torchrun this creates a one-process gloo group on an
    in-memory store. Under torchrun it joins the job's group and uses ``model_parallel_size``
    ranks per model (default: all of them). ``backend`` defaults to NCCL when CUDA is available,
    else gloo; pass "gloo" to run on the CPU of a machine that has GPUs (NCCL cannot move CPU
    tensors). It only matters for the first call, which creates the group.

    Returns the model-parallel world size.
    """
    if not dist.is_initialized():
        if _under_torchrun() and (_launched_by_torchrun() or os.environ["WORLD_SIZE"] != "1"):
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            _join_process_group(backend)
        else:
            # Single process: a HashStore needs no address, port or environment variables.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        tear_down_at_exit()  # destroyed in order at exit: no abort in the C++ teardown

    world_size = dist.get_world_size()
    if model_parallel_size is None:
        model_parallel_size = world_size if not fs_init.model_parallel_is_initialized() else (
            fs_init.get_model_parallel_world_size()
        )
    if model_parallel_size < 1 or world_size % model_parallel_size != 0:
        raise ModelParallelError(
            f"model_parallel_size={model_parallel_size} must be >= 1 and divide the number of "
            f"processes ({world_size}); launch with torchrun --nproc_per_node {model_parallel_size} "
            "or pass a model_parallel_size that divides it"
        )
    if fs_init.model_parallel_is_initialized():
        current = fs_init.get_model_parallel_world_size()
        if current != model_parallel_size:
            raise ModelParallelError(
                f"model parallelism is already set up with size {current}; "
                f"cannot switch to {model_parallel_size} in the same process"
            )
        return current
    # fairscale prints its set-up on every rank; keep stdout for the user's output.
    _quiet_call(fs_init.initialize_model_parallel, model_parallel_size)
    return model_parallel_size


def _quiet_call(fn, *args):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def model_parallel_world_size() -> int:
    """Number of ranks one model is split across: 1 until model parallelism is set up.

    Only reads the state: building a model never creates a process group (``init_model_parallel``,
    ``load_model`` and ``Llama.build`` do)."""
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


def model_parallel_rank() -> int:
    """This process's rank within its model-parallel group (0 until one is set up)."""
    return fs_init.get_model_parallel_rank() if fs_init.model_parallel_is_initialized() else 0


def select_device(override: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``override`` if given, else cuda > mps > cpu.

    Under torchrun with CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    if override is not None:
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# Chosen by scripts/benchmark.py on the project's reference CPU: see README, "Speed".
CPU_DEFAULT_DTYPE = torch.bfloat16


def select_dtype(device: torch.device, override: str | torch.dtype | None = None) -> torch.dtype:
    """The weight/activation dtype: ``override`` if given; bfloat16 on CUDA where supported, else
    float16; float16 on MPS; ``CPU_DEFAULT_DTYPE`` on CPU."""
    if override is not None:
        if isinstance(override, torch.dtype):
            return override
        try:
            return _DTYPES[str(override).lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {override!r}; choose one of {sorted(_DTYPES)}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return CPU_DEFAULT_DTYPE


# --- communication in the inference forward -----------------------------------------------------
#
# fairscale's mappings are autograd Functions that call torch.distributed's in-place collectives:
# torch.compile cannot trace them, so every parallel layer split the compiled decode step into
# pieces (two graph breaks per layer). Without gradients the layers use torch.distributed's
# *functional* collectives instead: ops that return a new tensor, which dynamo traces into the one
# graph (and inductor schedules) like any other op. Same sums and concatenations, same results.


# all_gather_single is the newer name (torch >= 2.12 warns on the old one).
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _model_parallel_group() -> dist.ProcessGroup:
    return fs_init.get_model_parallel_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the model-parallel ranks (a new tensor; ``x`` is left as it is)."""
    return funcol.all_reduce(x, "sum", _model_parallel_group())


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' ``x`` along the last dimension, in rank order.

    Collectives gather along dim 0 (the one dimension every torch version supports), so the last
    dimension is moved to the front and back.
    """
    gathered = _all_gather_dim0(x.movedim(-1, 0).contiguous(), 0, _model_parallel_group())
    return gathered.movedim(0, -1)


# --- fairscale layers that can be built on the meta device -------------------------------------
#
# The arithmetic of a linear layer is its ``local_product`` (x Wᵀ with this rank's slice of W);
# the communication around it is written once, here. A kernel family (``llama3.kernels``) swaps
# the arithmetic and the weight's representation and inherits the communication.


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """``y = x Wᵀ`` with W's rows (output features) split across model-parallel ranks.

    fairscale's layout; allocation through ``torch.empty`` so the active device, meta included,
    is honoured; no bias.
    """

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False) -> None:
        torch.nn.Module.__init__(self)
        world_size = model_parallel_world_size()
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.output_size_per_partition = _divide(out_features, world_size, "output features")
        self.weight = torch.nn.Parameter(torch.empty(self.output_size_per_partition, in_features))
        self.register_parameter("bias", None)
        self.master_weight = None

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] times this rank's rows of W: [..., output_size_per_partition]."""
        return F.linear(x, self.weight)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.output_size_per_partition == self.out_features:
            # One rank: nothing to communicate, and no autograd mapping to break torch.compile.
            return self.local_product(input_)
        if torch.is_grad_enabled():  # training: fairscale's autograd-aware mappings
            y = self.local_product(fs_mappings.copy_to_model_parallel_region(input_))
            return fs_mappings.gather_from_model_parallel_region(y) if self.gather_output else y
        y = self.local_product(input_)
        return gather_last_dim(y) if self.gather_output else y


class RowParallelLinear(fs_layers.RowParallelLinear):
    """``y = x Wᵀ`` with W's columns (input features) split across ranks; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int) -> None:
        torch.nn.Module.__init__(self)
        world_size = model_parallel_world_size()
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = True
        self.input_size_per_partition = _divide(in_features, world_size, "input features")
        self.weight = torch.nn.Parameter(torch.empty(out_features, self.input_size_per_partition))
        self.register_parameter("bias", None)
        self.master_weight = None

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_local] times this rank's columns of W: a partial sum [..., out]."""
        return F.linear(x, self.weight)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.input_size_per_partition == self.in_features:
            return self.local_product(input_)
        if torch.is_grad_enabled():
            return fs_mappings.reduce_from_model_parallel_region(self.local_product(input_))
        return all_reduce_sum(self.local_product(input_))


class VocabParallelEmbedding(fs_layers.VocabParallelEmbedding):
    """Token embedding with the vocabulary (dim 0) split across ranks, as Llama 3 checkpoints are."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        torch.nn.Module.__init__(self)
        world_size = model_parallel_world_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self._weight = None
        per_rank = _divide(num_embeddings, world_size, "vocabulary entries")
        self.vocab_start_index = model_parallel_rank() * per_rank
        self.vocab_end_index = self.vocab_start_index + per_rank
        self.num_embeddings_per_partition = per_rank
        self.weight = torch.nn.Parameter(torch.empty(per_rank, embedding_dim))

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.num_embeddings_per_partition == self.num_embeddings:
            # One rank holds the whole table: skip fairscale's masking and all-reduce.
            return torch.nn.functional.embedding(input_, self.weight)
        if torch.is_grad_enabled():
            return super().forward(input_)
        # Ids outside this rank's slice of the vocabulary look up row 0 and are zeroed; the sum over
        # ranks then holds each id's row exactly once.
        local = input_ - self.vocab_start_index
        mine = (local >= 0) & (local < self.num_embeddings_per_partition)
        rows = torch.nn.functional.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce_sum(rows.masked_fill(~mine.unsqueeze(-1), 0.0))


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts != 0:
        raise ModelParallelError(
            f"{n} {what} cannot be split evenly across {parts} model-parallel ranks; "
            "choose a model-parallel size that divides it"
        )
    return n // parts
