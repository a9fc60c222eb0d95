"""Every file opened on a user's behalf is checked (issue 24): a named pipe, a device, a directory
or an oversized file is refused in one line, never read (a hang or a MemoryError), and a side file
that is a symlink is checked for what it is before a conversion copies it."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import finishes

from llama3.chat import ChatSession
from llama3.checkpoint import convert_checkpoint, write_random_checkpoint
from llama3.convert import main as convert_main
from llama3.errors import LlamaError
from llama3.files import FileTooLargeError, NotARegularFileError, NotTextError, read_bytes, read_text
from llama3.tokenizer import Tokenizer
from llama3.tool_session import load_tool_definitions


def _finishes(fn, timeout: float = 30.0):
    return finishes(fn, timeout, "blocked on the file")


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _special_paths(tmp_path: Path, fifo: Path) -> dict[str, Path]:
    return {"named pipe": fifo, "device": Path("/dev/zero"), "directory": tmp_path}


@pytest.mark.parametrize("kind", ["named pipe", "device", "directory"])
def test_special_files_are_refused_in_one_line(tmp_path: Path, fifo: Path, kind: str) -> None:
    path = _special_paths(tmp_path, fifo)[kind]
    for read in (read_bytes, read_text):
        with pytest.raises(NotARegularFileError) as info:
            _finishes(lambda read=read: read(path, "file"))
        message = str(info.value)
        assert "\n" not in message
        assert str(path) in message
        assert kind.split()[-1] in message
        assert isinstance(info.value, LlamaError)
        assert isinstance(info.value, OSError)


def test_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "notes.txt"
    link.symlink_to("/dev/zero")
    with pytest.raises(NotARegularFileError, match="device"):
        _finishes(lambda: read_text(link))


def test_size_limit_applies_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(FileTooLargeError, match="larger than 1000 bytes"):
        read_text(path, "file", limit=1000)
    assert read_text(path, "file", limit=1001) == "x" * 1001
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(NotTextError, match="UTF-8"):
        read_text(tmp_path / "bin")


class _Model:
    model = SimpleNamespace(params=SimpleNamespace(max_seq_len=100000))
    formatter = SimpleNamespace(encode_dialog_prompt=lambda d: [0] * sum(len(m["content"]) + 4 for m in d))

    def stream_chat_completion(self, dialog, **kw):
        yield "ok"


@pytest.mark.parametrize("kind", ["named pipe", "device", "directory"])
def test_chat_file_command_refuses_special_files(tmp_path: Path, fifo: Path, kind: str) -> None:
    path = _special_paths(tmp_path, fifo)[kind]
    out = io.StringIO()
    session = ChatSession(_Model(), out=out, max_gen_len=10)
    assert _finishes(lambda: session.send_file(str(path))) is None
    assert session.history == [] or all(m["role"] == "system" for m in session.history)
    lines = [line for line in out.getvalue().splitlines() if line]
    assert len(lines) == 1
    assert lines[0].startswith(f"[cannot read {path}: ")
    assert "not a regular file" in lines[0]


@pytest.mark.parametrize("kind", ["named pipe", "device", "directory"])
def test_tools_file_refuses_special_files(tmp_path: Path, fifo: Path, kind: str) -> None:
    path = _special_paths(tmp_path, fifo)[kind]
    with pytest.raises(ValueError, match="not a regular file") as info:
        _finishes(lambda: load_tool_definitions(path))
    assert "\n" not in str(info.value)


def test_tokenizer_that_is_a_pipe_is_refused(fifo: Path) -> None:
    with pytest.raises(OSError, match="named pipe"):
        _finishes(lambda: Tokenizer(fifo))


@pytest.fixture
def tiny_meta(tmp_path: Path) -> Path:
    return write_random_checkpoint(tmp_path / "src", "test-gqa", dtype=torch.float32)


@pytest.mark.parametrize("target", ["device", "not a tokenizer", "named pipe"])
def test_conversion_checks_a_symlinked_tokenizer(tmp_path: Path, tiny_meta: Path, target: str,
                                                 capsys) -> None:
    if target == "device":
        (tiny_meta / "tokenizer.model").symlink_to("/dev/zero")
    elif target == "named pipe":
        os.mkfifo(tmp_path / "pipe")
        (tiny_meta / "tokenizer.model").symlink_to(tmp_path / "pipe")
    else:
        (tmp_path / "secret.txt").write_text("not a tokenizer at all\n")
        (tiny_meta / "tokenizer.model").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(LlamaError):
        _finishes(lambda: convert_checkpoint(tiny_meta, tmp_path / "dst", to="hf"))
    assert not (tmp_path / "dst").exists()
    status = _finishes(lambda: convert_main(["to-hf", str(tiny_meta), str(tmp_path / "dst2")]))
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert "tokenizer" in err
    assert not (tmp_path / "dst2").exists()


def test_conversion_copies_a_symlinked_real_tokenizer(tmp_path: Path, tiny_meta: Path,
                                                     llama3_tokenizer_path: Path) -> None:
    (tiny_meta / "tokenizer.model").symlink_to(llama3_tokenizer_path)
    convert_checkpoint(tiny_meta, tmp_path / "dst", to="meta")
    copied = tmp_path / "dst" / "tokenizer.model"
    assert not copied.is_symlink()
    assert copied.read_bytes() == llama3_tokenizer_path.read_bytes()


@pytest.mark.parametrize("target", ["device", "named pipe", "not a tokenizer"])
def test_make_tiny_checkpoint_checks_the_tokenizer_it_copies(tmp_path: Path, target: str, capsys) -> None:
    from llama3.make_tiny_checkpoint import main as make

    link = tmp_path / "tok.model"
    if target == "device":
        link.symlink_to("/dev/zero")
    elif target == "named pipe":
        os.mkfifo(tmp_path / "pipe")
        link.symlink_to(tmp_path / "pipe")
    else:
        (tmp_path / "key.txt").write_text("secret\n")
        link.symlink_to(tmp_path / "key.txt")
    status = _finishes(lambda: make([str(tmp_path / "out"), "--dim", "32", "--n-heads", "4",
                                     "--tokenizer", str(link)]))
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert "tok" in err
    assert not (tmp_path / "out").exists()
