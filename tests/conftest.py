"""Shared pytest fixtures. Shared plain functions live in tests/helpers.py (``from helpers import``).

Each section below belongs to one area of the test suite; keep sections independent.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import helpers
import pytest
import torch

from llama3.checkpoint import write_random_checkpoint
from llama3.model import Transformer

# Re-exported for branches written before tests/helpers.py: import them from helpers instead.
random_model, tiny_model = helpers.random_model, helpers.tiny_model

# Child processes (scripts, `python -m llama3...`, torchrun ranks) import this checkout's llama3,
# installed or not: a script's own folder, not the working directory, is first on its sys.path.
os.environ.update(helpers.with_repo_on_pythonpath(dict(os.environ)))

# Builds measure the linear-layer kernels and cache the result under $XDG_CACHE_HOME
# (llama3.kernels.autotune): the tests' go to a directory of their own, removed at exit, never to
# the user's ~/.cache (child processes inherit it).
_KERNEL_CACHE_HOME = tempfile.TemporaryDirectory(prefix="llama3-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _KERNEL_CACHE_HOME.name

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Parallel workers share the cores: each gets its share of threads. Torch's default (every
    # core per process) makes the many small ops of these tests spin on each other's cores: the
    # top-p tests took 15 times the CPU time with two workers of two threads each on two cores.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # for the workers' child processes too


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists
def pytest_configure(config: pytest.Config) -> None:
    # The xdist controller (not a worker) prints a line as each test file finishes.
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.register(helpers.FileProgress(reporter), "llama3-file-progress")

# ----------------------------------------------------------------------------------
# Tokenizer / chat format (tests/test_tokenizer.py, tests/test_chat_format.py). The oracles come
# from Meta's llama-models package; see helpers.oracle_unavailable for skip-or-fail.
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def oracle_unavailable() -> Callable[[str], NoReturn]:
    """Call with a reason when a test oracle is missing: skips locally, fails in CI."""
    return helpers.oracle_unavailable


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Path of Meta's Llama 3 tokenizer.model as shipped in the llama-models package."""
    return helpers.llama3_tokenizer_path()


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_path: Path):
    """Our Tokenizer on the real Llama 3 vocabulary (loaded once per session)."""
    from llama3.tokenizer import Tokenizer

    return Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="session")
def meta_tokenizer(llama3_tokenizer_path: Path):
    """Meta's reference Tokenizer from llama-models (needs only tiktoken)."""
    try:
        from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    except ImportError as e:
        helpers.oracle_unavailable(f"cannot import llama_models.llama3.tokenizer ({e}). "
                                   f"{helpers.LLAMA_MODELS_HINT}")
    return MetaTokenizer(llama3_tokenizer_path)


# ------------------------------------------------------------- end tokenizer section


# ----------------------------------------------------------------------------------
# Tiny models and checkpoints, shared by every test file. Shapes come from the one table,
# llama3.presets.PRESETS: "test-chat" (the real 128,256-token vocabulary, so real token ids are
# valid), "test-gqa" (8 query heads on 2 KV heads, vocabulary 256, 3.2's RoPE scaling), "tiny".
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., Transformer]:
    """:func:`helpers.tiny_model`, for tests that prefer a fixture to an import."""
    return helpers.tiny_model


# ------------------------------------------------------------- end tiny models section


# ----------------------------------------------------------------------------------
# Generation / chat CLI (tests/test_generation.py, tests/test_chat_cli.py)
# ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def generation_checkpoint(tmp_path_factory, llama3_tokenizer_path: Path) -> Path:
    """A tiny random-weight Meta-format checkpoint with the real vocabulary, and the real
    tokenizer.model linked beside it (outside the repository), as ``Llama.build`` expects."""
    out = tmp_path_factory.mktemp("generation_ckpt")
    # std 0.1: logits spread enough that greedy choices have clear margins.
    write_random_checkpoint(out, "test-chat", seed=0, std=0.1, dtype=torch.float32)
    (out / "tokenizer.model").symlink_to(llama3_tokenizer_path)
    return out


# ------------------------------------------------------------- end generation section
