"""What several test files share, as plain functions and constants (fixtures live in conftest.py).

Import it as ``from helpers import tiny_model``: pytest puts ``tests/`` on ``sys.path``
(``pythonpath`` in pyproject.toml), so this is an ordinary module, never ``conftest``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch

from llama3.kernels.autotune import KernelCache
from llama3.kernels.measure import Tuning
from llama3.model import ModelArgs, Transformer
from llama3.presets import preset_args

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------
# Oracles. Meta's real tokenizer.model is never committed: it comes from Meta's `llama-models`
# package (`pip install --no-deps llama-models`), which CI installs and which also provides Meta's
# reference Tokenizer / ChatFormat used as oracles. Locally a missing oracle skips the test; in CI
# (CI=true) it fails, so CI can never pass by skipping.
# ----------------------------------------------------------------------------------

LLAMA3_TOKENIZER_MD5 = "08292403f8b173e7524d7fba7bbbd2d3"
LLAMA_MODELS_HINT = (
    "Meta's llama-models package provides the Llama 3 tokenizer.model and the reference "
    "implementation used as test oracle; install it with `pip install --no-deps llama-models`"
)


def in_ci() -> bool:
    """True under CI (``CI=1/true/yes``), where a missing oracle is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def oracle_unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason`` (a missing oracle); in CI fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} (tests must not be skipped in CI)", pytrace=False)
    pytest.skip(reason)


def llama3_tokenizer_path() -> Path:
    """Path of Meta's Llama 3 tokenizer.model as shipped in the llama-models package (md5-checked)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        oracle_unavailable(f"llama_models is not installed. {LLAMA_MODELS_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        oracle_unavailable(f"{path} is missing. {LLAMA_MODELS_HINT}")
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != LLAMA3_TOKENIZER_MD5:
        pytest.fail(f"{path} has md5 {digest}, expected Meta's Llama 3 tokenizer ({LLAMA3_TOKENIZER_MD5})")
    return path


# ----------------------------------------------------------------------------------
# Tiny models. Shapes come from the one table, llama3.presets.PRESETS: "test-chat" (the real
# 128,256-token vocabulary, so real token ids are valid), "test-gqa" (8 query heads on 2 KV heads,
# vocabulary 256, 3.2's RoPE scaling), "tiny".
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


# ----------------------------------------------------------------------------------
# Subprocesses. A script, `python -m llama3...` or torchrun rank started by a test must import the
# llama3 of this checkout whether or not (or wherever) the package is installed, from whatever
# directory it runs in: conftest.py puts REPO first on PYTHONPATH for every child process.
# ----------------------------------------------------------------------------------


def with_repo_on_pythonpath(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this checkout first on ``PYTHONPATH`` (once)."""
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), *paths])}


# ----------------------------------------------------------------------------------
# Progress under pytest-xdist (scripts/test.sh runs the suite on parallel workers)
# ----------------------------------------------------------------------------------


class FileProgress:
    """A pytest plugin for the xdist controller: one line as each test file finishes
    (``tests/test_x.py: 41 passed, 1 skipped (12.3 s)``). With parallel workers the terminal
    otherwise shows only dots in completion order, which never say what is done."""

    def __init__(self, reporter: Any) -> None:
        self.reporter = reporter
        self.total: Counter[str] | None = None
        self.result: dict[str, str] = {}
        self.outcomes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.started: dict[str, float] = {}

    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if self.total is None:  # every worker collects the same tests
            self.total = Counter(nodeid.split("::")[0] for nodeid in ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        file = report.nodeid.split("::")[0]
        self.started.setdefault(file, time.monotonic())
        xfail = hasattr(report, "wasxfail")
        if report.when == "setup" and not report.passed:
            self.result[report.nodeid] = "error" if report.failed else "xfailed" if xfail else "skipped"
        elif report.when == "call":
            self.result[report.nodeid] = (("xfailed" if report.skipped else "xpassed") if xfail
                                          else report.outcome)
        elif report.when == "teardown":
            outcome = "error" if report.failed else self.result.pop(report.nodeid, "passed")
            self.outcomes[file][outcome] += 1
            if self.total is not None and sum(self.outcomes[file].values()) == self.total[file]:
                counts = ", ".join(f"{n} {what}" for what, n in sorted(self.outcomes[file].items()))
                seconds = time.monotonic() - self.started[file]
                self.reporter.ensure_newline()  # after the dots of the line in progress
                self.reporter.write_line(f"{file}: {counts} ({seconds:.1f} s)")


def finishes(fn, timeout: float = 60.0, what: str = "blocked"):
    """Run ``fn`` in a thread and return its value (or raise its error); fail with ``what``
    instead of hanging the suite when it does not finish within ``timeout`` seconds."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), what
    if "error" in box:
        raise box["error"]
    return box.get("value")


class LogLines(logging.Handler):
    """A logging handler that keeps each record's message (attach it to a logger under test)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# ----------------------------------------------------------------------------------
# The kernel chooser with a stubbed timer: kernels advance a fake clock by a cost the test sets.
# ----------------------------------------------------------------------------------


# A model wide enough for the chooser to measure (MIN_MEASURED_DIM), small enough to build in a test.
MEASURED_ARGS = dict(dim=1024, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=256,
                     max_batch_size=2, max_seq_len=32)


class FakeClock:
    """A timer that only the stubbed kernels advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stub_kernel_costs(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                      kernels: tuple[type, ...]) -> dict[str, tuple[float, float]]:
    """Make each of ``kernels`` (subclasses before their bases: each wrapper calls the product its
    class had before any patching) advance ``clock`` on every product by the cost the returned
    table gives its name: kernel name -> (seconds for one row, seconds for many rows)."""
    table: dict[str, tuple[float, float]] = {}
    for cls in kernels:
        original = cls.local_product

        def timed(self, x, original=original, name=cls.name):
            # A kernel left out of the table costs a second a product: it never wins.
            clock.now += table.get(name, (1.0, 1.0))[0 if x.numel() == x.shape[-1] else 1]
            return original(self, x)
        monkeypatch.setattr(cls, "local_product", timed)
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    return table


def stubbed_tuning(tmp_path: Path, clock: FakeClock, machine: dict[str, str]) -> Tuning:
    """Measure on ``clock``, with no time budget (the minimum rounds), a cache file in ``tmp_path``,
    ``machine`` as the machine's fingerprint and a 64 KiB cache flush (not twice this CPU's cache)."""
    return Tuning(budget_s=0.0, cache=KernelCache(tmp_path / "kernels.json"), timer=clock,
                  fingerprint=machine, flush_bytes=2**16)
