"""scripts/setup.sh's command line (what it installs is tried on a fresh clone, by hand: it takes
minutes and a package index)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), *argv], capture_output=True, text=True,
                          timeout=60)


def test_help_names_the_torch_builds():
    proc = _setup("--help")
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout.startswith("Create .venv (if missing) and install llama3 into it")
    assert "bash scripts/setup.sh [--cpu|--cuda] test" in proc.stdout
    assert "else the CPU build" in proc.stdout
    assert "--cpu / --cuda replace one of the other build" in proc.stdout


def test_unknown_argument_is_refused_before_anything_is_installed():
    proc = _setup("--gpu")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "setup.sh: unknown argument '--gpu' (use: [--cpu|--cuda] [demo|test])\n"
