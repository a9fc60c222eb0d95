"""Shared pytest fixtures.

Each section below belongs to one area of the test suite; keep sections independent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from llama3.model import ModelArgs, Transformer
from llama3.presets import PRESETS, preset_args, write_random_checkpoint

# ----------------------------------------------------------------------------------
# Tokenizer / chat format (tests/test_tokenizer.py, tests/test_chat_format.py)
#
# Meta's real tokenizer.model is never committed: it comes from Meta's `llama-models`
# package (`pip install --no-deps llama-models`), which CI installs and which also
# provides Meta's reference Tokenizer / ChatFormat used as oracles. Locally a missing
# oracle skips the test; in CI (CI=true) it fails, so CI can never pass by skipping.
# ----------------------------------------------------------------------------------

LLAMA3_TOKENIZER_MD5 = "08292403f8b173e7524d7fba7bbbd2d3"
_LLAMA_MODELS_HINT = (
    "Meta's llama-models package provides the Llama 3 tokenizer.model and the reference "
    "implementation used as test oracle; install it with `pip install --no-deps llama-models`"
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _oracle_unavailable(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (tests must not be skipped in CI)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def oracle_unavailable() -> Callable[[str], NoReturn]:
    """Call with a reason when a test oracle is missing: skips locally, fails in CI."""
    return _oracle_unavailable


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Path of Meta's Llama 3 tokenizer.model as shipped in the llama-models package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        _oracle_unavailable(f"llama_models is not installed. {_LLAMA_MODELS_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        _oracle_unavailable(f"{path} is missing. {_LLAMA_MODELS_HINT}")
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != LLAMA3_TOKENIZER_MD5:
        pytest.fail(f"{path} has md5 {digest}, expected Meta's Llama 3 tokenizer ({LLAMA3_TOKENIZER_MD5})")
    return path


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
        _oracle_unavailable(f"cannot import llama_models.llama3.tokenizer ({e}). {_LLAMA_MODELS_HINT}")
    return MetaTokenizer(llama3_tokenizer_path)


# ------------------------------------------------------------- end tokenizer section


# ----------------------------------------------------------------------------------
# Tiny models and checkpoints, shared by every test file. Shapes come from the one table,
# llama3.presets.PRESETS: "test-chat" (the real 128,256-token vocabulary, so real token ids are
# valid), "test-gqa" (8 query heads on 2 KV heads, vocabulary 256, 3.2's RoPE scaling), "tiny".
# ----------------------------------------------------------------------------------


def random_model(args: ModelArgs, *, seed: int = 0, std: float = 0.1,
                 norm_gains: bool = False) -> Transformer:
    """A Transformer for ``args`` with random weights: torch seeded with ``seed``, matrices ~ N(0, std²)
    — larger than the default init, so greedy choices have clear margins and every position's
    attention pattern matters — and norm gains 1, or ~ U(0.5, 1.5) with ``norm_gains``."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, std)
            elif norm_gains:
                p.uniform_(0.5, 1.5)
    return model


def tiny_model(preset: str = "test-chat", *, seed: int = 0, std: float = 0.1, norm_gains: bool = False,
               dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides) -> Transformer:
    """:func:`random_model` of preset ``preset`` (with ModelArgs ``overrides``), in eval mode."""
    model = random_model(preset_args(preset, **overrides), seed=seed, std=std, norm_gains=norm_gains)
    return model.to(device=device, dtype=dtype).eval()


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., Transformer]:
    """The :func:`tiny_model` helper, for tests that prefer a fixture to ``from conftest import``."""
    return tiny_model


# ------------------------------------------------------------- end tiny models section


# ----------------------------------------------------------------------------------
# Generation / chat CLI (tests/test_generation.py, tests/test_chat_cli.py)
# ----------------------------------------------------------------------------------

GENERATION_TINY_ARGS = PRESETS["test-chat"]


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
