"""llama.cpp in a process of its own, driven over stdin/stdout in JSON lines.

It must not share a process with torch: ggml's AMX kernels run on the OpenMP threads of whichever
runtime was loaded first (torch's), where oneDNN's AMX kernels release the tile configuration that
ggml believes is still set, and the next tile instruction raises SIGILL (seen on a Xeon with
AMX-INT8, Q8_0/Q4_0 models). This process imports llama_cpp and numpy only.

Requests (one JSON object per line) and replies:
    {"op": "logits", "ids": [...]}              -> {"logits": [...]} after ids from position 0
    {"op": "decode", "ids": [...], "n": N}      -> {"times": [...], "tokens": [...]} greedy, 2 warm-up steps
    {"op": "prefill", "ids": [...]}             -> {"seconds": s}
    {"op": "close"}                             -> exits

``python llamacpp_worker.py MODEL.gguf N_CTX THREADS VOCAB [no-extra-bufts]``
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import llama_cpp.llama_cpp as capi
    import numpy as np
    from llama_cpp import Llama

    path, n_ctx, threads, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if sys.argv[5:] == ["no-extra-bufts"]:
        # Without ggml's extra weight layouts (AMX, CPU repack): llama-cpp-python has no argument
        # for llama_model_params.use_extra_bufts, so the defaults it starts from are changed.
        default_params = capi.llama_model_default_params

        def without_extra_bufts():  # noqa: ANN202
            params = default_params()
            params.use_extra_bufts = False
            return params
        capi.llama_model_default_params = without_extra_bufts
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def last_logits() -> np.ndarray:  # the last evaluated position's (no copy of all rows)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "close":
            break
        llm.reset()
        if req["op"] == "prefill":
            start = time.perf_counter()
            llm.eval(req["ids"])
            reply({"seconds": time.perf_counter() - start})
            continue
        llm.eval(req["ids"])
        if req["op"] == "logits":
            reply({"logits": last_logits().tolist()})
            continue
        token = int(np.argmax(last_logits()))
        tokens, times = [token], []
        for i in range(req["n"] + 2):
            start = time.perf_counter()
            llm.eval([token])
            token = int(np.argmax(last_logits()))
            if i >= 2:
                times.append(time.perf_counter() - start)
            tokens.append(token)
        reply({"times": times, "tokens": tokens})
    llm.close()


if __name__ == "__main__":
    main()
