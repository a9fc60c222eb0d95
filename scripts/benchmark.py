"""Prefill and decode speed of llama3's Transformer, against the memory-bandwidth roofline and,
optionally, Hugging Face transformers on the same weights, in the same process.

    python scripts/benchmark.py --shape llama-3.2-1b --dtype bf16 --compare hf
    python scripts/benchmark.py --shape llama-3-8b --device cuda --quantize int8 --compile
    python scripts/benchmark.py --ckpt_dir ~/.llama/checkpoints/Llama3.2-1B --out results.json
    python scripts/benchmark.py --shape llama-3.2-1b --n_layers 4 --table --threads 2 --compare llamacpp
    python scripts/benchmark.py --shape tiny --prompt_lens 512,8192,32768 --max_seq_lens 2048,32768

``--table`` is the README's CPU speed table: batch-1 decode in bf16, fp16 and int8, each with and
without torch.compile, greedy and top-p 0.9, as % of the read bandwidth, the configurations run
interleaved round by round (``--precisions bf16,bf16-torch,...`` adds rows with torch's kernels
instead of the FBGEMM-packed ones ``Llama.build`` picks on x86 CPUs without bfloat16 matrix units);
``--compare llamacpp`` adds llama.cpp (llama-cpp-python) on the same
weights written as GGUF (BF16 / F16 / Q8_0), timed in the same run (``pip install -e .[bench]``).

What is measured (all greedy, batch of identical-length random prompts):

* prefill tokens/s: one ``forward(prompt, 0, last_only=True)`` per prompt length, batch 1;
* decode tokens/s: after a ``--decode_context``-token prompt and 2 warm-up steps,
  ``--decode_tokens`` single-token steps (argmax fed back), each timed; tokens/s = batch / median
  step time of the best of ``--repeats`` runs (the JSON also has the mean), counting every
  sequence of the batch;
* roofline: decoding one step must read every weight once plus the KV cache written so far, so
  tokens/s <= batch · bandwidth / bytes_per_step. The read bandwidth is measured in the same run,
  at its start and its end, by a float32 sum over 1 GiB (4 GiB on GPU; the best of 5): a reduction
  reads the buffer once and writes nothing, as decoding reads weights; the higher reading is used, since other
  processes on a shared machine can only lower it (copy and GEMV probes are reported too);
* peak memory: the process's peak resident set (VmHWM, reset before each model) on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA.

``--compare hf`` builds ``transformers.LlamaForCausalLM`` (attn_implementation="sdpa", its default
dynamic KV cache) holding the same weights and dtype, and times ``model.generate`` with
``do_sample=False`` as users run it: prefill = ``generate(max_new_tokens=1)``; decode steps are
timed inside ``generate(min_new_tokens=max_new_tokens=N+3)`` by a logits processor that notes
the time of each token (the first two steps are dropped, as our warm-up steps are).

Defaults are picked so that the 1B shape finishes in a few minutes on a 2-core CPU: on CPU the
prompt lengths are 128, the decode run 16 tokens after a 64-token prompt; on CUDA 512 and 2048, 128
tokens after 512. Pass ``--prompt_lens 512,2048`` etc. to override.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

import torch

from llama3.checkpoint import meta_to_hf_state_dict, model_args_to_hf_config
from llama3.cli import fire_strict
from llama3.distributed import select_device, select_dtype
from llama3.generation import make_decode_step
from llama3.kernels import apply_kernels, choose_kernels
from llama3.model import ModelArgs, Transformer
from llama3.presets import PRESETS
from llama3.sampling import sample_next_token

# --- measuring -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (after one untimed warm-up): the least disturbed by
    other processes, which on a shared machine only ever make things slower."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in GB/s (1e9 bytes/s) over a ``gib`` GiB buffer (far larger than any cache).

    ``read`` is the one decoding is held to: a float32 sum, which reads the buffer once and writes
    nothing (decode reads weights, it does not copy them). ``copy`` (read + write) and
    ``gemv_fp32`` (torch.mv over the buffer as a matrix) are reported alongside."""
    n = int(gib * 2**30) // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    probes = {
        "read": (lambda: a.sum(), a.nbytes),
        "copy": (lambda: b.copy_(a), 2 * a.nbytes),  # reads a, writes b
        "gemv_fp32": (lambda: torch.mv(a.view(-1, 4096), b[:4096]), a.nbytes),
    }
    return {name: nbytes / _best_time(fn, device, repeats) / 1e9 for name, (fn, nbytes) in probes.items()}


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict[str, float]):
    """Puts the peak memory (GB) used inside the block into ``record["peak_mem_gb"]``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    yield
    if device.type == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        record["peak_mem_gb"] = _vm_hwm_bytes() / 1e9


def _vm_hwm_bytes() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: the peak of the whole process

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def decode_bytes_per_step(model: torch.nn.Module, args: ModelArgs, batch: int, kv_len: int,
                          kv_dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decoding step must read: every parameter and buffer of
    the linear layers and norms (int8 weights and their scales after quantization; the token
    embedding only for the ``batch`` rows looked up, unless it is the output projection too) and
    keys and values of ``kv_len`` positions. Layers packed for FBGEMM count their weight's bytes (a
    float16 pack is the size of the bfloat16 weight it replaced)."""
    weight_bytes = sum(m.weight_nbytes() for m in model.modules() if hasattr(m, "packs"))
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or "kv_cache" in name:
            continue
        seen.add(id(t))
        # Only the looked-up rows of the embedding are read, unless it is also the output weight.
        if name == "tok_embeddings.weight" and t is not getattr(model.output, "weight", None):
            weight_bytes += batch * t.shape[1] * t.element_size()
        else:
            weight_bytes += t.numel() * t.element_size()
    elem = torch.tensor([], dtype=kv_dtype).element_size()
    kv_bytes = 2 * args.n_layers * batch * args.n_kv_heads * args.head_dim * kv_len * elem
    return weight_bytes, kv_bytes


# --- the models under test ----------------------------------------------------------------------


def build_model(shape: str | None, ckpt_dir: str | None, n_layers: int | None, device: torch.device,
                dtype: torch.dtype, max_batch_size: int, max_seq_len: int) -> Transformer:
    """Random weights of a named shape, or a checkpoint through llama3.checkpoint.load_model."""
    if ckpt_dir:
        from llama3.checkpoint import load_model  # lazily: only needed for real weights

        model = load_model(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                           device=device, dtype=dtype)
        return model.eval()
    params = dict(PRESETS[shape])
    if n_layers:
        params["n_layers"] = n_layers
    args = ModelArgs(**params, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    torch.manual_seed(0)  # the same weights every time: --compare rebuilds them for transformers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the run dtype: no float32 copy
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def build_hf_model(model: Transformer, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with ``model``'s weights."""
    import transformers

    args = model.params
    # Our own config writer; no token ids (generation must not stop early), positions for any length.
    config = transformers.LlamaConfig(**{
        **model_args_to_hf_config(args, dtype), "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0,
        "max_position_embeddings": max(args.max_seq_len, 131072), "attn_implementation": "sdpa",
    })
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), args), strict=False)
    missing = [k for k in missing if not (args.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion: missing {missing}, unexpected {unexpected}")
    if args.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


# --- timing loops ---------------------------------------------------------------------------------


def _prompt(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 100003 + length)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def ours_prefill(model: Transformer, prompt: torch.Tensor) -> None:
    model.forward(prompt, 0, last_only=True)


def ours_decode(model: Transformer, step: Callable, prompt: torch.Tensor, n_tokens: int,
                device: torch.device) -> list[float]:
    """Seconds of each of ``n_tokens`` greedy steps after ``prompt`` (prefill not timed)."""
    logits = model.forward(prompt, 0, last_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True)
    pos = prompt.shape[1]
    for _ in range(2):  # warm-up steps (compiled step: the first call compiles)
        token = step(token, pos)[:, -1].argmax(-1, keepdim=True)
        pos += 1
    times = []
    for _ in range(n_tokens):
        _sync(device)
        start = time.perf_counter()
        token = step(token, pos)[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        pos += 1
    return times


def _logit_diff(model: Transformer, hf: torch.nn.Module, device: torch.device) -> float:
    """Both models hold the same weights: their logits agree to the dtype's rounding."""
    prompt = _prompt(1, 8, model.params.vocab_size, device)
    with torch.inference_mode():
        theirs = hf(prompt).logits.float()
    return (model.forward(prompt, 0) - theirs).abs().max().item()


def hf_generate(hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens; returns the seconds between
    consecutive tokens (a logits processor, called once per generated token, takes the times)."""
    import transformers

    stamps: list[float] = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(scores.device)
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                    logits_processor=transformers.LogitsProcessorList([Clock()]))
    return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:], strict=False)]


def _decode_summary(row: dict[str, Any], batch: int, times: list[float]) -> float:
    """tokens/s of the median step (robust to other processes stealing a step), and the mean."""
    median = statistics.median(times)
    row[f"decode_b{batch}_tok_s"] = batch / median
    row[f"decode_b{batch}_mean_tok_s"] = batch * len(times) / sum(times)
    return batch / median


# --- the README speed table: precisions x compile x sampling, interleaved; llama.cpp alongside ------

# name -> (weight dtype, quantization, fbgemm): fbgemm None = the library's choice (llama3.kernels:
# FBGEMM-packed float16 on x86 CPUs without bfloat16 matrix units), False = torch's kernels only.
PRECISIONS: dict[str, tuple[torch.dtype, str | None, bool | None]] = {
    "bf16": (torch.bfloat16, None, None), "fp16": (torch.float16, None, None),
    "int8": (torch.bfloat16, "int8", None),
    "bf16-torch": (torch.bfloat16, None, False), "fp16-torch": (torch.float16, None, False)}


def prepare(model: Transformer, quantize: str | None, fbgemm: bool | None) -> str:
    """The library's kernel choice for ``model`` (``llama3.kernels.choose_kernels``, as
    ``Llama.build`` makes it), applied; returns the kernels' label for the tables."""
    weight = model.tok_embeddings.weight
    plan = choose_kernels(model, weight.device, weight.dtype, quantize, fbgemm=fbgemm)
    apply_kernels(model, plan)
    name = plan.kernel("output").name  # every family gets the same kernel unless LLAMA3_KERNELS says
    return {"fbgemm-fp16": "fbgemm", "int8": "int8"}.get(name, "torch")  # cpu-gemv is torch.mv


TOP_P = dict(temperature=0.6, top_p=0.9)  # the library's defaults


def _pick(sampled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next token [b, 1] from step logits [b, 1, vocab]: argmax, or top-p sampling."""
    if sampled:
        return lambda logits: sample_next_token(logits[:, -1], **TOP_P)[:, None]
    return lambda logits: logits[:, -1].argmax(-1, keepdim=True)


def decode_run(model: Transformer, step: Callable, prompt: torch.Tensor, n_tokens: int, sampled: bool,
               device: torch.device) -> tuple[list[float], list[int]]:
    """Seconds of each of ``n_tokens`` steps after ``prompt`` (2 untimed warm-up steps), each
    including the choice of the next token; and the tokens."""
    pick = _pick(sampled)
    token = pick(model.forward(prompt, 0, last_only=True))
    pos, tokens = prompt.shape[1], [int(token[0, 0])]
    for _ in range(2):
        token = pick(step(token, pos))
        pos += 1
        tokens.append(int(token[0, 0]))
    times = []
    for _ in range(n_tokens):
        _sync(device)
        start = time.perf_counter()
        token = pick(step(token, pos))
        _sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(int(token[0, 0]))
        pos += 1
    return times, tokens


def speed_table(shape: str, n_layers: int | None, precisions: list[str], compile_modes: list[bool],
                decode_tokens: int, decode_context: int, repeats: int, compare: str | None,
                device: torch.device) -> dict[str, Any]:
    """Batch-1 decode tok/s for every (precision, compile, greedy/top-p) on the same random weights,
    runs interleaved round by round (a burst from another process hits one run, not one
    configuration), each cell = median step of its best run; % of the read-bandwidth roofline;
    llama.cpp on the same weights (GGUF BF16 / F16 / Q8_0) with ``compare="llamacpp"``."""
    bandwidth = measure_bandwidth(device)
    print("# read bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()), flush=True)
    max_seq_len = decode_context + decode_tokens + 16
    models, cells, kernels = {}, {}, {}
    for name in precisions:
        dtype, quantize, fbgemm = PRECISIONS[name]
        model = build_model(shape, None, n_layers, device, dtype, 1, max_seq_len)
        kernels[name] = prepare(model, quantize, fbgemm)
        models[name] = model
        mean_kv = decode_context + 2 + decode_tokens // 2
        w_bytes, kv_bytes = decode_bytes_per_step(model, model.params, 1, mean_kv, dtype)
        for compiled in compile_modes:
            step = make_decode_step(model, compiled)
            for sampled in (False, True):
                cells[(name, compiled, sampled)] = dict(step=step, runs=[], tokens=None,
                                                        bytes=w_bytes + kv_bytes)
    prompt = _prompt(1, decode_context, models[precisions[0]].params.vocab_size, device)
    for key, cell in cells.items():  # warm-up round (compiles), also the greedy tokens to compare
        torch.manual_seed(0)
        _, cell["tokens"] = decode_run(models[key[0]], cell["step"], prompt, 6, key[2], device)
    for r in range(repeats):
        for key, cell in cells.items():
            torch.manual_seed(r)
            times, _ = decode_run(models[key[0]], cell["step"], prompt, decode_tokens, key[2], device)
            cell["runs"].append(times)
            print(f"  round {r} {key}: {1 / statistics.median(times):.2f} tok/s", flush=True)
    rows = []
    for (name, compiled, sampled), cell in cells.items():
        tok_s = 1 / min(statistics.median(t) for t in cell["runs"])
        rows.append(dict(precision=name, compile=compiled, sampling="top-p 0.9" if sampled else "greedy",
                         tok_s=tok_s, read_gb_per_token=cell["bytes"] / 1e9,
                         pct_read_bw=100 * tok_s * cell["bytes"] / 1e9 / bandwidth["read"],
                         greedy_tokens=None if sampled else cell["tokens"], kernels=kernels[name]))
    for (name, compiled, sampled), cell in cells.items():
        if not sampled and cell["tokens"] != cells[(name, compile_modes[0], False)]["tokens"]:
            print(f"# NOTE: {name} compile={compiled} greedy tokens differ from compile={compile_modes[0]}")
    del cells
    llamacpp = {}
    if compare == "llamacpp":
        for name in precisions:
            plain = models[name]
            if kernels[name] == "fbgemm":  # GGUF is written from float weights, which packing dropped
                plain = build_model(shape, None, n_layers, device, PRECISIONS[name][0], 1, max_seq_len)
            llamacpp[name] = run_llamacpp(plain, name.removesuffix("-torch"), prompt, decode_tokens, repeats)
            del plain
            ours = next(r for r in rows if r["precision"] == name and r["sampling"] == "greedy")
            # Random weights have near-tied logits: a rounding difference can flip a greedy choice
            # (and everything after it), so the logits are the real check.
            same = sum(a == b for a, b in zip(llamacpp[name]["tokens"][:8], ours["greedy_tokens"][:8],
                                               strict=False))
            llamacpp[name]["first_8_tokens_equal"] = same
            print(f"  llama.cpp {llamacpp[name]['gguf_type']}: {llamacpp[name]['tok_s']:.2f} tok/s; prompt "
                  f"logits max |diff| {llamacpp[name]['logit_diff_in_std']:.3f} std; first 8 greedy "
                  f"tokens: {same}/8 equal", flush=True)
    elif compare:
        raise ValueError(f"unknown compare={compare!r} for --table (llamacpp is the one we have)")
    for probe, value in measure_bandwidth(device).items():  # others only ever lower a reading
        bandwidth[probe] = max(bandwidth[probe], value)
    for row in rows:
        row["pct_read_bw"] = 100 * row["tok_s"] * row["read_gb_per_token"] / bandwidth["read"]
    return dict(bandwidth_gb_s=bandwidth, rows=rows, llamacpp=llamacpp)


KERNEL_NAMES = {"fbgemm": "FBGEMM fp16", "torch": "torch", "int8": "torch int8"}


def print_speed_table(result: dict[str, Any], machine: dict[str, Any], shape_name: str) -> None:
    """The README table (markdown)."""
    bw = result["bandwidth_gb_s"]["read"]
    print(f"\n{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, {shape_name}, "
          "batch 1; "
          f"read bandwidth {bw:.1f} GB/s; load average {machine['load_avg_at_start']:.1f} -> "
          f"{os.getloadavg()[0]:.1f}\n")
    has_cpp = bool(result["llamacpp"])
    head = ("| precision | linear kernels | compile | greedy tok/s | top-p 0.9 tok/s | % of read bandwidth "
            "(greedy) |")
    sep = "|---|---|---|---|---|---|"
    if has_cpp:
        head += " llama.cpp greedy tok/s | ratio |"
        sep += "---|---|"
    print(head)
    print(sep)
    for row in result["rows"]:
        if row["sampling"] != "greedy":
            continue
        sampled = next(r for r in result["rows"] if r["precision"] == row["precision"]
                       and r["compile"] == row["compile"] and r["sampling"] != "greedy")
        line = (f"| {row['precision'].removesuffix('-torch')} | {KERNEL_NAMES[row['kernels']]} | "
                f"{'yes' if row['compile'] else 'no'} | {row['tok_s']:.1f} | "
                f"{sampled['tok_s']:.1f} | {row['pct_read_bw']:.0f} % |")
        if has_cpp:
            cpp = result["llamacpp"][row["precision"]]
            line += f" {cpp['tok_s']:.1f} ({cpp['gguf_type']}) | {row['tok_s'] / cpp['tok_s']:.2f}× |"
        print(line)


def write_gguf(model: Transformer, path: str, gguf_type: str) -> None:
    """``model``'s weights as a GGUF file for llama.cpp (BF16, F16 or Q8_0 matrices; F32 norms).

    Meta's layout is llama.cpp's (adjacent-pair RoPE), so no permutation; Llama 3.1 RoPE scaling
    goes in as llama.cpp's per-frequency divisors (``rope_freqs.weight``); the vocabulary is
    llama.cpp's "none" (ids in, logits out, no tokenizer needed)."""
    import gguf
    import numpy as np

    from llama3.model import rope_frequencies

    args = model.params
    qtype = {"BF16": gguf.GGMLQuantizationType.BF16, "F16": gguf.GGMLQuantizationType.F16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model("none")
    w.add_file_type({"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])

    def matrix(name: str, t: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        t = t.float() if scale is None else t.float() * scale.float()[:, None]
        w.add_tensor(name, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)

    def vector(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.float().numpy().astype(np.float32))

    if args.use_scaled_rope:
        plain = ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
        vector("rope_freqs.weight", rope_frequencies(plain) / rope_frequencies(args))
    sd = model.state_dict()
    matrix("token_embd.weight", sd["tok_embeddings.weight"])
    vector("output_norm.weight", sd["norm.weight"])
    if not args.tie_word_embeddings:
        matrix("output.weight", sd["output.weight"], sd.get("output.scale"))
    names = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
             "feed_forward.w3": "ffn_up"}
    for i in range(args.n_layers):
        vector(f"blk.{i}.attn_norm.weight", sd[f"layers.{i}.attention_norm.weight"])
        vector(f"blk.{i}.ffn_norm.weight", sd[f"layers.{i}.ffn_norm.weight"])
        for ours, theirs in names.items():
            prefix = f"layers.{i}.{ours}"
            matrix(f"blk.{i}.{theirs}.weight", sd[f"{prefix}.weight"], sd.get(f"{prefix}.scale"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_llamacpp(model: Transformer, precision: str, prompt: torch.Tensor, decode_tokens: int,
                 repeats: int) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) greedy decode on ``model``'s weights: tok/s (median step of the
    best of ``repeats`` runs, after 2 warm-up steps, as ours) and its first greedy tokens."""
    import tempfile

    import numpy as np
    from llama_cpp import Llama as LlamaCpp

    gguf_type = {"bf16": "BF16", "fp16": "F16", "int8": "Q8_0"}[precision]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"model-{gguf_type}.gguf")
        write_gguf(model, path, gguf_type)
        llm = LlamaCpp(model_path=path, n_ctx=model.params.max_seq_len, n_batch=512,
                       n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                       verbose=False)
        vocab = model.params.vocab_size

        def last_logits() -> np.ndarray:  # the last evaluated position's (no copy of all rows)
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

        ids = prompt[0].tolist()
        llm.eval(ids)  # the same weights give the same logits, to the precision's rounding
        theirs = torch.tensor(last_logits(), dtype=torch.float32)
        ours = model.forward(prompt, 0, last_only=True)[0, -1].float()
        logit_diff = float((ours - theirs).abs().max() / ours.std())
        best, tokens = None, []
        for _ in range(repeats):
            llm.reset()
            llm.eval(ids)
            token = int(np.argmax(last_logits()))
            out, times = [token], []
            for i in range(decode_tokens + 2):
                start = time.perf_counter()
                llm.eval([token])
                token = int(np.argmax(last_logits()))
                if i >= 2:
                    times.append(time.perf_counter() - start)
                out.append(token)
            tokens = out
            median = statistics.median(times)
            best = median if best is None else min(best, median)
        llm.close()
    return dict(gguf_type=gguf_type, tok_s=1 / best, tokens=tokens, logit_diff_in_std=logit_diff)


# --- the run --------------------------------------------------------------------------------------


def _as_ints(value: int | str | Sequence[int] | None, default: Sequence[int]) -> list[int]:
    if value is None:
        return list(default)
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def main(shape: str = "llama-3.2-1b", ckpt_dir: str | None = None, n_layers: int | None = None,
         dtype: str | None = None, device: str | None = None, compile: bool = False,
         quantize: str | None = None, batch_sizes: Any = None, prompt_lens: Any = None,
         decode_tokens: int | None = None, decode_context: int | None = None, repeats: int = 2,
         compare: str | None = None, threads: int | None = None, out: str | None = None,
         max_seq_lens: Any = None, table: bool = False, precisions: Any = "bf16,fp16,int8",
         bandwidth_gib: float | None = None, fbgemm: bool | None = None) -> dict:
    """Run the benchmark; print a table; write JSON to ``out`` if given. Returns the results.

    Args:
        shape: one of tiny, llama-3.2-1b, llama-3.2-3b, llama-3-8b, llama-3-70b (random weights).
        ckpt_dir: a checkpoint directory instead (loaded by llama3.checkpoint.load_model).
        n_layers: keep only this many layers (quick runs of big shapes).
        dtype: bf16 / fp16 / fp32 (default: llama3's choice for the device).
        device: cpu / cuda / ... (default: llama3's choice).
        compile: decode with torch.compile of the fixed-shape step (model.forward with kv_len;
            CUDA: mode="reduce-overhead").
        quantize: "int8" for int8 weight-only linear layers.
        fbgemm: pack bfloat16/float16 linear layers for FBGEMM (llama3.kernels.fbgemm); default: as
            ``Llama.build`` does (on x86 CPUs without bfloat16 matrix units); False: torch's kernels.
        batch_sizes: decode batch sizes, e.g. "1,8" (default 1,8).
        prompt_lens: prefill prompt lengths (default CPU 128; CUDA 512,2048).
        decode_tokens: timed decode steps (default CPU 16, CUDA 128).
        decode_context: prompt length before decoding (default CPU 64, CUDA 512).
        repeats: timed repetitions of each prefill and decode run (the best is kept).
        compare: "hf" to run transformers' LlamaForCausalLM on the same weights too.
        threads: torch CPU threads (default: torch's choice, one per core).
        out: path of the JSON results file.
        max_seq_lens: e.g. "2048,32768": batch-1 decode tok/s after the ``decode_context`` prompt
            with the model built for each of these context sizes, side by side (the cost of a step
            should follow the filled cache, not max_seq_len).
        table: the README speed table instead: batch-1 decode for each of ``precisions``, with and
            without compile, greedy and top-p 0.9, % of the read bandwidth; with
            ``compare="llamacpp"`` llama.cpp on the same weights too.
        precisions: for ``table``: any of bf16, fp16, int8 (int8 weights, bf16 activations), and
            bf16-torch, fp16-torch (torch's kernels, not FBGEMM's, for comparison).
        bandwidth_gib: size of the bandwidth probes' buffer (default 1 GiB on CPU, 4 on GPU; it must
            exceed the caches: smaller only for quick dry runs).
    """
    if threads:
        torch.set_num_threads(threads)
    dev = select_device(device)
    dt = select_dtype(dev, dtype)
    on_cpu = dev.type == "cpu"
    probe_gib = bandwidth_gib or (1.0 if on_cpu else 4.0)
    batch_sizes = _as_ints(batch_sizes, (1, 8))
    prompt_lens = _as_ints(prompt_lens, (128,) if on_cpu else (512, 2048))
    decode_tokens = decode_tokens or (16 if on_cpu else 128)
    decode_context = decode_context or (64 if on_cpu else 512)
    max_seq_len = max([*prompt_lens, decode_context + decode_tokens + 2]) + 8
    max_batch = max(batch_sizes)

    machine = {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "load_avg_at_start": os.getloadavg()[0]}
    if dev.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(dev)
    else:
        machine["cpu"] = _cpu_name()
    print(f"# {machine}", flush=True)

    if table:
        name = shape + (f" ({n_layers} layers)" if n_layers else "")
        names = precisions.split(",") if isinstance(precisions, str) else list(precisions)  # fire: a tuple
        result = speed_table(shape, n_layers, [str(p).strip() for p in names],
                             [False, True], decode_tokens, decode_context, max(repeats, 3), compare, dev)
        result.update(machine=machine, shape=name, decode_tokens=decode_tokens,
                      decode_context=decode_context, argv=sys.argv[1:])
        print_speed_table(result, machine, name)
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=2)
        return result

    bandwidth = measure_bandwidth(dev, gib=probe_gib)
    print("# memory bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()), flush=True)

    mode = "+".join(m for m in ("eager" if not compile else "compile", quantize) if m)
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    with peak_memory(dev, record):
        model = build_model(shape, ckpt_dir, n_layers, dev, dt, max_batch, max_seq_len)
        args = model.params
        kernels = prepare(model, quantize, fbgemm)
        step = make_decode_step(model, compile)
        ours = _run_ours(model, step, args, dev, dt, prompt_lens, batch_sizes, decode_tokens,
                         decode_context, repeats)
    ours.update(impl="llama3", mode=mode, linear_kernels=KERNEL_NAMES[kernels],
                peak_mem_gb=record["peak_mem_gb"])
    rows.append(ours)
    del model, step
    gc.collect()

    if compare == "hf":
        # The same weights again (same seed, or the same checkpoint), unquantized, handed to
        # transformers; each implementation's peak memory is measured on its own.
        model = build_model(shape, ckpt_dir, n_layers, dev, dt, max_batch, max_seq_len)
        hf_model = build_hf_model(model, dev, dt)
        print(f"# transformers vs llama3 logits, max |diff| on 8 tokens: "
              f"{_logit_diff(model, hf_model, dev):.3g}", flush=True)
        del model
        gc.collect()
        record = {}
        with peak_memory(dev, record):  # from after the conversion: our copy is gone by then
            theirs = _run_hf(hf_model, args, dev, prompt_lens, batch_sizes, decode_tokens,
                             decode_context, repeats)
        theirs.update(impl="transformers", mode="eager generate", peak_mem_gb=record["peak_mem_gb"])
        rows.append(theirs)
        ours["vs_transformers"] = {
            k: ours[k] / theirs[k] for k in ours if k.startswith(("prefill_", "decode_"))
            and k.endswith("tok_s") and theirs.get(k)
        }
    elif compare:
        raise ValueError(f"unknown compare={compare!r} (hf is the one we have)")

    seq_lens = _as_ints(max_seq_lens, ())
    by_seq_len: dict[int, float] = {}
    for msl in seq_lens:  # decode at a short position in models built for different context sizes
        model = build_model(shape, ckpt_dir, n_layers, dev, dt, 1, msl)
        prepare(model, quantize, fbgemm)
        step = make_decode_step(model, compile)
        prompt = _prompt(1, decode_context, args.vocab_size, dev)
        runs = [ours_decode(model, step, prompt, decode_tokens, dev) for _ in range(repeats)]
        by_seq_len[msl] = 1 / min(statistics.median(t) for t in runs)
        print(f"  llama3 decode b1 at position ~{decode_context}, max_seq_len {msl}: "
              f"{by_seq_len[msl]:.2f} tok/s", flush=True)
        del model, step
        gc.collect()
    if by_seq_len:
        ours["decode_b1_by_max_seq_len"] = by_seq_len

    # Other processes only ever lower a bandwidth reading: measure again at the end, keep the best.
    for probe, value in measure_bandwidth(dev, gib=probe_gib).items():
        bandwidth[probe] = max(bandwidth[probe], value)
    print("# memory bandwidth GB/s, best of start and end: "
          + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()), flush=True)
    for batch in batch_sizes:
        roofline = batch * bandwidth["read"] * 1e9 / ours[f"decode_b{batch}_bytes_per_step"]
        ours[f"decode_b{batch}_roofline_tok_s"] = roofline
        ours[f"decode_b{batch}_pct_roofline"] = 100 * ours[f"decode_b{batch}_tok_s"] / roofline

    name = shape if not ckpt_dir else os.path.basename(os.path.normpath(ckpt_dir))
    if n_layers:
        name += f" ({n_layers} layers)"
    results = {"machine": machine, "bandwidth_gb_s": bandwidth, "shape": name,
               "dtype": str(dt).replace("torch.", ""), "prompt_lens": prompt_lens, "batch_sizes": batch_sizes,
               "decode_tokens": decode_tokens, "decode_context": decode_context, "rows": rows,
               "load_avg_at_end": os.getloadavg()[0], "argv": sys.argv[1:]}
    _print_table(results)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"# wrote {out}")
    return results


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def _run_ours(model: Transformer, step: Callable, args: ModelArgs, dev: torch.device, dt: torch.dtype,
              prompt_lens: list[int], batch_sizes: list[int], decode_tokens: int, decode_context: int,
              repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    ours_prefill(model, _prompt(1, 8, args.vocab_size, dev))  # warm-up (kernel selection, allocator)
    for length in prompt_lens:
        prompt = _prompt(1, length, args.vocab_size, dev)
        record: dict[str, float] = {}
        with peak_memory(dev, record):
            seconds = _best_time(lambda p=prompt: ours_prefill(model, p), dev, repeats)
        row[f"prefill_{length}_tok_s"] = length / seconds
        row[f"prefill_{length}_peak_mem_gb"] = record["peak_mem_gb"]
        print(f"  llama3 prefill {length}: {length / seconds:.1f} tok/s, peak memory "
              f"{record['peak_mem_gb']:.2f} GB", flush=True)
    for batch in batch_sizes:
        prompt = _prompt(batch, decode_context, args.vocab_size, dev)
        # Best of `repeats` runs, by median step time: another process's burst spoils one run.
        runs = [ours_decode(model, step, prompt, decode_tokens, dev) for _ in range(repeats)]
        tok_s = _decode_summary(row, batch, min(runs, key=statistics.median))
        mean_kv = decode_context + 2 + decode_tokens / 2
        w_bytes, kv_bytes = decode_bytes_per_step(model, args, batch, int(mean_kv), dt)
        row[f"decode_b{batch}_bytes_per_step"] = w_bytes + kv_bytes
        print(f"  llama3 decode b{batch}: {tok_s:.2f} tok/s ({(w_bytes + kv_bytes) / 1e9:.2f} GB read "
              f"per step)", flush=True)
    return row


def _run_hf(hf: torch.nn.Module, args: ModelArgs, dev: torch.device, prompt_lens: list[int],
            batch_sizes: list[int], decode_tokens: int, decode_context: int, repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    hf_generate(hf, _prompt(1, 8, args.vocab_size, dev), 1)
    for length in prompt_lens:
        prompt = _prompt(1, length, args.vocab_size, dev)
        seconds = _best_time(lambda p=prompt: hf_generate(hf, p, 1), dev, repeats)
        row[f"prefill_{length}_tok_s"] = length / seconds
        print(f"  transformers prefill {length}: {length / seconds:.1f} tok/s", flush=True)
    for batch in batch_sizes:
        prompt = _prompt(batch, decode_context, args.vocab_size, dev)
        hf_generate(hf, prompt, 3)  # warm-up
        # The same 2 warm-up steps dropped as ours, and the best of `repeats` runs.
        runs = [hf_generate(hf, prompt, decode_tokens + 3)[2:] for _ in range(repeats)]
        tok_s = _decode_summary(row, batch, min(runs, key=statistics.median))
        print(f"  transformers decode b{batch}: {tok_s:.2f} tok/s", flush=True)
    return row


def _print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['threads']} threads)"
    print(f"\n{where}, {results['shape']}, {results['dtype']}, bandwidth "
          f"{results['bandwidth_gb_s']['read']:.1f} GB/s, load avg {machine['load_avg_at_start']:.2f}"
          f" -> {results['load_avg_at_end']:.2f}")
    cols = ([f"prefill_{n}_tok_s" for n in results["prompt_lens"]]
            + [f"decode_b{b}_tok_s" for b in results["batch_sizes"]])
    header = ["impl", "mode"] + [c.replace("_tok_s", "") for c in cols] + [
        f"b{b} %roofline" for b in results["batch_sizes"]] + ["peak GB"]
    lines = [header]
    for row in results["rows"]:
        pct = [f"{row[f'decode_b{b}_pct_roofline']:.0f}%" if f"decode_b{b}_pct_roofline" in row else "-"
               for b in results["batch_sizes"]]
        mode = row["mode"] + (f" ({row['linear_kernels']})" if "linear_kernels" in row else "")
        lines.append([row["impl"], mode] + [f"{row.get(c, float('nan')):.2f}" for c in cols]
                     + pct + [f"{row['peak_mem_gb']:.1f}"])
        if "vs_transformers" in row:
            lines.append(["  ratio", "vs transformers"] + [
                f"{row['vs_transformers'][c]:.2f}x" if c in row["vs_transformers"] else "-" for c in cols]
                + [""] * (len(results["batch_sizes"]) + 1))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


@functools.wraps(main)
def cli(*args: Any, **kwargs: Any) -> None:
    """Command line: ``main`` without echoing its result dict."""
    main(*args, **kwargs)


if __name__ == "__main__":
    raise SystemExit(fire_strict(cli))
