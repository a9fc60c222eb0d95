"""llama.cpp's side of ``scripts/accuracy.py``, in a process of its own: tokenize a text with a GGUF
file's own vocabulary, requantize the file to other types, and save each type's logits at every
position of the text (teacher-forced).

Like ``llamacpp_worker.py`` this process imports llama_cpp and numpy only: ggml's AMX kernels must
not share OpenMP threads with torch's.

``python llamacpp_logits.py JOB.json``, where JOB.json is
``{"gguf": path, "text": str, "types": ["F32", "Q8_0", ...], "out_dir": path, "threads": n}``.
Writes ``tokens.json`` (the ids, the model's own BOS convention) and ``logits-TYPE.npy``
(float32 [n_tokens, vocab]) for each type into ``out_dir`` (each requantized GGUF file is made there
and removed once its logits are saved).
Each type is ``llama_model_quantize`` with ``allow_requantize`` and ``pure``: every matrix, the
token embedding (which a tied model also uses as its output projection) included, in that type;
norms stay F32.
"""

from __future__ import annotations

import json
import os
import sys

# llama.cpp's file type (enum llama_ftype) and tensor type (enum ggml_type) by the names the
# accuracy table uses; numbers, since llama-cpp-python does not name every one (GGML_TYPE_BF16).
FTYPES = {"F32": (0, 0), "F16": (1, 1), "Q4_0": (2, 2), "Q4_1": (3, 3), "Q8_0": (7, 8), "BF16": (32, 30)}


def requantize(src: str, dst: str, gguf_type: str, threads: int) -> None:
    """``src`` rewritten as ``dst`` with every matrix in ``gguf_type`` (dequantized first when the
    source is quantized: allow_requantize)."""
    import ctypes

    import llama_cpp.llama_cpp as capi

    ftype, ttype = FTYPES[gguf_type]
    params = capi.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.output_tensor_type = ttype
    params.token_embedding_type = ttype
    params.allow_requantize = True
    params.quantize_output_tensor = True
    params.pure = True  # no k-quant "mixture" rules: the type named is the type of every matrix
    if capi.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {gguf_type} failed")


def main() -> None:
    import numpy as np
    from llama_cpp import Llama

    with open(sys.argv[1]) as f:
        job = json.load(f)
    out_dir, threads = job["out_dir"], int(job["threads"])
    # The model's own convention (add_bos_token in the GGUF), the text never parsed as special tokens.
    vocab = Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
    tokens = vocab.tokenize(job["text"].encode(), add_bos=True, special=False)
    vocab.close()
    with open(os.path.join(out_dir, "tokens.json"), "w") as f:
        json.dump(tokens, f)
    for gguf_type in job["types"]:
        path = os.path.join(out_dir, f"model-{gguf_type}.gguf")
        requantize(job["gguf"], path, gguf_type, threads)
        # llama.cpp as users run it (its default kernels for this CPU, runtime repacking included);
        # logits_all keeps every position's logits, n_ctx just the text.
        llm = Llama(model_path=path, n_ctx=len(tokens), n_batch=512, n_ubatch=512, n_threads=threads,
                    n_threads_batch=threads, logits_all=True, verbose=False)
        llm.reset()
        llm.eval(tokens)
        np.save(os.path.join(out_dir, f"logits-{gguf_type}.npy"), np.array(llm.scores[: len(tokens)]))
        llm.close()
        os.remove(path)  # the logits are what is kept
        print(f"llama.cpp {gguf_type}: {len(tokens)} positions", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
