"""Choose a linear-layer kernel by measuring the candidates on this machine, and remember the result.

Which kernel computes ``y = x Wᵀ`` fastest depends on the CPU (AVX2 only, AVX-512, bfloat16 or
int8 matrix units), on torch's build, on the threads and on the phase: one row while decoding
(bound by how fast the weight streams), many rows in a prefill (bound by arithmetic). Measured on
two CPU classes, the fastest one-row kernel and the fastest many-row kernel differ, and a rule read
from CPU flags picked the wrong one on the next CPU class. So nothing here looks at flags:

* :func:`choose` builds each candidate for a layer's shape, times them interleaved, round by round
  (another process's burst then slows one round, not one candidate), for one row and for a prefill
  chunk, within a time budget, and returns the fastest per phase with the median time of each;
* the result is cached per machine in a small JSON file (:class:`KernelCache`), keyed by the CPU
  model and flags, torch's version and CPU capability, the shape, dtype, threads and the candidate
  names, so a second build is instant and a new CPU or torch measures again;
* ``LLAMA3_KERNELS`` (or ``override=``) forces a choice: ``"fbgemm-fp16"`` for both phases and
  every layer family, ``"decode=w8a8,prefill=torch"`` per phase, ``"output:decode=torch"`` for one
  layer family. A forced name that is not a candidate is an error that lists the candidates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LlamaError

__all__ = ["PHASES", "Choice", "KernelCache", "KernelOverrideError", "choose", "default_cache_path",
           "machine_fingerprint", "parse_override"]

logger = logging.getLogger(__name__)

PHASES = ("decode", "prefill")
ENV = "LLAMA3_KERNELS"
_CACHE_VERSION = 1

Product = Callable[[torch.Tensor], torch.Tensor]
Candidate = Callable[[], Product]
"""Builds one kernel for the layer being tuned (quantizes / packs a weight) and returns its
product ``x [rows, in] -> [rows, out]``; called once per :func:`choose`."""


class KernelOverrideError(LlamaError, ValueError):
    """``LLAMA3_KERNELS`` / ``override=`` names a kernel that is not a candidate, or is malformed."""


def machine_fingerprint() -> dict[str, str]:
    """What a measurement depends on besides the shape: CPU model and flags, torch and its ISA level."""
    model, flags = "", ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Processor", "cpu model")) and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    return {"cpu": model or platform.processor() or platform.machine(), "flags": flags,
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/llama3/kernels.json``, else ``~/.cache/llama3/kernels.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama3" / "kernels.json"


class KernelCache:
    """Measured choices in one JSON file: ``{"version": 1, "entries": {key: choice}}``.

    A file that cannot be read or parsed is ignored (with a log line) and rewritten on the next
    store; writes go to a temporary file renamed over the old one, so a crash or a concurrent
    build never leaves half a file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()

    def load(self) -> dict[str, Any]:
        """All entries (empty when the file is missing, unreadable or not this format)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("ignoring the kernel cache %s (%s); it will be measured again", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(
                data.get("entries"), dict):
            logger.warning("ignoring the kernel cache %s (not a version-%d cache file)", self.path,
                           _CACHE_VERSION)
            return {}
        return data["entries"]

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``, if any."""
        entry = self.load().get(key)
        return entry if isinstance(entry, dict) else None

    def store(self, key: str, entry: dict[str, Any]) -> None:
        """Add or replace one entry (atomically); an unwritable cache only logs."""
        entries = self.load()
        entries[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernels-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning("could not write the kernel cache %s (%s); choices will be measured again",
                           self.path, e)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


def parse_override(text: str | None, family: str = "") -> dict[str, str]:
    """The phases ``text`` forces for ``family``: ``{"decode": name, "prefill": name}`` or a part.

    Entries are comma-separated, each ``[family:][phase=]name``; an entry for a named family beats
    one for every family."""
    forced: dict[str, str] = {}
    specific: dict[str, str] = {}
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        scope, _, rest = entry.rpartition(":")
        if scope and scope != family:
            continue
        phase, _, name = rest.rpartition("=")
        if phase and phase not in PHASES or not name:
            raise KernelOverrideError(
                f"cannot read {ENV} entry {entry!r}: write NAME, PHASE=NAME or FAMILY:PHASE=NAME, with "
                f"PHASE one of {', '.join(PHASES)} (e.g. {ENV}=decode=fbgemm-fp16,prefill=torch)")
        target = specific if scope else forced
        for p in [phase] if phase else PHASES:
            target[p] = name
    return {**forced, **specific}


@dataclass(frozen=True)
class Choice:
    """The kernel for each phase of one layer family, and how it was decided."""

    decode: str
    prefill: str
    # candidate -> phase -> median seconds per call (only what was measured, maybe from the cache)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "measured"  # "measured", "cache" or "forced" (partly forced: "forced+measured")

    def describe(self, family: str = "") -> str:
        """The log line: what was chosen and the measured time of each candidate."""
        parts = []
        for phase in PHASES:
            times = ", ".join(f"{name} {t[phase] * 1e3:.3g} ms" for name, t in
                              sorted(self.seconds.items(), key=lambda kv: kv[1].get(phase, float("inf")))
                              if phase in t)
            parts.append(f"{phase}: {getattr(self, phase)}" + (f" ({times})" if times else ""))
        return f"{family + ' ' if family else ''}kernels [{self.source}] " + "; ".join(parts)


def _cache_key(fingerprint: Mapping[str, str], out_features: int, in_features: int, dtype: torch.dtype,
               threads: int, prefill_rows: int, names: list[str], phases: tuple[str, ...]) -> str:
    return json.dumps({**fingerprint, "shape": [out_features, in_features], "dtype": str(dtype),
                       "threads": threads, "prefill_rows": prefill_rows, "candidates": sorted(names),
                       "phases": list(phases)}, sort_keys=True)


def _measure(products: Mapping[str, Product], inputs: Mapping[str, torch.Tensor], budget_s: float,
             timer: Callable[[], float], min_rounds: int = 3,
             evict: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Median seconds per call of each product for each phase's input, rounds interleaved;
    ``evict`` (untimed) starts each round."""
    times: dict[str, dict[str, list[float]]] = {n: {p: [] for p in inputs} for n in products}
    for product in products.values():  # warm-up: first-call allocations, oneDNN primitive creation
        for x in inputs.values():
            product(x)
    start = timer()
    rounds = 0
    while rounds < min_rounds or timer() - start < budget_s:
        if evict is not None:
            evict()
        for name, product in products.items():
            for phase, x in inputs.items():
                t0 = timer()
                product(x)
                times[name][phase].append(timer() - t0)
        rounds += 1
        if rounds >= 50:
            break
    return {n: {p: statistics.median(ts) for p, ts in by_phase.items()} for n, by_phase in times.items()}


def choose(candidates: Mapping[str, Candidate], out_features: int, in_features: int,
           dtype: torch.dtype, *, family: str = "", threads: int | None = None, prefill_rows: int = 512,
           budget_s: float = 0.5, override: str | None = None, cache: KernelCache | None = None,
           timer: Callable[[], float] = time.perf_counter,
           fingerprint: Mapping[str, str] | None = None, phases: tuple[str, ...] = PHASES,
           log: bool = True, evict: Callable[[], None] | None = None) -> Choice:
    """The fastest of ``candidates`` for a ``[out_features, in_features]`` layer in ``dtype``, for one
    row (decode) and for ``prefill_rows`` rows (prefill), measured on this machine.

    ``override`` (default: the ``LLAMA3_KERNELS`` environment variable) forces phases (see
    :func:`parse_override`); ``cache`` (default: :class:`KernelCache` at its default path; pass
    ``KernelCache(os.devnull)``-like paths to disable) remembers measured choices; ``timer`` and
    ``fingerprint`` are for tests. ``phases``: the phases to time (a layer that never sees a
    prefill, such as the output projection, times ``("decode",)`` and takes the decode winner for
    both). ``evict``: called, untimed, at the start of each round of timing (to empty the CPU's
    caches, so that a product reads its weight from memory as it would in a model too large for
    them). Logs the choice and each candidate's time unless ``log`` is False."""
    if not candidates:
        raise ValueError("choose() needs at least one candidate kernel")
    names = list(candidates)
    forced = parse_override(os.environ.get(ENV) if override is None else override, family)
    for phase, name in forced.items():
        if name not in candidates:
            raise KernelOverrideError(
                f"{ENV}/override asks for kernel {name!r} ({phase}{' of ' + family if family else ''}), "
                f"which cannot serve this layer here; candidates: {', '.join(names)}")
    threads = threads or torch.get_num_threads()
    cache = cache if cache is not None else KernelCache()
    key = _cache_key(fingerprint if fingerprint is not None else machine_fingerprint(), out_features,
                     in_features, dtype, threads, prefill_rows if "prefill" in phases else 0, names, phases)
    open_phases = [p for p in PHASES if p not in forced]
    if not open_phases:
        choice = Choice(forced["decode"], forced["prefill"], {}, "forced")
    elif len(names) == 1:
        choice = Choice(names[0], names[0], {}, "only candidate")
    else:
        entry = cache.get(key)
        if entry is not None and all(isinstance(entry.get(p), str) and entry[p] in candidates
                                     for p in PHASES):
            seconds, source = entry.get("seconds", {}), "cache"
        else:
            generator = torch.Generator().manual_seed(0)
            rows = {"decode": 1, "prefill": prefill_rows}
            inputs = {p: torch.randn(rows[p], in_features, generator=generator).to(dtype) for p in phases}
            products = {name: factory() for name, factory in candidates.items()}
            seconds = _measure(products, inputs, budget_s, timer, evict=evict)
            del products
            entry = {p: min(names, key=lambda n, p=p: seconds[n][p]) for p in phases}
            entry.update({p: entry[phases[0]] for p in PHASES if p not in entry})
            entry["seconds"] = seconds
            cache.store(key, entry)
            source = "measured"
        picked = {p: forced.get(p, entry[p]) for p in PHASES}
        choice = Choice(picked["decode"], picked["prefill"], seconds,
                        ("forced+" if forced else "") + source)
    where = f"[{out_features}x{in_features} {str(dtype).removeprefix('torch.')}, {threads} threads]"
    if log:
        logger.info("%s", choice.describe(f"{family} {where}".strip()))
    return choice
