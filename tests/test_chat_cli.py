"""The interactive chat program (llama3.chat): driven by scripted stdin, with the prompts the model
receives recorded, so /reset, trimming a full context, Ctrl-C and quitting can be checked exactly."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model

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


@pytest.fixture()
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(Llama, "stream", rec.wrap(Llama.stream))
    return rec


def lines(*items: str):
    """A read_line function returning ``items`` one by one, then None (end of input)."""
    it = iter(items)
    return lambda: next(it, None)


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

    def read_line():
        item = next(calls, None)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    session.run(read_line)  # ends at end of input after "hi"
    text = out.getvalue()
    assert text.startswith("[commands: /reset")
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
    assert before == after and before.strip()  # same prompt after /reset, same greedy answer
    assert "Loaded" in proc.stderr  # loading progress goes to stderr, not into the conversation
