"""Measuring which kernel serves a layer family on this CPU, for :func:`~llama3.kernels.choose_kernels`.

For a family (attention projections, feed-forward, output projection) and its candidate kernels,
:func:`measure_family` builds each candidate on random weights of the family's layers, one of each
as a transformer block holds them (attention wq, wk, wv, wo; feed-forward w1, w3, w2; at most
``OUTPUT_SAMPLE_ROWS`` rows of the output projection), and times one pass through them in the
order a forward pass runs them, through :func:`llama3.kernels.autotune.choose` (one row for
decoding, ``PREFILL_ROWS`` rows for a prefill, ``MEASURE_BUDGET_S`` per family, cached per
machine); then it decides whether a second weight layout for the prefill pays (``TWO_LAYOUTS_GAIN``).

Why a pass and not one sample layer timed again and again: on the AMX Xeon (2 cores) w8a8's
``torch._int_mm`` kernel took 1.10 ms per call on the feed-forward's ``w1`` repeated alone against
1.76 ms for oneDNN's, yet through w1, w3, w2 in turn 3.64 ms against oneDNN's 2.64, and the full 1B
model decoded 10.5 tok/s with the first and 12.2 with the second: a kernel's speed on one repeated
shape does not carry over to the sequence a decoding step runs.

Why each round of timing starts by reading a buffer twice the size of the CPU's last-level cache
(:func:`last_level_cache_bytes`): a decoding step of any model this measures (width >= 1024: 1B
parameters and more) streams its weights from memory, but one block's layers (21 MB in Llama 3.2
1B's attention, 100 MB in its feed-forward) stay in a large last-level cache (300 MiB on the AMX
Xeon) when timed again and again, and a kernel's rate from the cache does not rank the kernels as
they run from memory. Measured on the AMX Xeon (2 threads, bfloat16 attention of Llama 3.2 1B,
G weights/s): FBGEMM 17.9, torch.mv 17.4, torch 13.2 from the cache; 8.9, 11.6, 9.7 from memory.
The candidates that share a float weight get a copy each, so one does not read the other's from
the cache.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed import ColumnParallelLinear, model_parallel_world_size
from . import autotune
from .base import LinearKernel, swap_linear
from .phases import PhaseKernel, phase_kernel, shares_layout

__all__ = ["MAX_MEASURED_WEIGHTS", "MEASURE_BUDGET_S", "MIN_MEASURED_DIM", "OUTPUT_SAMPLE_ROWS",
           "PREFILL_ROWS", "TWO_LAYOUTS_GAIN", "Measured", "Tuning", "flush_bytes", "last_level_cache_bytes",
           "measure_family", "why_not_measured"]

# Nothing narrower is measured: microseconds are noise (the test shapes; every released Llama 3 is wider).
MIN_MEASURED_DIM = 1024
# What a measurement times: a prefill chunk of this many rows (the many-row regime, short enough
# for the budget), the output projection on at most this many of its rows (a sample of the
# vocabulary; decode only: a prefill computes logits for its last row), and the budget per family.
PREFILL_ROWS = 128
OUTPUT_SAMPLE_ROWS = 16384
MEASURE_BUDGET_S = 0.3
# The most weights one family's measurement builds (per candidate layout): 384 MB in bfloat16.
MAX_MEASURED_WEIGHTS = 192 * 2**20
# The buffer read before each round of timing: twice the last-level cache, within these bounds
# (a cache size that cannot be read: the upper bound).
FLUSH_BYTES_BOUNDS = (64 * 2**20, 1 * 2**30)
# Two weight layouts for one layer (decode kernel + prefill kernel) only when the prefill winner is
# at least this much faster than the decode winner at prefill; otherwise the decode winner does both.
TWO_LAYOUTS_GAIN = 1.25


@dataclass(frozen=True)
class Tuning:
    """How :func:`~llama3.kernels.choose_kernels` measures: time budget per layer family, the
    cache of measured choices (None: :class:`~llama3.kernels.autotune.KernelCache` at its default
    path), the clock and machine fingerprint (tests stub them), and the bytes read to empty the
    CPU's caches before each round (None: :func:`flush_bytes`; 0: none). ``enabled=False``: never
    measure (the rule of :func:`~llama3.kernels.decide` instead)."""

    budget_s: float = MEASURE_BUDGET_S
    cache: autotune.KernelCache | None = None
    timer: Callable[[], float] = time.perf_counter
    fingerprint: Mapping[str, str] | None = None
    enabled: bool = True
    flush_bytes: int | None = None


@dataclass(frozen=True)
class Measured:
    """A measured family: its kernel (two-phase or not), the reason for the log line, and the
    one-layout kernel to fall back to when two layouts do not fit (None: one layout already)."""

    kernel: type[LinearKernel]
    reason: str
    one_layout: type[LinearKernel] | None


def why_not_measured(args: Any, device: torch.device, tuning: Tuning) -> str:
    """Why kernels are not measured for this model here (empty: they are)."""
    if not tuning.enabled:
        return "measuring is off (Tuning(enabled=False))"
    if device.type != "cpu":
        return f"on {device.type} the rule decides"
    if args.dim < MIN_MEASURED_DIM:
        return f"width {args.dim} < {MIN_MEASURED_DIM}: a test shape"
    if model_parallel_world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "model-parallel ranks would measure each other's load"
    return ""


def last_level_cache_bytes(sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of the largest data cache level of the CPU that runs this (Linux's sysfs), or None."""
    levels: dict[int, int] = {}
    try:
        entries = sorted(os.listdir(sysfs))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(sysfs, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(sysfs, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(sysfs, entry, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if scale > 1 else text
        if kind != "Instruction" and digits.isdigit():
            levels[level] = max(levels.get(level, 0), int(digits) * scale)
    return levels[max(levels)] if levels else None


def flush_bytes() -> int:
    """How much to read to empty the caches: twice the last-level cache, within ``FLUSH_BYTES_BOUNDS``."""
    low, high = FLUSH_BYTES_BOUNDS
    cache = last_level_cache_bytes()
    return high if cache is None else min(high, max(low, 2 * cache))


def _cache_flush(nbytes: int) -> Callable[[], None] | None:
    """A function that reads ``nbytes`` of memory of its own, which leaves no weight in the caches
    (the memory is taken on the first call: a choice found in the kernel cache takes none)."""
    if nbytes <= 0:
        return None
    buffer: list[torch.Tensor] = []

    def flush() -> None:
        if not buffer:
            buffer.append(torch.ones(max(1, nbytes // 4), dtype=torch.float32))
        buffer[0].sum()
    return flush


def _family_shapes(family: str, args: Any) -> list[tuple[int, int]]:
    """The (out, in) shape of each layer a measurement passes through, in forward order: one block's
    wq, wk, wv, wo or w1, w3, w2, or at most OUTPUT_SAMPLE_ROWS rows of the output projection; the
    rows of a family larger than MAX_MEASURED_WEIGHTS cut in proportion (70B, 405B)."""
    kv = (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads)
    shapes = {"attention": [(args.dim, args.dim), (kv, args.dim), (kv, args.dim), (args.dim, args.dim)],
              "feed-forward": [(args.ffn_hidden_dim, args.dim)] * 2 + [(args.dim, args.ffn_hidden_dim)],
              "output": [(min(args.vocab_size, OUTPUT_SAMPLE_ROWS), args.dim)]}[family]
    share = MAX_MEASURED_WEIGHTS / sum(o * i for o, i in shapes)
    if share < 1:  # rows in multiples of 64, which every kernel's packing takes
        shapes = [(max(64, int(o * share) // 64 * 64), i) for o, i in shapes]
    return shapes


@torch.no_grad()
def measure_family(family: str, pool: list[type[LinearKernel]], args: Any, dtype: torch.dtype, tuning: Tuning,
                   forced: Mapping[str, type[LinearKernel]], settings: Mapping[str, Any] | None = None
                   ) -> Measured:
    """The kernel of ``family`` (``"attention"``, ``"feed-forward"``, ``"output"``) among ``pool``
    by measurement; ``forced``: phase -> kernel kept as given (the other phase measured);
    ``settings``: the candidates' ``from_float`` settings (int4's group size; part of the cache key)."""
    settings = dict(settings or {})
    shapes = _family_shapes(family, args)
    # The first layer's real shape names the measurement in the cache (the output projection's
    # whole vocabulary, though a sample of its rows is timed).
    out_f, in_f = (args.vocab_size, args.dim) if family == "output" else shapes[0]
    phases = tuple(p for p in (("decode",) if family == "output" else autotune.PHASES) if p not in forced)
    weights: list[torch.Tensor] = []

    def factory(kernel: type[LinearKernel]) -> autotune.Candidate:
        def build() -> autotune.Product:
            if not weights:  # random weights, one per layer, shared by the candidates
                generator = torch.Generator().manual_seed(0)
                weights.extend(torch.randn(shape, generator=generator).mul_(0.02).to(dtype)
                               for shape in shapes)
            layers = []
            for w in weights:
                with torch.device("meta"):
                    layer = ColumnParallelLinear(w.shape[1], w.shape[0])
                # A copy each for the kernels computing from the float weight: one must not find
                # the weight the other just read in the cache.
                layer.weight = nn.Parameter(w.clone() if kernel.shares_float_weight else w,
                                            requires_grad=False)
                layers.append((swap_linear(layer, kernel, **settings), w.shape[1]))
            inputs: dict[tuple[int, int], torch.Tensor] = {}

            def one_pass(x: torch.Tensor) -> None:
                for layer, width in layers:
                    # A layer wider than the family's input (w2) takes an input of its own width,
                    # made on the first call of each row count (the untimed warm-up).
                    xi = x
                    if width != x.shape[-1]:
                        key = (x.shape[0], width)
                        if key not in inputs:
                            inputs[key] = torch.randn(key).to(x.dtype)
                        xi = inputs[key]
                    kernel.local_product(layer, xi)
            return one_pass
        return build

    # The layers passed through are part of the cache key, and so is the method: a choice cached
    # from one sample layer timed on its own (which misled, see the module doc) is not reused.
    machine = tuning.fingerprint if tuning.fingerprint is not None else autotune.machine_fingerprint()
    between_rounds = flush_bytes() if tuning.flush_bytes is None else tuning.flush_bytes
    fingerprint = {**machine, "measured": "one pass through " + ", ".join(f"{o}x{i}" for o, i in shapes)
                   + (", weights from memory" if between_rounds > 0 else ", weights from the cache")}
    if settings:  # another group size is another measurement
        fingerprint.update({f"setting {k}": str(v) for k, v in sorted(settings.items())})
    flush = _cache_flush(between_rounds)
    picked = autotune.choose({k.name: factory(k) for k in pool}, out_f, in_f, dtype, family=family,
                             prefill_rows=PREFILL_ROWS, budget_s=tuning.budget_s, override="",
                             cache=tuning.cache, timer=tuning.timer, fingerprint=fingerprint,
                             phases=phases or ("decode",), log=False, evict=flush)
    by_name = {k.name: k for k in pool}
    decode = forced.get("decode") or by_name[picked.decode]
    prefill = forced.get("prefill") or by_name[picked.prefill]
    seconds = picked.seconds
    reason = f"{family} measured{' (cached)' if picked.source == 'cache' else ''}: " + _rates(
        seconds, sum(o * i for o, i in shapes))
    if forced:
        reason += f", {', '.join(f'{p}={k.name}' for p, k in forced.items())} forced"
    elif prefill is not decode:
        slow, fast = seconds[decode.name].get("prefill"), seconds[prefill.name].get("prefill")
        gain = 1.0 if shares_layout(decode, prefill) else TWO_LAYOUTS_GAIN  # one layout: no cost
        if slow is None or fast is None or slow <= gain * fast:
            prefill = decode  # a second layout would not pay
    kernel = phase_kernel(decode, prefill)
    two_layouts = issubclass(kernel, PhaseKernel) and not (
        all(k.shares_float_weight for k in kernel.kernels) or shares_layout(*kernel.kernels))
    return Measured(kernel, reason, decode if two_layouts else None)


def _rates(seconds: Mapping[str, Mapping[str, float]], weights: int) -> str:
    """"decode fbgemm-fp16 3.1, torch 1.2 G weights/s; prefill torch 950, ... GFLOP/s"."""
    parts = []
    for phase, unit, work in (("decode", "G weights/s", weights),
                              ("prefill", "GFLOP/s", 2 * PREFILL_ROWS * weights)):
        timed = sorted((t[phase], name) for name, t in seconds.items() if phase in t)
        if timed:
            parts.append(f"{phase} " + ", ".join(f"{name} {work / t / 1e9:.3g}" for t, name in timed)
                         + f" {unit}")
    return "; ".join(parts) if parts else "no timing (forced)"
