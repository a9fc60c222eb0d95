"""Measuring which kernel serves a layer family on this CPU, for :func:`~llama3.kernels.choose_kernels`.

For a family (attention projections, feed-forward, output projection) and its candidate kernels,
:func:`measure_family` builds each candidate on a random sample weight of the family's shape and
times it through :func:`llama3.kernels.autotune.choose` (one row for decoding, ``PREFILL_ROWS``
rows for a prefill, ``MEASURE_BUDGET_S`` per family, cached per machine), then decides whether a
second weight layout for the prefill pays (``TWO_LAYOUTS_GAIN``).
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

__all__ = ["MEASURE_BUDGET_S", "MIN_MEASURED_DIM", "OUTPUT_SAMPLE_ROWS", "PREFILL_ROWS", "TWO_LAYOUTS_GAIN",
           "Measured", "Tuning", "measure_family", "why_not_measured"]

# Nothing narrower is measured: microseconds are noise (the test shapes; every released Llama 3 is wider).
MIN_MEASURED_DIM = 1024
# What a measurement times: a prefill chunk of this many rows (the many-row regime, short enough
# for the budget), the output projection on at most this many of its rows (a sample of the
# vocabulary; decode only: a prefill computes logits for its last row), and the budget per family.
PREFILL_ROWS = 128
OUTPUT_SAMPLE_ROWS = 16384
MEASURE_BUDGET_S = 0.3
# Two weight layouts for one layer (decode kernel + prefill kernel) only when the prefill winner is
# at least this much faster than the decode winner at prefill; otherwise the decode winner does both.
TWO_LAYOUTS_GAIN = 1.25


@dataclass(frozen=True)
class Tuning:
    """How :func:`~llama3.kernels.choose_kernels` measures: time budget per layer family, the
    cache of measured choices (None: :class:`~llama3.kernels.autotune.KernelCache` at its default
    path), and the clock and machine fingerprint (tests stub them). ``enabled=False``: never
    measure (the rule of :func:`~llama3.kernels.decide` instead)."""

    budget_s: float = MEASURE_BUDGET_S
    cache: autotune.KernelCache | None = None
    timer: Callable[[], float] = time.perf_counter
    fingerprint: Mapping[str, str] | None = None
    enabled: bool = True


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


def _sample_shape(family: str, args: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the family's shape, the shape measured): wq, w1, and at most OUTPUT_SAMPLE_ROWS of output."""
    shape = {"attention": (args.dim, args.dim), "feed-forward": (args.ffn_hidden_dim, args.dim),
             "output": (args.vocab_size, args.dim)}[family]
    return shape, (min(shape[0], OUTPUT_SAMPLE_ROWS) if family == "output" else shape[0], shape[1])


@torch.no_grad()
def measure_family(family: str, pool: list[type[LinearKernel]], args: Any, dtype: torch.dtype, tuning: Tuning,
                   forced: Mapping[str, type[LinearKernel]], settings: Mapping[str, Any] | None = None
                   ) -> Measured:
    """The kernel of ``family`` (``"attention"``, ``"feed-forward"``, ``"output"``) among ``pool``
    by measurement; ``forced``: phase -> kernel kept as given (the other phase measured);
    ``settings``: the candidates' ``from_float`` settings (int4's group size; part of the cache key)."""
    settings = dict(settings or {})
    (out_f, in_f), (rows, _) = _sample_shape(family, args)
    phases = tuple(p for p in (("decode",) if family == "output" else autotune.PHASES) if p not in forced)
    weight: list[torch.Tensor] = []

    def factory(kernel: type[LinearKernel]) -> autotune.Candidate:
        def build() -> autotune.Product:
            if not weight:  # one random sample weight per family, shared by the candidates
                weight.append(torch.randn(rows, in_f, generator=torch.Generator().manual_seed(0))
                              .mul_(0.02).to(dtype))
            with torch.device("meta"):
                layer = ColumnParallelLinear(in_f, rows)
            layer.weight = nn.Parameter(weight[0], requires_grad=False)
            swapped = swap_linear(layer, kernel, **settings)
            return lambda x: kernel.local_product(swapped, x)
        return build

    fingerprint = tuning.fingerprint
    if settings:  # another group size is another measurement
        fingerprint = {**(fingerprint if fingerprint is not None else autotune.machine_fingerprint()),
                       **{f"setting {k}": str(v) for k, v in sorted(settings.items())}}
    picked = autotune.choose({k.name: factory(k) for k in pool}, out_f, in_f, dtype, family=family,
                             prefill_rows=PREFILL_ROWS, budget_s=tuning.budget_s, override="",
                             cache=tuning.cache, timer=tuning.timer, fingerprint=fingerprint,
                             phases=phases or ("decode",), log=False)
    by_name = {k.name: k for k in pool}
    decode = forced.get("decode") or by_name[picked.decode]
    prefill = forced.get("prefill") or by_name[picked.prefill]
    seconds = picked.seconds
    reason = f"{family} measured{' (cached)' if picked.source == 'cache' else ''}: " + _rates(
        seconds, out_f if family != "output" else rows, in_f)
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


def _rates(seconds: Mapping[str, Mapping[str, float]], out_f: int, in_f: int) -> str:
    """"decode fbgemm-fp16 3.1, torch 1.2 G weights/s; prefill torch 950, ... GFLOP/s"."""
    parts = []
    for phase, unit, work in (("decode", "G weights/s", out_f * in_f),
                              ("prefill", "GFLOP/s", 2 * PREFILL_ROWS * out_f * in_f)):
        timed = sorted((t[phase], name) for name, t in seconds.items() if phase in t)
        if timed:
            parts.append(f"{phase} " + ", ".join(f"{name} {work / t / 1e9:.3g}" for t, name in timed)
                         + f" {unit}")
    return "; ".join(parts) if parts else "no timing (forced)"
