"""Prefill and decode speed of llama3's Transformer, against the memory-bandwidth roofline and,
optionally, Hugging Face transformers or llama.cpp on the same weights, in the same process.

    python scripts/benchmark.py --shape llama-3.2-1b --dtype bf16 --compare hf
    python scripts/benchmark.py --shape llama-3-8b --device cuda --quantize int8 --compile
    python scripts/benchmark.py --ckpt_dir ~/.llama/checkpoints/Llama3.2-1B --out results.json
    python scripts/benchmark.py --shape llama-3.2-1b --n_layers 4 --table --threads 2 --compare llamacpp
    python scripts/benchmark.py --shape tiny --prompt_lens 512,8192,32768 --max_seq_lens 2048,32768

``--table`` is the README's CPU speed table: batch-1 decode for each of ``--precisions`` (bf16,
fp16, int8, w8a8, int4; ``bf16-torch`` / ``bf16-fbgemm`` force torch's or FBGEMM's kernels), with
and without torch.compile, greedy and top-p 0.9, as % of the read bandwidth, the configurations
run interleaved round by round; ``--compare llamacpp`` adds llama.cpp (llama-cpp-python) on the
same weights written as GGUF (BF16 / F16 / Q8_0 / Q4_0, every matrix in that type), decode and a
``--prefill_len``-token prefill (default 512), timed in the same run (``pip install -e .[bench]``).
The header names the CPU model and its key flags.

What is measured (batch of identical-length random prompts):

* prefill tokens/s: one ``forward(prompt, 0, last_only=True)`` per prompt length, batch 1;
* decode tokens/s: the library's own decode loop and decode step (``llama3.decoding.decode`` with
  ``make_decode_step``, greedy) after a ``--decode_context``-token prompt: the time between the
  positions it yields, 2 warm-up steps dropped, ``--decode_tokens`` steps; tokens/s = batch /
  median step time of the best of ``--repeats`` runs (the JSON also has the mean);
* roofline: decoding one step must read every weight once plus the KV cache written so far, so
  tokens/s <= batch · bandwidth / bytes_per_step. The read bandwidth is measured in the same run,
  at its start and its end, by a float32 sum over 1 GiB (4 GiB on GPU; the best of 5); the higher
  reading is used, since other processes on a shared machine can only lower it;
* peak memory: the process's peak resident set (VmHWM, reset before each model) on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA.

``--compare hf`` builds ``transformers.LlamaForCausalLM`` (attn_implementation="sdpa") holding the
same weights and dtype and times ``model.generate`` with ``do_sample=False`` as users run it.

The parts live in ``scripts/bench/``: ``probes`` (timers, bandwidth, memory), ``run_llama3``,
``run_transformers``, ``run_llamacpp`` + ``gguf_writer``, ``table`` (the README table), ``kernels``
(a per-kernel probe: which linear-layer kernel is fastest on this CPU).

Defaults are picked so that the 1B shape finishes in a few minutes on a 2-core CPU: on CPU the
prompt lengths are 128, the decode run 16 tokens after a 64-token prompt; on CUDA 512 and 2048, 128
tokens after 512.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the package beside scripts/ first, then bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

import torch  # noqa: E402
from bench.machine import cpu_info, cpu_summary  # noqa: E402
from bench.probes import measure_bandwidth, peak_memory  # noqa: E402
from bench.report import print_table, run_cli, write_results  # noqa: E402
from bench.run_llama3 import build_model, decode_at_max_seq_lens, prepare, run_ours  # noqa: E402
from bench.table import print_speed_table, speed_table  # noqa: E402

from llama3.decoding import make_decode_step  # noqa: E402
from llama3.distributed import select_device, select_dtype  # noqa: E402


def _as_ints(value: int | str | Sequence[int] | None, default: Sequence[int]) -> list[int]:
    if value is None:
        return list(default)
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def _as_names(value: Any, choices: dict[str, bool]) -> list[bool]:
    names = value.split(",") if isinstance(value, str) else list(value)  # fire: a tuple
    unknown = [n for n in names if str(n).strip() not in choices]
    if unknown or not names:
        raise ValueError(f"expected a comma-separated subset of {', '.join(choices)}, got {value!r}")
    return [choices[str(n).strip()] for n in names]


def main(shape: str = "llama-3.2-1b", ckpt_dir: str | None = None, n_layers: int | None = None,
         dtype: str | None = None, device: str | None = None, compile: bool = False,
         quantize: str | None = None, batch_sizes: Any = None, prompt_lens: Any = None,
         decode_tokens: int | None = None, decode_context: int | None = None, repeats: int = 2,
         compare: str | None = None, threads: int | None = None, out: str | None = None,
         max_seq_lens: Any = None, table: bool = False, precisions: Any = "bf16,fp16,int8,w8a8,int4",
         bandwidth_gib: float | None = None, fbgemm: bool | None = None,
         prefill_len: int | None = None, table_modes: Any = "eager,compile",
         table_sampling: Any = "greedy,top-p") -> dict:
    """Run the benchmark; print a table; write JSON to ``out`` if given. Returns the results.

    Args:
        shape: one of tiny, llama-3.2-1b, llama-3.2-3b, llama-3-8b, llama-3-70b (random weights).
        ckpt_dir: a checkpoint directory instead (loaded by llama3.checkpoint.load_model).
        n_layers: keep only this many layers (quick runs of big shapes).
        dtype: bf16 / fp16 / fp32 (default: llama3's choice for the device).
        device: cpu / cuda / ... (default: llama3's choice).
        compile: decode with torch.compile(model.forward_static) (CUDA: mode="reduce-overhead").
        quantize: "int8" (weight-only), "w8a8" (int8 weights and activations), "int4" (g32) or "fp8".
        fbgemm: pack bfloat16/float16 linear layers for FBGEMM (llama3.cpu_linear); default: as
            ``Llama.build`` does; False: torch's kernels.
        batch_sizes: decode batch sizes, e.g. "1,8" (default 1,8).
        prompt_lens: prefill prompt lengths (default CPU 128; CUDA 512,2048).
        decode_tokens: timed decode steps (default CPU 16, CUDA 128).
        decode_context: prompt length before decoding (default CPU 64, CUDA 512).
        repeats: timed repetitions of each prefill and decode run (the best is kept).
        compare: "hf" for transformers' LlamaForCausalLM on the same weights; with ``table``,
            "llamacpp" for llama.cpp.
        threads: torch CPU threads (default: torch's choice, one per core).
        out: path of the JSON results file.
        max_seq_lens: e.g. "2048,32768": batch-1 decode tok/s after the ``decode_context`` prompt
            with the model built for each of these context sizes, side by side.
        table: the README speed table instead (see the module docstring).
        precisions: for ``table``: any of bf16, fp16, int8, w8a8, int4, int4-bf16-output, fp8,
            bf16-torch, fp16-torch, bf16-fbgemm, fp16-fbgemm.
        bandwidth_gib: size of the bandwidth probes' buffer (default 1 GiB on CPU, 4 on GPU; it must
            exceed the caches: smaller only for quick dry runs).
        prefill_len: for ``table``: prefill tokens timed per precision (default 512 with
            ``compare="llamacpp"``, else 0 = none).
        table_modes: for ``table``: "eager", "compile" or both (default), for shorter runs.
        table_sampling: for ``table``: "greedy" or "greedy,top-p" (default).
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

    info = cpu_info()
    machine = {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": info["model"], "cpu_flags": info["flags"], "load_avg_at_start": os.getloadavg()[0]}
    if dev.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(dev)
    print(cpu_summary(), flush=True)

    if table:
        name = shape + (f" ({n_layers} layers)" if n_layers else "")
        names = precisions.split(",") if isinstance(precisions, str) else list(precisions)  # fire: a tuple
        if prefill_len is None:
            prefill_len = 512 if compare == "llamacpp" else 0
        modes = _as_names(table_modes, {"eager": False, "compile": True})
        samplings = _as_names(table_sampling, {"greedy": False, "top-p": True})
        if False not in samplings:
            raise ValueError("table_sampling must include greedy (the rows compared with llama.cpp)")
        result = speed_table(shape, n_layers, [str(p).strip() for p in names], modes, decode_tokens,
                             decode_context, max(repeats, 3), compare, dev, prefill_len, samplings)
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
        start = time.perf_counter()
        kernels = prepare(model, quantize, fbgemm)  # the library's kernel choice, timed as a user waits
        choice_s = time.perf_counter() - start
        step = make_decode_step(model, compile)
        ours = run_ours(model, step, args, dev, dt, prompt_lens, batch_sizes, decode_tokens,
                        decode_context, repeats)
    ours.update(impl="llama3", mode=mode, linear_kernels=kernels, kernel_choice_s=choice_s,
                peak_mem_gb=record["peak_mem_gb"])
    rows.append(ours)
    del model, step
    gc.collect()

    if compare == "hf":
        from bench.run_transformers import build_hf_model, logit_diff, run_hf

        # The same weights again (same seed, or the same checkpoint), unquantized, handed to
        # transformers; each implementation's peak memory is measured on its own.
        model = build_model(shape, ckpt_dir, n_layers, dev, dt, max_batch, max_seq_len)
        hf_model = build_hf_model(model, dev, dt)
        print(f"# transformers vs llama3 logits, max |diff| on 8 tokens: "
              f"{logit_diff(model, hf_model, dev):.3g}", flush=True)
        del model
        gc.collect()
        record = {}
        with peak_memory(dev, record):  # from after the conversion: our copy is gone by then
            theirs = run_hf(hf_model, args, dev, prompt_lens, batch_sizes, decode_tokens,
                            decode_context, repeats)
        theirs.update(impl="transformers", mode="eager generate", peak_mem_gb=record["peak_mem_gb"])
        rows.append(theirs)
        ours["vs_transformers"] = {
            k: ours[k] / theirs[k] for k in ours if k.startswith(("prefill_", "decode_"))
            and k.endswith("tok_s") and theirs.get(k)
        }
    elif compare:
        raise ValueError(f"unknown compare={compare!r} (hf; llamacpp goes with --table)")

    seq_lens = _as_ints(max_seq_lens, ())
    if seq_lens:
        ours["decode_b1_by_max_seq_len"] = decode_at_max_seq_lens(
            shape, ckpt_dir, n_layers, dev, dt, quantize, fbgemm, compile, seq_lens, decode_context,
            decode_tokens, repeats)

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
    print_table(results)
    write_results(results, out)
    return results


if __name__ == "__main__":
    run_cli(main)
