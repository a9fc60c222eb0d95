"""Re-entrancy is an error, not a deadlock (issue 24): a call on a ``Llama`` from inside its own
decode step, or from code already holding its call lock, raises ReentrantCallError at once, and the
``Llama`` stays usable. The oracle for "usable" is the same call on a fresh Llama."""

from __future__ import annotations

import threading

import pytest
from helpers import finishes

from llama3.call_lock import CallLock, ReentrantCallError
from llama3.decoding import make_decode_step
from llama3.errors import LlamaError
from llama3.generation import Llama

PROMPT = [[128000, 9906, 11, 1917]]


def _finishes(fn, timeout: float = 120.0):
    return finishes(fn, timeout, "deadlocked")


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model("test-chat")


def _reentrant_llama(model, llama3_tokenizer, inner):
    """A Llama whose decode step calls ``inner(llama)`` once, on its first step."""
    eager = make_decode_step(model, compile=False)
    state = {"armed": True, "llama": None}

    def step(tokens, pos):
        if state["armed"]:
            state["armed"] = False
            inner(state["llama"])
        return eager(tokens, pos)

    llama = Llama(model, llama3_tokenizer, decode_step=step)
    state["llama"] = llama
    return llama, state


CALLS = {
    "generate": lambda llama: llama.generate(PROMPT, max_gen_len=2, temperature=0),
    "text_completion": lambda llama: llama.text_completion(["Hi"], max_gen_len=2, temperature=0),
    "chat_completion": lambda llama: llama.chat_completion([[{"role": "user", "content": "Hi"}]],
                                                           max_gen_len=2, temperature=0),
    "stream": lambda llama: list(llama.stream(PROMPT, max_gen_len=2, temperature=0)),
}


@pytest.mark.parametrize("outer", ["generate", "stream"])
@pytest.mark.parametrize("inner", list(CALLS))
def test_call_from_inside_the_decode_step_raises(model, llama3_tokenizer, outer: str, inner: str) -> None:
    llama, state = _reentrant_llama(model, llama3_tokenizer, CALLS[inner])
    with pytest.raises(ReentrantCallError) as info:
        _finishes(lambda: CALLS[outer](llama))
    assert isinstance(info.value, LlamaError)
    assert isinstance(info.value, RuntimeError)
    assert "same thread" in str(info.value)
    # Still usable: the next call gives what a fresh Llama gives.
    fresh = Llama(model, llama3_tokenizer)
    assert _finishes(lambda: llama.generate(PROMPT, max_gen_len=4, temperature=0)) == \
        fresh.generate(PROMPT, max_gen_len=4, temperature=0)
    assert not llama._lock.locked()


def test_code_holding_the_lock_gets_an_error(model, llama3_tokenizer) -> None:
    llama = Llama(model, llama3_tokenizer)
    with llama._lock:
        _finishes(lambda: llama._lock.held_by_me() or None)  # another thread: not the holder
        with pytest.raises(ReentrantCallError):
            llama.generate(PROMPT, max_gen_len=2, temperature=0)
    assert llama.generate(PROMPT, max_gen_len=2, temperature=0)[0]


def test_other_threads_still_wait_their_turn() -> None:
    lock = CallLock()
    order = []
    lock.acquire()
    worker = threading.Thread(target=lambda: (lock.acquire(), order.append("worker"), lock.release()))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive()
    assert order == []
    order.append("main")
    lock.release()
    worker.join(30)
    assert order == ["main", "worker"]
