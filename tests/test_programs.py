"""The command-line programs end cleanly (issue 24): every library error is one line with exit status
2, Ctrl-C at any moment (even while imports run) ends quietly with status 130, and a closed or
missing stdin ends the chat cleanly."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llama3 import chat, convert, make_tiny_checkpoint
from llama3.errors import LlamaError
from llama3.memory import NotEnoughMemoryError

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("LLAMA3_TRACEBACK", None)
    return env


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


class _Boom(LlamaError, RuntimeError):
    """A library error that is neither a ValueError nor an OSError."""


def test_chat_not_enough_memory_is_one_line(generation_checkpoint: Path, capsys) -> None:
    # A KV cache of a billion positions cannot fit: NotEnoughMemoryError, reported in one line.
    status = chat.main([str(generation_checkpoint), "--max-seq-len", "1000000000", "--quiet"])
    line = _one_error_line(capsys.readouterr().err, "llama3-chat")
    assert status == 2
    assert "does not fit" in line


def test_convert_and_make_tiny_report_library_errors_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def boom(*args, **kwargs):
        raise _Boom("the device said no;\nfree some memory and try again")

    monkeypatch.setattr("llama3.checkpoint.write_random_checkpoint", boom)
    assert make_tiny_checkpoint.main([str(tmp_path / "t")]) == 2
    line = _one_error_line(capsys.readouterr().err, "llama3-make-tiny-checkpoint")
    assert "free some memory" in line
    (tmp_path / "src").mkdir()
    monkeypatch.setattr("llama3.checkpoint.convert_checkpoint", boom)
    monkeypatch.setattr("llama3.checkpoint.inspect_checkpoint", boom)
    assert convert.main(["to-hf", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    _one_error_line(capsys.readouterr().err, "llama3-convert")


@pytest.mark.parametrize("script", ["example_text_completion", "example_chat_completion",
                                    "example_tool_calling"])
def test_example_scripts_report_library_errors_in_one_line(script: str, tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    spec = importlib.util.spec_from_file_location(script, REPO / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def no_memory(*args, **kwargs):
        raise NotEnoughMemoryError("weights + KV cache need 99 GiB\nbut 1 GiB is free")

    monkeypatch.setattr("llama3.generation.Llama.build", no_memory)
    assert module.fire_strict(module.main, [str(tmp_path)], prog=script) == 2
    _one_error_line(capsys.readouterr().err, script)


# --- Ctrl-C -----------------------------------------------------------------------------------

PROGRAMS = {
    "python -m llama3.chat": ["-m", "llama3.chat"],
    "llama3-chat": ["-c", "from llama3.programs import chat; chat()"],  # what the console script runs
    "example script": [str(REPO / "scripts" / "example_text_completion.py")],
}


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_ctrl_c_at_any_moment_is_quiet(program: str, generation_checkpoint: Path) -> None:
    # The signal comes at delays after the program has put its handler in place, seen in -X
    # importtime's output as the first import finished after llama3.programs (a program installs
    # the handler before anything else, so a Ctrl-C during the interpreter's own start, or in the
    # instant before the handler exists, is Python's, not ours): while torch is being imported,
    # while the checkpoint loads, while it generates.
    for delay in (0.0, 0.3, 1.0, 2.5):
        proc = subprocess.Popen([sys.executable, "-X", "importtime", *PROGRAMS[program],
                                 str(generation_checkpoint)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=_env(), cwd=REPO, text=True)
        lines: list[str] = []
        started = threading.Event()

        def read(stream=proc.stderr, lines=lines, started=started):
            programs_imported = False
            for line in stream:
                lines.append(line)
                if programs_imported and line.startswith("import time:"):
                    started.set()
                programs_imported = programs_imported or "llama3.programs" in line
            started.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert started.wait(60), "the program never started"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        proc.stdin.close()  # a chat already at its prompt (where Ctrl-C does not quit) sees the end
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        reader.join(30)
        err = "".join(line for line in lines if not line.startswith("import time:"))
        if proc.returncode == 0:
            continue  # it finished before the signal came (the example script is quick)
        assert proc.returncode == 130, (delay, proc.returncode, err)
        assert "Traceback" not in err, (delay, err)
        assert "KeyboardInterrupt" not in err, (delay, err)


# --- stdin ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stdin", ["closed", "empty"])
def test_chat_ends_cleanly_without_stdin(stdin: str, generation_checkpoint: Path) -> None:
    kwargs = ({"pass_fds": (), "preexec_fn": lambda: os.close(0)} if stdin == "closed"
              else {"stdin": subprocess.DEVNULL})
    proc = subprocess.run([sys.executable, "-m", "llama3.chat", str(generation_checkpoint), "--max-seq-len",
                           "64", "--quiet"], capture_output=True, env=_env(), cwd=REPO, text=True,
                          timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
