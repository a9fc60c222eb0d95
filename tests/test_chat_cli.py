"""The interactive chat program (llama3.chat): driven by scripted stdin, with the prompts the model
receives recorded, so /reset, trimming a full context, Ctrl-C and quitting can be checked exactly."""

from __future__ import annotations

import hashlib
import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_model

from llama3.chat import ChatSession, main
from llama3.generation import Llama
from llama3.tokenizer import ChatFormat

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(tokenizer, max_seq_len: int) -> Llama:
    model = tiny_model("test-chat", seed=0, std=0.1, max_batch_size=1, max_seq_len=max_seq_len)
    return Llama(model, tokenizer)


class Recorder:
    """Wraps ``Llama.stream``: records each prompt and the text streamed back for it."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.answers: list[str] = []

    def wrap(self, stream):
        def recording_stream(llama, prompt_tokens, *args, **kwargs):
            self.prompts.append(list(prompt_tokens[0]))
            self.answers.append("")
            for step in stream(llama, prompt_tokens, *args, **kwargs):
                self.answers[-1] += step[0]
                yield step

        return recording_stream


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(Llama, "stream", rec.wrap(Llama.stream))
    return rec


def lines(*items: str):
    """A read_line function returning ``items`` one by one, then None (end of input)."""
    it = iter(items)
    return lambda prompt: next(it, None)


def test_reset_through_stdin(generation_checkpoint, recorder, monkeypatch, capsys, llama3_tokenizer):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nmore please\n\n/reset\nhello\n/exit\nnever\n"))
    assert main([str(generation_checkpoint), "--temperature", "0", "--max-seq-len", "256",
                 "--max-gen-len", "8", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    first, second, third = recorder.prompts  # the empty line is ignored, "never" comes after /exit
    answers = recorder.answers
    assert out == f"{answers[0]}\n{answers[1]}\n[conversation cleared]\n{answers[2]}\n"
    fmt = ChatFormat(llama3_tokenizer)
    assert first == third == fmt.encode_dialog_prompt([{"role": "user", "content": "hello"}])
    assert answers[2] == answers[0]  # greedy: the same prompt gives the same answer
    assert second == fmt.encode_dialog_prompt([
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "more please"},
    ])


def test_full_context_drops_the_oldest_exchanges(llama3_tokenizer, recorder):
    llama = tiny_llama(llama3_tokenizer, max_seq_len=96)
    out = io.StringIO()
    session = ChatSession(llama, system_prompt="You are terse.", temperature=0, max_gen_len=12, out=out)
    assert session.prompt_budget == 96 - 12
    system = session.system
    encode = llama.formatter.encode_dialog_prompt
    dropped_notes = 0
    for i in range(8):
        before = list(session.history)
        user = {"role": "user", "content": f"Tell me one more fact about the number {i}, please."}
        note_start = out.tell()
        session.handle(user["content"])
        prompt = recorder.prompts[-1]
        assert len(prompt) <= session.prompt_budget
        # The kept exchanges are the most recent ones, as many as fit; the system prompt stays.
        kept = (len(before) - len(system)) // 2
        while kept and len(encode(system + before[len(before) - 2 * kept:] + [user])) > session.prompt_budget:
            kept -= 1
        expected = system + before[len(before) - 2 * kept:] + [user]
        assert prompt == encode(expected)
        assert session.history == expected + [{"role": "assistant", "content": recorder.answers[-1]}]
        n_dropped = (len(before) - len(system)) // 2 - kept
        written = out.getvalue()[note_start:]
        if n_dropped:
            dropped_notes += 1
            assert written.startswith(f"[context full: dropped the oldest {n_dropped} exchange")
        else:
            assert "context full" not in written
    assert dropped_notes >= 3


def test_a_message_that_cannot_fit_is_refused(llama3_tokenizer, recorder):
    llama = tiny_llama(llama3_tokenizer, max_seq_len=48)
    out = io.StringIO()
    session = ChatSession(llama, system_prompt="Hi.", temperature=0, max_gen_len=8, out=out)
    session.handle("short")
    history = list(session.history)
    assert session.ask("word " * 60) is None
    assert session.history == history
    assert len(recorder.prompts) == 1
    assert "[message too long: the prompt would be" in out.getvalue()
    assert "only 40 fit (max_seq_len 48" in out.getvalue()


def test_ctrl_c_stops_the_answer_but_not_the_program(llama3_tokenizer):
    llama = tiny_llama(llama3_tokenizer, max_seq_len=128)
    closed = []

    def interrupted_stream(dialog, **kwargs):
        try:
            yield "Hel"
            yield "lo"
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    def fine_stream(dialog, **kwargs):
        yield "Fine."

    streams = iter([interrupted_stream, fine_stream])
    llama.stream_chat_completion = lambda dialog, **kw: next(streams)(dialog, **kw)
    out = io.StringIO()
    session = ChatSession(llama, temperature=0, out=out)
    session.run(lines("first", "second", "/exit"))
    assert out.getvalue() == "Hello\n[interrupted; the partial answer is kept]\nFine.\n"
    assert closed == [True]
    assert session.history == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "Fine."},
    ]


def test_commands_and_end_of_input(llama3_tokenizer, recorder):
    llama = tiny_llama(llama3_tokenizer, max_seq_len=64)
    out = io.StringIO()
    session = ChatSession(llama, system_prompt="S", temperature=0, max_gen_len=4, out=out)
    calls = iter(["/help", KeyboardInterrupt, "/frobnicate", "  ", "hi"])

    def read_line(prompt):
        item = next(calls, None)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    session.run(read_line)  # ends at end of input after "hi"
    text = out.getvalue()
    assert text.startswith('[commands: """ (start/end a multi-line message), /file PATH')
    assert "[use /exit or Ctrl-D to quit]" in text
    assert "[unknown command /frobnicate; commands:" in text
    assert len(recorder.prompts) == 1
    assert session.history[0] == {"role": "system", "content": "S"}
    assert session.handle("/quit") is False
    session.handle("/reset")
    assert session.history == [{"role": "system", "content": "S"}]


def test_python_m_llama3_chat(generation_checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "llama3.chat", str(generation_checkpoint), "--temperature", "0",
         "--max-seq-len", "128", "--max-gen-len", "6", "--device", "cpu", "--system", "Be brief."],
        input="hi\n/reset\nhi\n", capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = proc.stdout.split("[conversation cleared]\n")
    assert before == after
    assert before.strip()
    assert "Loaded" in proc.stderr  # loading progress goes to stderr, not into the conversation


# --- Long and multi-line input ----------------------------------------------------------------


def test_triple_quote_blocks_and_file_reach_the_model_whole(llama3_tokenizer, recorder, tmp_path):
    llama = tiny_llama(llama3_tokenizer, max_seq_len=4096)
    long_text = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {7 * i}."
                          for i in range(120))
    assert len(long_text) > 6000
    (tmp_path / "long.txt").write_text(long_text)
    out = io.StringIO()
    session = ChatSession(llama, temperature=0, max_gen_len=2, out=out)
    session.run(lines('"""', "/reset is text here", "", "  indented line", '"""', '"""one line"""',
                      f"/file {tmp_path / 'long.txt'}", f"/file {tmp_path / 'missing.txt'}",
                      '"""first', "unterminated"))
    sent = [m["content"] for m in session.history if m["role"] == "user"]
    assert sent == ["/reset is text here\n\n  indented line", "one line", long_text, "first\nunterminated"]
    fmt = ChatFormat(llama3_tokenizer)
    # Each prompt is the whole conversation so far, every message whole (the file is 1,000+ tokens).
    assert len(recorder.prompts) == 4
    for i, prompt in enumerate(recorder.prompts):
        assert prompt == fmt.encode_dialog_prompt(session.history[: 2 * i + 1])
    assert len(recorder.prompts[2]) - len(recorder.prompts[1]) > 1000
    text = out.getvalue()
    assert f"[sending {tmp_path / 'long.txt'} ({len(long_text)} characters)]" in text
    assert f"[cannot read {tmp_path / 'missing.txt'}: No such file or directory]" in text
    assert '[end of input inside a """ block: sending the 2 line(s) read]' in text


CHILD = r'''
import hashlib, sys
if "--no-readline" in sys.argv:
    sys.modules["readline"] = None  # as on a Python built without it
from types import SimpleNamespace
from llama3.chat import ChatSession, make_read_line

class EchoModel:
    """Stands in for Llama: answers with the length and hash of the message it received."""
    model = SimpleNamespace(params=SimpleNamespace(max_seq_len=100000))
    formatter = SimpleNamespace(encode_dialog_prompt=lambda d: [0] * sum(len(m["content"]) + 4 for m in d))
    def stream_chat_completion(self, dialog, **kw):
        text = dialog[-1]["content"]
        yield f"<got {len(text)} {hashlib.sha1(text.encode()).hexdigest()[:12]}>"

read_line, terminal = make_read_line(sys.stdout)
ChatSession(EchoModel(), out=sys.stdout, max_gen_len=10).run(read_line)
terminal.save_history()
print("<bye>")
'''


class Terminal:
    """A program under a pseudo-terminal, driven like a person at the keyboard."""

    def __init__(self, argv, env):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                                     start_new_session=True)
        os.close(slave)
        self.buf = b""

    def _read(self, timeout: float) -> None:
        if select.select([self.master], [], [], timeout)[0]:
            try:
                self.buf += os.read(self.master, 65536)
            except OSError:
                pass

    def expect(self, pattern: bytes, timeout: float = 60) -> bytes:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.buf)
            if m:
                seen, self.buf = self.buf[: m.end()], self.buf[m.end():]
                return seen
            self._read(0.05)
        raise AssertionError(f"{pattern!r} never came; last output {self.buf[-300:]!r}")

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), 512):
            os.write(self.master, data[i:i + 512])
            self._read(0)  # keep the echo flowing so the terminal never blocks

    def turn(self, keys: bytes) -> bytes:
        """Wait for the prompt, type ``keys``, return the output up to the answer."""
        self.expect(b"> ")
        self.send(keys)
        return self.expect(rb"<got \d+ \w+>|<bye>")

    def close(self) -> int:
        code = self.proc.wait(timeout=30)
        os.close(self.master)
        return code


def _got(text: str) -> bytes:
    return f"<got {len(text)} {hashlib.sha1(text.encode()).hexdigest()[:12]}>".encode()


def _child_env(tmp_path, **extra):
    env = dict(os.environ, TERM="xterm", INPUTRC="/dev/null", LLAMA3_CHAT_HISTORY=str(tmp_path / "history"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def test_terminal_line_editing_history_and_long_pastes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    term = Terminal([sys.executable, str(script)], _child_env(tmp_path))
    # Arrow keys edit the line (nothing like ^[[D reaches the screen or the model).
    seen = term.turn(b"hllo\x1b[D\x1b[D\x1b[De\r")
    assert seen.endswith(_got("hello"))
    assert b"^[[" not in seen
    assert term.turn(b"\x1b[A\r").endswith(_got("hello"))  # Up: the history
    # A bracketed paste of several lines is one message.
    assert term.turn(b"\x1b[200~line 1\nline 2\x1b[201~\r").endswith(_got("line 1\nline 2"))
    # So is an unbracketed one: lines arriving faster than anyone types.
    assert term.turn(b"q1\rq2\r").endswith(_got("q1\nq2"))
    # Longer than the terminal driver's 4095-character line: arrives whole.
    assert term.turn(b"x" * 5000 + b"\r").endswith(_got("x" * 5000))
    block = ["a" * 2000, "b" * 2000, "c" * 2000]
    assert term.turn(b'"""\r' + b"\r".join(x.encode() for x in block) + b'\r"""\r').endswith(
        _got("\n".join(block)))
    seen = term.turn(b"\x04")  # Ctrl-D: a newline, then a clean exit
    assert seen.endswith(b"\r\n<bye>")
    assert term.close() == 0
    assert "hello" in (tmp_path / "history").read_text()


def test_terminal_without_readline_joins_pastes_and_never_cuts_silently(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    term = Terminal([sys.executable, str(script), "--no-readline"], _child_env(tmp_path))
    # Lines arriving faster than anyone types are one paste, one message.
    assert term.turn(b"p1\rp2\rp3\r").endswith(_got("p1\np2\np3"))
    # The terminal keeps 4095 characters of a longer line: that is said, and nothing is sent.
    term.expect(b"> ")
    term.send(b"y" * 5000 + b"\r")
    term.expect(b"was probably cut short by the terminal; not sent: put a long message in a file")
    seen = term.turn(b"ok\r")
    assert seen.endswith(_got("ok"))
    assert seen.count(b"<got") == 1
    assert term.turn(b"\x04").endswith(b"\r\n<bye>")
    assert term.close() == 0


# --- Flags and user errors --------------------------------------------------------------------


def test_closed_stdin_and_underscore_flags(generation_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main([str(generation_checkpoint), "--max_gen_len", "4", "--max_seq_len", "64", "--top_p", "0.5",
                 "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing answered, nothing printed; --quiet: no loading report either
    assert "Loaded" not in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(("argv", "message"), [
    (["--temperature", "nan"], "temperature"),
    (["--top-p", "0"], "top"),
    (["--max-gen-len", "64", "--max-seq-len", "64"], "--max-gen-len 64 leaves no room for a prompt"),
    (["--max_gen"], "unrecognized arguments: --max_gen"),  # no abbreviations
    (["--frobnicate", "1"], "unrecognized arguments: --frobnicate"),
    (["--temperature", "warm"], "invalid float value: 'warm'"),
])
def test_user_errors_are_one_line_and_come_before_loading(argv, message, generation_checkpoint, monkeypatch,
                                                          capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Llama, "build", no_loading)
    assert main([str(generation_checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama3-chat: error: "), err
    assert err.count("\n") == 1, err
    assert message in err


def test_missing_checkpoint_and_full_system_prompt(generation_checkpoint, tmp_path, monkeypatch, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"llama3-chat: error: checkpoint directory '{tmp_path / 'nowhere'}' " \
                                      "does not exist\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main([str(generation_checkpoint), "--max-seq-len", "64", "--device", "cpu", "--quiet",
                 "--system", "You are a helpful assistant. " * 10]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("llama3-chat: error: the system prompt fills the context: with it a "
                                   "prompt takes at least ")
    assert "only 48 fit (--max-seq-len 64 minus 16 kept for the answer)" in captured.err
    assert captured.err.count("\n") == 1


def _script(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                          **kwargs)


def test_example_scripts_reject_bad_flags_before_loading(generation_checkpoint):
    proc = _script("scripts/example_text_completion.py", str(generation_checkpoint), "--max_gen_lenx", "4")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == ("example_text_completion.py: error: unknown flag --max_gen_lenx; "
                           "did you mean --max_gen_len?\n")
    proc = _script("scripts/example_chat_completion.py", str(generation_checkpoint), "--temperature", "nan",
                   "--max-seq-len", "64")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "temperature" in proc.stderr
    assert "Loaded" not in proc.stderr


def test_example_script_help_lists_flags_without_a_pager(tmp_path):
    # Under a terminal, with a pager that would swallow the text: --help still prints it all.
    term = Terminal([sys.executable, "scripts/example_chat_completion.py", "--help"],
                    _child_env(tmp_path, PAGER="false", COLUMNS="100"))
    text = term.expect(rb"prefill_chunk[^\n]*\n[^\n]*\n[^\n]*\n[^\n]*tokens")
    assert b"--temperature" in text
    assert b"sampling temperature; 0 is greedy decoding." in text
    assert term.close() == 0


# --- llama3-make-tiny-checkpoint and llama3-convert ---------------------------------------------


def test_make_tiny_checkpoint_flags_and_overwrite(tmp_path, capsys, llama3_tokenizer_path):
    from llama3.checkpoint import inspect_checkpoint, read_model_args
    from llama3.make_tiny_checkpoint import main as make

    shape = ["--dim", "32", "--n_heads", "4", "--n-kv-heads", "2", "--tokenizer", str(llama3_tokenizer_path)]
    out = tmp_path / "m"
    assert make([str(out), "--num-shards", "2", *shape]) == 0
    assert inspect_checkpoint(out).num_shards == 2
    assert "wrote meta checkpoint" in capsys.readouterr().out
    # A misspelled flag is refused, and nothing is written.
    assert make([str(tmp_path / "n"), "--n_layer", "4"]) == 2
    assert capsys.readouterr().err.startswith("llama3-make-tiny-checkpoint: error: unrecognized arguments: "
                                              "--n_layer 4")
    assert not (tmp_path / "n").exists()
    # An existing checkpoint is not overwritten without --overwrite ...
    assert make([str(out), *shape]) == 2
    assert "is not empty; choose a new directory or pass --overwrite" in capsys.readouterr().err
    assert inspect_checkpoint(out).num_shards == 2
    # ... and with it, replaced whole (no stale shard left behind).
    assert make([str(out), "--overwrite", "--n_layers", "1", *shape]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert read_model_args(out).n_layers == 1


def test_convert_cli(tmp_path, capsys, llama3_tokenizer_path):
    from llama3.convert import main as convert
    from llama3.make_tiny_checkpoint import main as make

    src = tmp_path / "src"
    assert make([str(src), "--dim", "32", "--n-heads", "4", "--n-kv-heads", "2", "--num-shards", "2",
                 "--tokenizer", str(llama3_tokenizer_path)]) == 0
    assert convert(["reshard", str(src), str(tmp_path / "r"), "--num-shards", "0"]) == 2
    assert "--num-shards must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert convert(["to_hf", str(src), str(tmp_path / "hf"), "--max_shard_gb", "1"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert convert(["to-hf", str(src), str(tmp_path / "hf")]) == 2
    assert "is not empty" in capsys.readouterr().err
    proc = _script("-m", "llama3.convert", "to-meta", str(tmp_path / "hf"), str(tmp_path / "meta"),
                   "--num_shards", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 1 shard(s) and params.json" in proc.stdout


# --- What the chat shows: timings, pastes, tool mode; hints outside the venv ---------------------


def test_answer_timing_line(llama3_tokenizer, monkeypatch):
    from types import SimpleNamespace

    import llama3.chat as chat

    class Streaming:
        tokenizer = llama3_tokenizer
        formatter = ChatFormat(llama3_tokenizer)
        model = SimpleNamespace(params=SimpleNamespace(max_seq_len=4096))

        def stream_chat_completion(self, dialog, **kwargs):
            yield ""  # a step that produced no text yet (a character split across tokens)
            yield "Hello"
            yield " there friend"

    # perf_counter: the start, the first text, the end.
    clock = iter([10.0, 10.5, 12.5])
    monkeypatch.setattr(chat.time, "perf_counter", lambda: next(clock))
    out, stats = io.StringIO(), io.StringIO()
    ChatSession(Streaming(), out=out, stats=stats).ask("hi")
    n = len(llama3_tokenizer.encode("Hello there friend", bos=False, eos=False))
    assert n == 3
    assert out.getvalue() == "Hello there friend\n"  # the answer itself is untouched
    assert stats.getvalue() == "[3 tokens in 2.50 s: first token after 0.50 s, then 1.0 tok/s]\n"


def test_chat_shows_timings_and_banner_on_stderr_unless_quiet(generation_checkpoint, monkeypatch, capsys):
    flags = [str(generation_checkpoint), "--temperature", "0", "--max-seq-len", "128", "--max-gen-len", "5",
             "--device", "cpu", "--dtype", "float32"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    assert main(flags) == 0
    captured = capsys.readouterr()
    timings = re.findall(r"^\[(\d+) tokens? in [\d.]+ s: first token after [\d.]+ s(, then [\d.]+ tok/s)?\]$",
                         captured.err, re.M)
    assert len(timings) == 2
    assert all(0 < int(n) <= 5 for n, _ in timings)
    assert f"Chatting with {generation_checkpoint}. commands:" in captured.err
    assert "tok/s" not in captured.out
    assert "Chatting" not in captured.out
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main([*flags, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.strip()


def test_tool_mode_banner_and_timing(llama3_tokenizer):
    from llama3.chat import ToolChatSession
    from llama3.chat_format import ToolDefinition, ToolParameter

    weather = ToolDefinition("get_weather", "Get the weather", {"city": ToolParameter("string", "A city")})
    llama = tiny_llama(llama3_tokenizer, max_seq_len=2048)
    stats = io.StringIO()
    session = ToolChatSession(llama, tools=[weather], builtin_tools=["brave_search"], tool_format="json",
                              max_tool_rounds=3, temperature=0, max_gen_len=4, out=io.StringIO(), stats=stats)
    banner = session.banner("CKPT")
    first, second = banner.split("\n")
    assert first.startswith("Chatting with CKPT in TOOL MODE: tools get_weather, brave_search (custom "
                            "tools in the json format).")
    assert "/skip" in first
    assert "after 3 calls in a row" in first
    assert second == ChatSession.banner(session, "CKPT")  # then the usual commands
    session.run(lines("hi", "/skip"))
    assert re.fullmatch(r"(\[\d+ tokens? in [\d.]+ s(, [\d.]+ tok/s)?\]\n)+", stats.getvalue())


def test_terminal_paste_is_summarised_and_stays_one_history_entry(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    paste = "\n".join(f"line {i}: " + "z" * 760 for i in range(14))
    term = Terminal([sys.executable, str(script)], _child_env(tmp_path))
    seen = term.turn(b"\x1b[200~" + paste.encode() + b"\x1b[201~\r")
    assert seen.endswith(_got(paste))
    assert f"[pasted: 14 lines, {len(paste):,} characters]".encode() in seen
    seen = term.turn(b"short\r")
    assert seen.endswith(_got("short"))
    assert b"[pasted" not in seen
    assert term.turn(b"\x04").endswith(b"<bye>")
    assert term.close() == 0
    # A new session: the history file gives the paste back as one entry (Up twice: the paste).
    term = Terminal([sys.executable, str(script)], _child_env(tmp_path))
    assert term.turn(b"\x1b[A\x1b[A\r").endswith(_got(paste))
    assert term.turn(b"\x04").endswith(b"<bye>")
    assert term.close() == 0


def _bare_python(*argv: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    """``python -S``: this interpreter without its site-packages, like a Python outside the venv."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-S", *argv], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=60)


@pytest.mark.parametrize("argv", [["-m", "llama3.chat", "ckpt"], ["-m", "llama3.make_tiny_checkpoint", "x"],
                                  ["scripts/example_chat_completion.py", "ckpt"],
                                  ["scripts/make_tiny_checkpoint.py", "x"]])
def test_outside_the_venv_one_line_says_what_to_do(argv):
    proc = _bare_python(*argv)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "not installed in this Python" in proc.stderr
    assert "source .venv/bin/activate" in proc.stderr
    assert "pip install -e ." in proc.stderr


def test_importing_llama3_without_its_dependencies_names_them():
    proc = _bare_python("-c", "import llama3", pythonpath=str(REPO))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ModuleNotFoundError: torch")
    assert "source .venv/bin/activate" in proc.stderr


def test_make_tiny_checkpoint_one_summary_line_names_the_shape(tmp_path, capsys, llama3_tokenizer_path):
    import torch

    from llama3.make_tiny_checkpoint import main as make

    tok = ["--tokenizer", str(llama3_tokenizer_path)]
    assert make([str(tmp_path / "a"), "--dim", "128", *tok]) == 0
    captured = capsys.readouterr()
    sd = torch.load(tmp_path / "a" / "consolidated.00.pth", weights_only=True)
    n_params = sum(t.numel() for t in sd.values())
    assert captured.out.count("\n") == 1
    assert captured.err == ""
    assert captured.out.startswith(f"wrote meta checkpoint (custom shape: tiny-chat with dim=128, "
                                   f"{n_params / 1e6:,.1f}M random parameters, float32, "
                                   f"{4 * n_params / 1e6:,.0f} MB) to {tmp_path / 'a'} in ")
    assert make([str(tmp_path / "b"), "--dim", "64", *tok]) == 0  # the preset's own value: its name
    assert "(tiny-chat shape, " in capsys.readouterr().out
