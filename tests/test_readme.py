"""The README's Python blocks run as written, on a random-weight checkpoint like the demo's, so they
cannot drift from the code.

Every ```python block in README.md carries a marker on the line before it: ``<!-- runnable -->``
(run alone), ``<!-- runnable: continues the block above -->`` (run after the previous runnable
block, with its names) or ``<!-- not run: why -->``. Checkpoint paths of real models are replaced
by the test checkpoint's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from llama3.checkpoint import write_random_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```python\n(.*?)^```", re.M | re.S)
REAL_CHECKPOINT = "Llama3.1-8B-Instruct/"  # the checkpoint the README's examples name


def readme_blocks() -> list[tuple[str, str, int]]:
    """(marker, code, line number) of every ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(1) or "", m.group(2), text.count("\n", 0, m.start(2)) + 1) for m in FENCE.finditer(text)]


def runnable_groups() -> list[tuple[int, list[str]]]:
    """Runnable blocks, a block that continues another joined to it: (first line, codes)."""
    groups: list[tuple[int, list[str]]] = []
    for marker, code, line in readme_blocks():
        if marker == "<!-- runnable -->":
            groups.append((line, [code]))
        elif marker.startswith("<!-- runnable: continues"):
            assert groups, f"README.md line {line}: continues a block, but no runnable block comes before"
            groups[-1][1].append(code)
    return groups


def test_every_python_block_is_marked():
    blocks = readme_blocks()
    known = r"<!-- (runnable|runnable: continues the block above|not run: .+) -->"
    unmarked = [line for marker, _, line in blocks if not re.fullmatch(known, marker)]
    assert not unmarked, f"README.md python blocks without a runnable / not run marker at lines {unmarked}"
    assert sum(marker.startswith("<!-- runnable") for marker, _, _ in blocks) >= 5


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory, llama3_tokenizer_path) -> Path:
    # As scripts/demo.sh writes it: the tiny-chat shape, the real tokenizer, weights of std 0.1.
    out = tmp_path_factory.mktemp("readme") / "tiny-random"
    return write_random_checkpoint(out, "tiny-chat", std=0.1, dtype=torch.float32,
                                   tokenizer=llama3_tokenizer_path)


@pytest.mark.parametrize(("line", "codes"), runnable_groups(),
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs(line, codes, demo_checkpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(codes):
        code = code.replace(REAL_CHECKPOINT, f"{demo_checkpoint}/")
        exec(compile(code, f"README.md block at line {line} (part {i + 1})", "exec"), namespace)
