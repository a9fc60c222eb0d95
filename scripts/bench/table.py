"""The README's CPU speed table: batch-1 decode (and prefill) for several precisions, with and without
compile, greedy and top-p, runs interleaved round by round; llama.cpp on the same weights beside it."""

from __future__ import annotations

import gc
import os
import statistics
from typing import Any

import torch

from llama3.decoding import make_decode_step

from .probes import best_time, decode_bytes_per_step, measure_bandwidth
from .run_llama3 import (
    GREEDY,
    OVERRIDES,
    PRECISIONS,
    TOP_P,
    build_model,
    make_prompt,
    prefill,
    prepare,
    timed_decode,
)
from .run_llamacpp import GGUF_FOR, LlamaCpp


def speed_table(shape: str, n_layers: int | None, precisions: list[str], compile_modes: list[bool],
                decode_tokens: int, decode_context: int, repeats: int, compare: str | None,
                device: torch.device, prefill_len: int = 0,
                samplings: list[bool] | None = None) -> dict[str, Any]:
    """Batch-1 decode tok/s for every (precision, compile, greedy/top-p) on the same random weights;
    ``prefill_len`` > 0: prefill tok/s of that many tokens per precision (eager); with
    ``compare="llamacpp"``, llama.cpp on the same weights (GGUF BF16 / F16 / Q8_0 / Q4_0, greedy
    decode and prefill) in the same rounds. Every configuration runs once per round, rounds
    repeated (a burst from another process hits one run, not one configuration); each cell is
    the median over rounds of each run's median step; % of the read-bandwidth roofline.
    ``samplings``: [False] greedy only, [True] top-p only (default both)."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precisions {unknown}; choose from {', '.join(PRECISIONS)}")
    if compare not in (None, "llamacpp"):
        raise ValueError(f"unknown compare={compare!r} for --table (llamacpp is the one we have)")
    bandwidth = measure_bandwidth(device)
    print("# read bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()), flush=True)
    max_seq_len = max(decode_context + decode_tokens + 16, prefill_len + 8)
    models, cells, kernels, prefills, cpp = {}, {}, {}, {}, {}
    for name in precisions:
        dtype, quantize, fbgemm = PRECISIONS[name]
        model = build_model(shape, None, n_layers, device, dtype, 1, max_seq_len)
        kernels[name] = prepare(model, quantize, fbgemm, OVERRIDES.get(name))
        models[name] = model
        prefills[name] = []
        mean_kv = decode_context + 2 + decode_tokens // 2
        w_bytes, kv_bytes = decode_bytes_per_step(model, model.params, 1, mean_kv, dtype)
        for compiled in compile_modes:
            step = make_decode_step(model, compiled)
            for sampling in [TOP_P if top_p else GREEDY for top_p in (samplings or [False, True])]:
                cells[(name, compiled, sampling is TOP_P)] = dict(step=step, runs=[], tokens=None,
                                                                  bytes=w_bytes + kv_bytes)
    # llama.cpp's workers start once every kernel is measured (nothing else runs while it is), each
    # on GGUF weights written from a rebuild of the same float weights (build_model is seeded).
    for name in precisions:
        gguf_type = GGUF_FOR.get(name.split("-")[0])  # fp8: no llama.cpp counterpart
        if compare == "llamacpp" and gguf_type and gguf_type not in cpp:
            weights = build_model(shape, None, n_layers, device, PRECISIONS[name][0], 1, max_seq_len)
            cpp[gguf_type] = dict(runner=LlamaCpp(weights, gguf_type, max_seq_len), runs=[], prefill=[],
                                  precision=name)
            del weights
    vocab = models[precisions[0]].params.vocab_size
    prompt = make_prompt(1, decode_context, vocab, device)
    long_prompt = make_prompt(1, prefill_len, vocab, device) if prefill_len else None
    for key, cell in cells.items():  # warm-up round (compiles), also the greedy tokens to compare
        torch.manual_seed(0)
        _, cell["tokens"] = timed_decode(models[key[0]], cell["step"], prompt, 6, TOP_P if key[2] else GREEDY)
    for entry in cpp.values():
        _, entry["tokens"] = entry["runner"].decode(prompt, 6)
        if long_prompt is not None:
            entry["runner"].prefill(long_prompt)
    for r in range(repeats):
        for key, cell in cells.items():
            torch.manual_seed(r)
            times, _ = timed_decode(models[key[0]], cell["step"], prompt, decode_tokens,
                                    TOP_P if key[2] else GREEDY)
            cell["runs"].append(statistics.median(times))
            print(f"  round {r} {key}: {1 / cell['runs'][-1]:.2f} tok/s", flush=True)
        for gguf_type, entry in cpp.items():
            times, _ = entry["runner"].decode(prompt, decode_tokens)
            entry["runs"].append(statistics.median(times))
            print(f"  round {r} llama.cpp {gguf_type}: {1 / entry['runs'][-1]:.2f} tok/s", flush=True)
        if long_prompt is not None:
            for name in precisions:
                seconds = best_time(lambda m=models[name]: prefill(m, long_prompt), device, 1)
                prefills[name].append(seconds)
                print(f"  round {r} {name} prefill {prefill_len}: {prefill_len / seconds:.1f} tok/s",
                      flush=True)
            for gguf_type, entry in cpp.items():
                entry["prefill"].append(entry["runner"].prefill(long_prompt))
                print(f"  round {r} llama.cpp {gguf_type} prefill {prefill_len}: "
                      f"{prefill_len / entry['prefill'][-1]:.1f} tok/s", flush=True)
    rows = []
    for (name, compiled, sampled), cell in cells.items():
        tok_s = 1 / statistics.median(cell["runs"])
        row = dict(precision=name, compile=compiled, sampling="top-p 0.9" if sampled else "greedy",
                   tok_s=tok_s, tok_s_runs=[1 / t for t in cell["runs"]],
                   read_gb_per_token=cell["bytes"] / 1e9,
                   greedy_tokens=None if sampled else cell["tokens"], kernels=kernels[name])
        if prefills[name]:
            row["prefill_tok_s"] = prefill_len / statistics.median(prefills[name])
        rows.append(row)
    for (name, compiled, sampled), cell in cells.items():
        if not sampled and cell["tokens"] != cells[(name, compile_modes[0], False)]["tokens"]:
            print(f"# NOTE: {name} compile={compiled} greedy tokens differ from compile={compile_modes[0]}")
    del cells
    llamacpp = {}
    for gguf_type, entry in cpp.items():
        runner = entry.pop("runner")
        theirs = runner.prompt_logits(prompt)
        runner.close()
        result = dict(gguf_type=gguf_type, tok_s=1 / statistics.median(entry["runs"]),
                      tok_s_runs=[1 / t for t in entry["runs"]], tokens=entry["tokens"])
        if entry["prefill"]:
            result["prefill_tok_s"] = prefill_len / statistics.median(entry["prefill"])
        for name in precisions:
            if GGUF_FOR.get(name.split("-")[0]) != gguf_type:
                continue
            ours_logits = models[name].forward(prompt, 0, last_only=True)[0, -1].float()
            ours = next(r for r in rows if r["precision"] == name and r["sampling"] == "greedy")
            # Random weights have near-tied logits: a rounding difference can flip a greedy choice
            # (and everything after it), so the logits are the real check.
            same = sum(a == b for a, b in zip(entry["tokens"][:8], ours["greedy_tokens"][:8], strict=False))
            diff = float((ours_logits - theirs).abs().max() / ours_logits.std())
            llamacpp[name] = dict(result, first_8_tokens_equal=same, logit_diff_in_std=diff)
            print(f"  llama.cpp {gguf_type} vs {name}: prompt logits max |diff| "
                  f"{llamacpp[name]['logit_diff_in_std']:.3f} std; first 8 greedy tokens: {same}/8 equal",
                  flush=True)
    del models
    gc.collect()
    for probe, value in measure_bandwidth(device).items():  # others only ever lower a reading
        bandwidth[probe] = max(bandwidth[probe], value)
    for row in rows:
        row["pct_read_bw"] = 100 * row["tok_s"] * row["read_gb_per_token"] / bandwidth["read"]
    return dict(bandwidth_gb_s=bandwidth, rows=rows, llamacpp=llamacpp, prefill_len=prefill_len)


def print_speed_table(result: dict[str, Any], machine: dict[str, Any], shape_name: str) -> None:
    """The README table (markdown), with the machine's CPU model and key flags in its header."""
    bw = result["bandwidth_gb_s"]["read"]
    print(f"\n{machine['cpu']} (flags: {' '.join(machine.get('cpu_flags', [])) or '?'}), "
          f"{machine['threads']} threads, torch {machine['torch']}, {shape_name}, batch 1; "
          f"read bandwidth {bw:.1f} GB/s; load average {machine['load_avg_at_start']:.1f} -> "
          f"{os.getloadavg()[0]:.1f}\n")
    has_cpp = bool(result["llamacpp"])
    n_pre = result.get("prefill_len") or 0
    head = ("| precision | linear kernels | compile | greedy tok/s | top-p 0.9 tok/s | "
            "% of read bandwidth (greedy) |")
    sep = "|---|---|---|---|---|---|"
    if has_cpp:
        head += " llama.cpp greedy tok/s | ratio |"
        sep += "---|---|"
    if n_pre:
        head += f" prefill {n_pre} tok/s |" + (" llama.cpp prefill | ratio |" if has_cpp else "")
        sep += "---|" + ("---|---|" if has_cpp else "")
    print(head)
    print(sep)
    for row in result["rows"]:
        if row["sampling"] != "greedy":
            continue
        sampled = next((r for r in result["rows"] if r["precision"] == row["precision"]
                        and r["compile"] == row["compile"] and r["sampling"] != "greedy"),
                       {"tok_s": float("nan")})
        top_p = "-" if sampled["tok_s"] != sampled["tok_s"] else f"{sampled['tok_s']:.1f}"  # nan: not run
        line = (f"| {row['precision']} | {row['kernels']} | "
                f"{'yes' if row['compile'] else 'no'} | {row['tok_s']:.1f} | "
                f"{top_p} | {row['pct_read_bw']:.0f} % |")
        cpp = result["llamacpp"].get(row["precision"]) if has_cpp else None
        if has_cpp and cpp is None:  # fp8: no llama.cpp counterpart
            line += " - | - |"
        elif has_cpp:
            line += f" {cpp['tok_s']:.1f} ({cpp['gguf_type']}) | {row['tok_s'] / cpp['tok_s']:.2f}× |"
        if n_pre:
            pre = row.get("prefill_tok_s", float("nan")) if not row["compile"] else float("nan")
            line += f" {pre:.0f} |" if not row["compile"] else " (eager) |"
            if has_cpp:
                cpp_pre = (cpp or {}).get("prefill_tok_s", float("nan"))
                line += (f" {cpp_pre:.0f} | {pre / cpp_pre:.2f}× |" if not row["compile"] else " | |")
        print(line)
